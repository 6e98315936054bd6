"""The long-tailed training example, end to end in a few seconds (--tiny), so it cannot rot."""

from __future__ import annotations

import csv
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))

pytest.importorskip("mnist1d")


def test_long_tailed_example_tiny(tmp_path):
    import long_tailed

    assert long_tailed.long_tailed_counts(1000, 100) == [1000, 599, 359, 215, 129, 77, 46, 27, 16, 10]
    assert long_tailed.main(["--tiny", "--no-progress", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    # 2 imbalance factors x 9 losses (tiny grid) x 1 seed, every error a probability
    assert len(rows) == 18
    assert {r["family"] for r in rows} == {
        "softmax (CE)",
        "CB softmax",
        "CB sigmoid",
        "CB focal",
        "CB softmax focal",
        "Balanced Softmax",
        "Post-hoc LA (CE)",
        "LDAM-DRW",
        "CB focal DRW",
    }
    # the post-hoc row evaluates the CE model of the same seed: at tau = 1 it must differ from
    # it somewhere (the prior shifts the decision) on the long-tailed run
    by = {(r["imbalance"], r["family"]): r for r in rows}
    ce, post = by[("100", "softmax (CE)")], by[("100", "Post-hoc LA (CE)")]
    assert any(ce[f"acc_class{c}"] != post[f"acc_class{c}"] for c in range(10))
    assert all(0.0 <= float(r["test_error"]) <= 1.0 for r in rows)
    table = (tmp_path / "table.md").read_text()
    assert "| softmax (CE) |" in table and "**Verdict at IF 100:**" in table
    assert "The best of the other long-tail methods" in table
    assert (tmp_path / "per_class.png").stat().st_size > 1000
    assert (tmp_path / "weights.png").stat().st_size > 1000
