"""Dense prediction: logits [N, C, d1, ..., dk] (class dimension 1) and unbatched [C], read
in place in both layouts a model produces (contiguous NCHW: the planes kernels; channels-last:
the rows kernels), against F.cross_entropy where the semantics meet and cbfused.reference for
every loss type; gradients in the logits' memory format; gradcheck, opcheck, torch.compile,
thread-count determinism and the errors of bad shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from testing import (
    BINARY_FAMILY,
    DTYPES,
    LOSS_TYPES,
    SOFTMAX_FAMILY,
    assert_bitwise_across_threads,
    assert_close_scaled,
    make_counts,
)

import cbfused
from cbfused import reference as R

IGNORE = 255  # the segmentation convention


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x [N, C, d...] in the named memory layout, same values."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "channels_last":  # NHWC, NDHWC, NLC: classes innermost
        return x.movedim(1, -1).contiguous().movedim(-1, 1)
    if layout == "crop":  # a crop of a larger map (spatial dimensions do not collapse)
        pad = [2] * (2 * (x.dim() - 2))
        big = F.pad(x, pad, value=7.0)
        idx = (slice(None), slice(None)) + tuple(slice(2, 2 + s) for s in x.shape[2:])
        return big[idx]
    if layout == "batch_slice":  # every other sample of a larger batch (planes, in place)
        return torch.stack([x, x], 1)[:, 0]
    raise ValueError(layout)


def make_dense(shape, dtype, kind="hard", loss_type="softmax", seed=0, ignore_frac=0.15):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(dtype)
    c = shape[0] if len(shape) == 1 else shape[1]
    pos_shape = () if len(shape) == 1 else (shape[0], *shape[2:])
    if kind == "hard":
        y = torch.randint(0, c, pos_shape, generator=g)
        if y.numel() and ignore_frac:
            y[torch.rand(pos_shape, generator=g) < ignore_frac] = IGNORE
        return x, y
    t = torch.rand(shape, generator=g, dtype=torch.float64)
    cdim = 0 if len(shape) == 1 else 1
    if loss_type in SOFTMAX_FAMILY:
        t = t / t.sum(cdim, keepdim=True)
    else:
        t = (t > 0.7).to(torch.float64)
    return x, t.to(dtype)


def grads(fn, x, go=None):
    xi = x.detach().clone().requires_grad_()
    out = fn(xi)
    if go is None:
        go = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (g,) = torch.autograd.grad(out, xi, go.to(out.dtype))
    return out, g


SHAPES = [(4, 6, 9), (2, 5, 7, 9), (2, 4, 3, 5, 6), (2, 19, 1, 1), (1, 3, 1, 17), (0, 5, 4, 4), (3, 1, 4, 4)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "crop", "batch_slice"])
def test_softmax_equals_cross_entropy(shape, layout):
    """weighted_mean, sum and none equal F.cross_entropy(weight, ignore_index=255); 'mean'
    is the sum over the non-ignored positions' count. Values and gradients, float64."""
    x, y = make_dense(shape, torch.float64, seed=len(shape))
    x = _layout(x, layout)
    c = shape[1]
    w = torch.rand(c, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.5
    valid = (y != IGNORE).sum().item()
    for red, torch_red in [("weighted_mean", "mean"), ("sum", "sum"), ("none", "none"), ("mean", "sum")]:
        if x.numel() == 0 and red == "weighted_mean":
            continue  # torch: 0 / 0 = NaN, cbfused: 0 (documented)

        def ours(xi, red=red):
            return cbfused.class_balanced_loss(
                xi, y, weights=w, loss_type="softmax", reduction=red, ignore_index=IGNORE
            )

        def theirs(xi, red=red, torch_red=torch_red):
            out = F.cross_entropy(xi, y, weight=w, ignore_index=IGNORE, reduction=torch_red)
            return out / valid if red == "mean" and valid else out

        a, ga = grads(ours, x)
        b, gb = grads(theirs, x)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-12)
        assert ga.shape == x.shape


