// Binary wheels only (CMake REATT_PORTABLE=ON, scripts/release/build_wheels.sh): the module is compiled with this host's
// glibc headers and a static libstdc++, but linked against glibc 2.28 stubs, so that it loads on any manylinux_2_28
// system. Two glibc symbols newer than 2.28 are still referenced from libstdc++ and are defined here, hidden, so the
// references bind inside the module and never reach the system's glibc.
#include <sys/random.h>

#include <cerrno>
#include <cstdint>
#include <cstdlib>

extern "C" {

// glibc 2.32: libstdc++'s headers (ext/atomicity.h) read it to skip atomic reference counting while the process has
// one thread. Fixed at 0 ("maybe multi-threaded"): reference counts are always atomic, which is correct everywhere.
__attribute__((visibility("hidden"))) char __libc_single_threaded = 0;

// glibc 2.36: referenced by libstdc++.a's std::random_device (pulled in by the exception classes, never called by
// reatt). Same contract as glibc's: a uniformly random 32-bit value that never fails (aborts if the kernel cannot
// deliver, as glibc does); getrandom(2) exists since glibc 2.25 and Linux 3.17.
__attribute__((visibility("hidden"))) uint32_t arc4random(void) noexcept {
  uint32_t v = 0;
  for (;;) {
    ssize_t n = getrandom(&v, sizeof v, 0);
    if (n == static_cast<ssize_t>(sizeof v)) return v;
    if (n < 0 && errno != EINTR) std::abort();
  }
}
}
