"""Bad inputs: each gets a clear error naming the problem and the value; nothing crashes.
Each row of README's "Bad inputs" table is one case here."""

from __future__ import annotations

import pytest
import torch

import cbfused

W = torch.ones(10, dtype=torch.float64)


def x_(n=4, c=10, dtype=torch.float32):
    return torch.randn(n, c, dtype=dtype)


CASES = {
    "target out of range (high)": (
        lambda: cbfused.class_balanced_loss(x_(), torch.tensor([0, 12, 1, 2]), weights=W),
        RuntimeError,
        r"target 12 is out of range for 10 classes \(sample 1\)",
    ),
    "target out of range (negative)": (
        lambda: cbfused.class_balanced_loss(
            x_(), torch.tensor([0, 1, -3, 2]), weights=W, loss_type="softmax"
        ),
        RuntimeError,
        r"target -3 is out of range for 10 classes \(sample 2\)",
    ),
    "target of wrong dtype": (
        lambda: cbfused.class_balanced_loss(x_(), torch.tensor([True, False, True, True]), weights=W),
        RuntimeError,
        r"target must be int64 / int32 class indices or a float tensor of the logits' shape, got dtype Bool",
    ),
    "target of wrong shape": (
        lambda: cbfused.class_balanced_loss(x_(), torch.tensor([0, 1, 2]), weights=W),
        RuntimeError,
        r"class-index target must have shape \[4\] for logits of shape \[4, 10\], got \[3\]",
    ),
    "float target of wrong shape": (
        lambda: cbfused.class_balanced_loss(x_(), torch.rand(4, 9), weights=W),
        RuntimeError,
        r"float \(multi-hot / soft\) target must have the logits' shape \[4, 10\], got \[4, 9\]",
    ),
    "float target of another dtype": (
        lambda: cbfused.class_balanced_loss(x_(), torch.rand(4, 10, dtype=torch.float64), weights=W),
        RuntimeError,
        r"float target dtype Double does not match the logits' dtype Float",
    ),
    "float target above 1": (
        lambda: cbfused.class_balanced_loss(x_(), torch.full((4, 10), 1.5), weights=W, loss_type="sigmoid"),
        RuntimeError,
        r"float target 1.5 in row 0 is outside \[0, 1\]",
    ),
    "float target below 0": (
        lambda: cbfused.class_balanced_loss(x_(), -torch.rand(4, 10) - 0.1, weights=W, loss_type="softmax"),
        RuntimeError,
        r"float target -\d\.\d+ in row 0 is outside \[0, 1\]",
    ),
    "float target NaN": (
        lambda: cbfused.class_balanced_loss(x_(), torch.full((4, 10), float("nan")), weights=W),
        RuntimeError,
        r"float target nan in row 0 is outside \[0, 1\]",
    ),
    "negative count": (
        lambda: cbfused.class_balanced_loss(x_(), torch.zeros(4).long(), samples_per_class=[5] * 9 + [-1]),
        ValueError,
        r"negative count -1 for class 9",
    ),
    "NaN count": (
        lambda: cbfused.class_balanced_loss(
            x_(), torch.zeros(4).long(), samples_per_class=[5] * 9 + [float("nan")]
        ),
        ValueError,
        r"non-finite count nan for class 9",
    ),
    "counts of wrong length": (
        lambda: cbfused.class_balanced_loss(x_(), torch.zeros(4).long(), samples_per_class=[5] * 9),
        RuntimeError,
        r"class weights must have shape \[10\] \(one per class\), got \[9\]",
    ),
    "zero count": (
        lambda: cbfused.class_balanced_loss(x_(), torch.zeros(4).long(), samples_per_class=[5] * 9 + [0]),
        ValueError,
        r"classes \[9\] have zero samples.*not per batch",
    ),
    "all counts zero": (
        lambda: cbfused.class_balanced_loss(
            x_(), torch.zeros(4).long(), samples_per_class=[0] * 10, zero_count="zero"
        ),
        ValueError,
        r"every class has zero samples",
    ),
    "beta = 1": (
        lambda: cbfused.class_balanced_loss(
            x_(), torch.zeros(4).long(), samples_per_class=[5] * 10, beta=1.0
        ),
        ValueError,
        r"beta must be in \[0, 1\), got 1.0",
    ),
    "beta < 0": (
        lambda: cbfused.ClassBalancedLoss([5] * 10, beta=-0.5),
        ValueError,
        r"beta must be in \[0, 1\), got -0.5",
    ),
    "gamma < 0": (
        lambda: cbfused.class_balanced_loss(x_(), torch.zeros(4).long(), weights=W, gamma=-1.0),
        ValueError,
        r"gamma must be a finite number >= 0, got -1",
    ),
    "gamma < 0 (module)": (
        lambda: cbfused.ClassBalancedLoss([5] * 10, gamma=-2.0),
        ValueError,
        r"gamma must be a finite number >= 0, got -2.0",
    ),
    "alpha with a softmax loss": (
        lambda: cbfused.class_balanced_loss(
            x_(), torch.zeros(4).long(), weights=W, loss_type="softmax", alpha=0.25
        ),
        ValueError,
        r"alpha applies to the sigmoid-based losses only, not to loss_type='softmax'",
    ),
    "alpha outside [0, 1]": (
        lambda: cbfused.class_balanced_loss(x_(), torch.zeros(4).long(), weights=W, alpha=1.5),
        ValueError,
        r"alpha must be in \[0, 1\] \(or None\), got 1.5",
    ),
    "unknown loss type": (
        lambda: cbfused.class_balanced_loss(x_(), torch.zeros(4).long(), weights=W, loss_type="ce"),
        ValueError,
        r"loss_type must be one of \['focal', 'sigmoid', 'softmax', 'softmax_focal'\], got 'ce'",
    ),
    "unknown reduction": (
        lambda: cbfused.class_balanced_loss(x_(), torch.zeros(4).long(), weights=W, reduction="avg"),
        ValueError,
        r"reduction must be one of \['none', 'sum', 'mean', 'weighted_mean'\], got 'avg'",
    ),
    "target shape for [N, C, d] logits": (
        lambda: cbfused.class_balanced_loss(torch.randn(2, 10, 3), torch.zeros(2).long(), weights=W),
        RuntimeError,
        r"class-index target must have shape \[2, 3\] for logits of shape \[2, 10, 3\], got \[2\] "
        r"\(the logits' shape without the class dimension, 1\)",
    ),
    "0-d logits": (
        lambda: cbfused.class_balanced_loss(torch.tensor(1.0), torch.tensor(0), weights=W[:1]),
        RuntimeError,
        r"logits must be \[N, C, d1, ..., dk\] \(class dimension 1\) or \[C\], got a 0-d tensor",
    ),
    "zero classes": (
        lambda: cbfused.class_balanced_loss(torch.randn(4, 0), torch.zeros(4).long(), weights=W[:0]),
        RuntimeError,
        r"logits need at least one class, got shape \[4, 0\]",
    ),
    "integer logits": (
        lambda: cbfused.class_balanced_loss(
            torch.ones(4, 10, dtype=torch.long), torch.zeros(4).long(), weights=W
        ),
        RuntimeError,
        r"logits must be float16, bfloat16, float32 or float64, got Long",
    ),
    "weights on another device": (
        lambda: cbfused.class_balanced_loss(x_(), torch.zeros(4).long(), weights=W.to("meta")),
        ValueError,
        r"class weights are on meta but logits are on cpu",
    ),
    "target on another device": (
        lambda: cbfused.class_balanced_loss(x_(), torch.zeros(4, device="meta").long(), weights=W),
        ValueError,
        r"target are on meta but logits are on cpu",
    ),
    "both counts and weights": (
        lambda: cbfused.class_balanced_loss(
            x_(), torch.zeros(4).long(), weights=W, samples_per_class=[1] * 10
        ),
        ValueError,
        r"give either samples_per_class \(and beta\) or weights, not both",
    ),
    "neither counts nor weights": (
        lambda: cbfused.class_balanced_loss(x_(), torch.zeros(4).long()),
        ValueError,
        r"needs samples_per_class \(counted over the whole training set\) or ready per-class weights",
    ),
    "sigmoid_focal_loss shape mismatch": (
        lambda: cbfused.sigmoid_focal_loss(torch.randn(3, 4), torch.rand(3, 5)),
        RuntimeError,
        r"targets must have the inputs' shape \[3, 4\], got \[3, 5\]",
    ),
    "sigmoid_focal_loss bad weight": (
        lambda: cbfused.sigmoid_focal_loss(torch.randn(3, 4), torch.rand(3, 4), weight=torch.ones(3)),
        RuntimeError,
        r"weight must have shape \[4\] \(one per class, the inputs' last dimension\), got \[3\]",
    ),
    "gamma < 0 (linear)": (
        lambda: cbfused.linear_class_balanced_loss(
            torch.randn(4, 3), torch.randn(10, 3), None, torch.zeros(4).long(), weights=W, gamma=-3.0
        ),
        ValueError,
        r"gamma must be a finite number >= 0, got -3.0",
    ),
    "ignore_index with float targets": (
        lambda: cbfused.class_balanced_loss(
            x_(), torch.rand(4, 10), weights=W, loss_type="sigmoid", ignore_index=0
        ),
        ValueError,
        r"ignore_index=0 is set but the target is a float tensor \(torch.float32\)",
    ),
    "ignore_index with float targets (module)": (
        lambda: cbfused.ClassBalancedLoss(weights=W, loss_type="softmax", ignore_index=255)(
            x_(), torch.softmax(x_(), 1)
        ),
        ValueError,
        r"ignore_index=255 is set but the target is a float tensor",
    ),
    "ignore_index with float targets (linear)": (
        lambda: cbfused.linear_class_balanced_loss(
            torch.randn(4, 3), torch.randn(10, 3), None, torch.rand(4, 10), weights=W, ignore_index=1
        ),
        ValueError,
        r"ignore_index=1 is set but the target is a float tensor",
    ),
    "sigmoid_focal_loss alpha > 1": (
        lambda: cbfused.sigmoid_focal_loss(torch.randn(3, 4), torch.rand(3, 4), alpha=1.5),
        ValueError,
        r"alpha must be in \[0, 1\] \(or negative to disable it\), got 1.5",
    ),
    "sigmoid_focal raw op alpha > 1": (
        lambda: torch.ops.cbfused.sigmoid_focal(torch.randn(3, 4), torch.rand(3, 4), None, 1.5, 2.0, 0, 0),
        RuntimeError,
        r"alpha must be in \[0, 1\] \(or negative to disable it\), got 1.5",
    ),
    "option set on a module": (
        lambda: setattr(cbfused.ClassBalancedLoss(weights=W), "reduction", "avg"),
        ValueError,
        r"reduction must be one of \['none', 'sum', 'mean', 'weighted_mean'\], got 'avg'",
    ),
    "sigmoid_focal_loss bad reduction": (
        lambda: cbfused.sigmoid_focal_loss(torch.randn(3, 4), torch.rand(3, 4), reduction="weighted_mean"),
        ValueError,
        r"reduction must be one of \['none', 'sum', 'mean'\], got 'weighted_mean'",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case):
    fn, exc, match = CASES[case]
    with pytest.raises(exc, match=match):
        fn()


def test_out_of_range_target_in_a_large_parallel_batch_is_reported():
    x = torch.randn(20000, 10)
    y = torch.randint(0, 10, (20000,))
    y[17777] = 10
    with pytest.raises(RuntimeError, match=r"target 10 is out of range for 10 classes \(sample 17777\)"):
        cbfused.class_balanced_loss(x, y, weights=W)
    # the process is fine afterwards
    y[17777] = 3
    assert torch.isfinite(cbfused.class_balanced_loss(x, y, weights=W))


@pytest.mark.parametrize("bad", [float("nan"), 1.5, -0.25])
@pytest.mark.parametrize("col", [0, 37, 99])  # first lane, a middle block, the row's tail
@pytest.mark.parametrize("loss_type", ["softmax", "sigmoid", "focal", "softmax_focal"])
def test_one_bad_float_target_lane_is_found(loss_type, col, bad):
    """One out-of-range value among valid soft labels: found in whichever lane it sits,
    and reported with its row and value."""
    t = torch.rand(5, 100) * 0.5
    t[3, col] = bad
    with pytest.raises(RuntimeError, match=rf"float target {bad} in row 3 is outside \[0, 1\]"):
        cbfused.class_balanced_loss(torch.randn(5, 100), t, weights=torch.ones(100), loss_type=loss_type)
