// Bindings of csrc/cpu_isa.h: what the running CPU executes, as every CPU kernel's dispatcher sees it. The tests
// (tests/isa.py), the mutation gate (scripts/mutation/gate.py) and the benchmarks read this, never /proc/cpuinfo, so all
// of them agree with the kernels, REATT_CPU_ISA_CAP included.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "common.h"
#include "cpu_isa.h"

namespace py = pybind11;

namespace reatt {
namespace {

py::dict cpu_isa_info() {
  py::dict d;
  const int best = cpu_isa::best(), det = cpu_isa::detected(), cap = cpu_isa::cap();
  d["best"] = cpu_isa::kNames[best];
  d["detected"] = cpu_isa::kNames[det];
  d["cap"] = cap < cpu_isa::kLevels - 1 ? py::object(py::str(cpu_isa::kNames[cap])) : py::object(py::none());
  py::dict feats;
  for (const auto& f : cpu_isa::kFeatures) feats[f.name] = cpu_isa::cpu_has(f.name);
  d["features"] = feats;
  py::dict missing;  // level -> the instructions it needs that this CPU lacks ("" where it runs)
  py::list levels;
  for (int l = 0; l < cpu_isa::kLevels; ++l) {
    levels.append(cpu_isa::kNames[l]);
    missing[cpu_isa::kNames[l]] = l <= best ? std::string() : cpu_isa::missing(l);
  }
  d["levels"] = levels;
  d["missing"] = missing;
  return d;
}

const RegisterBindings cpu_isa_bindings([](py::module_& m) {
  m.def("cpu_isa_info", &cpu_isa_info,
        "The CPU kernels' instruction-set levels on this machine: {best, detected, cap, features, levels, missing} "
        "(csrc/cpu_isa.h; REATT_CPU_ISA_CAP lowers `best`)");
});

}  // namespace
}  // namespace reatt
