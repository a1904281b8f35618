// pybind11 bindings of the MaxSim CUDA entry points (reatt_kernels._C, and reatt_kernels._C_emu under emulation). Each
// takes one MaxsimArgs (maxsim_args.h); maxsim_plan_cuda returns the plan the entry points will follow on the current
// device, so the launcher sizes its workspaces from it and the tests can check it.
#include <pybind11/pybind11.h>

#include "maxsim/maxsim_cuda.cuh"

namespace py = pybind11;

namespace reatt {
namespace {

py::dict maxsim_plan_cuda(const MaxsimArgs& a, bool backward) {
  using namespace maxsim_cuda;
  const DeviceLimits lim = current_device_limits();
  py::dict out;
  out["sm_count"] = lim.sm_count;
  out["smem_optin"] = lim.smem_optin;
  if (backward) {
    check_bwd(a);
    const BwdPlan pl = plan_bwd(a, lim);
    out["n_split"] = pl.n_split;
    out["n_part"] = pl.n_part;
    out["ordered_dd"] = pl.ordered_dd;
    out["jt"] = pl.jt;
    out["dd_smem"] = pl.dd_smem;
  } else {
    check_fwd(a);
    const FwdPlan pl = plan_fwd(a, lim);
    out["WR"] = pl.WR;
    out["DS"] = pl.DS;
    out["QPB"] = pl.QPB;
    out["n_rc"] = pl.n_rc;
    out["KT"] = pl.KT;
    out["vec"] = pl.vec != 0;
    out["bias_smem"] = pl.bias_smem;
    out["docs_per_cta"] = pl.docs_per_cta;
    out["grid"] = py::make_tuple(pl.grid_x, pl.grid_y);
    out["threads"] = 32 * pl.WR * pl.DS;
    out["smem"] = pl.smem;
  }
  return out;
}

const RegisterBindings kRegister([](py::module_& m) {
  bind_maxsim_args(m);
  m.attr("MAXSIM_CUDA_MAX_DIM") = maxsim_cuda::MAX_DIM;
  m.def("maxsim_fwd_cuda", &maxsim_fwd_cuda, py::call_guard<py::gil_scoped_release>(),
        "MaxSim forward on CUDA: writes scores fp32 [Bq, C] and argmax int32 [Bq, C, Lq] (csrc/maxsim/maxsim_cuda.cuh)",
        py::arg("args"));
  m.def("maxsim_bwd_cuda", &maxsim_bwd_cuda, py::call_guard<py::gil_scoped_release>(),
        "MaxSim backward on CUDA through the saved argmax; workspaces as maxsim_plan_cuda(args, backward=True) says",
        py::arg("args"));
  m.def("maxsim_plan_cuda", &maxsim_plan_cuda,
        "The launch plan of maxsim_fwd_cuda (backward=False: tiling, grid, shared memory) or maxsim_bwd_cuda "
        "(backward=True: dq splits, dbias partitions, ordered or atomic dd) for these arguments on the current device",
        py::arg("args"), py::arg("backward") = false);
});

}  // namespace
}  // namespace reatt