def test_unbatched_equals_cross_entropy():
    w = torch.rand(7, dtype=torch.float64) + 0.5
    x = torch.randn(7, dtype=torch.float64)
    for y in (torch.tensor(3), torch.tensor(IGNORE)):
        for red, torch_red in [("weighted_mean", "mean"), ("none", "none"), ("sum", "sum")]:
            if y.item() == IGNORE and red == "weighted_mean":
                continue  # torch: NaN, cbfused: 0

            def ours(xi, red=red, y=y):
                return cbfused.class_balanced_loss(
                    xi, y, weights=w, loss_type="softmax", reduction=red, ignore_index=IGNORE
                )

            def theirs(xi, torch_red=torch_red, y=y):
                return F.cross_entropy(xi, y, weight=w, ignore_index=IGNORE, reduction=torch_red)

            a, ga = grads(ours, x)
            b, gb = grads(theirs, x)
            assert a.shape == b.shape == ()
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("kind", ["hard", "float"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "crop"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_loss_against_reference(loss_type, kind, layout, dtype):
    shape = (2, 11, 5, 7) if layout != "channels_last" or dtype != torch.float64 else (2, 11, 3, 5, 4)
    x, y = make_dense(shape, dtype, kind, loss_type, seed=hash((loss_type, kind)) % 97)
    x = _layout(x, layout)
    w = cbfused.class_balanced_weights(make_counts(shape[1]), 0.999)
    alpha = 0.3 if loss_type in BINARY_FAMILY else None
    for red in ("mean", "weighted_mean", "none"):
        ignore = IGNORE if kind == "hard" else -100
        kw = dict(loss_type=loss_type, gamma=1.5, alpha=alpha, reduction=red, ignore_index=ignore)
        a, ga = grads(lambda xi, kw=kw: cbfused.class_balanced_loss(xi, y, weights=w, **kw), x)
        b, gb = grads(lambda xi, kw=kw: R.class_balanced_loss(xi, y, w, **kw), x)
        assert_close_scaled(a, b, dtype)
        assert_close_scaled(ga, gb, dtype)


@pytest.mark.parametrize(
    "shape", [(3, 6, 5, 4), (2, 6, 40), (2, 3, 2, 3, 4)], ids=lambda s: "x".join(map(str, s))
)
def test_gradient_in_the_logits_memory_format(shape):
    """The gradient comes back in the logits' layout: NCHW for NCHW, channels-last for
    channels-last (no permute or copy on the way)."""
    w = cbfused.class_balanced_weights(make_counts(shape[1]), 0.99)
    for layout in ("contiguous", "channels_last"):
        x, y = make_dense(shape, torch.float32, seed=3)
        x = _layout(x, layout).requires_grad_()
        for lt in LOSS_TYPES:
            (g,) = torch.autograd.grad(
                cbfused.class_balanced_loss(x, y, weights=w, loss_type=lt, ignore_index=IGNORE), x
            )
            assert g.stride() == x.stride(), (layout, lt, g.stride(), x.stride())


def test_channels_last_is_the_2d_call_on_its_rows():
    """A channels-last [N, C, H, W] call is the 2-D call on its rows, bit for bit (the same
    rows kernels read the same memory)."""
    x, y = make_dense((2, 13, 6, 5), torch.float32, seed=4)
    xc = _layout(x, "channels_last")
    w = cbfused.class_balanced_weights(make_counts(13), 0.999)
    for lt in LOSS_TYPES:
        a, ga = grads(
            lambda xi, lt=lt: cbfused.class_balanced_loss(
                xi, y, weights=w, loss_type=lt, reduction="none", ignore_index=IGNORE
            ),
            xc,
        )
        rows = xc.movedim(1, -1).reshape(-1, 13)
        b, gb = grads(
            lambda xi, lt=lt: cbfused.class_balanced_loss(
                xi, y.reshape(-1), weights=w, loss_type=lt, reduction="none", ignore_index=IGNORE
            ),
            rows,
            go=None,
        )
        assert torch.equal(a.reshape(-1), b)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("kind", ["hard", "float"])
def test_gradcheck_dense(loss_type, kind):
    for layout, shape in [
        ("contiguous", (2, 4, 3, 5)),
        ("channels_last", (2, 4, 3, 2)),
        ("contiguous", (4,)),
    ]:
        x, y = make_dense(shape, torch.float64, kind, loss_type, seed=2)
        if x.dim() > 1:
            x = _layout(x, layout)
        w = cbfused.class_balanced_weights(make_counts(4), 0.99)
        for red in ("mean", "none"):
            ignore = IGNORE if kind == "hard" else -100

            def f(xi, red=red, ignore=ignore, y=y, w=w):
                return cbfused.class_balanced_loss(
                    xi, y, weights=w, loss_type=loss_type, gamma=1.5, reduction=red, ignore_index=ignore
                )

            assert torch.autograd.gradcheck(
                f, (x.detach().clone().requires_grad_(),), eps=1e-6, atol=1e-7, rtol=1e-6
            )


def test_opcheck_dense():
    w = cbfused.class_balanced_weights(make_counts(5), 0.999)
    for shape, layout in [
        ((2, 5, 3, 4), "contiguous"),
        ((2, 5, 3, 4), "channels_last"),
        ((2, 5, 6), "crop"),
        ((5,), None),
    ]:
        for lt, code in cbfused._ops.LOSS_TYPES.items():
            for kind in ("hard", "float"):
                x, y = make_dense(shape, torch.float32, kind, lt, seed=code)
                if layout:
                    x = _layout(x, layout)
                ignore = IGNORE if kind == "hard" else -100
                for red in (0, 2):
                    args = (x.detach().clone().requires_grad_(), y, w, code, 2.0, -1.0, red, ignore, 1)
                    torch.library.opcheck(torch.ops.cbfused.cb_loss.default, args)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_compile_fullgraph_segmentation_head(layout):
    torch._dynamo.reset()
    crit = cbfused.ClassBalancedLoss(
        make_counts(6), beta=0.999, loss_type="softmax_focal", gamma=2.0, ignore_index=IGNORE
    )
    conv = torch.nn.Conv2d(3, 6, 3, padding=1)
    if layout == "channels_last":
        conv = conv.to(memory_format=torch.channels_last)

    def step(img, y):
        return crit(conv(img), y) * 2.0

    compiled = torch.compile(step, fullgraph=True)
    g = torch.Generator().manual_seed(0)
    for hw in ((8, 8), (8, 10)):
        img = torch.randn(2, 3, *hw, generator=g)
        if layout == "channels_last":
            img = img.to(memory_format=torch.channels_last)
        y = torch.randint(0, 6, (2, *hw), generator=g)
        y[0, 0, 0] = IGNORE
        out_c = compiled(img, y)
        (gc,) = torch.autograd.grad(out_c, conv.weight)
        out_e = step(img, y)
        (ge,) = torch.autograd.grad(out_e, conv.weight)
        torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("kind", ["hard", "float"])
def test_bitwise_across_threads_planes(loss_type, kind):
    x, y = make_dense((3, 21, 37, 41), torch.float32, kind, loss_type, seed=7)  # many chunks of tiles
    w = cbfused.class_balanced_weights(make_counts(21), 0.999)
    ignore = IGNORE if kind == "hard" else -100
    assert_bitwise_across_threads(
        lambda xi: cbfused.class_balanced_loss(
            xi, y, weights=w, loss_type=loss_type, gamma=0.5, ignore_index=ignore
        ),
        x,
    )


def test_ignored_positions_get_zero_gradient_even_with_nonfinite_logits():
    x, y = make_dense((2, 5, 4, 4), torch.float32, seed=8, ignore_frac=0)
    x[0, :, 1, 2] = float("nan")
    x[1, :, 3, 3] = float("inf")
    y[0, 1, 2] = IGNORE
    y[1, 3, 3] = IGNORE
    w = torch.ones(5)
    for layout in ("contiguous", "channels_last"):
        xi = _layout(x, layout).requires_grad_()
        for lt in LOSS_TYPES:
            loss = cbfused.class_balanced_loss(xi, y, weights=w, loss_type=lt, ignore_index=IGNORE)
            (g,) = torch.autograd.grad(loss, xi)
            assert torch.isfinite(loss), (layout, lt)
            assert torch.isfinite(g).all() and (g[0, :, 1, 2] == 0).all() and (g[1, :, 3, 3] == 0).all()


def test_errors_name_the_shapes():
    w = torch.ones(5)
    x = torch.randn(2, 5, 4, 4)
    with pytest.raises(RuntimeError, match=r"target must have shape \[2, 4, 4\].*got \[2, 4\]"):
        cbfused.class_balanced_loss(x, torch.zeros(2, 4, dtype=torch.long), weights=w)
    with pytest.raises(RuntimeError, match=r"target must have shape \[2, 4, 4\].*got \[2, 4, 5\]"):
        cbfused.class_balanced_loss(x, torch.zeros(2, 4, 5, dtype=torch.long), weights=w)
    with pytest.raises(
        RuntimeError,
        match=r"class weights must have shape \[6\].*got \[5\] for logits of shape \[2, 6, 3\].*dimension 1",
    ):
        cbfused.class_balanced_loss(torch.randn(2, 6, 3), torch.zeros(2, 3, dtype=torch.long), weights=w)
    with pytest.raises(RuntimeError, match=r"float .* target must have the logits' shape \[2, 5, 4, 4\]"):
        cbfused.class_balanced_loss(x, torch.rand(2, 4, 4, 5), weights=w)
    with pytest.raises(RuntimeError, match=r"0-d tensor"):
        cbfused.class_balanced_loss(torch.tensor(1.0), torch.tensor(0), weights=torch.ones(1))
    with pytest.raises(RuntimeError, match=r"target 7 is out of range for 5 classes"):
        y = torch.zeros(2, 4, 4, dtype=torch.long)
        y[1, 2, 3] = 7
        cbfused.class_balanced_loss(x, y, weights=w, ignore_index=IGNORE)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_sigmoid_focal_loss_weight_along_the_class_dimension(dtype, reduction):
    """sigmoid_focal_loss(weight=w, dim=1) on channels-first masks equals torchvision's focal
    loss times w along dimension 1; dim=-1 (default) and its positive index stay the last."""
    import torchvision

    g = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 5, 6, 7, generator=g, dtype=torch.float64) * 3).to(dtype)
    t = (torch.rand(2, 5, 6, 7, generator=g) > 0.8).to(dtype)
    for dim, k in [(1, 5), (-3, 5), (2, 6), (-1, 7), (3, 7)]:
        w = torch.rand(k, generator=g, dtype=torch.float64) + 0.5
        view = [1, 1, 1, 1]
        view[dim] = k

        def theirs(xi, w=w, view=view):
            out = torchvision.ops.sigmoid_focal_loss(xi, t.to(xi.dtype), alpha=0.25, gamma=2.0) * w.view(view)
            return {"none": out, "mean": out.mean(), "sum": out.sum()}[reduction]

        a, ga = grads(
            lambda xi, w=w, dim=dim: cbfused.sigmoid_focal_loss(xi, t, 0.25, 2.0, reduction, w, dim), x
        )
        b, gb = grads(theirs, x.double())
        assert_close_scaled(a, b.to(dtype), dtype)
        assert_close_scaled(ga, gb.to(dtype), dtype)
        r = R.sigmoid_focal_loss(x, t, 0.25, 2.0, reduction, w, dim=dim)
        assert_close_scaled(a, r, dtype)


