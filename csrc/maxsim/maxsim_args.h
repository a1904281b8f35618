// MaxsimArgs: the one parameter struct of the MaxSim bindings, shared by the CPU (maxsim_cpu.cpp) and CUDA
// (maxsim_cuda_bindings.cu) kernels, so a launcher fills named fields instead of passing 20-28 positional integers.
// Plain data, no libtorch: data pointers as integers (0 = absent), sizes and strides in elements, a dtype code
// (common.h::DType), and the execution context (the CUDA stream handle; the CPU thread count, ISA and segment length).
//
// Layouts (reatt_kernels/reference/maxsim.py is the spec): q [Bq, Lq, D] with q_mask bool [Bq, Lq]; d padded
// [Nd, Ld, D] with an optional d_mask bool [Nd, Ld], or packed [T, D] with int64 d_offsets [Nd + 1] (then Ld = 0,
// sd_b = 0 and sd_l is the row stride); grouped = padded with group_size > 0 (query a owns documents a*n .. a*n+n-1).
// C = group_size or Nd columns.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "common.h"

namespace reatt {

struct MaxsimArgs {
  // ---- inputs (both directions) ----
  int dtype = kFloat32;                           // of q and d: float32, float16 or bfloat16
  uintptr_t q = 0;                                // [Bq, Lq, D]
  int64_t Bq = 0, Lq = 0, D = 0;
  int64_t sq_b = 0, sq_l = 0, sq_d = 1;
  uintptr_t q_mask = 0;                           // bool [Bq, Lq]
  int64_t sqm_b = 0, sqm_l = 1;
  uintptr_t d = 0;                                // padded [Nd, Ld, D] or packed [T, D]
  int64_t Nd = 0, Ld = 0, T = 0;                  // T: rows of a packed d (0 when padded)
  int64_t sd_b = 0, sd_l = 0, sd_d = 1;
  uintptr_t d_mask = 0;                           // bool [Nd, Ld] or 0 (padded only)
  int64_t sdm_b = 0, sdm_l = 1;
  uintptr_t d_offsets = 0;                        // int64 [Nd + 1] (packed) or 0
  uintptr_t pos_bias = 0;                         // fp32 [R] contiguous or 0
  int64_t R = 0;
  int64_t group_size = 0;
  bool mean = false;
  // ---- a prepared corpus (rk.prepare_corpus; CPU, packed layout): written by maxsim_prepare_cpu, read by the forward
  uintptr_t d_screen = 0;                         // bf16 [T, screen_ld] rows of d (zero past D), or 0
  int64_t screen_ld = 0;                          // = D rounded up to 32 (the filter's row stride)
  uintptr_t d_norm = 0;                           // fp32 [Nd]: an upper bound of max_j |d_j| per document
  // ---- forward outputs ----
  uintptr_t scores = 0;                           // fp32 [Bq, C] contiguous
  uintptr_t argmax = 0;                           // int32 [Bq, C, Lq] contiguous (also a backward input)
  // ---- backward ----
  uintptr_t grad = 0;                             // fp32 [Bq, C]
  int64_t sg_b = 0, sg_c = 1;
  uintptr_t nq = 0;                               // CUDA: int32 [Bq] valid tokens per query
  uintptr_t dq = 0;                               // [Bq, Lq, D] contiguous, q's dtype
  uintptr_t dd = 0;                               // d's shape, contiguous, d's dtype (CUDA: ordered dd only)
  uintptr_t dbias = 0;                            // fp32 [R]
  bool deterministic = false;                     // CUDA: dd in a fixed order; the CPU backward always is
  // CUDA workspaces, sized by the plan (maxsim_plan_cuda): dq_ws fp32 [n_split, Bq*Lq, D] when n_split > 1, dd32 fp32
  // [ntok, D] zero-filled when the plan picks the atomic dd, dbias_ws fp32 [n_part, R] zero-filled when R > 0.
  uintptr_t dq_ws = 0, dd32 = 0, dbias_ws = 0;
  // CUDA plan: dd uses fp32 atomics only above this many (query, token) entries per document (maxsim_cuda.cuh says
  // why). -1: the built-in threshold; tests set 0 to run the atomic kernel on small shapes.
  int64_t atomic_min_entries = -1;
  // ---- execution ----
  uintptr_t stream = 0;                           // CUDA: cudaStream_t (0 under emulation)
  int n_threads = 1;                              // CPU: OpenMP threads (the launcher passes torch.get_num_threads())
  std::string isa = "auto";                       // CPU: auto | avx512_bf16 | avx512 | avx2 | scalar
  int64_t seg = 0;                                // CPU: document segment length (0: the default)

