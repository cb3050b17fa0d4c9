"""Builds es_kernels._C (the C++ CPU kernels) through CMakeLists.txt.

The C++ library is compiled against the torch installed in the environment, so
build without isolation, torch installed first:

    pip install torch                                   # the build you run with
    pip install setuptools cmake ninja
    pip install --no-build-isolation -e .               # or: pip wheel --no-build-isolation .
    python -m build --no-isolation                      # sdist + wheel

Environment variables:
    ES_KERNELS_NO_BUILD=1       skip the C++ build: the pure-Python package
                                (Triton on CUDA, the PyTorch reference on CPU)
    ES_KERNELS_REQUIRE_BUILD=1  a failed C++ build fails the install (make, CI);
                                by default it warns and installs pure Python
    ES_KERNELS_NATIVE=ON        tune for the building CPU (-march=native); OFF by default
    ES_KERNELS_BUILD_TYPE       CMake build type (Release)
"""

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "on", "true", "yes")


# With build isolation (a plain `pip install .`) pip builds in a fresh
# environment; were torch a build requirement, pip would download torch's
# default (CUDA, multi-GB) build into it and compile against a torch other than
# the one the user runs. torch is therefore not in build-system.requires: the
# build stops at once with the commands to run. It stops rather than falling
# back to pure Python because the user who ran it wants the CPU kernels and the
# fix is one flag; ES_KERNELS_NO_BUILD=1 asks for the pure-Python package.
NO_TORCH_MESSAGE = """
es-kernels: torch is not installed in the build environment.
The C++ CPU kernels are compiled against the torch you run with, so build
without build isolation, with torch (and cmake, ninja) installed first:

    pip install torch setuptools cmake ninja
    pip install --no-build-isolation {target}

or install the pure-Python package (no C++ CPU kernels):

    ES_KERNELS_NO_BUILD=1 pip install {target}
"""

BUILD_FAILED_WARNING = """
============================================================================
WARNING: es-kernels: the C++ CPU kernels (es_kernels._C) were NOT built:
    {error}
Installing the pure-Python package: CPU ops fall back to the PyTorch
reference (slower). Set ES_KERNELS_REQUIRE_BUILD=1 to make this an error;
ES_KERNELS_NO_BUILD=1 skips the build without this warning.
============================================================================
"""


class BuildError(RuntimeError):
    pass


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def run(self) -> None:
        if self.extensions and importlib.util.find_spec("torch") is None:
            sys.stderr.write(NO_TORCH_MESSAGE.format(target="."))
            raise SystemExit("es-kernels: torch is required to build the C++ kernels (see above)")
        super().run()

    def build_extension(self, ext: Extension) -> None:
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        try:
            self._cmake_build(out_dir)
        except (OSError, BuildError) as exc:
            if _env_flag("ES_KERNELS_REQUIRE_BUILD"):
                raise
            # a library left by an earlier build would not match these sources
            for stale in out_dir.glob("_C.*"):
                stale.unlink()
            # a warning (not a print): pip >= 24.1 shows a build backend's
            # warnings even without -v, and hides its output
            warnings.warn(BUILD_FAILED_WARNING.format(error=exc), stacklevel=1)

    def _cmake_build(self, out_dir: Path) -> None:
        torch_dir = Path(importlib.util.find_spec("torch").submodule_search_locations[0]).resolve()
        abi = ""
        try:  # what torch.utils.cpp_extension uses; CMake reads libc10 when torch won't import
            with warnings.catch_warnings():  # e.g. numpy missing: not this build's business
                warnings.simplefilter("ignore")
                import torch

            abi = str(int(torch._C._GLIBCXX_USE_CXX11_ABI))
        except Exception:  # e.g. a CUDA torch whose CUDA runtime wheels are absent
            pass
        # cmake and ninja may come from pip, next to this interpreter
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        cmake = shutil.which("cmake", path=env["PATH"])
        if cmake is None:
            raise FileNotFoundError("cmake not found (pip install cmake ninja)")
        generator = ["-G", "Ninja"] if shutil.which("ninja", path=env["PATH"]) else []
        # A persistent build folder (an edit rebuilds incrementally), one per
        # environment and torch: a second venv never reuses, nor links against,
        # the first one's torch.
        key = hashlib.sha1(f"{sys.prefix}|{torch_dir}|{generator}".encode()).hexdigest()[:10]
        build_dir = ROOT / "build" / f"cmake-py{sys.version_info[0]}{sys.version_info[1]}-{key}"
        build_dir.mkdir(parents=True, exist_ok=True)
        configure = [
            cmake,
            str(ROOT),
            *generator,
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DES_KERNELS_TORCH_DIR={torch_dir}",
            f"-DES_KERNELS_CXX11_ABI={abi}",
            f"-DES_KERNELS_OUTPUT_DIR={out_dir}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('ES_KERNELS_BUILD_TYPE', 'Release')}",
            f"-DES_KERNELS_NATIVE={'ON' if _env_flag('ES_KERNELS_NATIVE') else 'OFF'}",
        ]
        build = [cmake, "--build", str(build_dir), "--parallel", str(os.cpu_count() or 1)]
        for step, cmd in (("configure", configure), ("build", build)):
            try:
                subprocess.check_call(cmd, cwd=build_dir, env=env)
            except subprocess.CalledProcessError as exc:
                raise BuildError(
                    f"the CMake {step} step failed (exit status {exc.returncode}); "
                    f"its output is above (pip shows it with -v)"
                ) from exc


setup(
    ext_modules=[] if _env_flag("ES_KERNELS_NO_BUILD") else [CMakeExtension("es_kernels._C")],
    cmdclass={"build_ext": CMakeBuild},
)
