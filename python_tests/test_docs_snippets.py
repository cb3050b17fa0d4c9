"""The README's and docs/'s code blocks run as written.

Every ```python block of README.md and docs/*.md (docs/api.md aside: it is
generated from the docstrings) runs in a fresh namespace, in a temporary
working directory, unless an HTML comment on the line before its fence says
otherwise:

- ``<!-- docs-test: continue -->``: runs in the namespace of the file's
  previous block (a second step of one example);
- ``<!-- docs-test: fragment (why) -->``: not run (it names your model or
  data, or needs several processes), only compiled;
- ``<!-- docs-test: slow -->``: runs, marked ``slow``.

Every ``pip install`` line of the README's bash blocks is one that
python_tests/test_install.py runs (it names the command in a ``README:``
comment).
"""

from __future__ import annotations

import importlib.util
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md"] + sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "api.md")
DIRECTIVE = re.compile(r"<!--\s*docs-test:\s*(.*?)\s*-->")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def blocks(path: pathlib.Path, lang: str = "python") -> list:
    """(line, code, directives) of each ```lang block of a markdown file."""
    text = path.read_text()
    out = []
    for m in FENCE.finditer(text):
        if m.group(1) != lang:
            continue
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        found = DIRECTIVE.fullmatch(before.strip())
        words = set(found.group(1).split("(", 1)[0].split()) if found else set()
        unknown = words - {"continue", "fragment", "slow"}
        assert not unknown, f"{path.name}: unknown docs-test directive {unknown}"
        out.append((text.count("\n", 0, m.start()) + 1, m.group(2), words))
    return out


def _chains():
    """The runnable examples: a block with the blocks that continue it."""
    for path in FILES:
        chain = []
        for line, code, words in blocks(path):
            if "fragment" in words:
                continue
            if "continue" not in words and chain:
                yield path, chain
                chain = []
            assert "continue" not in words or chain, f"{path.name}:{line}: continues no block"
            chain.append((line, code, words))
        if chain:
            yield path, chain


def _params():
    for path, chain in _chains():
        slow = any("slow" in w for _, _, w in chain)
        name = f"{path.relative_to(ROOT)}:{chain[0][0]}"
        yield pytest.param(path, chain, id=name, marks=[pytest.mark.slow] if slow else [])


def _needs(code: str) -> None:
    for module in ("transformers", "lightning", "accelerate", "sklearn", "mnist1d"):
        if re.search(rf"^\s*(import|from) {module}\b", code, re.M) and importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed")


@pytest.mark.parametrize("path,chain", list(_params()))
def test_code_block_runs(path, chain, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    for line, code, _ in chain:
        _needs(code)
        exec(compile(code, f"{path.name}:{line}", "exec"), namespace)


def test_fragments_compile():
    found = 0
    for path in FILES:
        for line, code, words in blocks(path):
            if "fragment" in words:
                compile(code, f"{path.name}:{line}", "exec")
                found += 1
    assert found  # the directive is recognised


def test_readme_plain_loop_scores_in_eval_mode():
    """The README's loop: BatchNorm's running statistics count the training
    steps only (a scoring pass in train mode would count every meta-batch
    twice)."""
    (line, code, _), *_ = blocks(ROOT / "README.md")
    assert "BatchNorm1d" in code and "es.select" in code, "the README's first block is the plain loop"
    namespace = {"__name__": "__docs__"}
    exec(compile(code, f"README.md:{line}", "exec"), namespace)
    bn = namespace["model"][1]
    steps = int(namespace["opt"].state_dict()["state"][0]["step"])
    assert steps > 0 and int(bn.num_batches_tracked) == steps
    assert namespace["model"].training


def test_readme_pip_installs_are_tested():
    """Each `pip install` of the README is a command test_install.py runs."""
    install_tests = (ROOT / "python_tests" / "test_install.py").read_text()
    covered = set(re.findall(r"^\s*(?:# )?README: (.+)$", install_tests, re.M))
    commands = []
    for _, code, _ in blocks(ROOT / "README.md", "bash"):
        for cmd in code.splitlines():
            cmd = cmd.split("#", 1)[0].strip()
            if cmd.startswith("pip install") and cmd != "pip install torch":
                commands.append(cmd)
    assert commands, "the README shows no install command"
    missing = [c for c in commands if c not in {c.strip() for c in covered}]
    assert not missing, f"README install commands no test in test_install.py runs: {missing}"
