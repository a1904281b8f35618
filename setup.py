"""Build driver: setuptools -> CMake -> the pybind11 modules ``reatt_kernels._C`` and ``reatt_kernels._C_emu`` (the CUDA
kernels compiled as host C++ against the CPU emulation in csrc/cuda_emu/; built by the same CMake run, next to _C).

Follows pybind11's cmake_example. Environment variables:

- ``REATT_CUDA=auto|0|1``: build the CUDA sources when CMake finds nvcc (auto, default), never (0), or always (1: a CUDA
  configure/compile error fails the install, which is what CI uses).
- ``REATT_CUDA_ARCHS``: CMake CUDA architectures, default ``80;90``.
- ``REATT_BUILD_DIR``: CMake build folder (default ``build/cmake-<python tag>``); lets parallel builds not collide.
- ``REATT_BUILD_JOBS``: parallel compile jobs (default: number of CPUs).

A missing compiler never breaks installation: in ``auto`` mode a failed CUDA build is retried without CUDA, and a failed
C++ build installs the pure-Python package; ``reatt_kernels.available_backends()`` then says why a backend is missing.
"""
import os
import subprocess
import sys
import sysconfig
import warnings
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str, optional: bool = False):
        super().__init__(name, sources=[], optional=optional)


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if ext.name == "reatt_kernels._C_emu":
            return  # built next to _C by the CMake run of _C (optional: absent when the C++ build failed)
        mode = os.environ.get("REATT_CUDA", "auto").strip().lower()
        if mode not in ("auto", "0", "1"):
            raise SystemExit(f"REATT_CUDA must be auto, 0 or 1, got {mode!r}")
        attempts = {"auto": ["auto", "0"], "1": ["1"], "0": ["0"]}[mode]
        last_err = None
        for cuda in attempts:
            try:
                self._cmake_build(ext, cuda)
                return
            except subprocess.CalledProcessError as err:
                last_err = err
                if cuda == "auto":
                    warnings.warn("reatt_kernels: the build with CUDA failed; retrying without CUDA", stacklevel=1)
        if mode == "1":
            raise SystemExit(f"reatt_kernels: REATT_CUDA=1 and the CUDA build failed: {last_err}")
        # Optional part failed entirely: install the pure-Python package (the torch/triton backends still work).
        warnings.warn(f"reatt_kernels: the C++ extension could not be built ({last_err}); installing without it",
                      stacklevel=1)

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
