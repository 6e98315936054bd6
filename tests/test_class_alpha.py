"""A per-class alpha vector (docs/losses.md, "Per-class alpha"): the sigmoid-based losses weigh
class c by alpha_c where t = 1 and 1 - alpha_c where t = 0; softmax focal weighs sample i by
alpha[y_i]. Against cbfused.reference, the scalar alpha it generalises, and the CUDA kernels'
source (emulated)."""

from __future__ import annotations

import os

import pytest
import torch
from testing import (
    assert_close_scaled,
    assert_compiles_like_eager,
    assert_loss_close,
    make_counts,
    make_dense_inputs,
    value_and_grad,
)

import cbfused
from cbfused import reference

KINDS = ["focal", "sigmoid", "softmax_focal"]


def _layout(x, layout):
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def _inputs(shape, dtype, kind, loss_type, seed=0):
    c = shape[1]
    x, y, g = make_dense_inputs(shape, dtype, kind, loss_type, seed)
    w = cbfused.class_balanced_weights(make_counts(c, seed=seed), 0.999)
    alpha = torch.rand(c, generator=g, dtype=torch.float64)
    return x, y, w, alpha


def _reference(x, y, w, loss_type, alpha, reduction):
    xr = x.detach().double().requires_grad_()
    yr = y if not y.is_floating_point() else y.double()
    ref = reference.class_balanced_loss(xr, yr, w, loss_type, gamma=1.5, alpha=alpha, reduction=reduction)
    (g,) = torch.autograd.grad(ref.sum(), xr)
    return ref.detach(), g


