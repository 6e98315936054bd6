"""Adjusted logits of the softmax losses, inside the fused kernels (docs/losses.md, "Adjusted
logits"): training-time logit adjustment (Menon et al.; Balanced Softmax at tau = 1), LDAM's
target margin and a logit scale. Against F.cross_entropy on the adjusted logits where the
semantics meet, against cbfused.reference everywhere, on the CPU kernels (rows and planes)
and the CUDA kernels' source (emulated)."""

from __future__ import annotations

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

C = 12


def _prior(counts):
    n = counts.double()
    return n / n.sum()


def _layout(x, layout):
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def _torch_adjusted(x, y, counts, tau, margins, scale):
    """The adjusted logits written out in torch ops: s x + tau log(pi), less s margins[y] on the
    target class (classes along dimension 1)."""
    shape = [1] * x.dim()
    shape[1] = -1
    z = scale * x + tau * _prior(counts).log().to(x.dtype).reshape(shape)
    if margins is not None:
        onehot = F.one_hot(y.clamp(min=0), x.shape[1]).movedim(-1, 1).to(x.dtype)
        z = z - scale * onehot * margins.to(x.dtype).reshape(shape)
    return z


@pytest.mark.parametrize(
    "kw",
    [
        {"logit_adjustment": 1.0},
        {"logit_adjustment": 0.5},
        {"margins": True, "logit_scale": 30.0},
        {"logit_adjustment": 1.0, "margins": True, "logit_scale": 2.0},
        {"margins": True},  # s Delta <= log 2: the CPU exchanges the target's term after the sums
        {"logit_adjustment": 1.0, "margins": True},
        {"logit_adjustment": 1.0, "label_smoothing": 0.1, "weighting": "class"},
    ],
    ids=lambda kw: ",".join(kw),
)
@pytest.mark.parametrize(
    "shape,layout",
    [((64, C), "plain"), ((3, C, 5, 6), "plain"), ((3, C, 5, 6), "channels_last"), ((C,), "plain")],
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else v,
)
def test_equals_torch_cross_entropy_on_the_adjusted_logits(shape, layout, kw):
    """weighted_mean, sum and none equal F.cross_entropy(weight, ignore_index) on
    s x + tau log(pi) - s Delta_y e_y, values and gradients, in float64."""
    g = torch.Generator().manual_seed(len(shape))
    counts = make_counts(C, seed=3)
    x = _layout(torch.randn(*shape, generator=g, dtype=torch.float64) * 2, layout)
    t_shape = () if len(shape) == 1 else (shape[0], *shape[2:])
    y = torch.randint(0, C, t_shape, generator=g)
    if y.dim():
        y.view(-1)[::5] = -100
    w = torch.rand(C, generator=g, dtype=torch.float64) + 0.2
    margins = cbfused.ldam_margins(counts) if kw.get("margins") else None
    args = {**kw, "margins": margins}
    tau, scale = kw.get("logit_adjustment", 0.0), kw.get("logit_scale", 1.0)
    eps = kw.get("label_smoothing", 0.0)
    yb = y if x.dim() > 1 else y.unsqueeze(0)
    for reduction, torch_reduction in [("weighted_mean", "mean"), ("sum", "sum"), ("none", "none")]:
        lo, go = value_and_grad(
            lambda xi, reduction=reduction: cbfused.class_balanced_loss(
                xi,
                y,
                weights=w,
                prior=_prior(counts) if tau else None,
                loss_type="softmax",
                reduction=reduction,
                **args,
            ),
            x,
        )

        def theirs(xi, torch_reduction=torch_reduction):
            xi2 = xi if xi.dim() > 1 else xi.unsqueeze(0)
            out = F.cross_entropy(
                _torch_adjusted(xi2, yb, counts, tau, margins, scale),
                yb,
                weight=w,
                ignore_index=-100,
                label_smoothing=eps,
                reduction=torch_reduction,
            )
            return out if xi.dim() > 1 or torch_reduction != "none" else out.squeeze(0)

        lt, gt = value_and_grad(theirs, x)
        torch.testing.assert_close(lo, lt, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(go, gt, rtol=1e-11, atol=1e-12)


def test_balanced_softmax_from_the_class_counts():
    """tau = 1 with samples_per_class: Balanced Softmax (Ren et al.) = cross-entropy on
    x + log(pi), with the class-balanced weights of the same counts."""
    counts = make_counts(C, seed=5)
    x = torch.randn(40, C, dtype=torch.float64)
    y = torch.randint(0, C, (40,))
    w = cbfused.class_balanced_weights(counts, 0.99)
    lo, go = value_and_grad(
        lambda xi: cbfused.class_balanced_loss(
            xi,
            y,
            samples_per_class=counts,
            beta=0.99,
            loss_type="softmax",
            reduction="weighted_mean",
            logit_adjustment=1.0,
        ),
        x,
    )
    lt, gt = value_and_grad(lambda xi: F.cross_entropy(xi + _prior(counts).log(), y, weight=w), x)
    torch.testing.assert_close(lo, lt, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(go, gt, rtol=1e-12, atol=1e-13)


def test_post_hoc_adjustment_inverts_the_training_offset():
    """adjust_logits(z, counts, tau) removes what logit_adjustment=tau added: the loss on
    adjust_logits-adjusted logits with training-time adjustment equals the plain loss."""
    counts = make_counts(C, seed=2)
    x = torch.randn(30, C, dtype=torch.float64)
    y = torch.randint(0, C, (30,))
    w = torch.ones(C, dtype=torch.float64)
    a = cbfused.class_balanced_loss(
        cbfused.adjust_logits(x, counts, tau=0.8),
        y,
        weights=w,
        prior=_prior(counts),
        loss_type="softmax",
        logit_adjustment=0.8,
    )
    b = cbfused.class_balanced_loss(x, y, weights=w, loss_type="softmax")
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _inputs(shape, dtype, kind, seed=0):
    c = shape[1]
    x, y, _ = make_dense_inputs(shape, dtype, kind, "softmax", seed)
    counts = make_counts(c, seed=seed)
    return x, y, counts


def _reference(x, y, counts, loss_type, reduction, tau, margins, scale, eps=0.0, weighting="sample"):
    xr = x.detach().double().requires_grad_()
    yr = y if not y.is_floating_point() else y.double()
    w = cbfused.class_balanced_weights(counts, 0.999)
    ref = reference.class_balanced_loss(
        xr,
        yr,
        w,
        loss_type,
        gamma=1.5,
        reduction=reduction,
        label_smoothing=eps,
        weighting=weighting,
        logit_offset=tau * _prior(counts).log(),
        margins=margins,
        logit_scale=scale,
    )
    (g,) = torch.autograd.grad(ref.sum(), xr)
    return ref.detach(), g


def _ours(x, y, counts, loss_type, reduction, tau, margins, scale, eps=0.0, weighting="sample"):
    return value_and_grad(
        lambda xi: cbfused.class_balanced_loss(
            xi,
            y,
            samples_per_class=counts,
            beta=0.999,
            loss_type=loss_type,
            gamma=1.5,
            reduction=reduction,
            logit_adjustment=tau,
            margins=margins,
            logit_scale=scale,
            label_smoothing=eps,
            weighting=weighting,
        ),
        x,
    )


SHAPES = [(70, 10), (9, 257), (3, 1025), (2, 7, 9, 11)]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("kind", ["hard", "soft"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("loss_type", ["softmax", "softmax_focal"])
def test_matches_reference_every_dtype_and_layout(loss_type, shape, dtype, kind):
    x, y, counts = _inputs(shape, dtype, kind)
    margins = cbfused.ldam_margins(counts) if kind == "hard" else None
    for layout in ["plain", "channels_last"] if len(shape) == 4 else ["plain"]:
        xl = _layout(x, layout)
        yl = _layout(y, layout) if y.is_floating_point() else y
        # s Delta up to 1.5, and (s = 1, LDAM's max_margin 0.5) up to log 2, where the CPU
        # exchanges the target's term of the sum after the passes
        for reduction, tau, scale in [
            ("mean", 0.7, 3.0),
            ("none", 0.7, 3.0),
            ("mean", 0.0, 1.0),
            ("none", 0.7, 1.0),
        ]:
            lo, go = _ours(xl, yl, counts, loss_type, reduction, tau, margins, scale)
            lr, gr = _reference(xl, yl, counts, loss_type, reduction, tau, margins, scale)
            assert_close_scaled(lo, lr.to(dtype), dtype)
            assert_close_scaled(go, gr.to(dtype), dtype)
        for weighting in ["class", "sample"]:  # with label smoothing, both weighting rules
            lo, go = _ours(xl, yl, counts, loss_type, "sum", 1.0, margins, 2.0, 0.1, weighting)
            lr, gr = _reference(xl, yl, counts, loss_type, "sum", 1.0, margins, 2.0, 0.1, weighting)
            assert_close_scaled(lo, lr.to(dtype), dtype)
            assert_close_scaled(go, gr.to(dtype), dtype)


def test_saturated_scaled_logits_stay_finite():
    """LDAM's s = 30 on logits of +-20 (z up to 600): finite, and equal to F.cross_entropy to
    a few ulp of the largest adjusted logit (the rounding of z = s x itself: 600 * 2^-24 =
    3.6e-5 in float32)."""
    counts = make_counts(4, seed=1)
    m = cbfused.ldam_margins(counts)
    x = torch.tensor([[20.0, -20.0, 0.0, 5.0], [-20.0, 20.0, 19.9, 0.0]], dtype=torch.float64)
    y = torch.tensor([0, 2])
    w = torch.ones(4, dtype=torch.float64)
    want_l, want_g = value_and_grad(
        lambda xi: F.cross_entropy(_torch_adjusted(xi, y, counts, 0.0, m, 30.0), y, reduction="sum"), x
    )
    for dtype in [torch.float64, torch.float32]:
        lo, go = value_and_grad(
            lambda xi, dtype=dtype: cbfused.class_balanced_loss(
                xi, y, weights=w.to(dtype), loss_type="softmax", reduction="sum", margins=m, logit_scale=30.0
            ),
            x.to(dtype),
        )
        assert torch.isfinite(lo).all() and torch.isfinite(go).all()
        ulp_z = 600.0 * torch.finfo(dtype).eps
        torch.testing.assert_close(lo.double(), want_l, rtol=0, atol=8 * ulp_z)
        torch.testing.assert_close(go.double(), want_g, rtol=0, atol=8 * ulp_z * 30)


@pytest.mark.parametrize(
    "s, margins",
    [(32.0, [0.5, 1.5, -0.25, 3.0, 7.0]), (1.0, [0.5, 0.125, 0.6875, 0.25, 0.0])],
    ids=["margins-in-the-passes", "margins-after-the-sums"],
)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("shape", [(256, 5), (256, 80), (4, 5, 8, 8)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("loss_type", ["softmax", "softmax_focal"])
def test_float32_margins_keep_confident_rows_to_an_ulp_of_one(loss_type, shape, smoothing, s, margins):
    """Rows whose target leads the other logits by 0 to 100, with target margins M = s Delta
    of -8, 16, 48, 96 and 224, or of 0 to 0.6875 (<= log 2): float32 loss and gradient
    (d / dz) within 4 ulp of one (of the loss where it is larger) of the float64 reference,
    the confident rows' small 1 - p_y included. The exps' shift must be the max of the logits
    with the margin (the target's own where it leads, so its term is exp(0) = 1): a kernel
    that shifted by the max before the margin, tried as a speed-up, was off by about an ulp
    of M (9 to 46 ulp at M = 48) and at M = 96 underflowed the whole sum. Only where every
    M <= log 2 does the CPU shift by the max before the margin (an ulp of M is then at most
    half an ulp of one) and exchange the target's term of the sum after the passes: the
    second case. The loss without the gradient (the forward-only kernels) is the same to the
    bit. Logits, scale and margins are exact in float32, so only the kernels' own rounding
    is measured."""
    g = torch.Generator().manual_seed(11)
    n, c = shape[0], shape[1]
    x = torch.randint(-128, 129, shape, generator=g).double() / (8 * s)  # z = s x, multiples of 1/8
    y = torch.randint(0, c, (n, *shape[2:]), generator=g)
    lead = (torch.arange(y.numel()) % 101).double().reshape(y.shape) / s  # 0 .. 100 in z
    x.scatter_(1, y.unsqueeze(1), (x.amax(1) + lead).unsqueeze(1))
    margins = torch.tensor(margins, dtype=torch.float64).repeat((c + 4) // 5)[:c]
    w = torch.ones(c, dtype=torch.float64)
    kw = dict(loss_type=loss_type, gamma=2.0, margins=margins, logit_scale=s, label_smoothing=smoothing)
    lo, go = value_and_grad(
        lambda xi: cbfused.class_balanced_loss(xi, y, weights=w.float(), reduction="none", **kw), x.float()
    )
    with torch.no_grad():
        assert torch.equal(
            cbfused.class_balanced_loss(x.float(), y, weights=w.float(), reduction="none", **kw), lo
        )
    lr, gr = value_and_grad(lambda xi: reference.class_balanced_loss(xi, y, w, reduction="none", **kw), x)
    eps = torch.finfo(torch.float32).eps
    tol = 4 * eps * lr.abs().clamp(min=1)
    err = (lo.double() - lr).abs()
    assert (err <= tol).all(), f"loss off by {(err / tol).max():.1f}x the tolerance"
    gerr = (go.double() - gr).abs() / s  # d / dx = s d / dz
    assert (gerr <= 4 * eps).all(), f"gradient off by {gerr.max() / eps:.1f} ulp of one"


def test_gradcheck_opcheck_and_compile():
    x, y, counts = _inputs((6, 5), torch.float64, "hard")
    m = cbfused.ldam_margins(counts)
    f = lambda v: cbfused.class_balanced_loss(  # noqa: E731
        v,
        y,
        samples_per_class=counts,
        loss_type="softmax_focal",
        gamma=1.5,
        reduction="sum",
        logit_adjustment=1.0,
        margins=m,
        logit_scale=2.0,
    )
    assert torch.autograd.gradcheck(f, (x.clone().requires_grad_(),))
    offset = _prior(counts).log()
    args = (
        x.clone().requires_grad_(),
        y,
        torch.ones(5, dtype=torch.float64),
        3,
        1.5,
        -1.0,
        1,
        -100,
        2,
        0.0,
        0,
        offset,
        m,
        2.0,
    )
    torch.library.opcheck(torch.ops.cbfused.cb_loss.default, args)

    crit = cbfused.ClassBalancedLoss(
        counts, loss_type="softmax", logit_adjustment=1.0, margins=m, logit_scale=4.0
    )
    xs = torch.randn(2, 5, 7, 3)
    ys = torch.randint(0, 5, (2, 7, 3))
    assert_compiles_like_eager(lambda v: crit(v * 2.0, ys), xs)


def test_bitwise_across_thread_counts():
    for shape in [(300, 50), (2, 9, 40, 40)]:
        _, y, counts = _inputs(shape, torch.float32, "hard")
        m = cbfused.ldam_margins(counts)
        x = torch.randn(*shape)
        assert_bitwise_across_threads(
            lambda v, y=y, counts=counts, m=m: cbfused.class_balanced_loss(
                v,
                y,
                samples_per_class=counts,
                loss_type="softmax",
                logit_adjustment=1.0,
                margins=m,
                logit_scale=5.0,
            ),
            x,
        )


def test_module_keeps_its_offset_and_margins_in_float64():
    counts = make_counts(C, seed=4)
    m = cbfused.ldam_margins(counts)
    crit = cbfused.ClassBalancedLoss(
        counts, loss_type="softmax", logit_adjustment=1.0, margins=m, logit_scale=10.0
    )
    assert crit.logit_offset.dtype == torch.float64 and crit.margins.dtype == torch.float64
    torch.testing.assert_close(crit.logit_offset, _prior(counts).log())
    assert "logit_adjustment=1.0" in repr(crit) and "logit_scale=10.0" in repr(crit)
    x, y = torch.randn(16, C), torch.randint(0, C, (16,))
    want = cbfused.class_balanced_loss(
        x, y, samples_per_class=counts, loss_type="softmax", logit_adjustment=1.0, margins=m, logit_scale=10.0
    )
    torch.testing.assert_close(crit(x, y), want, rtol=0, atol=0)
    crit.half()
    assert crit.logit_offset.dtype == torch.float64 and crit.margins.dtype == torch.float64
    crit.logit_scale = 1.0
    crit.float()
    assert not torch.equal(crit(x, y), want)
    with pytest.raises(ValueError, match="logit_scale must be a finite number > 0, got -1"):
        crit.logit_scale = -1.0


def test_fused_linear_path():
    g = torch.Generator().manual_seed(9)
    n, h = 37, 8
    counts = make_counts(C, seed=6)
    m = cbfused.ldam_margins(counts)
    f = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(C, h, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(C, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, C, (n,), generator=g)
    kw = dict(samples_per_class=counts, loss_type="softmax", logit_adjustment=1.0, margins=m, logit_scale=3.0)
    for reduction in ["mean", "none"]:
        ours = cbfused.linear_class_balanced_loss(f, W, b, y, reduction=reduction, chunk_rows=8, **kw)
        go = torch.autograd.grad(ours.sum(), (f, W, b))
        plain = cbfused.class_balanced_loss(torch.addmm(b, f, W.t()), y, reduction=reduction, **kw)
        gp = torch.autograd.grad(plain.sum(), (f, W, b))
        torch.testing.assert_close(ours, plain, rtol=1e-12, atol=1e-12)
        for a, e in zip(go, gp, strict=True):
            torch.testing.assert_close(a, e, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        ({"logit_adjustment": float("nan")}, ValueError, "logit_adjustment must be a finite number, got nan"),
        ({"logit_scale": 0.0}, ValueError, r"logit_scale must be a finite number > 0, got 0.0"),
        ({"logit_scale": float("inf")}, ValueError, "logit_scale must be a finite number > 0, got inf"),
        ({"logit_adjustment": 1.0, "loss_type": "focal"}, ValueError, "apply to the softmax losses"),
        ({"logit_scale": 2.0, "loss_type": "sigmoid"}, ValueError, "apply to the softmax losses"),
        ({"margins": torch.ones(3), "loss_type": "focal"}, ValueError, "margins apply to the softmax losses"),
        ({"margins": torch.ones(3, 1)}, ValueError, r"margins must be a 1-D \[C\] tensor, got \[3, 1\]"),
        ({"logit_adjustment": 1.0, "weights": torch.ones(3)}, ValueError, "needs the class prior"),
        ({"prior": torch.ones(3) / 3}, ValueError, "prior is given but logit_adjustment is 0"),
        (
            {"logit_adjustment": 1.0, "prior": torch.tensor([0.5, 0.5, 0.0])},
            ValueError,
            "prior must be finite and > 0 for every class, got 0.0 for class 2",
        ),
        ({"logit_adjustment": "1"}, TypeError, "logit_adjustment must be a float"),
    ],
)
def test_bad_values_are_named(kwargs, err, match):
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    kw = {"loss_type": "softmax", "samples_per_class": [5, 3, 1], **kwargs}
    if "weights" in kw:
        kw.pop("samples_per_class")
    with pytest.raises(err, match=match):
        cbfused.class_balanced_loss(x, y, **kw)


def test_margins_need_class_indices_and_the_right_length():
    x = torch.randn(4, 3)
    t = torch.softmax(torch.randn(4, 3), 1)
    with pytest.raises(ValueError, match="margins apply to class-index targets only"):
        cbfused.class_balanced_loss(x, t, weights=torch.ones(3), loss_type="softmax", margins=torch.ones(3))
    with pytest.raises(RuntimeError, match=r"margins must have shape \[3\] \(one per class\), got \[4\]"):
        cbfused.class_balanced_loss(
            x, torch.tensor([0, 1, 2, 0]), weights=torch.ones(3), loss_type="softmax", margins=torch.ones(4)
        )


# ---------------------------------------------------------------------------------------------
# The CUDA kernels' source in the CPU emulation (cbfused._emulated_cuda)

try:
    import cbfused._emulated_cuda  # noqa: F401

    EMULATED = True
except ImportError:
    EMULATED = os.environ.get("CBFUSED_EMULATION") == "1"  # then the import error shows below
    if EMULATED:
        import cbfused._emulated_cuda  # noqa: F401

EMU_SHAPES = [(37, 10), (9, 257), (3, 1025), (2, 8142), (2, 7, 9, 11), (3, 5, 1, 300)]


@pytest.mark.skipif(not EMULATED, reason="the CUDA emulation is built by `make test`")
@pytest.mark.parametrize("kind", ["hard", "soft"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", EMU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("loss_type", ["softmax", "softmax_focal"])
def test_emulated_cuda_kernels_match_reference(loss_type, shape, dtype, kind):
    if dtype == torch.float64 and shape[1] > 1024:
        pytest.skip("block-per-row path covered by float32 / bfloat16 (keeps the emulation fast)")
    x, y, counts = _inputs(shape, dtype, kind, seed=2)
    m = cbfused.ldam_margins(counts) if kind == "hard" else None
    offset = 0.7 * _prior(counts).log()
    w = cbfused.class_balanced_weights(counts, 0.999)
    lt = cbfused._ops.LOSS_TYPES[loss_type]
    smoothing = [(0.0, "sample"), (0.1, "class")] + (
        [(0.1, "sample")] if loss_type == "softmax_focal" else []
    )
    for layout in ["plain", "channels_last"] if len(shape) == 4 else ["plain"]:
        xl = _layout(x, layout)
        yl = _layout(y, layout) if y.is_floating_point() else y
        for eps, weighting in smoothing:
            for reduction in ["weighted_mean", "none"]:
                red = cbfused._ops.REDUCTIONS[reduction]
                loss, grad, scale = torch.ops.cbfused_emu.cb_loss(
                    xl,
                    yl,
                    w.to(dtype),
                    lt,
                    1.5,
                    -1.0,
                    red,
                    -100,
                    1,
                    eps,
                    cbfused._ops.WEIGHTINGS[weighting],
                    offset,
                    m,
                    3.0,
                )
                g = (grad.double() * scale.double()).to(dtype)
                lr, gr = _reference(xl, yl, counts, loss_type, reduction, 0.7, m, 3.0, eps, weighting)
                assert_close_scaled(loss, lr.to(dtype), dtype)
                assert_close_scaled(g, gr.to(dtype), dtype)


def test_linear_module_takes_the_options():
    counts = make_counts(C, seed=8)
    m = cbfused.ldam_margins(counts)
    torch.manual_seed(0)
    mod = cbfused.ClassBalancedLinearLoss(
        6,
        counts,
        beta=0.99,
        loss_type="softmax",
        logit_adjustment=1.0,
        margins=m,
        logit_scale=2.0,
        dtype=torch.float64,
    )
    f = torch.randn(20, 6, dtype=torch.float64)
    y = torch.randint(0, C, (20,))
    want = cbfused.class_balanced_loss(
        mod.logits(f),
        y,
        samples_per_class=counts,
        beta=0.99,
        loss_type="softmax",
        logit_adjustment=1.0,
        margins=m,
        logit_scale=2.0,
    )
    torch.testing.assert_close(mod(f, y), want, rtol=1e-12, atol=1e-12)
    mod.half()
    assert mod.prior.dtype == torch.float64 and mod.margins.dtype == torch.float64
