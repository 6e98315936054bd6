"""Bitwise identical loss and gradient across repeated calls and thread counts (CPU):
rows are processed in fixed chunks whose partial sums are combined in a fixed order."""

from __future__ import annotations

import pytest
import torch
from testing import LOSS_TYPES, assert_bitwise_across_threads, make_counts, make_inputs

import cbfused


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("kind", ["hard", "float"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bitwise_across_threads_and_calls(loss_type, kind, dtype):
    x, y = make_inputs(3001, 97, dtype, "cpu", kind, loss_type, seed=7)  # ~18 chunks
    w = cbfused.class_balanced_weights(make_counts(97), 0.999)
    assert_bitwise_across_threads(
        lambda xi: cbfused.class_balanced_loss(xi, y, weights=w, loss_type=loss_type, gamma=0.5),
        x,
        (1, 2, 4, 2),
    )
