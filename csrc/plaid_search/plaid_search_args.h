// PlaidSearchArgs: the parameter struct of plaid_search_cpu (plaid_search_cpu.cpp). Plain data, no libtorch: data
// pointers as integers, sizes in elements; every tensor contiguous (reatt_kernels/cpu/plaid_search.py makes them so).
// Semantics: reatt_kernels/reference/plaid_search.py.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "common.h"

namespace reatt {

struct PlaidSearchArgs {
  uintptr_t table = 0;      // fp32 [Bq, C, LP]: q . centroids^T, LP a multiple of 16, columns >= n_valid[a] zero
  uintptr_t q = 0;          // fp32 [Bq, LP, D]: each query's valid tokens first (rows >= n_valid[a] are not read)
  uintptr_t n_valid = 0;    // int32 [Bq]
  uintptr_t weights = 0;    // fp32 [D, 2^nbits]: the residual bucket values per dimension
  uintptr_t codes = 0;      // [T] centroid id per token: int32 (code_dtype kInt32) or uint16 (kUInt16)
  int code_dtype = kInt32;
  uintptr_t packed = 0;     // uint8 [T, D * nbits / 8]: residual buckets, LSB first
  uintptr_t offsets = 0;    // int64 [Nd + 1]
  uintptr_t live = 0;       // uint8 [Nd]: 0 = never returned (deleted), or 0 = every document is live
  uintptr_t allow = 0;      // uint8 [Bq, Nd]: per-query allow-list (subset), or 0 = no restriction
  uintptr_t cand = 0;       // int64 [Bq, Nc]: candidate documents (inverted-list probe, -1 = padding), or 0 = all
  int64_t Nc = 0;
  uintptr_t out_scores = 0; // fp32 [Bq, k]
  uintptr_t out_docs = 0;   // int64 [Bq, k]: document rows (not user ids), -1 where fewer than k qualify
  uintptr_t stage_s = 0;    // fp64 [3] or 0: seconds in centroid interaction, selection, rerank (whole batch)
  int64_t Bq = 0, LP = 0, D = 0, C = 0, Nd = 0, T = 0;
  int nbits = 0;
  int64_t ncand = 0;        // documents reranked per query (the M best by centroid interaction)
  int64_t k = 0;
  int nthreads = 1;
  std::string isa = "auto"; // instruction-set path, csrc/cpu_isa.h (REATT_CPU_ISA)
};

inline void bind_plaid_search_args(pybind11::module_& m) {
  namespace py = pybind11;
  if (py::hasattr(m, "PlaidSearchArgs")) return;
  py::class_<PlaidSearchArgs>(m, "PlaidSearchArgs", py::module_local(),
                              "Parameters of plaid_search_cpu (csrc/plaid_search/plaid_search_args.h)")
      .def(py::init<>())
      .def_readwrite("table", &PlaidSearchArgs::table)
      .def_readwrite("q", &PlaidSearchArgs::q)
      .def_readwrite("n_valid", &PlaidSearchArgs::n_valid)
      .def_readwrite("weights", &PlaidSearchArgs::weights)
      .def_readwrite("codes", &PlaidSearchArgs::codes)
      .def_readwrite("code_dtype", &PlaidSearchArgs::code_dtype)
      .def_readwrite("packed", &PlaidSearchArgs::packed)
      .def_readwrite("offsets", &PlaidSearchArgs::offsets)
      .def_readwrite("live", &PlaidSearchArgs::live)
      .def_readwrite("allow", &PlaidSearchArgs::allow)
      .def_readwrite("cand", &PlaidSearchArgs::cand)
      .def_readwrite("Nc", &PlaidSearchArgs::Nc)
      .def_readwrite("out_scores", &PlaidSearchArgs::out_scores)
      .def_readwrite("out_docs", &PlaidSearchArgs::out_docs)
      .def_readwrite("stage_s", &PlaidSearchArgs::stage_s)
      .def_readwrite("Bq", &PlaidSearchArgs::Bq)
      .def_readwrite("LP", &PlaidSearchArgs::LP)
      .def_readwrite("D", &PlaidSearchArgs::D)
      .def_readwrite("C", &PlaidSearchArgs::C)
      .def_readwrite("Nd", &PlaidSearchArgs::Nd)
      .def_readwrite("T", &PlaidSearchArgs::T)
      .def_readwrite("nbits", &PlaidSearchArgs::nbits)
      .def_readwrite("ncand", &PlaidSearchArgs::ncand)
      .def_readwrite("k", &PlaidSearchArgs::k)
      .def_readwrite("nthreads", &PlaidSearchArgs::nthreads)
      .def_readwrite("isa", &PlaidSearchArgs::isa);
}

}  // namespace reatt
