"""Every loss type x target kind x reduction x dtype against cbfused.reference: values and
gradients, on shapes that stress the kernels (N = 0, C = 1, odd C, C = 8142, slices)."""

from __future__ import annotations

import itertools

import pytest
import torch
from testing import DTYPES, LOSS_TYPES, REDUCTIONS, assert_close_scaled, make_counts, make_inputs

import cbfused
from cbfused import reference as R


def run_both(x, y, w, loss_type, reduction, gamma=1.5, alpha=None, grad_seed=1):
    xa = x.detach().clone().requires_grad_()
    xb = x.detach().clone().requires_grad_()
    ours = cbfused.class_balanced_loss(
        xa, y, weights=w, loss_type=loss_type, gamma=gamma, alpha=alpha, reduction=reduction
    )
    ref = R.class_balanced_loss(xb, y, w, loss_type=loss_type, gamma=gamma, alpha=alpha, reduction=reduction)
    g = torch.Generator().manual_seed(grad_seed)
    go = torch.randn(ref.shape, generator=g, dtype=torch.float64).to(ref.dtype).to(ref.device)
    (ga,) = torch.autograd.grad(ours, xa, go)
    (gb,) = torch.autograd.grad(ref, xb, go)
    return ours, ref, ga, gb


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("kind", ["hard", "float"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matrix_against_reference(device, loss_type, kind, reduction, dtype):
    n, c = 67, 37
    x, y = make_inputs(n, c, dtype, device, kind, loss_type, seed=hash((loss_type, kind)) % 1000)
    w = cbfused.class_balanced_weights(make_counts(c), 0.999, device=device)
    alpha = 0.3 if loss_type in ("focal", "sigmoid") else None
    ours, ref, ga, gb = run_both(x, y, w, loss_type, reduction, alpha=alpha)
    assert_close_scaled(ours, ref, dtype)
    assert_close_scaled(ga, gb, dtype)


SHAPES = [(0, 5), (1, 1), (9, 1), (5, 2), (33, 7), (16, 17), (3, 8142), (2, 8191), (300, 10)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_shapes(device, shape, loss_type, dtype):
    n, c = shape
    for kind, reduction in itertools.product(["hard", "float"], ["mean", "none"]):
        x, y = make_inputs(n, c, dtype, device, kind, loss_type, seed=n * 31 + c)
        w = cbfused.class_balanced_weights(make_counts(c, seed=c), 0.99, device=device)
        ours, ref, ga, gb = run_both(x, y, w, loss_type, reduction)
        assert_close_scaled(ours, ref, dtype)
        assert_close_scaled(ga, gb, dtype)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_non_contiguous_and_offset_views(device, loss_type):
    dtype = torch.float32
    big, yb = make_inputs(40, 61, dtype, device, "float", loss_type, seed=3)
    w = cbfused.class_balanced_weights(make_counts(23, seed=5), 0.999, device=device)
    views = {
        "column slice (row stride 61, offset 7)": (big[:, 7:30], yb[:, 7:30]),
        "row step": (big[::3, :23], yb[::3, :23]),
        "transposed": (big[:23, :30].t(), yb[:23, :30].t()),
    }
    for name, (x, t) in views.items():
        if loss_type.startswith("softmax"):
            t = t / t.sum(1, keepdim=True).clamp(min=1e-3)
            t = t.clamp(max=1)
        xs = x if x.shape[1] == 23 else x[:, :23]
        ts = t if t.shape[1] == 23 else t[:, :23]
        assert not xs.is_contiguous() or xs.storage_offset() > 0, name
        ours, ref, ga, gb = run_both(xs, ts, w, loss_type, "mean")
        assert_close_scaled(ours, ref, dtype)
        assert_close_scaled(ga, gb, dtype)
        # hard targets from a strided int view
        yh = (torch.arange(xs.shape[0] * 2, device=device) % 23)[::2]
        assert not yh.is_contiguous()
        ours, ref, ga, gb = run_both(xs, yh, w, loss_type, "sum")
        assert_close_scaled(ours, ref, dtype)
        assert_close_scaled(ga, gb, dtype)


@pytest.mark.parametrize("logits_dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_class_weights_of_any_float_dtype_and_stride(device, logits_dtype):
    """The class weights are read in the accumulation type (float64 for float64 logits, else
    float32) from any floating dtype and any stride: the result is bit for bit that of the
    weights converted up front, for both ops."""
    x, y = make_inputs(13, 11, logits_dtype, device, "hard", seed=9)
    acc = torch.float64 if logits_dtype == torch.float64 else torch.float32
    base = torch.rand(22, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).to(device) + 0.25
    t = (torch.rand(13, 11, generator=torch.Generator().manual_seed(3)) > 0.6).to(logits_dtype).to(device)
    for wdt in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        for w in (base.to(wdt)[:11], base.to(wdt)[::2]):  # contiguous, and stride 2
            w_acc = w.to(acc).contiguous()
            for lt in range(4):
                a = torch.ops.cbfused.cb_loss(x, y, w, lt, 2.0, -1.0, 0, -100, 1)
                b = torch.ops.cbfused.cb_loss(x, y, w_acc, lt, 2.0, -1.0, 0, -100, 1)
                assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), (wdt, w.stride(), lt)
            a = torch.ops.cbfused.sigmoid_focal(x, t, w, 0.25, 2.0, 0, 1)
            b = torch.ops.cbfused.sigmoid_focal(x, t, w_acc, 0.25, 2.0, 0, 1)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), (wdt, w.stride())
            # and the weights are used at all: doubling them doubles the loss
            c = torch.ops.cbfused.cb_loss(x, y, w * 2, 1, 2.0, -1.0, 0, -100, 1)
            d = torch.ops.cbfused.cb_loss(x, y, w_acc, 1, 2.0, -1.0, 0, -100, 1)
            assert torch.equal(c[0].double(), 2 * d[0].double())


@pytest.mark.parametrize("shape", [(1000, 37), (200, 300)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("kind", ["hard", "float"])
@pytest.mark.parametrize("loss_type", ["softmax", "softmax_focal"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_softmax_row_groups_across_chunks(device, shape, kind, loss_type, dtype):
    """Softmax rows go through the CPU kernel in groups (up to one vector's lanes, 4096 // C
    rows) inside fixed chunks of 16384 // C rows, so groups end short at every chunk
    boundary (37: chunks of 442 rows, groups of 16; 300: 54 rows, groups of 13). Every
    row's loss and gradient must still be its own: per-row losses against the reference,
    ignored rows (a fifth, scattered through the groups) exactly +0."""
    n, c = shape
    x, y = make_inputs(n, c, dtype, device, kind, loss_type, seed=c, ignore_frac=0.2)
    w = cbfused.class_balanced_weights(make_counts(c, seed=c), 0.999, device=device)
    for reduction in ("none", "mean"):
        ours, ref, ga, gb = run_both(x, y, w, loss_type, reduction)
        assert_close_scaled(ours, ref, dtype)
        assert_close_scaled(ga, gb, dtype)
        if reduction == "none" and kind == "hard":
            ignored = y == -100
            assert ignored.sum() > n // 10
            assert (ours[ignored] == 0).all() and not torch.signbit(ours[ignored]).any()
            assert (ga[ignored] == 0).all()


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0, 3.0, 5.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_gamma_range(device, loss_type, gamma, dtype):
    """Every gamma path of the kernels (hard targets: an integer gamma is a product, 1 and 2
    compiled as constants on the CPU; other values an exp), with and without alpha, in rows
    with vectors on both sides of the class."""
    c = 40
    x, y = make_inputs(50, c, dtype, device, "hard", loss_type, seed=int(gamma * 10))
    w = cbfused.class_balanced_weights(make_counts(c), 0.9, device=device)
    for alpha in [None, 0.25] if loss_type in ("sigmoid", "focal") else [None]:
        ours, ref, ga, gb = run_both(x, y, w, loss_type, "mean", gamma=gamma, alpha=alpha)
        assert_close_scaled(ours, ref, dtype)
        assert_close_scaled(ga, gb, dtype)


def test_gamma_zero_focal_equals_sigmoid(device):
    x, y = make_inputs(40, 9, torch.float64, device, "hard", seed=2)
    w = torch.rand(9, dtype=torch.float64, device=device) + 0.5
    a = cbfused.class_balanced_loss(x, y, weights=w, loss_type="focal", gamma=0.0)
    b = cbfused.class_balanced_loss(x, y, weights=w, loss_type="sigmoid")
    torch.testing.assert_close(a, b, rtol=1e-13, atol=0)
    a = cbfused.class_balanced_loss(x, y, weights=w, loss_type="softmax_focal", gamma=0.0)
    b = cbfused.class_balanced_loss(x, y, weights=w, loss_type="softmax")
    torch.testing.assert_close(a, b, rtol=1e-13, atol=0)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_all_ignored_and_empty_give_zero_not_nan(device, loss_type):
    w = torch.ones(6, device=device)
    for n in (0, 5):
        x = torch.randn(n, 6, device=device, requires_grad=True)
        y = torch.full((n,), -100, device=device)
        for red in ("mean", "weighted_mean", "sum"):
            loss = cbfused.class_balanced_loss(x, y, weights=w, loss_type=loss_type, reduction=red)
            loss.backward()
            assert loss.item() == 0.0
            assert torch.equal(x.grad, torch.zeros_like(x))
            x.grad = None
        # float targets that are all zero: D = sum t = 0
        t = torch.zeros(n, 6, device=device)
        loss = cbfused.class_balanced_loss(x, t, weights=w, loss_type=loss_type)
        loss.backward()
        assert loss.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))


def test_custom_ignore_index_and_int32_targets(device):
    x, y = make_inputs(30, 7, torch.float64, device, "hard", seed=9, ignore_frac=0)
    y[::4] = 255
    w = cbfused.class_balanced_weights(make_counts(7), 0.99, device=device)
    for loss_type in LOSS_TYPES:
        ours = cbfused.class_balanced_loss(
            x, y.int(), weights=w, loss_type=loss_type, ignore_index=255, reduction="none"
        )
        ref = R.class_balanced_loss(x, y, w, loss_type=loss_type, ignore_index=255, reduction="none")
        assert_close_scaled(ours, ref, torch.float64)
        assert (ours[::4] == 0).all()


def test_counts_path_equals_weights_path(device):
    counts = make_counts(11)
    x, y = make_inputs(20, 11, torch.float32, device, "hard", seed=4)
    a = cbfused.class_balanced_loss(x, y, samples_per_class=counts, beta=0.99, loss_type="softmax")
    w = cbfused.class_balanced_weights(counts, 0.99, device=device)
    b = cbfused.class_balanced_loss(x, y, weights=w, loss_type="softmax")
    assert torch.equal(a, b)
    m = cbfused.ClassBalancedLoss(counts, beta=0.99, loss_type="softmax").to(device)
    assert torch.equal(m(x, y), b)


def test_sigmoid_focal_loss_against_reference(device):
    g = torch.Generator().manual_seed(0)
    for dtype in DTYPES:
        for shape in [(40, 9), (3, 4, 17), (0, 5), (11,)]:
            x = (torch.randn(shape, generator=g, dtype=torch.float64) * 4).to(dtype).to(device)
            t = torch.rand(shape, generator=g, dtype=torch.float64).to(dtype).to(device)  # soft targets too
            k = shape[-1]
            w = torch.rand(k, generator=g, dtype=torch.float64).to(device) + 0.5
            for reduction, alpha, gamma, weight in itertools.product(
                ["none", "mean", "sum"], [0.25, -1.0], [0.0, 0.5, 2.0], [None, w]
            ):
                xa = x.clone().requires_grad_()
                xb = x.clone().requires_grad_()
                a = cbfused.sigmoid_focal_loss(xa, t, alpha, gamma, reduction, weight=weight)
                b = R.sigmoid_focal_loss(xb, t, alpha, gamma, reduction, weight=weight)
                assert_close_scaled(a, b, dtype)
                go = torch.randn(b.shape, generator=g, dtype=torch.float64).to(dtype).to(device)
                (ga,) = torch.autograd.grad(a, xa, go)
                (gb,) = torch.autograd.grad(b, xb, go)
                assert_close_scaled(ga, gb, dtype)
