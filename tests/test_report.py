"""benchmarks/report.py's option-cost table and its target, on rows made up here, and
bench.py's argument checks (the benchmark itself is not run by the tests)."""

import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import report  # noqa: E402


def _row(kernel, provider, dtype, n, c, ms, run, mode="fwd+bwd"):
    return {
        "kernel": kernel,
        "provider": provider,
        "mode": mode,
        "dtype": dtype,
        "N": n,
        "C": c,
        "median_ms": ms,
        "run": run,
        "shape": "",
        "layout": "",
        "H": 0,
        **{k: math.nan for k in ("x_floor", "peak_extra_bytes", "peak_extra_x_nc", "speedup_vs_ref")},
    }


def _rows(option_ms):
    """Two runs: plain cbfused at 1 ms, one option at option_ms[run], float32 at 1024 x 1000."""
    rows = []
    for run, ms in enumerate(option_ms):
        rows.append(_row("softmax", "cbfused", "float32", 1024, 1000, 1.0, run))
        rows.append(_row("softmax", "cbfused margins", "float32", 1024, 1000, ms, run))
        rows.append(_row("softmax", "cbfused margins", "float32", 1024, 1000, 9.0, run, mode="fwd"))
        rows.append(_row("softmax", "reference", "float32", 1024, 1000, 30.0, run))
    return rows


def _option_target(rows):
    (t,) = [t for t in report.targets(rows) if t[0].startswith("each option")]
    return t


def test_option_table_is_the_median_over_runs_and_their_range():
    table = report.option_table(_rows([1.2, 1.05, 1.3]))
    line = next(x for x in table.splitlines() if "`margins`" in x)
    assert "| softmax | 1.20x (1.05-1.30) / - |" in line
    assert "reference" not in table  # only the options and F.cross_entropy(label_smoothing)


def test_option_target_names_the_cells_over_it():
    _, ok, nums = _option_target(_rows([1.2, 1.16]))
    assert (
        ok is False and "0 of 1 cells within" in nums and "margins softmax in 1 cell(s), 1.18-1.18x" in nums
    )
    _, ok, nums = _option_target(_rows([1.05, 1.2, 1.08]))
    assert ok is True and "1 of 1 cells within; over: none" in nums


def test_bench_gamma_flag_refuses_bad_values_and_publishing(capsys):
    """--gamma sets the focal losses' gamma of every cell; a negative or non-finite value,
    or --publish away from the default (the published tables are at gamma = 2), is an
    error naming the value before anything is measured."""
    import bench

    for argv, match in [
        (["--gamma", "-1"], "--gamma must be a finite number >= 0, got -1.0"),
        (["--gamma", "nan"], "--gamma must be a finite number >= 0, got nan"),
        (["--publish", "--gamma", "1.5"], "--publish writes the tables at gamma = 2.0; got --gamma 1.5"),
    ]:
        with pytest.raises(SystemExit):
            bench.main(argv)
        assert match in capsys.readouterr().err
    bench.set_gamma(1.5)
    try:
        assert bench.GAMMA == 1.5
    finally:
        bench.set_gamma(2.0)
