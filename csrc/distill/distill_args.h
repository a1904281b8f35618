// Parameter structs of the distillation bindings (no libtorch: data pointers as integers, 0 = absent; sizes and strides
// in elements; dtype codes from common.h::DType).
// - ReaderTeacherArgs: shared by reader_teacher_fwd_cpu (distill_cpu.cpp) and reader_teacher_fwd_cuda (distill_cuda.cu).
// - DistillKlArgs: distill_kl_fwd_cuda (the CPU backend's KL is the torch reference, so it has no binding).
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "common.h"

namespace reatt {

struct ReaderTeacherArgs {
  uintptr_t attn = 0;                        // [B, L, H, T, S], any strides
  int dtype = kFloat32;                      // of attn: float32, float16 or bfloat16
  int64_t B = 0, L = 0, H = 0, T = 0, S = 0;
  int64_t sb = 0, sl = 0, sh = 0, st = 0, ss = 1;
  uintptr_t doc = 0;                         // [B, S] contiguous document ids: int32 (CPU) or int16 (CUDA)
  int doc_dtype = kInt32;
  uintptr_t mask = 0;                        // uint8 [B, S] contiguous, or 0 (all tokens count)
  int64_t n_docs = 0;
  bool is_logits = false;                    // attn holds pre-softmax scores (else probabilities)
  uintptr_t out = 0;                         // fp32 [B, n_docs] contiguous
  uintptr_t partial = 0;                     // CUDA: fp32 [B, n_chunks, n_docs] workspace (reader_teacher_plan_cuda)
  uintptr_t stream = 0;                      // CUDA: cudaStream_t
  std::string isa = "auto";                  // CPU: instruction-set path, csrc/cpu_isa.h (REATT_CPU_ISA)
};

struct DistillKlArgs {
  uintptr_t student = 0;                     // [B, M], any strides
  int dtype = kFloat32;                      // of student (and of grad)
  int64_t B = 0, M = 0, ss_b = 0, ss_m = 1;
  bool sparse = false;                       // teacher given as (tprobs, tcols) [B, n] instead of a dense [B, M]
  uintptr_t teacher = 0;                     // dense: fp32 [B, M] contiguous
  uintptr_t tprobs = 0, tcols = 0;           // sparse: fp32 and int64 [B, n] contiguous
  int64_t n = 0;
  uintptr_t loss = 0;                        // fp32 [B]
  uintptr_t grad = 0;                        // [B, M] contiguous in the student's dtype, or 0 (no gradient)
  double grad_scale = 1.0;
  bool normalize = false;                    // divide the teacher row by its mass
  uintptr_t stream = 0;
};

// Registered once per module (the CPU and CUDA bindings both call these; module_local: _C and _C_emu each own a copy).
inline void bind_reader_teacher_args(pybind11::module_& m) {
  namespace py = pybind11;
  if (py::hasattr(m, "ReaderTeacherArgs")) return;
  py::class_<ReaderTeacherArgs>(m, "ReaderTeacherArgs", py::module_local(),
                                "Parameters of reader_teacher_fwd_* (csrc/distill/distill_args.h)")
      .def(py::init<>())
      .def_readwrite("attn", &ReaderTeacherArgs::attn)
      .def_readwrite("dtype", &ReaderTeacherArgs::dtype)
      .def_readwrite("B", &ReaderTeacherArgs::B)
      .def_readwrite("L", &ReaderTeacherArgs::L)
      .def_readwrite("H", &ReaderTeacherArgs::H)
      .def_readwrite("T", &ReaderTeacherArgs::T)
      .def_readwrite("S", &ReaderTeacherArgs::S)
      .def_readwrite("sb", &ReaderTeacherArgs::sb)
      .def_readwrite("sl", &ReaderTeacherArgs::sl)
      .def_readwrite("sh", &ReaderTeacherArgs::sh)
      .def_readwrite("st", &ReaderTeacherArgs::st)
      .def_readwrite("ss", &ReaderTeacherArgs::ss)
      .def_readwrite("doc", &ReaderTeacherArgs::doc)
      .def_readwrite("doc_dtype", &ReaderTeacherArgs::doc_dtype)
      .def_readwrite("mask", &ReaderTeacherArgs::mask)
      .def_readwrite("n_docs", &ReaderTeacherArgs::n_docs)
      .def_readwrite("is_logits", &ReaderTeacherArgs::is_logits)
      .def_readwrite("out", &ReaderTeacherArgs::out)
      .def_readwrite("partial", &ReaderTeacherArgs::partial)
      .def_readwrite("stream", &ReaderTeacherArgs::stream)
      .def_readwrite("isa", &ReaderTeacherArgs::isa);
}

inline void bind_distill_kl_args(pybind11::module_& m) {
  namespace py = pybind11;
  if (py::hasattr(m, "DistillKlArgs")) return;
  py::class_<DistillKlArgs>(m, "DistillKlArgs", py::module_local(),
                            "Parameters of distill_kl_fwd_cuda (csrc/distill/distill_args.h)")
      .def(py::init<>())
      .def_readwrite("student", &DistillKlArgs::student)
      .def_readwrite("dtype", &DistillKlArgs::dtype)
      .def_readwrite("B", &DistillKlArgs::B)
      .def_readwrite("M", &DistillKlArgs::M)
      .def_readwrite("ss_b", &DistillKlArgs::ss_b)
      .def_readwrite("ss_m", &DistillKlArgs::ss_m)
      .def_readwrite("sparse", &DistillKlArgs::sparse)
      .def_readwrite("teacher", &DistillKlArgs::teacher)
      .def_readwrite("tprobs", &DistillKlArgs::tprobs)
      .def_readwrite("tcols", &DistillKlArgs::tcols)
      .def_readwrite("n", &DistillKlArgs::n)
      .def_readwrite("loss", &DistillKlArgs::loss)
      .def_readwrite("grad", &DistillKlArgs::grad)
      .def_readwrite("grad_scale", &DistillKlArgs::grad_scale)
      .def_readwrite("normalize", &DistillKlArgs::normalize)
      .def_readwrite("stream", &DistillKlArgs::stream);
}

}  // namespace reatt