# flat tiles (sigmoid / focal, C <= 256), warp rows, block rows, planes
SHAPES = [(70, 10), (9, 300), (3, 1025), (2, 7, 9, 11)]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("kind", ["hard", "soft"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("loss_type", KINDS)
def test_matches_reference(loss_type, shape, dtype, kind):
    x, y, w, alpha = _inputs(shape, dtype, kind, loss_type)
    for layout in ["plain", "channels_last"] if len(shape) == 4 else ["plain"]:
        xl = _layout(x, layout)
        yl = _layout(y, layout) if y.is_floating_point() else y
        for reduction in ["mean", "none"]:
            lo, go = value_and_grad(
                lambda xi, yl=yl, reduction=reduction: cbfused.class_balanced_loss(
                    xi,
                    yl,
                    weights=w.to(dtype),
                    loss_type=loss_type,
                    gamma=1.5,
                    alpha=alpha,
                    reduction=reduction,
                ),
                xl,
            )
            lr, gr = _reference(xl, yl, w.to(dtype), loss_type, alpha, reduction)
            assert_loss_close(lo, lr, dtype)
            assert_close_scaled(go, gr.to(dtype), dtype)


@pytest.mark.parametrize("kind", ["hard", "soft"])
@pytest.mark.parametrize("loss_type", ["focal", "sigmoid"])
def test_a_constant_vector_is_the_scalar_alpha(loss_type, kind):
    """The vector generalises torchvision's scalar alpha: [a, ..., a] gives the scalar's loss."""
    for shape in [(64, 10), (5, 300), (2, 6, 5, 7)]:
        x, y, w, _ = _inputs(shape, torch.float64, kind, loss_type)
        vec = value_and_grad(
            lambda xi, y=y, w=w, c=shape[1]: cbfused.class_balanced_loss(
                xi, y, weights=w, loss_type=loss_type, alpha=torch.full((c,), 0.3, dtype=torch.float64)
            ),
            x,
        )
        sca = value_and_grad(
            lambda xi, y=y, w=w: cbfused.class_balanced_loss(
                xi, y, weights=w, loss_type=loss_type, alpha=0.3
            ),
            x,
        )
        torch.testing.assert_close(vec[0], sca[0], rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(vec[1], sca[1], rtol=1e-13, atol=1e-14)


def test_softmax_focal_weighs_the_sample_by_its_class_alpha():
    """alpha[y] times the sample's loss and gradient: with 'none', loss_i(alpha) = alpha[y_i]
    loss_i(no alpha); 'weighted_mean' keeps its denominator (the sum of class weights)."""
    x, y, w, alpha = _inputs((50, 8), torch.float64, "hard", "softmax_focal")
    kw = dict(weights=w, loss_type="softmax_focal", gamma=2.0)
    a = cbfused.class_balanced_loss(x, y, alpha=alpha, reduction="none", **kw)
    b = cbfused.class_balanced_loss(x, y, reduction="none", **kw)
    valid = y != -100
    torch.testing.assert_close(a[valid], b[valid] * alpha[y[valid]], rtol=1e-14, atol=0)
    am = cbfused.class_balanced_loss(x, y, alpha=alpha, reduction="weighted_mean", **kw)
    torch.testing.assert_close(am, a.sum() / w[y[valid]].sum(), rtol=1e-14, atol=0)


def test_gradcheck_opcheck_compile_and_module():
    x, y, w, alpha = _inputs((6, 5), torch.float64, "hard", "focal")
    for lt in KINDS:
        f = lambda v, lt=lt: cbfused.class_balanced_loss(  # noqa: E731
            v, y, weights=w, loss_type=lt, gamma=1.5, alpha=alpha, reduction="sum"
        )
        assert torch.autograd.gradcheck(f, (x.clone().requires_grad_(),))
        code = cbfused._ops.LOSS_TYPES[lt]
        args = (x.clone().requires_grad_(), y, w, code, 1.5, -1.0, 1, -100, 2, 0.0, 0, None, None, 1.0, alpha)
        torch.library.opcheck(torch.ops.cbfused.cb_loss.default, args)
    counts = make_counts(5)
    crit = cbfused.ClassBalancedLoss(counts, loss_type="focal", alpha=alpha)
    assert crit.alpha is crit.class_alpha and "alpha=[per class]" in repr(crit)
    xs = torch.randn(2, 5, 7, 3)
    ys = torch.randint(0, 5, (2, 7, 3))
    assert_compiles_like_eager(lambda v: crit(v * 2.0, ys), xs)
    crit.half()
    assert crit.class_alpha.dtype == torch.float64
    crit.float()
    crit.alpha = 0.25  # a number replaces the per-class alpha
    assert crit.class_alpha is None and crit.alpha == 0.25


def test_fused_linear_path():
    g = torch.Generator().manual_seed(3)
    n, h, c = 33, 8, 11
    f = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(c, h, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, c, (n,), generator=g)
    alpha = torch.rand(c, generator=g, dtype=torch.float64)
    for lt in KINDS:
        kw = dict(weights=torch.ones(c, dtype=torch.float64), loss_type=lt, gamma=1.5, alpha=alpha)
        ours = cbfused.linear_class_balanced_loss(f, W, None, y, chunk_rows=8, **kw)
        go = torch.autograd.grad(ours, (f, W))
        plain = cbfused.class_balanced_loss(f @ W.t(), y, **kw)
        gp = torch.autograd.grad(plain, (f, W))
        torch.testing.assert_close(ours, plain, rtol=1e-12, atol=1e-12)
        for a, e in zip(go, gp, strict=True):
            torch.testing.assert_close(a, e, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize(
    "loss_type,alpha,err,match",
    [
        ("focal", torch.tensor([0.5, 1.5, 0.2]), ValueError, r"must be in \[0, 1\], got 1.5 for class 1"),
        ("focal", torch.tensor([0.5, float("nan"), 0.2]), ValueError, "got nan for class 1"),
        ("focal", torch.ones(3, 1), ValueError, r"must be a 1-D \[C\] tensor, got shape \[3, 1\]"),
        ("softmax", torch.ones(3) / 2, ValueError, "applies to loss_type in"),
        (
            "focal",
            torch.ones(4) / 2,
            RuntimeError,
            r"class_alpha must have shape \[3\] \(one per class\), got \[4\]",
        ),
    ],
)
def test_bad_alpha_vectors_are_named(loss_type, alpha, err, match):
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    with pytest.raises(err, match=match):
        cbfused.class_balanced_loss(x, y, weights=torch.ones(3), loss_type=loss_type, alpha=alpha)


# ---------------------------------------------------------------------------------------------
# The CUDA kernels' source in the CPU emulation (cbfused._emulated_cuda)

try:
    import cbfused._emulated_cuda  # noqa: F401

    EMULATED = True
except ImportError:
    EMULATED = os.environ.get("CBFUSED_EMULATION") == "1"
    if EMULATED:  # the test command built it: the import error shows
        import cbfused._emulated_cuda  # noqa: F401

EMU_SHAPES = [(37, 10), (9, 300), (3, 1025), (2, 7, 9, 11), (3, 5, 1, 300)]


@pytest.mark.skipif(not EMULATED, reason="the CUDA emulation is built by `make test`")
@pytest.mark.parametrize("kind", ["hard", "soft"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", EMU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("loss_type", KINDS)
def test_emulated_cuda_kernels_match_reference(loss_type, shape, dtype, kind):
    if dtype == torch.float64 and shape[1] > 1024:
        pytest.skip("block-per-row path covered by float32 / bfloat16 (keeps the emulation fast)")
    x, y, w, alpha = _inputs(shape, dtype, kind, loss_type, seed=2)
    lt = cbfused._ops.LOSS_TYPES[loss_type]
    for layout in ["plain", "channels_last"] if len(shape) == 4 else ["plain"]:
        xl = _layout(x, layout)
        yl = _layout(y, layout) if y.is_floating_point() else y
        for reduction in ["weighted_mean", "none"]:
            red = cbfused._ops.REDUCTIONS[reduction]
            loss, grad, scale = torch.ops.cbfused_emu.cb_loss(
                xl, yl, w.to(dtype), lt, 1.5, -1.0, red, -100, 1, 0.0, 0, None, None, 1.0, alpha
            )
            g = (grad.double() * scale.double()).to(dtype)
            lr, gr = _reference(xl, yl, w.to(dtype), loss_type, alpha, reduction)
            assert_loss_close(loss, lr, dtype)
            assert_close_scaled(g, gr.to(dtype), dtype)


# ---------------------------------------------------------------------------------------------
# sigmoid_focal_loss (the torchvision drop-in) with a per-class alpha along `dim`


def _drop_in_inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=g, dtype=torch.float64) * 3).to(dtype)
    t = torch.rand(*shape, generator=g, dtype=torch.float64)
    t = torch.where(t > 0.8, torch.ones_like(t), t * (t < 0.2)).to(dtype)  # mostly 0 / 1, some soft
    return x, t


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "shape,dim", [((64, 10), -1), ((5, 300), -1), ((2, 7, 9, 11), 1), ((3, 4, 6), 1), ((6, 5), 0)], ids=str
)
def test_sigmoid_focal_loss_per_class_alpha_matches_reference(shape, dim, dtype, weighted):
    x, t = _drop_in_inputs(shape, dtype)
    k = shape[dim]
    alpha = torch.rand(k, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    weight = torch.rand(k, dtype=torch.float64) + 0.5 if weighted else None
    for reduction in ["none", "sum", "mean"]:
        lo, go = value_and_grad(
            lambda xi, reduction=reduction: cbfused.sigmoid_focal_loss(
                xi, t, alpha=alpha, gamma=2.0, reduction=reduction, weight=weight, dim=dim
            ),
            x,
        )
        xr = x.detach().double().requires_grad_()
        ref = reference.sigmoid_focal_loss(
            xr, t.double(), alpha=alpha, gamma=2.0, reduction=reduction, weight=weight, dim=dim
        )
        (gr,) = torch.autograd.grad(ref.sum(), xr)
        assert_loss_close(lo, ref.detach(), dtype)
        assert_close_scaled(go, gr.to(dtype), dtype)


def test_sigmoid_focal_loss_alpha_vector_is_torchvision_per_class():
    """Class c's elements equal torchvision.ops.sigmoid_focal_loss with alpha = alpha_c; a
    constant vector is the scalar alpha, bit for bit."""
    torchvision = pytest.importorskip("torchvision")
    x, t = _drop_in_inputs((40, 6), torch.float64, seed=3)
    t = t.round()
    alpha = torch.tensor([0.0, 0.1, 0.25, 0.5, 0.9, 1.0], dtype=torch.float64)
    ours = cbfused.sigmoid_focal_loss(x, t, alpha=alpha, gamma=2.0)
    for c in range(6):
        theirs = torchvision.ops.sigmoid_focal_loss(x[:, c], t[:, c], alpha=float(alpha[c]), gamma=2.0)
        torch.testing.assert_close(ours[:, c], theirs, rtol=1e-12, atol=1e-14)
    for a in [0.0, 0.25, 1.0]:
        vec = cbfused.sigmoid_focal_loss(
            x, t, alpha=torch.full((6,), a, dtype=torch.float64), reduction="sum"
        )
        assert torch.equal(vec, cbfused.sigmoid_focal_loss(x, t, alpha=a, reduction="sum"))


def test_sigmoid_focal_loss_alpha_vector_autograd_and_errors():
    x, t = _drop_in_inputs((4, 3, 5), torch.float64)
    alpha = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)
    f = lambda v: cbfused.sigmoid_focal_loss(v, t, alpha=alpha, reduction="sum", dim=1)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x.clone().requires_grad_(),))
    args = (x.clone().requires_grad_(), t, None, -1.0, 2.0, 1, 2, 1, alpha)
    torch.library.opcheck(torch.ops.cbfused.sigmoid_focal.default, args)
    compiled = torch.compile(
        lambda v, a: cbfused.sigmoid_focal_loss(v, t, alpha=a, reduction="sum", dim=1), fullgraph=True
    )
    torch.testing.assert_close(compiled(x, alpha), f(x))
    with pytest.raises(
        RuntimeError, match=r"a per-class alpha must be in \[0, 1\]"
    ):  # checked in the graph too
        compiled(x, torch.tensor([0.2, 1.5, 0.8], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"a per-class alpha must be in \[0, 1\], got 1.5 for class 2"):
        cbfused.sigmoid_focal_loss(x, t, alpha=torch.tensor([0.1, 0.2, 1.5]), dim=1)
    with pytest.raises(
        RuntimeError, match=r"class_alpha must have shape \[5\] \(one per class, the inputs' last"
    ):
        cbfused.sigmoid_focal_loss(x, t, alpha=alpha)  # classes along the last dimension: 5
    with pytest.raises(RuntimeError, match="not both"):
        torch.ops.cbfused.sigmoid_focal(x, t, None, 0.25, 2.0, 1, 0, 1, alpha)


@pytest.mark.skipif(not EMULATED, reason="the CUDA emulation is built by `make test`")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,dim", [((37, 10), -1), ((2, 7, 9, 11), 1), ((3, 1031), 0)], ids=str)
def test_emulated_sigmoid_focal_per_class_alpha(shape, dim, dtype):
    x, t = _drop_in_inputs(shape, dtype, seed=4)
    k = shape[dim]
    alpha = torch.rand(k, dtype=torch.float64)
    weight = torch.rand(k, dtype=torch.float64) + 0.5
    for w in [None, weight]:
        loss, grad = torch.ops.cbfused_emu.sigmoid_focal(x, t, w, -1.0, 2.0, 0, 1, dim, alpha)
        xr = x.detach().double().requires_grad_()
        ref = reference.sigmoid_focal_loss(xr, t.double(), alpha=alpha, gamma=2.0, weight=w, dim=dim)
        (gr,) = torch.autograd.grad(ref.sum(), xr)
        assert_loss_close(loss, ref.detach(), dtype)
        assert_close_scaled(grad, gr.to(dtype), dtype)
