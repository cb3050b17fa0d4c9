"""The documentation is current: docs/api.md is what docs/gen_api.py writes
from the docstrings, every public function and class has a numpydoc
docstring, the API table of docs/usage.md names exactly the public names,
docs/layout.md names every tracked file, and the op signatures in
docs/spec.md are the schemas of es_kernels/_ops.py. (The code blocks of the
README and docs/: test_docs_snippets.py.)"""

import importlib
import inspect
import pathlib
import re
import subprocess
import sys

import pytest

import es_kernels
from es_kernels._ops import SCHEMAS

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs"))
import gen_api  # noqa: E402

pytest.importorskip("transformers", reason="docs/api.md documents the integrations")
pytest.importorskip("lightning", reason="docs/api.md documents the integrations")

# The modules whose public objects touch tensors: their docstrings say whether
# a call synchronises with the host.
TENSOR_MODULES = ("es_kernels", "es_kernels.lm", "es_kernels.distributed", "es_kernels.sharded")
# ... except these, which hold or index no tensor of their own.
NO_TENSOR_WORK = {"IndexedDataset", "shard_indices", "shard_length"}


def _public():
    """(module name, qualified name, object, is a method) of every public callable."""
    for modname in gen_api.MODULES:
        module = importlib.import_module(modname)
        for name in gen_api.public_names(module):
            obj = getattr(module, name)
            if not callable(obj):
                continue
            yield modname, name, obj, False
            if inspect.isclass(obj):
                for mname, member in gen_api.members(obj):
                    yield modname, f"{name}.{mname}", member, True


def _takes_parameters(obj) -> bool:
    if isinstance(obj, property) or (inspect.isclass(obj) and hasattr(obj, "_fields")):
        return False
    params = inspect.signature(obj).parameters
    return any(p not in ("self", "cls") for p in params)


def _returns_something(obj) -> bool:
    return inspect.isfunction(obj) and inspect.signature(obj).return_annotation not in (None, "None")


def test_api_page_is_current():
    assert (ROOT / "docs" / "api.md").read_text() == gen_api.render(), "run python docs/gen_api.py"


def test_public_functions_and_classes_have_numpydoc_docstrings():
    missing = []
    for modname, name, obj, is_method in _public():
        doc = inspect.getdoc(obj) or ""
        if not doc.strip():
            missing.append(f"{modname}.{name}: no docstring")
            continue
        if is_method and modname not in TENSOR_MODULES:
            continue  # the integrations' methods: framework hooks, a summary suffices
        if _takes_parameters(obj) and "\nParameters\n----" not in doc:
            missing.append(f"{modname}.{name}: no Parameters section")
        if _returns_something(obj) and "\nReturns\n----" not in doc:
            missing.append(f"{modname}.{name}: no Returns section")
        tensor_work = modname in TENSOR_MODULES and not is_method and name not in NO_TENSOR_WORK
        if tensor_work and not (inspect.isclass(obj) and hasattr(obj, "_fields")) and "synchronis" not in doc:
            missing.append(f"{modname}.{name}: does not say whether it synchronises with the host")
    assert not missing, "\n".join(missing)


def _usage_api_names() -> set:
    text = (ROOT / "docs" / "usage.md").read_text()
    table = text.split("| name | what it is |", 1)[1].split("\n\n", 1)[0]
    names = set()
    for row in table.splitlines()[2:]:
        names.update(re.findall(r"`([^`]+)`", row.split("|")[1]))
    return names


def test_usage_api_table_names_the_public_names():
    assert _usage_api_names() == set(gen_api.public_names(es_kernels))


def test_spec_op_signatures_are_the_schemas():
    spec = (ROOT / "docs" / "spec.md").read_text()
    block = spec.split("## 10. Op signatures", 1)[1].split("```", 2)[1]
    found = {}
    for sig in re.split(r"\n(?=\w+\()", block.strip()):
        name, rest = sig.split("(", 1)
        found[name.strip()] = " ".join(("(" + rest).split())
    assert found == {name: " ".join(schema.split()) for name, schema in SCHEMAS.items()}


def _tracked_files() -> list:
    """The files git tracks, or None outside a checkout."""
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return [pathlib.PurePosixPath(f) for f in out.splitlines()]


def test_layout_page_names_every_file_of_the_tree():
    """Every tracked file (bench/results aside) is named in docs/layout.md,
    and every file or folder it names exists."""
    files = _tracked_files()
    if files is None:
        pytest.skip("not a git checkout")
    layout = (ROOT / "docs" / "layout.md").read_text()
    named = set(re.findall(r"`([^`\s]+)`", layout))
    results = pathlib.PurePosixPath("bench/results")
    missing = [str(f) for f in files if f.name not in named and str(f) not in named and results not in f.parents]
    assert not missing, f"not in docs/layout.md: {missing}"
    folders = {str(d) + "/" for f in files for d in f.parents} | {d.name + "/" for f in files for d in f.parents}
    existing = {f.name for f in files} | {str(f) for f in files} | folders
    file_like = re.compile(r"^[\w./-]+(\.(py|md|cpp|h|inc|toml|sh|yaml|in|txt)|/)$|/")
    stale = sorted(n for n in named if file_like.search(n) and n not in existing)
    assert not stale, f"named in docs/layout.md but not in the tree: {stale}"
