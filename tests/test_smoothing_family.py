"""Label smoothing beyond softmax cross-entropy (docs/losses.md, "Label smoothing and class
weighting"): softmax focal loss on the smoothed distribution (both weighting rules), and the
sigmoid losses on targets t (1 - eps) + eps / 2. Against cbfused.reference, against torch's
own ops where the semantics meet, on the CPU kernels (rows and planes) and the CUDA kernels'
source (emulated)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from testing import (
    assert_bitwise_across_threads,
    assert_close_scaled,
    assert_compiles_like_eager,
    assert_loss_close,
    make_counts,
    make_dense_inputs,
    value_and_grad,
)

import cbfused
from cbfused import reference

try:
    import cbfused._emulated_cuda  # noqa: F401

    EMULATED = True
except ImportError:
    EMULATED = False

BINARY = ["sigmoid", "focal"]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# rows (one vector, several, past a block), planes, planes with one position per sample
SHAPES = [(70, 10), (9, 257), (3, 1025), (2, 7, 9, 11), (2, 3, 17)]


def _layout(x, layout):
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def _inputs(shape, dtype, kind, loss_type, seed=0):
    c = shape[1]
    x, y, g = make_dense_inputs(shape, dtype, kind, loss_type, seed, mixup=True)
    w = cbfused.class_balanced_weights(make_counts(c, seed=seed), 0.999)
    alpha = torch.rand(c, generator=g, dtype=torch.float64)
    return x, y, w, alpha


def _reference(x, y, w, loss_type, reduction, eps, weighting="sample", gamma=1.5, alpha=None, **adj):
    xr = x.detach().double().requires_grad_()
    yr = y if not y.is_floating_point() else y.double()
    ref = reference.class_balanced_loss(
        xr,
        yr,
        w,
        loss_type,
        gamma=gamma,
        alpha=alpha,
        reduction=reduction,
        label_smoothing=eps,
        weighting=weighting,
        **adj,
    )
    (g,) = torch.autograd.grad(ref.sum(), xr)
    return ref.detach(), g


# ---------------------------------------------------------------------------------------------
# Softmax focal


@pytest.mark.parametrize("weighting", ["sample", "class"])
@pytest.mark.parametrize("kind", ["hard", "soft"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_softmax_focal_matches_reference(shape, dtype, kind, weighting):
    x, y, w, alpha = _inputs(shape, dtype, kind, "softmax_focal")
    for layout in ["plain", "channels_last"] if len(shape) == 4 else ["plain"]:
        xl = _layout(x, layout)
        yl = _layout(y, layout) if y.is_floating_point() else y
        for reduction in ["mean", "weighted_mean", "sum", "none"]:
            for a in [None, alpha]:
                lo, go = value_and_grad(
                    lambda xi, yl=yl, reduction=reduction, a=a: cbfused.class_balanced_loss(
                        xi,
                        yl,
                        weights=w.to(dtype),
                        loss_type="softmax_focal",
                        gamma=1.5,
                        alpha=a,
                        reduction=reduction,
                        label_smoothing=0.15,
                        weighting=weighting,
                    ),
                    xl,
                )
                lr, gr = _reference(xl, yl, w.to(dtype), "softmax_focal", reduction, 0.15, weighting, alpha=a)
                assert_loss_close(lo, lr, dtype)
                assert_close_scaled(go, gr.to(dtype), dtype)


@pytest.mark.parametrize("weighting", ["sample", "class"])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 3.0])
def test_softmax_focal_smoothed_every_gamma_with_adjusted_logits(gamma, weighting):
    """Integer and fractional gamma; the margin and offset of adjusted logits apply on the
    smoothed focal path too (the margin on the class index, whose target is no longer 1)."""
    x, y, w, _ = _inputs((40, 12), torch.float64, "hard", "softmax_focal", seed=4)
    b = torch.randn(12, dtype=torch.float64)
    m = torch.rand(12, dtype=torch.float64)
    adjusted = (
        {"prior": torch.softmax(b, 0), "logit_adjustment": 1.0, "margins": m, "logit_scale": 2.0},
        {"logit_offset": torch.log_softmax(b, 0), "margins": m, "logit_scale": 2.0},  # the reference's
    )
    for kw, adj in [({}, {}), adjusted]:
        lo, go = value_and_grad(
            lambda xi, kw=kw: cbfused.class_balanced_loss(
                xi,
                y,
                weights=w,
                loss_type="softmax_focal",
                gamma=gamma,
                reduction="sum",
                label_smoothing=0.3,
                weighting=weighting,
                **kw,
            ),
            x,
        )
        lr, gr = _reference(x, y, w, "softmax_focal", "sum", 0.3, weighting, gamma=gamma, **adj)
        torch.testing.assert_close(lo, lr, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(go, gr, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("kind", ["hard", "soft"])
@pytest.mark.parametrize("shape", [(50, 10), (2, 6, 5, 7)], ids=lambda s: "x".join(map(str, s)))
def test_softmax_focal_gamma_zero_is_smoothed_cross_entropy(shape, kind):
    """gamma = 0 on the soft focal path equals the smoothed cross-entropy kernels and, with
    PyTorch's class weighting, F.cross_entropy(weight, label_smoothing) itself."""
    x, y, w, _ = _inputs(shape, torch.float64, kind, "softmax_focal", seed=1)
    for weighting in ["sample", "class"]:
        for reduction in ["weighted_mean", "sum", "none"]:
            kw = dict(weights=w, reduction=reduction, label_smoothing=0.25, weighting=weighting)
            lf, gf = value_and_grad(
                lambda xi, kw=kw: cbfused.class_balanced_loss(
                    xi, y, loss_type="softmax_focal", gamma=0.0, **kw
                ),
                x,
            )
            lc, gc = value_and_grad(
                lambda xi, kw=kw: cbfused.class_balanced_loss(xi, y, loss_type="softmax", **kw), x
            )
            torch.testing.assert_close(lf, lc, rtol=1e-12, atol=1e-13)
            torch.testing.assert_close(gf, gc, rtol=1e-11, atol=1e-13)
            if weighting == "class" and kind == "hard":
                red = {"weighted_mean": "mean"}.get(reduction, reduction)
                lt, gt = value_and_grad(
                    lambda xi, red=red: F.cross_entropy(xi, y, weight=w, label_smoothing=0.25, reduction=red),
                    x,
                )
                torch.testing.assert_close(lf, lt, rtol=1e-12, atol=1e-13)
                torch.testing.assert_close(gf, gt, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("gamma", [2.0, 1.5])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_softmax_focal_smoothed_near_p_one_half_and_one(dtype, gamma):
    """The smoothed focal term of every class takes 1 - p as such where p <= 1/2 (no
    cancellation there) and -expm1(log p) only in the vector that holds a class above 1/2:
    rows with a class at p = 1/2, just above and below it, at p -> 1 and at p = 1 / C, in
    several vectors of a row, each row's loss within float rounding of the float64
    reference and the gradient within its scale."""
    c = 40
    x = torch.full((7, c), -4.0, dtype=torch.float64)
    x[0, [3, 21]] = 12.0  # two classes at p = 1/2 (almost: the rest hold 38 e^-16)
    x[1, 21] = 12.0 + 1e-3  # just above 1/2
    x[1, 3] = 12.0
    x[2, 21] = 12.0 - 1e-3  # just below
    x[2, 3] = 12.0
    x[3, 30] = 25.0  # p -> 1: 1 - p ~ 39 e^-29
    x[4] = 0.0  # p = 1 / C
    x[5, 17] = float(torch.log(torch.tensor(c - 1.0)) + 4.0)  # p = 1/2 on one class
    x[6] = torch.linspace(-3, 3, c, dtype=torch.float64)
    y = torch.tensor([3, 21, 3, 30, 5, 17, 39])
    w = cbfused.class_balanced_weights(make_counts(c, seed=2), 0.999)
    xd = x.to(dtype)
    lo, go = value_and_grad(
        lambda xi: cbfused.class_balanced_loss(
            xi, y, weights=w, loss_type="softmax_focal", gamma=gamma, reduction="none", label_smoothing=0.1
        ),
        xd,
    )
    lr, gr = _reference(xd, y, w, "softmax_focal", "none", 0.1, gamma=gamma)
    # every row's loss is a sum of non-negative terms: relative, row by row
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(lo.double(), lr, rtol=tol, atol=0)
    for r in range(x.shape[0]):
        assert_close_scaled(go[r], gr[r].to(dtype), dtype)


def test_softmax_focal_smoothing_changes_the_loss():
    x, y, w, _ = _inputs((30, 8), torch.float64, "hard", "softmax_focal")
    kw = dict(weights=w, loss_type="softmax_focal", gamma=2.0, reduction="sum")
    plain = cbfused.class_balanced_loss(x, y, **kw)
    assert torch.equal(plain, cbfused.class_balanced_loss(x, y, label_smoothing=0.0, **kw))
    assert not torch.allclose(plain, cbfused.class_balanced_loss(x, y, label_smoothing=0.1, **kw))


# ---------------------------------------------------------------------------------------------
# The sigmoid family


@pytest.mark.parametrize("alpha", ["none", "scalar", "vector"])
@pytest.mark.parametrize("kind", ["hard", "soft"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("loss_type", BINARY)
def test_sigmoid_family_matches_reference(loss_type, shape, dtype, kind, alpha):
    x, y, w, avec = _inputs(shape, dtype, kind, loss_type)
    a = {"none": None, "scalar": 0.3, "vector": avec}[alpha]
    for layout in ["plain", "channels_last"] if len(shape) == 4 else ["plain"]:
        xl = _layout(x, layout)
        yl = _layout(y, layout) if y.is_floating_point() else y
        for reduction in ["mean", "weighted_mean", "none"]:
            for gamma in [2.0, 1.5] if loss_type == "focal" else [1.0]:
                lo, go = value_and_grad(
                    lambda xi, yl=yl, reduction=reduction, gamma=gamma: cbfused.class_balanced_loss(
                        xi,
                        yl,
                        weights=w.to(dtype),
                        loss_type=loss_type,
                        gamma=gamma,
                        alpha=a,
                        reduction=reduction,
                        label_smoothing=0.2,
                    ),
                    xl,
                )
                lr, gr = _reference(xl, yl, w.to(dtype), loss_type, reduction, 0.2, gamma=gamma, alpha=a)
                assert_loss_close(lo, lr, dtype)
                assert_close_scaled(go, gr.to(dtype), dtype)


@pytest.mark.parametrize("kind", ["hard", "soft"])
@pytest.mark.parametrize("shape", [(40, 10), (2, 5, 4, 3)], ids=lambda s: "x".join(map(str, s)))
def test_sigmoid_unit_weights_equal_bce_on_smoothed_targets(shape, kind):
    """With unit class weights, sigmoid cross-entropy with label smoothing eps is torch's
    binary_cross_entropy_with_logits on t (1 - eps) + eps / 2, summed with the sample weight
    s_i of the unsmoothed labels (1 per class index, sum_c t_c for float targets)."""
    x, y, _, _ = _inputs(shape, torch.float64, kind, "sigmoid", seed=5)
    c = shape[1]
    ones = torch.ones(c, dtype=torch.float64)
    t = y if y.is_floating_point() else F.one_hot(y.clamp(min=0), c).movedim(-1, 1).double()
    keep = (t.sum(1, keepdim=True) if y.is_floating_point() else (y >= 0).unsqueeze(1).double()).expand_as(x)
    for eps in [0.0, 0.1, 1.0]:
        lo, go = value_and_grad(
            lambda xi, eps=eps: cbfused.class_balanced_loss(
                xi, y, weights=ones, loss_type="sigmoid", reduction="sum", label_smoothing=eps
            ),
            x,
        )
        lt, gt = value_and_grad(
            lambda xi, eps=eps: (
                F.binary_cross_entropy_with_logits(xi, t * (1 - eps) + eps / 2, reduction="none") * keep
            ).sum(),
            x,
        )
        torch.testing.assert_close(lo, lt, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(go, gt, rtol=1e-12, atol=1e-13)


def test_sigmoid_smoothing_keeps_the_labels_weights_and_denominator():
    """s_i and the mean's D come from the labels: with float targets, mean = sum / sum t of
    the unsmoothed targets, the same D as without smoothing."""
    x, t, w, _ = _inputs((30, 6), torch.float64, "soft", "focal", seed=3)
    for loss_type in BINARY:
        kw = dict(weights=w, loss_type=loss_type, gamma=2.0, label_smoothing=0.2)
        mean = cbfused.class_balanced_loss(x, t, reduction="mean", **kw)
        total = cbfused.class_balanced_loss(x, t, reduction="sum", **kw)
        torch.testing.assert_close(mean, total / t.sum(), rtol=1e-14, atol=0)
        per = cbfused.class_balanced_loss(x, t, reduction="none", **kw)
        torch.testing.assert_close(per.sum(), total, rtol=1e-13, atol=0)


# ---------------------------------------------------------------------------------------------
# Autograd, the op's checks, compile, determinism, the fused linear path


@pytest.mark.parametrize("loss_type", ["softmax_focal", *BINARY])
def test_gradcheck_and_opcheck(loss_type):
    for kind, shape in [("hard", (6, 5)), ("soft", (2, 5, 3, 2))]:
        x, y, w, _ = _inputs(shape, torch.float64, kind, loss_type)
        for weighting in ["sample", "class"] if loss_type == "softmax_focal" else ["sample"]:
            f = lambda v, y=y, w=w, weighting=weighting: cbfused.class_balanced_loss(  # noqa: E731
                v,
                y,
                weights=w,
                loss_type=loss_type,
                gamma=1.5,
                reduction="sum",
                label_smoothing=0.3,
                weighting=weighting,
            )
            assert torch.autograd.gradcheck(f, (x.clone().requires_grad_(),))
            args = (
                x.clone().requires_grad_(),
                y,
                w,
                cbfused._ops.LOSS_TYPES[loss_type],
                1.5,
                -1.0,
                1,
                -100,
                2,
                0.3,
                cbfused._ops.WEIGHTINGS[weighting],
            )
            torch.library.opcheck(torch.ops.cbfused.cb_loss.default, args)


def test_class_weighting_is_refused_for_the_sigmoid_losses():
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    for loss_type in BINARY:
        with pytest.raises(ValueError, match=f"weighting='class' applies to .* got loss_type='{loss_type}'"):
            cbfused.class_balanced_loss(x, y, weights=torch.ones(3), loss_type=loss_type, weighting="class")
        with pytest.raises(
            RuntimeError, match=f"weighting='class' applies to the softmax losses only.*'{loss_type}'"
        ):
            torch.ops.cbfused.cb_loss(
                x, y, torch.ones(3), cbfused._ops.LOSS_TYPES[loss_type], 1.0, -1.0, 2, -100, 0, 0.0, 1
            )


def test_compile_fullgraph():
    x, y, w, _ = _inputs((2, 7, 9, 11), torch.float32, "hard", "focal")
    for loss_type in ["softmax_focal", "focal"]:
        crit = cbfused.ClassBalancedLoss(weights=w, loss_type=loss_type, gamma=2.0, label_smoothing=0.1)

        def step(v, crit=crit):
            return crit(v * 2.0, y)

        assert_compiles_like_eager(step, x)


@pytest.mark.parametrize("loss_type", ["softmax_focal", *BINARY])
def test_bitwise_across_thread_counts(loss_type):
    for shape in [(300, 50), (2, 9, 40, 40)]:
        for kind in ["hard", "soft"]:
            _, y, w, _ = _inputs(shape, torch.float32, kind, loss_type)
            x = torch.randn(*shape)
            assert_bitwise_across_threads(
                lambda v, y=y, w=w: cbfused.class_balanced_loss(
                    v, y, weights=w, loss_type=loss_type, gamma=2.0, label_smoothing=0.1
                ),
                x,
            )


@pytest.mark.parametrize("loss_type", ["softmax_focal", *BINARY])
def test_fused_linear_path(loss_type):
    """linear_class_balanced_loss (chunked) with label smoothing equals the loss on the
    materialised logits."""
    g = torch.Generator().manual_seed(11)
    n, h, c = 45, 16, 30
    f = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(c, h, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(c, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, c, (n,), generator=g)
    y[::6] = -100
    w = torch.rand(c, generator=g, dtype=torch.float64) + 0.2
    kw = dict(weights=w, loss_type=loss_type, gamma=2.0, reduction="weighted_mean", label_smoothing=0.2)
    ours = cbfused.linear_class_balanced_loss(f, W, b, y, chunk_rows=8, **kw)
    go = torch.autograd.grad(ours, (f, W, b))
    plain = cbfused.class_balanced_loss(torch.addmm(b, f, W.t()), y, **kw)
    gp = torch.autograd.grad(plain, (f, W, b))
    torch.testing.assert_close(ours, plain, rtol=1e-12, atol=1e-12)
    for a, e in zip(go, gp, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-11, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# The CUDA kernels' source in the CPU emulation (cbfused._emulated_cuda)

# warp rows (the flat kernel's shape for the sigmoid family without smoothing), several warps,
# block rows (C > 1024), planes, channels-last rows
EMU_SHAPES = [(37, 10), (9, 257), (3, 1025), (2, 7, 9, 11), (3, 5, 1, 300)]


@pytest.mark.skipif(not EMULATED, reason="the CUDA emulation is built by `make test`")
@pytest.mark.parametrize("kind", ["hard", "soft"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", EMU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("loss_type", ["softmax_focal", *BINARY])
def test_emulated_cuda_kernels_match_reference(loss_type, shape, dtype, kind):
    if dtype == torch.float64 and shape[1] > 1024:
        pytest.skip("block-per-row path covered by float32 / bfloat16 (keeps the emulation fast)")
    x, y, w, alpha = _inputs(shape, dtype, kind, loss_type, seed=2)
    lt = cbfused._ops.LOSS_TYPES[loss_type]
    weightings = ["sample", "class"] if loss_type == "softmax_focal" else ["sample"]
    for layout in ["plain", "channels_last"] if len(shape) == 4 else ["plain"]:
        xl = _layout(x, layout)
        yl = _layout(y, layout) if y.is_floating_point() else y
        for weighting in weightings:
            for a in [None, alpha]:
                red = cbfused._ops.REDUCTIONS["weighted_mean"]
                loss, grad, scale = torch.ops.cbfused_emu.cb_loss(
                    xl, yl, w.to(dtype), lt, 2.0, -1.0, red, -100, 1, 0.15,
                    cbfused._ops.WEIGHTINGS[weighting], None, None, 1.0, a,
                )  # fmt: skip
                g = (grad.double() * scale.double()).to(dtype)
                lr, gr = _reference(xl, yl, w.to(dtype), loss_type, "weighted_mean", 0.15, weighting, 2.0, a)
                assert_loss_close(loss, lr, dtype)
                assert_close_scaled(g, gr.to(dtype), dtype)
