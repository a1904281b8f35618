// PYBIND11_MODULE(_C_emu): the CUDA kernels of csrc/**/*.cu compiled as host C++ against the CPU emulation of the CUDA
// execution model (emu_runtime.h). The bindings are the .cu files' own (same names as in _C, CPU pointers, stream 0),
// collected through reatt::registrars() like _C's, plus the emulated device's limits and the runtime's self-tests.
#include <pybind11/pybind11.h>

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "../common.h"
#include "emu_runtime.h"

namespace py = pybind11;

namespace {
// A large, sparse host buffer: an anonymous MAP_NORESERVE mapping. Pages that are never written cost no memory (a read
// maps the shared zero page), so a test can address more than 2^31 elements while only the documents it touches get
// pages. Exposed with the buffer protocol: torch.frombuffer(buf, dtype=...) views it without a copy and keeps it alive.
struct SparseBuffer {
  void* p = nullptr;
  size_t n = 0;
  explicit SparseBuffer(size_t bytes) : n(bytes) {
    p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
      p = nullptr;
      throw std::runtime_error("sparse_buffer: mmap of " + std::to_string(bytes) + " bytes (MAP_NORESERVE) failed");
    }
  }
  ~SparseBuffer() {
    if (p) munmap(p, n);
  }
  // Bytes of the mapping backed by memory now (mincore), to show that only the touched pages exist.
  size_t resident_bytes() const {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    std::vector<unsigned char> v((n + page - 1) / page);
    if (mincore(p, n, v.data()) != 0) throw std::runtime_error("sparse_buffer: mincore failed");
    size_t r = 0;
    for (unsigned char c : v) r += (c & 1) ? page : 0;
    return r;
  }
};
}  // namespace

PYBIND11_MODULE(_C_emu, m) {
  m.doc() = "reatt_kernels CUDA kernels under CPU emulation (a test tool: every CUDA thread is an OS thread)";
  m.def("build_info", []() {
    py::dict info;
    info["cuda_emu"] = true;
#if defined(__SANITIZE_ADDRESS__)
    info["asan"] = true;
#else
    info["asan"] = false;
#endif
#if defined(__SANITIZE_THREAD__)
    info["tsan"] = true;
#else
    info["tsan"] = false;
#endif
#if defined(__FMA__)
    info["fma"] = true;  // built with -mfma: a*b+c contracted into FMA where the compiler may (-ffp-contract=fast)
#else
    info["fma"] = false;
#endif
    info["compiler"] = __VERSION__;
    return info;
  });
  m.def(
      "set_device_limits",
      [](py::object smem_optin, py::object sm_count) {
        auto& d = reatt_emu::device_limits();
        if (!smem_optin.is_none()) {
          const int v = smem_optin.cast<int>();
          REATT_CHECK(v >= 48 * 1024, "set_device_limits: smem_optin must be >= 49152 bytes");
          d.smem_optin = v;
        }
        if (!sm_count.is_none()) {
          const int v = sm_count.cast<int>();
          REATT_CHECK(v >= 1, "set_device_limits: sm_count must be >= 1");
          d.sm_count = v;
        }
        py::dict out;
        out["smem_optin"] = d.smem_optin;
        out["sm_count"] = d.sm_count;
        return out;
      },
      "Set the emulated device's opt-in shared memory per block (bytes) and SM count; returns the current values",
      py::arg("smem_optin") = py::none(), py::arg("sm_count") = py::none());
  m.def(
      "emu_config",
      []() {
        py::dict out;
        out["seed"] = reatt_emu::emu_seed();
        out["launches"] = reatt_emu::emu_launches();
        out["resident"] = reatt_emu::emu_resident();
        out["serial"] = reatt_emu::emu_serial();
        static const char* orders[] = {"seq", "pairwise", "reverse"};
        out["mma_order"] = orders[reatt_emu::emu_mma_order()];
        return out;
      },
      "The emulator's settings: seed (REATT_EMU_SEED), launches since it was set, resident blocks, serial, mma_order");
  m.def(
      "set_emu_config",
      [](py::object seed, py::object resident, py::object serial, py::object mma_order) {
        if (!seed.is_none()) reatt_emu::set_emu_seed(seed.cast<uint64_t>());
        if (!resident.is_none()) {
          const int v = resident.cast<int>();
          REATT_CHECK(v >= 1, "set_emu_config: resident must be >= 1");
          reatt_emu::set_emu_resident(v);
        }
        if (!serial.is_none()) reatt_emu::set_emu_serial(serial.cast<bool>());
        if (!mma_order.is_none()) {
          const std::string o = mma_order.cast<std::string>();
          REATT_CHECK(o == "seq" || o == "pairwise" || o == "reverse",
                      "set_emu_config: mma_order must be 'seq', 'pairwise' or 'reverse'");
          reatt_emu::set_emu_mma_order(o == "seq" ? 0 : o == "pairwise" ? 1 : 2);
        }
      },
      "Change the emulator's settings (None keeps one); setting the seed restarts the launch count",
      py::arg("seed") = py::none(), py::arg("resident") = py::none(), py::arg("serial") = py::none(),
      py::arg("mma_order") = py::none());
  py::class_<SparseBuffer, std::unique_ptr<SparseBuffer>>(m, "SparseBuffer", py::buffer_protocol())
      .def_buffer([](SparseBuffer& b) {
        return py::buffer_info(b.p, 1, py::format_descriptor<uint8_t>::format(), 1, {static_cast<py::ssize_t>(b.n)},
                               {static_cast<py::ssize_t>(1)});
      })
      .def_property_readonly("nbytes", [](const SparseBuffer& b) { return b.n; })
      .def("resident_bytes", &SparseBuffer::resident_bytes);
  m.def(
      "sparse_buffer", [](size_t nbytes) { return std::make_unique<SparseBuffer>(nbytes); },
      "An anonymous MAP_NORESERVE mapping of nbytes (zero-filled; only written pages use memory), buffer protocol",
      py::arg("nbytes"));
  m.def("get_last_error", []() { return static_cast<int>(cudaGetLastError()); },
        "cudaGetLastError() on the calling thread (returns and clears the pending error code)");
  for (auto& fn : reatt::registrars()) fn(m);
}
