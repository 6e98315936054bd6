"""Run-time choice of the CPU kernels (cbfused/_cpu.py): every ISA that was built and that
this CPU executes gives the same answers, checked two ways: the numerics and loss test files
run whole under each ISA, and one matrix of losses and gradients is compared across ISAs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from testing import RTOL

import cbfused
from cbfused import _cpu

HERE = os.path.dirname(os.path.abspath(__file__))
# the subprocesses import the same cbfused as this one
PKG_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(cbfused.__file__)))


def _env(cap: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("CBFUSED_CPU_CAPABILITY", None)
    if cap is not None:
        env["CBFUSED_CPU_CAPABILITY"] = cap
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PKG_ROOT, HERE, env.get("PYTHONPATH")) if p)
    return env


USABLE = [c for c in _cpu.ORDER if c in _cpu.compiled() and c in _cpu.supported()]


def _run(code: str, cap: str | None, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        env=_env(cap),
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_build_info_says_what_was_built_and_what_runs():
    info = cbfused.BUILD_INFO
    compiled = info["cpu_capabilities"].split(",")
    assert compiled == _cpu.compiled() and compiled, info
    assert info["cpu_supported"].split(",")[0] == "DEFAULT"
    if "CBFUSED_CPU_CAPABILITY" not in os.environ:
        assert info["cpu_capability"] == USABLE[-1], (info, USABLE)  # the best usable one
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if " avx512f " in flags and " avx512bw " in flags:
        assert "AVX512" in info["cpu_supported"].split(",")


@pytest.mark.parametrize("asked", ["AVX9", "avx2"])
def test_an_unknown_capability_is_refused_by_name(asked):
    r = _run("import cbfused", asked)
    assert r.returncode != 0
    assert f"CBFUSED_CPU_CAPABILITY={asked!r}: expected one of" in r.stderr, r.stderr[-2000:]


def test_a_capability_that_was_not_built_is_refused():
    missing = [c for c in _cpu.ORDER if c not in _cpu.compiled()]
    if not missing:
        pytest.skip("every ISA was built")
    r = _run("import cbfused", missing[0])
    assert r.returncode != 0 and "was built with CPU kernels for" in r.stderr, r.stderr[-2000:]


_MATRIX = r"""
import json, sys, torch, cbfused
from testing import LOSS_TYPES, make_counts, make_inputs
out = {"cap": cbfused.BUILD_INFO["cpu_capability"], "cases": {}}
for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
    for n, c in ((7, 3), (33, 80), (5, 1000), (300, 17)):
        w = cbfused.class_balanced_weights(make_counts(c), 0.999)
        for lt in LOSS_TYPES:
            for kind in ("hard", "float"):
                x, y = make_inputs(n, c, dtype, kind=kind, loss_type=lt, seed=n + c)
                x.requires_grad_()
                loss = cbfused.class_balanced_loss(x, y, weights=w, loss_type=lt, gamma=2.0, reduction="sum")
                loss.backward()
                key = f"{dtype}|{n}x{c}|{lt}|{kind}"
                out["cases"][key] = [loss.double().item(), x.grad.double().flatten().tolist()]
    g = torch.Generator().manual_seed(7)
    x = torch.randn(9, 4, 21, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    t = (torch.rand(9, 4, 21, generator=g) > 0.8).to(dtype)
    l = cbfused.sigmoid_focal_loss(x, t, alpha=0.25, gamma=1.5, reduction="sum")
    l.backward()
    out["cases"][f"{dtype}|sigmoid_focal_loss"] = [l.double().item(), x.grad.double().flatten().tolist()]
json.dump(out, open(sys.argv[1], "w"))
"""


@pytest.mark.skipif(len(USABLE) < 2, reason="this CPU executes only one of the ISAs that were built")
def test_every_isa_gives_the_same_losses_and_gradients(tmp_path):
    """One matrix (4 dtypes x 4 shapes, odd tails included, x every loss kind x hard / float
    targets, and sigmoid_focal_loss) under each usable ISA: each agrees with the others
    within the dtype's tolerance against the float64 reference (testing.RTOL)."""
    results = {}
    for cap in USABLE:
        path = tmp_path / f"{cap}.json"
        r = _run(_MATRIX, cap, str(path))
        assert r.returncode == 0, r.stderr[-3000:]
        res = json.loads(path.read_text())
        assert res["cap"] == cap
        results[cap] = res["cases"]
    base = USABLE[0]
    for cap in USABLE[1:]:
        assert results[cap].keys() == results[base].keys()
        for key, (loss, grad) in results[cap].items():
            dtype = getattr(torch, key.split("|")[0].replace("torch.", ""))
            bl, bg = results[base][key]
            tol = 2 * RTOL[dtype]
            a, b = torch.tensor([loss, *grad]), torch.tensor([bl, *bg])
            scale = max(abs(bl), max((abs(v) for v in bg), default=0.0), 1e-30)
            torch.testing.assert_close(
                a, b, rtol=tol, atol=tol * scale, msg=lambda m, k=key, c=cap: f"{c} vs {base}, {k}: {m}"
            )


@pytest.mark.skipif(len(USABLE) < 2, reason="this CPU executes only one of the ISAs that were built")
@pytest.mark.parametrize("cap", USABLE[:-1])
def test_numerics_and_losses_pass_under_each_isa(cap):
    """The numerics and loss test files, whole, under an ISA below the default (the default
    runs them in the main session)."""
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
            "test_numerics.py",
            "test_losses.py",
        ],
        env=_env(cap),
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and " failed" not in r.stdout
