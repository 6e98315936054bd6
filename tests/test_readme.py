"""README's Python blocks run as written (a user's first thirty seconds), in one fresh
interpreter each, in order; and every command and flag README names exists."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

import cbfused

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md")).read()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)
PKG_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(cbfused.__file__)))


def test_readme_has_python_blocks():
    assert BLOCKS, "README has no ```python blocks"


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_python_block_runs(i, tmp_path):
    script = tmp_path / f"block{i}.py"
    script.write_text(BLOCKS[i])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (PKG_ROOT, os.environ.get("PYTHONPATH")) if p),
    }
    r = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, f"README block {i} failed:\n{BLOCKS[i]}\n{r.stderr[-3000:]}"


def test_readme_make_targets_and_files_exist():
    makefile = open(os.path.join(ROOT, "Makefile")).read()
    for target in set(re.findall(r"`make (\w[\w-]*)", README)):
        assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"README names `make {target}`"
    for path in set(
        re.findall(r"`((?:docs|benchmarks|tests|examples|csrc|cbfused)/[\w./-]+\.(?:md|py|sh|h))`", README)
    ):
        assert os.path.exists(os.path.join(ROOT, path)), f"README names {path}, which does not exist"


def test_readme_bench_flags_exist():
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench.py"), "--help"],
        env={**os.environ, "CBFUSED_BENCH_ALLOCATOR": "glibc malloc", "PYTHONPATH": PKG_ROOT},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    docs = README + open(os.path.join(ROOT, "docs", "performance.md")).read()
    on_bench_lines = {
        f for line in docs.splitlines() if "bench.py" in line for f in re.findall(r"(--[\w-]+)", line)
    }
    for flag in on_bench_lines | set(re.findall(r"`(--[\w-]+)`", docs)):
        assert flag in r.stdout, f"docs name bench.py {flag}, which --help does not list"
