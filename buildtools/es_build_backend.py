"""The package's build backend: setuptools' own, with one check first.

The C++ CPU kernels are compiled against the torch the user runs with, so
torch is not a build requirement (as one, pip would download torch's default
CUDA build, several GB, into the isolated build environment and compile
against a torch other than the user's). Instead:

* with build isolation (a plain ``pip install .`` or ``pip install
  es_kernels-*.tar.gz``) the build finds the torch installed in the
  environment pip installs into, which isolation hides from the build's
  ``sys.path`` but not from ``sysconfig``, and compiles against it;
* where no torch is installed, the build stops at once, before pip resolves
  any dependency (so before any download), and prints the commands to run,
  unless ``ES_KERNELS_NO_BUILD=1`` asks for the pure-Python package.

setup.py takes :func:`find_torch` and the message from here (one definition).
"""

from __future__ import annotations

import importlib.util
import os
import re
import sysconfig
from pathlib import Path

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403  (every hook setuptools defines)

TORCH_FLOOR = "2.4.1"  # the oldest torch the tests ran on (pyproject.toml's comment)

NO_TORCH_MESSAGE = """
es-kernels: torch is not installed, and the C++ CPU kernels are compiled
against the torch you run with. Install torch first (the build you want: the
CPU wheel or a CUDA build), then es-kernels:

    pip install torch
    pip install {target}

or install the pure-Python package (no C++ CPU kernels; Triton on CUDA):

    ES_KERNELS_NO_BUILD=1 pip install {target}
"""


def env_flag(name: str) -> bool:
    """Whether the environment variable ``name`` is set to 1 / on / true / yes."""
    return os.environ.get(name, "").strip().lower() in ("1", "on", "true", "yes")


def find_torch() -> Path | None:
    """The folder of the torch package to build against, or None: the one this
    interpreter imports, else the one installed in the environment's
    site-packages (hidden by pip's build isolation)."""
    spec = importlib.util.find_spec("torch")
    if spec is not None and spec.submodule_search_locations:
        return Path(spec.submodule_search_locations[0]).resolve()
    for key in ("purelib", "platlib"):
        cand = Path(sysconfig.get_paths()[key]) / "torch"
        if (cand / "__init__.py").is_file():
            return cand.resolve()
    return None


def torch_version(torch_dir: Path) -> str | None:
    """The release of the torch in ``torch_dir`` ("2.13.0" for "2.13.0+cpu"),
    read from its version.py without importing it."""
    try:
        text = (torch_dir / "version.py").read_text()
    except OSError:
        return None
    m = re.search(r"""__version__\s*(?::\s*str\s*)?=\s*['"](\d+)\.(\d+)\.(\d+)""", text)
    return ".".join(m.groups()) if m else None


def torch_requirement() -> str:
    """The wheel's torch requirement: the minor release it is built against
    (its C++ library is tied to it), or the floor for the pure-Python package."""
    if not env_flag("ES_KERNELS_NO_BUILD"):
        torch_dir = find_torch()
        version = torch_version(torch_dir) if torch_dir is not None else None
        if version is not None:
            major, minor, _ = version.split(".")
            return f"torch~={major}.{minor}.0"
    return f"torch>={TORCH_FLOOR}"


def _require_torch() -> None:
    if not env_flag("ES_KERNELS_NO_BUILD") and find_torch() is None:
        raise SystemExit(NO_TORCH_MESSAGE.format(target="es-kernels (or .)"))


def get_requires_for_build_wheel(config_settings=None):
    _require_torch()
    return _setuptools.get_requires_for_build_wheel(config_settings)


def get_requires_for_build_editable(config_settings=None):
    _require_torch()
    return _setuptools.get_requires_for_build_editable(config_settings)
