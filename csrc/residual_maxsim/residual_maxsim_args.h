// ResidualMaxsimArgs: the parameter struct of the residual_maxsim bindings, shared by the CPU
// (residual_maxsim_cpu.cpp) and CUDA (residual_maxsim_cuda.cu) kernels. Plain data, no libtorch: data pointers as
// integers, sizes in elements; every tensor is contiguous (reatt_kernels/ops/residual_maxsim.py makes them so).
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "common.h"

namespace reatt {

struct ResidualMaxsimArgs {
  uintptr_t q = 0;               // fp32 [Bq, Lq, D]
  uintptr_t q_mask = 0;          // bool [Bq, Lq]
  uintptr_t centroids = 0;       // fp32 [C, D]
  uintptr_t weights = 0;         // fp32 [D, 2^nbits]
  uintptr_t codes = 0;           // int32 [T]: each token's centroid
  uintptr_t packed = 0;          // uint8 [T, D * nbits / 8]: each token's residual buckets, LSB first
  uintptr_t offsets = 0;         // int64 [Nd + 1]: document d holds tokens offsets[d] .. offsets[d + 1] - 1
  uintptr_t cand = 0;            // int64 [Bq, Nc]: candidate documents (-1: padding)
  uintptr_t out = 0;             // fp32 [Bq, Nc]
  int64_t Bq = 0, Lq = 0, D = 0, C = 0, Nd = 0, Nc = 0;
  int nbits = 0;                 // 1, 2, 4 or 8
  // CPU: the (query, candidate) pairs grouped by document, so each document is decoded once per call.
  uintptr_t order = 0;           // int64 [Bq * Nc]: flat pair indices sorted by document
  uintptr_t group_off = 0;       // int64 [n_groups + 1]: bounds of each document's run in `order`
  int64_t n_groups = 0;
  uintptr_t stream = 0;          // CUDA: cudaStream_t
  // CPU: the centroid score table q . centroids^T, fp32 [Bq, C, LP] (LP >= Lq), read instead of the centroids.
  uintptr_t table = 0;
  int64_t LP = 0;
  int nthreads = 1;              // CPU: OpenMP threads (torch.get_num_threads())
  std::string isa = "auto";       // CPU: instruction-set path, csrc/cpu_isa.h (REATT_CPU_ISA)
};

// Registered once per module (the CPU and CUDA bindings both call this; module_local: _C and _C_emu each own a copy).
inline void bind_residual_maxsim_args(pybind11::module_& m) {
  namespace py = pybind11;
  if (py::hasattr(m, "ResidualMaxsimArgs")) return;
  py::class_<ResidualMaxsimArgs>(m, "ResidualMaxsimArgs", py::module_local(),
                                 "Parameters of residual_maxsim_fwd_* (csrc/residual_maxsim/residual_maxsim_args.h)")
      .def(py::init<>())
      .def_readwrite("q", &ResidualMaxsimArgs::q)
      .def_readwrite("q_mask", &ResidualMaxsimArgs::q_mask)
      .def_readwrite("centroids", &ResidualMaxsimArgs::centroids)
      .def_readwrite("weights", &ResidualMaxsimArgs::weights)
      .def_readwrite("codes", &ResidualMaxsimArgs::codes)
      .def_readwrite("packed", &ResidualMaxsimArgs::packed)
      .def_readwrite("offsets", &ResidualMaxsimArgs::offsets)
      .def_readwrite("cand", &ResidualMaxsimArgs::cand)
      .def_readwrite("out", &ResidualMaxsimArgs::out)
      .def_readwrite("Bq", &ResidualMaxsimArgs::Bq)
      .def_readwrite("Lq", &ResidualMaxsimArgs::Lq)
      .def_readwrite("D", &ResidualMaxsimArgs::D)
      .def_readwrite("C", &ResidualMaxsimArgs::C)
      .def_readwrite("Nd", &ResidualMaxsimArgs::Nd)
      .def_readwrite("Nc", &ResidualMaxsimArgs::Nc)
      .def_readwrite("nbits", &ResidualMaxsimArgs::nbits)
      .def_readwrite("order", &ResidualMaxsimArgs::order)
      .def_readwrite("group_off", &ResidualMaxsimArgs::group_off)
      .def_readwrite("n_groups", &ResidualMaxsimArgs::n_groups)
      .def_readwrite("stream", &ResidualMaxsimArgs::stream)
      .def_readwrite("table", &ResidualMaxsimArgs::table)
      .def_readwrite("LP", &ResidualMaxsimArgs::LP)
      .def_readwrite("nthreads", &ResidualMaxsimArgs::nthreads)
      .def_readwrite("isa", &ResidualMaxsimArgs::isa);
}

}  // namespace reatt
