"""Agreement with the peers where the semantics meet: F.cross_entropy(weight=...),
torchvision.ops.sigmoid_focal_loss, and the balanced-loss package (whose known defects
we also pin down, so our tests show we do not share them)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from balanced_loss import Loss as BalancedLoss
from testing import make_counts, make_inputs

import cbfused


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weighted_mean_matches_cross_entropy_weight(device, dtype):
    x, y = make_inputs(200, 31, dtype, device, "hard", seed=1, ignore_frac=0.2)
    w = cbfused.class_balanced_weights(make_counts(31), 0.999, device=device)
    xa = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    ours = cbfused.class_balanced_loss(xa, y, weights=w, loss_type="softmax", reduction="weighted_mean")
    ref = F.cross_entropy(xb, y, weight=w.to(dtype))
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours, ref, **tol)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(xa.grad, xb.grad, **tol)
    # the paper's mean divides by the number of samples instead
    paper = cbfused.class_balanced_loss(x, y, weights=w, loss_type="softmax", reduction="mean")
    n_valid = (y != -100).sum()
    per = F.cross_entropy(x, y, weight=w.to(dtype), reduction="sum")
    torch.testing.assert_close(paper, per / n_valid, **tol)


def test_one_hot_float_targets_match_cross_entropy_probabilities(device):
    x, y = make_inputs(50, 12, torch.float64, device, "hard", seed=2, ignore_frac=0)
    w = cbfused.class_balanced_weights(make_counts(12), 0.99, device=device)
    t = F.one_hot(y, 12).double()
    ours = cbfused.class_balanced_loss(x, t, weights=w, loss_type="softmax")
    ref = F.cross_entropy(x, t, weight=w)  # probabilities: mean over N
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sigmoid_focal_loss_matches_torchvision(device, reduction, dtype):
    g = torch.Generator().manual_seed(0)
    for alpha, gamma in [(0.25, 2.0), (-1.0, 0.5), (0.6, 0.0)]:
        x = (torch.randn(64, 80, generator=g, dtype=torch.float64) * 3).to(dtype).to(device)
        t = (torch.rand(64, 80, generator=g) > 0.9).to(dtype).to(device)
        xa = x.clone().requires_grad_()
        xb = x.clone().requires_grad_()
        ours = cbfused.sigmoid_focal_loss(xa, t, alpha=alpha, gamma=gamma, reduction=reduction)
        ref = torchvision.ops.sigmoid_focal_loss(xb, t, alpha=alpha, gamma=gamma, reduction=reduction)
        tol = dict(rtol=2e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ours, ref, **tol)
        go = torch.rand_like(ref)
        (ga,) = torch.autograd.grad(ours, xa, go)
        (gb,) = torch.autograd.grad(ref, xb, go)
        torch.testing.assert_close(ga, gb, **tol)


def test_cb_focal_is_torchvision_focal_times_class_weight(device):
    x, y = make_inputs(40, 10, torch.float64, device, "hard", seed=4, ignore_frac=0)
    w = cbfused.class_balanced_weights(make_counts(10), 0.999, device=device)
    ours = cbfused.class_balanced_loss(x, y, weights=w, loss_type="focal", gamma=2.0, reduction="none")
    tv = torchvision.ops.sigmoid_focal_loss(x, F.one_hot(y, 10).double(), alpha=-1, gamma=2.0)
    torch.testing.assert_close(ours, tv.sum(1) * w[y], rtol=1e-12, atol=1e-12)


def _bl(loss_type, counts, beta, gamma=2.0):
    return BalancedLoss(
        loss_type=loss_type, beta=beta, fl_gamma=gamma, samples_per_class=counts, class_balanced=True
    )


@pytest.mark.parametrize("beta", [0.9, 0.999, 0.9999])
def test_balanced_loss_softmax_and_focal_at_moderate_logits(beta):
    counts = make_counts(10, seed=3).tolist()
    x, y = make_inputs(128, 10, torch.float32, "cpu", "hard", seed=5, scale=2.0, ignore_frac=0)
    ours_ce = cbfused.class_balanced_loss(x, y, samples_per_class=counts, beta=beta, loss_type="softmax")
    torch.testing.assert_close(ours_ce, _bl("cross_entropy", counts, beta)(x, y), rtol=1e-5, atol=1e-6)
    for gamma in (0.5, 1.0, 2.0):
        ours_fl = cbfused.class_balanced_loss(
            x, y, samples_per_class=counts, beta=beta, loss_type="focal", gamma=gamma
        )
        theirs = _bl("focal_loss", counts, beta, gamma)(x, y)
        torch.testing.assert_close(ours_fl, theirs, rtol=1e-5, atol=1e-6)


def test_balanced_loss_defects_we_do_not_share():
    counts = make_counts(10, seed=3).tolist()
    # 1. Focal modulator overflows at a positive-class logit of -100 (float32): loss 0, NaN grad.
    x = torch.zeros(2, 10)
    x[0, 3] = -100.0
    y = torch.tensor([3, 1])
    xa = x.clone().requires_grad_()
    theirs = _bl("focal_loss", counts, 0.999, 0.5)(xa, y)
    theirs.backward()
    assert torch.isnan(xa.grad).any()
    xb = x.clone().requires_grad_()
    ours = cbfused.class_balanced_loss(
        xb, y, samples_per_class=counts, beta=0.999, loss_type="focal", gamma=0.5
    )
    ours.backward()
    assert torch.isfinite(ours) and torch.isfinite(xb.grad).all()
    ref = cbfused.reference.class_balanced_loss(
        x.double(), y, cbfused.class_balanced_weights(counts, 0.999), loss_type="focal", gamma=0.5
    )
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    assert ours.item() > 10  # the -100 logit costs ~100 * w / 2, not 0
    # 2. Its sigmoid loss is averaged over N * C: a factor C below the paper's.
    x, y = make_inputs(64, 10, torch.float32, "cpu", "hard", seed=6, ignore_frac=0)
    theirs = _bl("binary_cross_entropy", counts, 0.999)(x, y)
    ours = cbfused.class_balanced_loss(x, y, samples_per_class=counts, beta=0.999, loss_type="sigmoid")
    torch.testing.assert_close(ours / 10, theirs, rtol=1e-5, atol=1e-6)
    # 3. Its "softmax_binary_cross_entropy" is BCE on softmax probabilities, not softmax CE.
    theirs = _bl("softmax_binary_cross_entropy", counts, 0.999)(x, y)
    ours = cbfused.class_balanced_loss(x, y, samples_per_class=counts, beta=0.999, loss_type="softmax")
    assert not np.isclose(theirs.item(), ours.item(), rtol=1e-2)


@pytest.mark.parametrize("loss_type", ["softmax", "softmax_focal", "sigmoid"])
def test_weighted_mean_divides_by_the_signed_weight_sum(device, loss_type):
    """Class weights whose target sum is negative: F.cross_entropy divides by that signed
    sum; a D <= 0 test once returned 0 with a zero gradient here."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64).to(device)
    y = torch.tensor([0, 1, 2, 3, 4, 1], device=device)
    w = torch.tensor([0.5, -2.0, 1.0, -1.5, 0.25], dtype=torch.float64, device=device)
    assert float(w[y].sum()) < 0
    xa = x.clone().requires_grad_()
    ours = cbfused.class_balanced_loss(
        xa, y, weights=w, loss_type=loss_type, gamma=0.0, reduction="weighted_mean"
    )
    ours.backward()
    xr = x.clone().requires_grad_()
    ref = cbfused.reference.class_balanced_loss(xr, y, w, loss_type, gamma=0.0, reduction="weighted_mean")
    ref.backward()
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(xa.grad, xr.grad, rtol=1e-12, atol=1e-12)
    assert ours.item() != 0 and xa.grad.abs().sum() > 0
    if loss_type == "softmax":
        xb = x.clone().requires_grad_()
        torch_ce = F.cross_entropy(xb, y, weight=w)
        torch_ce.backward()
        torch.testing.assert_close(ours, torch_ce, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-12, atol=1e-12)
    # the fused linear path divides by the same sum
    f = torch.randn(6, 3, generator=g, dtype=torch.float64).to(device)
    W = torch.randn(5, 3, generator=g, dtype=torch.float64).to(device)
    lin = cbfused.linear_class_balanced_loss(
        f, W, None, y, weights=w, loss_type=loss_type, gamma=0.0, reduction="weighted_mean"
    )
    torch.testing.assert_close(
        lin,
        cbfused.reference.class_balanced_loss(
            f @ W.t(), y, w, loss_type, gamma=0.0, reduction="weighted_mean"
        ),
        rtol=1e-12,
        atol=1e-12,
    )
