"""Builds es_kernels._C (the C++ CPU kernels) through CMakeLists.txt.

The C++ library is compiled against the torch installed in the environment
(never one downloaded for the build), so install torch first:

    pip install torch                                   # the build you run with
    pip install .                                       # or es_kernels-*.tar.gz: isolated, finds that torch
    pip install --no-build-isolation -e .               # a checkout (cmake, ninja installed)
    python -m build --no-isolation                      # sdist + wheel

The wheel requires the minor release of torch it was built against
(``torch~=X.Y.0``); the pure-Python package (ES_KERNELS_NO_BUILD=1), any torch
from the tested floor on. buildtools/es_build_backend.py (the build backend)
stops a build without torch before pip resolves anything.

Environment variables:
    ES_KERNELS_NO_BUILD=1       skip the C++ build: the pure-Python package
                                (Triton on CUDA, the PyTorch reference on CPU)
    ES_KERNELS_REQUIRE_BUILD=1  a failed C++ build fails the install (make, CI);
                                by default it warns and installs pure Python
    ES_KERNELS_NATIVE=ON        tune for the building CPU (-march=native); OFF by default
    ES_KERNELS_BUILD_TYPE       CMake build type (Release)
"""

import hashlib
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


# The torch to build against, the wheel's torch requirement and the message
# where there is none: one definition, in the build backend (it stops a build
# without torch before pip resolves any dependency).
sys.path.insert(0, str(ROOT / "buildtools"))
from es_build_backend import NO_TORCH_MESSAGE, env_flag, find_torch, torch_requirement  # noqa: E402

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
        if self.extensions and find_torch() is None:
            sys.stderr.write(NO_TORCH_MESSAGE.format(target="."))
            raise SystemExit("es-kernels: torch is required to build the C++ kernels (see above)")
        super().run()

    def build_extension(self, ext: Extension) -> None:
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        try:
            self._cmake_build(out_dir)
        except (OSError, BuildError) as exc:
            if env_flag("ES_KERNELS_REQUIRE_BUILD"):
                raise
            # a library left by an earlier build would not match these sources
            for stale in out_dir.glob("_C.*"):
                stale.unlink()
            # nothing was built: drop the extension, or the copy step of an
            # editable or in-place install fails on the missing library (a new
            # list: the loop that called us goes on over the old one)
            self.extensions = [e for e in self.extensions if e is not ext]
            # a warning (not a print): pip >= 24.1 shows a build backend's
            # warnings even without -v, and hides its output
            warnings.warn(BUILD_FAILED_WARNING.format(error=exc), stacklevel=1)

    def _cmake_build(self, out_dir: Path) -> None:
        torch_dir = find_torch()
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
            f"-DES_KERNELS_NATIVE={'ON' if env_flag('ES_KERNELS_NATIVE') else 'OFF'}",
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
    install_requires=[torch_requirement()],
    ext_modules=[] if env_flag("ES_KERNELS_NO_BUILD") else [CMakeExtension("es_kernels._C")],
    cmdclass={"build_ext": CMakeBuild},
)