  bool packed() const { return d_offsets != 0; }
  int64_t n_cols() const { return group_size ? group_size : Nd; }
};

// Registers MaxsimArgs on `m` once (both the CPU and the CUDA bindings call this; the first one wins). module_local:
// _C and _C_emu each hold their own copy of the type, so both can be imported in one process.
inline void bind_maxsim_args(pybind11::module_& m) {
  namespace py = pybind11;
  if (py::hasattr(m, "MaxsimArgs")) return;
  py::class_<MaxsimArgs>(m, "MaxsimArgs", py::module_local(),
                         "Parameters of the maxsim_* bindings (csrc/maxsim/maxsim_args.h: layouts and units)")
      .def(py::init<>())
      .def_readwrite("dtype", &MaxsimArgs::dtype)
      .def_readwrite("q", &MaxsimArgs::q)
      .def_readwrite("Bq", &MaxsimArgs::Bq)
      .def_readwrite("Lq", &MaxsimArgs::Lq)
      .def_readwrite("D", &MaxsimArgs::D)
      .def_readwrite("sq_b", &MaxsimArgs::sq_b)
      .def_readwrite("sq_l", &MaxsimArgs::sq_l)
      .def_readwrite("sq_d", &MaxsimArgs::sq_d)
      .def_readwrite("q_mask", &MaxsimArgs::q_mask)
      .def_readwrite("sqm_b", &MaxsimArgs::sqm_b)
      .def_readwrite("sqm_l", &MaxsimArgs::sqm_l)
      .def_readwrite("d", &MaxsimArgs::d)
      .def_readwrite("Nd", &MaxsimArgs::Nd)
      .def_readwrite("Ld", &MaxsimArgs::Ld)
      .def_readwrite("T", &MaxsimArgs::T)
      .def_readwrite("sd_b", &MaxsimArgs::sd_b)
      .def_readwrite("sd_l", &MaxsimArgs::sd_l)
      .def_readwrite("sd_d", &MaxsimArgs::sd_d)
      .def_readwrite("d_mask", &MaxsimArgs::d_mask)
      .def_readwrite("sdm_b", &MaxsimArgs::sdm_b)
      .def_readwrite("sdm_l", &MaxsimArgs::sdm_l)
      .def_readwrite("d_offsets", &MaxsimArgs::d_offsets)
      .def_readwrite("pos_bias", &MaxsimArgs::pos_bias)
      .def_readwrite("R", &MaxsimArgs::R)
      .def_readwrite("group_size", &MaxsimArgs::group_size)
      .def_readwrite("mean", &MaxsimArgs::mean)
      .def_readwrite("d_screen", &MaxsimArgs::d_screen)
      .def_readwrite("screen_ld", &MaxsimArgs::screen_ld)
      .def_readwrite("d_norm", &MaxsimArgs::d_norm)
      .def_readwrite("scores", &MaxsimArgs::scores)
      .def_readwrite("argmax", &MaxsimArgs::argmax)
      .def_readwrite("grad", &MaxsimArgs::grad)
      .def_readwrite("sg_b", &MaxsimArgs::sg_b)
      .def_readwrite("sg_c", &MaxsimArgs::sg_c)
      .def_readwrite("nq", &MaxsimArgs::nq)
      .def_readwrite("dq", &MaxsimArgs::dq)
      .def_readwrite("dd", &MaxsimArgs::dd)
      .def_readwrite("dbias", &MaxsimArgs::dbias)
      .def_readwrite("deterministic", &MaxsimArgs::deterministic)
      .def_readwrite("dq_ws", &MaxsimArgs::dq_ws)
      .def_readwrite("dd32", &MaxsimArgs::dd32)
      .def_readwrite("dbias_ws", &MaxsimArgs::dbias_ws)
      .def_readwrite("atomic_min_entries", &MaxsimArgs::atomic_min_entries)
      .def_readwrite("stream", &MaxsimArgs::stream)
      .def_readwrite("n_threads", &MaxsimArgs::n_threads)
      .def_readwrite("isa", &MaxsimArgs::isa)
      .def_readwrite("seg", &MaxsimArgs::seg);
}

}  // namespace reatt
