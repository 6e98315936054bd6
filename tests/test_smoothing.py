"""Label smoothing and the class-weighting rule of softmax cross-entropy (docs/losses.md,
"Label smoothing and class weighting"): against F.cross_entropy(weight, label_smoothing,
ignore_index) where the semantics meet (weighting="class"), against cbfused.reference
everywhere, on the CPU kernels (rows and planes) and the CUDA kernels' source (emulated)."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from testing import (
    assert_bitwise_across_threads,
    assert_close_scaled,
    assert_compiles_like_eager,
    make_counts,
    make_dense_inputs,
    value_and_grad,
)

import cbfused
from cbfused import reference

EPS = [0.0, 0.1, 0.35, 1.0]
# cbfused reduction -> F.cross_entropy's (with weight): 'weighted_mean' is its 'mean'
TORCH_RED = {"weighted_mean": "mean", "sum": "sum", "none": "none"}


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "crop":  # a view along W: copied once by the op
        return x[..., 1:]
    return x


@pytest.mark.parametrize("eps", EPS)
@pytest.mark.parametrize("reduction", list(TORCH_RED))
@pytest.mark.parametrize(
    "shape,layout",
    [
        ((64, 10), "plain"),
        ((37, 1000), "plain"),
        ((3, 7, 5, 6), "plain"),
        ((3, 7, 5, 6), "channels_last"),
        ((3, 7, 5, 6), "crop"),
        ((2, 5, 4), "plain"),
        ((11,), "plain"),
    ],
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else v,
)
def test_class_weighting_equals_torch_with_label_smoothing(shape, layout, reduction, eps):
    g = torch.Generator().manual_seed(sum(shape))
    x = _layout(torch.randn(*shape, generator=g, dtype=torch.float64) * 3, layout)
    C = shape[0] if len(shape) == 1 else shape[1]
    t_shape = () if len(shape) == 1 else (shape[0], *x.shape[2:])
    y = torch.randint(0, C, t_shape, generator=g)
    if y.dim():
        y.view(-1)[::4] = 255  # ignored
    w = torch.rand(C, generator=g, dtype=torch.float64) + 0.1

    def ours(xi):
        return cbfused.class_balanced_loss(
            xi,
            y,
            weights=w,
            loss_type="softmax",
            reduction=reduction,
            ignore_index=255,
            label_smoothing=eps,
            weighting="class",
        )

    def theirs(xi):
        return F.cross_entropy(
            xi, y, weight=w, ignore_index=255, label_smoothing=eps, reduction=TORCH_RED[reduction]
        )

    lo, go = value_and_grad(ours, x)
    lt, gt = value_and_grad(theirs, x)
    torch.testing.assert_close(lo, lt, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(go, gt, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("eps", EPS)
@pytest.mark.parametrize("reduction,torch_reduction", [("mean", "mean"), ("sum", "sum"), ("none", "none")])
@pytest.mark.parametrize("shape", [(50, 10), (9, 300), (2, 6, 5, 7)], ids=lambda s: "x".join(map(str, s)))
def test_class_weighting_on_probability_targets_equals_torch(shape, reduction, torch_reduction, eps):
    """F.cross_entropy(weight=w) on class probabilities: each class term weighted, the mean over
    positions (cbfused's 'mean' divides by the sum of the targets: the positions, for rows that
    sum to 1)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * 2
    t = torch.rand(*shape, generator=g, dtype=torch.float64)
    t = t / t.sum(1, keepdim=True)
    w = torch.rand(shape[1], generator=g, dtype=torch.float64) + 0.1
    lo, go = value_and_grad(
        lambda xi: cbfused.class_balanced_loss(
            xi, t, weights=w, loss_type="softmax", reduction=reduction, label_smoothing=eps, weighting="class"
        ),
        x,
    )
    lt, gt = value_and_grad(
        lambda xi: F.cross_entropy(xi, t, weight=w, label_smoothing=eps, reduction=torch_reduction), x
    )
    torch.testing.assert_close(lo, lt, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(go, gt, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("weighting", ["sample", "class"])
@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_unit_weights_equal_torch_label_smoothing(kind, weighting):
    """With all class weights 1 the two rules coincide with F.cross_entropy(label_smoothing)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 12, generator=g, dtype=torch.float64) * 4
    if kind == "hard":
        y = torch.randint(0, 12, (40,), generator=g)
    else:
        y = torch.softmax(torch.randn(40, 12, generator=g, dtype=torch.float64), 1)
    w = torch.ones(12, dtype=torch.float64)
    lo, go = value_and_grad(
        lambda xi: cbfused.class_balanced_loss(
            xi, y, weights=w, loss_type="softmax", label_smoothing=0.2, weighting=weighting
        ),
        x,
    )
    lt, gt = value_and_grad(lambda xi: F.cross_entropy(xi, y, label_smoothing=0.2), x)
    torch.testing.assert_close(lo, lt, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(go, gt, rtol=1e-12, atol=1e-13)


def _reference(x, y, w, reduction, eps, weighting, ignore_index=-100):
    xr = x.detach().double().requires_grad_()
    yr = y if not y.is_floating_point() else y.double()
    ref = reference.class_balanced_loss(
        xr,
        yr,
        w,
        "softmax",
        reduction=reduction,
        ignore_index=ignore_index,
        label_smoothing=eps,
        weighting=weighting,
    )
    (g,) = torch.autograd.grad(ref.sum(), xr)
    return ref.detach(), g


def _inputs(shape, dtype, kind, seed=0):
    C = shape[1]
    x, y, _ = make_dense_inputs(shape, dtype, kind, "softmax", seed)
    if kind == "soft":
        y[:2].select(1, 0).zero_()  # rows that do not sum to 1 too
    w = torch.as_tensor(cbfused.class_balanced_weights(make_counts(C), 0.999))
    return x, y, w


SHAPES = [(70, 10), (9, 257), (3, 1025), (2, 7, 9, 11), (2, 3, 17)]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("weighting", ["sample", "class"])
@pytest.mark.parametrize("kind", ["hard", "soft"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference_every_dtype_and_layout(shape, dtype, kind, weighting):
    x, y, w = _inputs(shape, dtype, kind)
    for layout in ["plain", "channels_last"] if len(shape) == 4 else ["plain"]:
        xl = _layout(x, layout)
        yl = _layout(y, layout) if y.is_floating_point() else y
        for reduction in ["mean", "weighted_mean", "sum", "none"]:
            lo, go = value_and_grad(
                lambda xi, yl=yl, reduction=reduction: cbfused.class_balanced_loss(
                    xi,
                    yl,
                    weights=w.to(dtype),
                    loss_type="softmax",
                    reduction=reduction,
                    label_smoothing=0.15,
                    weighting=weighting,
                ),
                xl,
            )
            lr, gr = _reference(xl, yl, w.to(dtype), reduction, 0.15, weighting)
            assert_close_scaled(lo, lr.to(dtype), dtype)
            assert_close_scaled(go, gr.to(dtype), dtype)


def test_saturated_logits_stay_exact():
    """p_y -> 1 at logits 1000 apart: the target gradient -P a_y (1 - p_y) + Q (A p_y - a_y)
    has no cancellation; F.cross_entropy agrees in float64, float32 is finite and close."""
    x = torch.tensor([[1000.0, 0.0, -1000.0], [0.0, 2000.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([0, 1])
    w = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
    for dtype in [torch.float64, torch.float32]:
        lo, go = value_and_grad(
            lambda xi, dtype=dtype: cbfused.class_balanced_loss(
                xi,
                y,
                weights=w.to(dtype),
                loss_type="softmax",
                reduction="sum",
                label_smoothing=0.1,
                weighting="class",
            ),
            x.to(dtype),
        )
        lt, gt = value_and_grad(
            lambda xi: F.cross_entropy(xi, y, weight=w, label_smoothing=0.1, reduction="sum"), x
        )
        assert torch.isfinite(lo).all() and torch.isfinite(go).all()
        torch.testing.assert_close(lo.double(), lt, rtol=1e-6, atol=0)
        torch.testing.assert_close(go.double(), gt, rtol=1e-6, atol=1e-7)


def test_class_weighting_without_smoothing_is_the_plain_rule_for_class_indices():
    x, y, w = _inputs((64, 10), torch.float64, "hard")
    a = cbfused.class_balanced_loss(x, y, weights=w, loss_type="softmax", weighting="class")
    b = cbfused.class_balanced_loss(x, y, weights=w, loss_type="softmax")
    assert torch.equal(a, b)
    # ...but not for soft labels, where the rules differ
    xs, t, _ = _inputs((64, 10), torch.float64, "soft")
    a = cbfused.class_balanced_loss(xs, t, weights=w, loss_type="softmax", reduction="sum", weighting="class")
    b = cbfused.class_balanced_loss(xs, t, weights=w, loss_type="softmax", reduction="sum")
    assert not torch.allclose(a, b)


def test_gradcheck_and_opcheck():
    x, y, w = _inputs((6, 5), torch.float64, "hard")
    xs, t, _ = _inputs((2, 5, 3, 2), torch.float64, "soft")
    for weighting in ["sample", "class"]:
        for xi, yi in [(x, y), (xs, t)]:
            f = lambda v, yi=yi, weighting=weighting: cbfused.class_balanced_loss(  # noqa: E731
                v,
                yi,
                weights=w,
                loss_type="softmax",
                reduction="sum",
                label_smoothing=0.3,
                weighting=weighting,
            )
            assert torch.autograd.gradcheck(f, (xi.clone().requires_grad_(),))
            args = (
                xi.clone().requires_grad_(),
                yi,
                w,
                0,
                0.0,
                -1.0,
                1,
                -100,
                2,
                0.3,
                cbfused._ops.WEIGHTINGS[weighting],
            )
            torch.library.opcheck(torch.ops.cbfused.cb_loss.default, args)


def test_compile_fullgraph():
    x, y, w = _inputs((2, 7, 9, 11), torch.float32, "hard")
    crit = cbfused.ClassBalancedLoss(weights=w, loss_type="softmax", label_smoothing=0.1, weighting="class")

    def step(v):
        return crit(v * 2.0, y)

    assert_compiles_like_eager(step, x)


@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_bitwise_across_thread_counts(kind):
    for shape in [(300, 50), (2, 9, 40, 40)]:
        _, y, w = _inputs(shape, torch.float32, kind)
        x = torch.randn(*shape)
        assert_bitwise_across_threads(
            lambda v, y=y, w=w: cbfused.class_balanced_loss(
                v, y, weights=w, loss_type="softmax", label_smoothing=0.1, weighting="class"
            ),
            x,
        )


def test_module_options_and_validation():
    w = torch.rand(5, dtype=torch.float64) + 0.5
    crit = cbfused.ClassBalancedLoss(weights=w, loss_type="softmax", label_smoothing=0.2, weighting="class")
    assert "label_smoothing=0.2" in repr(crit) and "weighting='class'" in repr(crit)
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 5, (8,))
    want = cbfused.class_balanced_loss(
        x, y, weights=w, loss_type="softmax", label_smoothing=0.2, weighting="class"
    )
    assert torch.equal(crit(x, y), want)
    crit.label_smoothing = 0.0
    assert torch.equal(crit(x, y), cbfused.class_balanced_loss(x, y, weights=w, loss_type="softmax"))
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        crit.label_smoothing = 1.5
    with pytest.raises(ValueError, match="weighting='class' applies to loss_type"):
        crit.loss_type = "focal"  # with weighting='class' still set


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"label_smoothing": -0.1}, r"label_smoothing must be in \[0, 1\], got -0.1"),
        ({"label_smoothing": 1.5}, r"label_smoothing must be in \[0, 1\], got 1.5"),
        ({"label_smoothing": math.nan}, r"label_smoothing must be in \[0, 1\], got nan"),
        ({"weighting": "classes"}, r"weighting must be one of \['sample', 'class'\], got 'classes'"),
        (
            {"weighting": "class", "loss_type": "focal"},
            r"applies to loss_type in \['softmax', 'softmax_focal'\]",
        ),
        ({"weighting": "class", "loss_type": "sigmoid"}, r"got loss_type='sigmoid'"),
    ],
)
def test_bad_options_are_named(kwargs, match):
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    kw = {"loss_type": "softmax", **kwargs}
    with pytest.raises(ValueError, match=match):
        cbfused.class_balanced_loss(x, y, weights=torch.ones(3), **kw)
    with pytest.raises(TypeError, match="label_smoothing must be a float"):
        cbfused.class_balanced_loss(x, y, weights=torch.ones(3), loss_type="softmax", label_smoothing="0.1")


def test_raw_op_checks_its_options():
    x, y, w = torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), torch.ones(3)
    with pytest.raises(RuntimeError, match="label_smoothing must be in"):
        torch.ops.cbfused.cb_loss(x, y, w, 0, 0.0, -1.0, 2, -100, 0, 2.0, 0)
    with pytest.raises(RuntimeError, match="unknown weighting code 7"):
        torch.ops.cbfused.cb_loss(x, y, w, 0, 0.0, -1.0, 2, -100, 0, 0.1, 7)
    with pytest.raises(RuntimeError, match="weighting='class' applies to the softmax losses only"):
        torch.ops.cbfused.cb_loss(x, y, w, cbfused._ops.LOSS_TYPES["focal"], 1.0, -1.0, 2, -100, 0, 0.1, 1)


# ---------------------------------------------------------------------------------------------
# The CUDA kernels' source in the CPU emulation (cbfused._emulated_cuda)

if os.environ.get("CBFUSED_EMULATION") == "1":
    import cbfused._emulated_cuda  # noqa: F401

    EMULATED = True
else:
    try:
        import cbfused._emulated_cuda  # noqa: F401

        EMULATED = True
    except ImportError:
        EMULATED = False

# warp per row, several warps, block per row (C > 1024), a row too long for the shared-memory
# cache (C = 8142 bfloat16 / float32 past 80 KiB per block only for block rows: it fits),
# the planes layout and channels-last rows
EMU_SHAPES = [(37, 10), (9, 257), (3, 1025), (2, 8142), (2, 7, 9, 11), (3, 5, 1, 300)]


@pytest.mark.skipif(not EMULATED, reason="the CUDA emulation is built by `make test`")
@pytest.mark.parametrize("weighting", ["sample", "class"])
@pytest.mark.parametrize("kind", ["hard", "soft"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", EMU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_emulated_cuda_kernels_match_reference(shape, dtype, kind, weighting):
    if dtype == torch.float64 and shape[1] > 1024:
        pytest.skip("block-per-row path covered by float32 / bfloat16 (keeps the emulation fast)")
    x, y, w = _inputs(shape, dtype, kind, seed=2)
    layouts = ["plain", "channels_last"] if len(shape) == 4 else ["plain"]
    for layout in layouts:
        xl = _layout(x, layout)
        yl = _layout(y, layout) if y.is_floating_point() else y
        for reduction in ["weighted_mean", "none"]:
            red = cbfused._ops.REDUCTIONS[reduction]
            loss, grad, scale = torch.ops.cbfused_emu.cb_loss(
                xl, yl, w.to(dtype), 0, 0.0, -1.0, red, -100, 1, 0.15, cbfused._ops.WEIGHTINGS[weighting]
            )
            g = (grad.double() * scale.double()).to(dtype)
            lr, gr = _reference(xl, yl, w.to(dtype), reduction, 0.15, weighting)
            assert_close_scaled(loss, lr.to(dtype), dtype)
            assert_close_scaled(g, gr.to(dtype), dtype)


@pytest.mark.parametrize("weighting", ["sample", "class"])
@pytest.mark.parametrize("reduction", ["weighted_mean", "sum", "none"])
def test_fused_linear_path(reduction, weighting):
    """linear_class_balanced_loss (chunked) with label smoothing equals the plain loss on the
    materialised logits, and with weighting='class' torch's F.linear_cross_entropy."""
    g = torch.Generator().manual_seed(11)
    n, h, c = 45, 16, 30
    f = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(c, h, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(c, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, c, (n,), generator=g)
    y[::6] = -100
    w = torch.rand(c, generator=g, dtype=torch.float64) + 0.2
    kw = dict(weights=w, loss_type="softmax", reduction=reduction, label_smoothing=0.2, weighting=weighting)
    ours = cbfused.linear_class_balanced_loss(f, W, b, y, chunk_rows=8, **kw)
    go = torch.autograd.grad(ours.sum(), (f, W, b))
    plain = cbfused.class_balanced_loss(torch.addmm(b, f, W.t()), y, **kw)
    gp = torch.autograd.grad(plain.sum(), (f, W, b))
    torch.testing.assert_close(ours, plain, rtol=1e-12, atol=1e-12)
    for a, e in zip(go, gp, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-11, atol=1e-12)
    if weighting == "class":
        theirs = F.linear_cross_entropy(
            f,
            W,
            y,
            linear_bias=b,
            weight=w,
            reduction=TORCH_RED[reduction],
            ignore_index=-100,
            label_smoothing=0.2,
        )
        gt = torch.autograd.grad(theirs.sum(), (f, W, b))
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
        for a, e in zip(go, gt, strict=True):
            torch.testing.assert_close(a, e, rtol=1e-11, atol=1e-12)
