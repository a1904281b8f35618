"""Build driver: setuptools -> CMake -> the pybind11 modules ``reatt_kernels._C`` and ``reatt_kernels._C_emu`` (the CUDA
kernels compiled as host C++ against the CPU emulation in csrc/cuda_emu/; built by the same CMake run, next to _C).

Follows pybind11's cmake_example. Environment variables:

- ``REATT_CUDA=auto|0|1``: build the CUDA sources when CMake finds nvcc (auto, default), never (0), or always (1: a CUDA
  configure/compile error fails the install, which is what CI uses).
- ``REATT_CUDA_ARCHS``: CMake CUDA architectures, default ``80;90``.
- ``REATT_BUILD_DIR``: CMake build folder (default ``build/cmake-<python tag>``); lets parallel builds not collide.
- ``REATT_BUILD_JOBS``: parallel compile jobs (default: number of CPUs).
- ``REATT_REQUIRE_EXT=1``: a C++ extension that cannot be built fails the install instead of falling back to the
  pure-Python package (CI and ``scripts/release/build_wheels.sh`` set it).
- ``REATT_CMAKE_ARGS``: extra CMake arguments, shell-quoted (``scripts/release/build_wheels.sh``: ``-DREATT_PORTABLE=ON``).

A missing compiler does not break installation by default: in ``auto`` mode a failed CUDA build is retried without CUDA,
and a failed C++ build installs the pure-Python package. Either prints one ``reatt_kernels: WARNING:`` line naming the
missing part and the fix, and importing the package then warns again (``reatt_kernels._ext``).
"""
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
FIX_HINT = "set REATT_REQUIRE_EXT=1 to make this an error"


def _warn(msg: str) -> None:
    # Exactly one line on stderr: `python -m build` shows it, pip with -v (and importing the package warns again).
    print(f"reatt_kernels: WARNING: {msg}", file=sys.stderr, flush=True)


def _require_ext() -> bool:
    return os.environ.get("REATT_REQUIRE_EXT", "0").strip() not in ("", "0")


def missing_build_part() -> "tuple[str, str] | None":
    """(what is missing, how to fix it) when the C++ build cannot even start, else None."""
    needed = [ROOT / "CMakeLists.txt", ROOT / "csrc" / "bindings.cpp"]
    absent = [str(p.relative_to(ROOT)) for p in needed if not p.is_file()]
    if absent:
        return (f"the source tree lacks {', '.join(absent)} (an incomplete sdist)",
                "install from a complete sdist, a binary wheel, or a git checkout")
    cxx = os.environ.get("CXX")
    if not (shutil.which(shlex.split(cxx)[0]) if cxx else any(shutil.which(c) for c in ("c++", "g++", "clang++"))):
        return ("no C++17 compiler" + (f" (CXX={cxx!r} not found)" if cxx else " (c++, g++, clang++ not on PATH)"),
                "install one (Debian/Ubuntu: apt install g++; Fedora/RHEL: dnf install gcc-c++) and reinstall")
    if not shutil.which("cmake"):
        return ("no cmake on PATH", "pip install 'cmake>=3.24' (or build with build isolation) and reinstall")
    try:
        import pybind11  # noqa: F401
    except ImportError:
        return ("pybind11 is not importable",
                "pip install 'pybind11>=2.12' (or build with build isolation) and reinstall")
    return None


class CMakeExtension(Extension):
    def __init__(self, name: str, optional: bool = False):
        super().__init__(name, sources=[], optional=optional)


class CMakeBuild(build_ext):
    def build_extensions(self) -> None:
        self._skipped: set = set()
        super().build_extensions()
        # A fallen-back extension has no file, nor has an optional module that CMake was told not to build (e.g. a
        # release wheel's -DREATT_EMU=OFF): drop them so --inplace copies and editable installs do not look for them.
        self.extensions = [e for e in self.extensions if e.name not in self._skipped
                           and (not getattr(e, "optional", False) or Path(self.get_ext_fullpath(e.name)).exists())]

    def build_extension(self, ext: Extension) -> None:
        if ext.name == "reatt_kernels._C_emu":
            return  # built next to _C by the CMake run of _C (optional: absent when the C++ build failed)
        mode = os.environ.get("REATT_CUDA", "auto").strip().lower()
        if mode not in ("auto", "0", "1"):
            raise SystemExit(f"REATT_CUDA must be auto, 0 or 1, got {mode!r}")
        missing = missing_build_part()
        if missing is not None:
            self._fallback(ext, *missing)
            return
        attempts = {"auto": ["auto", "0"], "1": ["1"], "0": ["0"]}[mode]
        last_err = None
        for cuda in attempts:
            try:
                self._cmake_build(ext, cuda)
                return
            except subprocess.CalledProcessError as err:
                last_err = err
                if cuda == "auto":
                    _warn("the CUDA build failed (see the compiler output above); retrying without CUDA, so the "
                          "'cuda' backend will be missing; fix the CUDA toolkit, or set REATT_CUDA=0 to skip it")
        if mode == "1":
            raise SystemExit(f"reatt_kernels: REATT_CUDA=1 and the CUDA build failed: {last_err}")
        self._fallback(ext, f"the C++ build failed ({last_err})",
                       "read the CMake/compiler output above; a C++17 compiler and cmake>=3.24 are needed")

    def _fallback(self, ext: Extension, what: str, fix: str) -> None:
        # The pure-Python package still works (torch and triton backends); packagers must not ship it by accident.
        if _require_ext():
            raise SystemExit(f"reatt_kernels: REATT_REQUIRE_EXT=1 and the C++ extension cannot be built: {what}. "
                             f"Fix: {fix}")
        _warn(f"installing WITHOUT the C++/CUDA extension: {what}; the 'cpu' and 'cuda' backends will be "
              f"unavailable. Fix: {fix}; {FIX_HINT}")
        getattr(self, "_skipped", set()).add(ext.name)

    def _cmake_build(self, ext: Extension, cuda: str) -> None:
        ext_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        out_dir = ext_path.parent
        tag = sysconfig.get_config_var("SOABI") or "py"
        build_dir = Path(os.environ.get("REATT_BUILD_DIR", ROOT / "build" / f"cmake-{tag}-cuda{cuda}")).resolve()
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = "Debug" if os.environ.get("REATT_DEBUG") == "1" else "Release"
        import pybind11

        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DREATT_CUDA={cuda}",
            f"-DREATT_EXT_SUFFIX={sysconfig.get_config_var('EXT_SUFFIX')}",
        ]
        archs = os.environ.get("REATT_CUDA_ARCHS")
        if archs:
            args.append(f"-DREATT_CUDA_ARCHS={archs}")
        args += shlex.split(os.environ.get("REATT_CMAKE_ARGS", ""))
        try:
            import ninja  # noqa: F401

            args += ["-G", "Ninja"]
        except ImportError:
            pass
        jobs = os.environ.get("REATT_BUILD_JOBS", str(os.cpu_count() or 2))
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "--config", cfg, "-j", jobs], cwd=build_dir, check=True)


setup(ext_modules=[CMakeExtension("reatt_kernels._C"), CMakeExtension("reatt_kernels._C_emu", optional=True)],
      cmdclass={"build_ext": CMakeBuild})