def test_sigmoid_focal_loss_weight_dim_errors():
    x, t = torch.randn(2, 5, 4), torch.rand(2, 5, 4).round()
    with pytest.raises(
        RuntimeError,
        match=r"weight must have shape \[5\] \(one per class, the inputs' dimension 1\), got \[4\]",
    ):
        cbfused.sigmoid_focal_loss(x, t, weight=torch.ones(4), dim=1)
    with pytest.raises(RuntimeError, match=r"weight dim 3 is out of range for inputs of shape \[2, 5, 4\]"):
        cbfused.sigmoid_focal_loss(x, t, weight=torch.ones(5), dim=3)
    with pytest.raises(TypeError, match=r"dim must be an int, got 1.0"):
        cbfused.sigmoid_focal_loss(x, t, weight=torch.ones(5), dim=1.0)


def test_class_counts_of_masks_and_dense_soft_labels():
    g = torch.Generator().manual_seed(9)
    masks = torch.randint(0, 6, (3, 5, 7), generator=g)
    masks[0, 0] = IGNORE
    want = torch.bincount(masks[masks != IGNORE], minlength=6)
    assert torch.equal(cbfused.class_counts(masks, 6, ignore_index=IGNORE), want)
    soft = torch.rand(3, 6, 5, 7, generator=g, dtype=torch.float64)
    torch.testing.assert_close(cbfused.class_counts(soft, 6), soft.sum((0, 2, 3)))
    with pytest.raises(ValueError, match=r"float targets must have shape \[N, 6, \.\.\.\].*got \[3, 5, 7\]"):
        cbfused.class_counts(soft[:, 0], 6)
