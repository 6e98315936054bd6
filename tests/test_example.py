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
    # 2 imbalance factors x 5 losses (tiny grid) x 1 seed, every error a probability
    assert len(rows) == 10
    assert {r["family"] for r in rows} == {
        "softmax (CE)",
        "CB softmax",
        "CB sigmoid",
        "CB focal",
        "CB softmax focal",
    }
    assert all(0.0 <= float(r["test_error"]) <= 1.0 for r in rows)
    table = (tmp_path / "table.md").read_text()
    assert "| softmax (CE) |" in table and "**Verdict at IF 100:**" in table
    assert (tmp_path / "per_class.png").stat().st_size > 1000
    assert (tmp_path / "weights.png").stat().st_size > 1000
