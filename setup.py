"""Builds es_kernels._C (the C++ CPU kernels) through CMakeLists.txt with Ninja.

Install from a checkout with the installed torch (no build isolation):
    pip install --no-build-isolation -e .
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11
        import torch.utils

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        # a persistent build folder: rebuilds after an edit are incremental
        build_dir = ROOT / "build" / f"cmake-py{sys.version_info[0]}{sys.version_info[1]}"
        build_dir.mkdir(parents=True, exist_ok=True)
        prefix = ";".join([torch.utils.cmake_prefix_path, pybind11.get_cmake_dir()])
        configure = [
            "cmake", str(ROOT), "-G", "Ninja",
            f"-DCMAKE_PREFIX_PATH={prefix}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DES_KERNELS_OUTPUT_DIR={out_dir}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('ES_KERNELS_BUILD_TYPE', 'Release')}",
            f"-DES_KERNELS_NATIVE={os.environ.get('ES_KERNELS_NATIVE', 'ON')}",
        ]
        # cmake and ninja may come from pip, next to this interpreter
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        subprocess.check_call(configure, cwd=build_dir, env=env)
        subprocess.check_call(["cmake", "--build", str(build_dir)], cwd=build_dir, env=env)


setup(
    ext_modules=[CMakeExtension("es_kernels._C")],
    cmdclass={"build_ext": CMakeBuild},
)
