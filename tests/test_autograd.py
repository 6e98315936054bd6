"""gradcheck (float64), torch.library.opcheck, torch.compile(fullgraph=True), and the
in-place backward's safety (retain_graph, grad_output scaling, double backward)."""

from __future__ import annotations

import pytest
import torch
from testing import LOSS_TYPES, make_counts, make_inputs

import cbfused
from cbfused import _ops


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("kind", ["hard", "float"])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "weighted_mean"])
def test_gradcheck(device, loss_type, kind, reduction):
    x, y = make_inputs(6, 5, torch.float64, device, kind, loss_type, seed=11, scale=2.0)
    w = cbfused.class_balanced_weights(make_counts(5), 0.99, device=device)
    alpha = 0.25 if loss_type == "focal" else None

    def f(x):
        return cbfused.class_balanced_loss(
            x, y, weights=w, loss_type=loss_type, gamma=1.5, alpha=alpha, reduction=reduction
        )

    assert torch.autograd.gradcheck(f, (x.requires_grad_(),), eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("gamma", [1.5, 0.0, 1.0, 3.0])  # integer gamma: the product path
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_gradcheck_sigmoid_focal_loss(device, reduction, gamma):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, generator=g, dtype=torch.float64).to(device).requires_grad_()
    t = torch.rand(4, 3, 5, generator=g, dtype=torch.float64).to(device)  # soft targets
    w = torch.rand(5, generator=g, dtype=torch.float64).to(device)
    assert torch.autograd.gradcheck(
        lambda x: cbfused.sigmoid_focal_loss(x, t, 0.25, gamma, reduction, weight=w),
        (x,),
        eps=1e-6,
        atol=1e-7,
    )


def _cb_samples(device):
    w = cbfused.class_balanced_weights(make_counts(7), 0.999, device=device)
    out = []
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for lt, code in _ops.LOSS_TYPES.items():
            for kind in ("hard", "float"):
                for red in (0, 2):
                    x, y = make_inputs(9, 7, dtype, device, kind, lt, seed=code)
                    out.append((x.requires_grad_(), y, w, code, 2.0, -1.0, red, -100, 1))
    x, y = make_inputs(9, 7, torch.float32, device, "hard", seed=1)
    out.append((x, y, w, 2, 0.5, 0.25, 1, -100, 0))  # no gradient requested
    return out


def test_opcheck_cb_loss(device):
    for args in _cb_samples(device):
        torch.library.opcheck(torch.ops.cbfused.cb_loss.default, args)


def test_opcheck_sigmoid_focal(device):
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        for red in (0, 1, 2):
            x = torch.randn(5, 6, generator=g, dtype=dtype).to(device).requires_grad_()
            t = torch.rand(5, 6, generator=g, dtype=dtype).to(device)
            w = torch.rand(6, generator=g).to(device)
            torch.library.opcheck(torch.ops.cbfused.sigmoid_focal.default, (x, t, w, 0.25, 2.0, red, 1))
            torch.library.opcheck(torch.ops.cbfused.sigmoid_focal.default, (x, t, None, -1.0, 0.5, red, 1))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_compile_fullgraph_module(device, loss_type):
    torch._dynamo.reset()
    crit = cbfused.ClassBalancedLoss(make_counts(10), beta=0.999, loss_type=loss_type, gamma=2.0).to(device)
    lin = torch.nn.Linear(16, 10).to(device)

    def step(feat, y):
        loss = crit(lin(feat), y)
        return loss * 2.0

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    g = torch.Generator().manual_seed(0)
    for n in (32, 33):  # a second shape exercises recompilation / dynamic shapes
        feat = torch.randn(n, 16, generator=g).to(device)
        y = torch.randint(0, 10, (n,), generator=g).to(device)
        out_c = compiled(feat, y)
        (gc,) = torch.autograd.grad(out_c, lin.weight)
        out_e = step(feat, y)
        (ge,) = torch.autograd.grad(out_e, lin.weight)
        torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-6)


def test_compile_fullgraph_sigmoid_focal(device):
    torch._dynamo.reset()
    f = torch.compile(lambda x, t: cbfused.sigmoid_focal_loss(x, t, reduction="mean"), fullgraph=True)
    x = torch.randn(8, 5, device=device, requires_grad=True)
    t = (torch.rand(8, 5, device=device) > 0.5).float()
    (g1,) = torch.autograd.grad(f(x, t), x)
    (g2,) = torch.autograd.grad(cbfused.sigmoid_focal_loss(x, t, reduction="mean"), x)
    torch.testing.assert_close(g1, g2)


def test_retain_graph_backward_twice_is_exact(device):
    x, y = make_inputs(20, 8, torch.float32, device, "hard", seed=3)
    x.requires_grad_()
    loss = cbfused.class_balanced_loss(x, y, weights=torch.ones(8, device=device), loss_type="focal")
    (g1,) = torch.autograd.grad(loss * 3.0, x, retain_graph=True)
    (g2,) = torch.autograd.grad(loss * 3.0, x, retain_graph=True)
    (g3,) = torch.autograd.grad(loss, x)  # last use: scales in place
    assert torch.equal(g1, g2)
    torch.testing.assert_close(g3 * 3.0, g1)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_grad_output_scaling(device, reduction):
    x, y = make_inputs(12, 6, torch.float64, device, "hard", seed=5)
    w = torch.rand(6, dtype=torch.float64, device=device) + 0.1
    x.requires_grad_()
    loss = cbfused.class_balanced_loss(x, y, weights=w, loss_type="softmax", reduction=reduction)
    go = torch.rand_like(loss) * 5
    (g,) = torch.autograd.grad(loss, x, go)
    ref = cbfused.reference.class_balanced_loss(x, y, w, loss_type="softmax", reduction=reduction)
    (gr,) = torch.autograd.grad(ref, x, go)
    torch.testing.assert_close(g, gr, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["hard", "float"])
@pytest.mark.parametrize("reduction", ["sum", "mean", "weighted_mean"])
def test_backward_scale_is_the_tensor_product_bit_for_bit(device, dtype, kind, reduction):
    """The backward multiplies the saved gradient by grad_output * grad_scale (float32, or
    float64 for float64 logits), in that type: for float16 / bfloat16 one rounding of the
    float32 product, not a product with the scale rounded to the gradient's type first. On
    the CPU the scale is computed from the two scalars on the host; in place or not, the
    result must be that product bit for bit."""
    x, y = make_inputs(9, 7, dtype, device, kind, "sigmoid", seed=4)
    w = torch.rand(7, generator=torch.Generator().manual_seed(1)).to(device) + 0.3
    red = _ops.REDUCTIONS[reduction]
    loss, grad, scale = torch.ops.cbfused.cb_loss(x, y, w, 2, 2.0, 0.25, red, -100, 1)
    for go in (1.0, 0.3, -7.1):
        g_loss = torch.tensor(go, dtype=dtype, device=device)
        expected = (grad.to(scale.dtype) * (g_loss.to(scale.dtype) * scale)).to(dtype)
        xr = x.detach().clone().requires_grad_()
        out = cbfused.class_balanced_loss(
            xr, y, weights=w, loss_type="focal", gamma=2.0, alpha=0.25, reduction=reduction
        )
        (g_keep,) = torch.autograd.grad(out, xr, g_loss, retain_graph=True)  # out of place
        (g_reuse,) = torch.autograd.grad(out, xr, g_loss)  # the saved buffer, scaled in place
        assert g_keep.dtype == dtype
        assert torch.equal(g_keep, expected), (go, (g_keep - expected).abs().max())
        assert torch.equal(g_reuse, expected), (go, (g_reuse - expected).abs().max())


def test_backward_scale_one_from_two_scalars_that_are_not_one(device):
    """grad_output 2 times the mean's 1/D = 1/2 is a scale of exactly 1: the gradient is the
    kernel's saved one unscaled (not halved, not doubled), in place or not."""
    x, _ = make_inputs(4, 3, torch.float32, device, "float", "sigmoid", seed=6)
    t = torch.tensor([[1.0, 0, 0], [0, 0, 0], [0, 0, 1], [0, 0, 0]], device=device)  # D = 2
    w = torch.ones(3, device=device)
    _, grad, scale = torch.ops.cbfused.cb_loss(x, t, w, 1, 0.0, -1.0, 2, -100, 1)
    assert scale.item() == 0.5
    go = torch.tensor(2.0, device=device)
    xr = x.detach().clone().requires_grad_()
    out = cbfused.class_balanced_loss(xr, t, weights=w, loss_type="sigmoid", reduction="mean")
    (g_keep,) = torch.autograd.grad(out, xr, go, retain_graph=True)
    (g_reuse,) = torch.autograd.grad(out, xr, go)
    assert torch.equal(g_keep, grad)
    assert torch.equal(g_reuse, grad)


def test_double_backward_raises(device):
    x, y = make_inputs(5, 4, torch.float64, device, "hard", seed=5)
    x.requires_grad_()
    loss = cbfused.class_balanced_loss(x, y, weights=torch.ones(4, dtype=torch.float64, device=device))
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.autograd.grad(loss, x, create_graph=True)


def test_no_grad_computes_no_gradient(device):
    x, y = make_inputs(5, 4, torch.float32, device, "hard", seed=5)
    w = torch.ones(4, device=device)
    out = torch.ops.cbfused.cb_loss(x, y, w, 0, 1.0, -1.0, 2, -100, 0)
    assert out[1].numel() == 0
    x.requires_grad_()
    with torch.no_grad():
        loss = cbfused.class_balanced_loss(x, y, weights=w, loss_type="softmax")
    assert loss.grad_fn is None


def test_grad_mode_reuse_scales_the_saved_buffer_in_place_only_when_safe(device):
    """grad_mode=2 lets the backward reuse the kernel's gradient buffer (no second N x C
    tensor); grad_mode=1 never touches the returned buffer."""
    x, y = make_inputs(10, 6, torch.float32, device, "hard", seed=2)
    x.requires_grad_()
    w = torch.ones(6, device=device)
    for mode, reused in ((1, False), (2, True)):
        loss, grad, inv = torch.ops.cbfused.cb_loss(x, y, w, 0, 1.0, -1.0, 2, -100, mode)
        before = grad.detach().clone()
        (g,) = torch.autograd.grad(loss * 3.0, x)
        torch.testing.assert_close(g, before * inv * 3.0)
        assert (g.data_ptr() == grad.data_ptr()) is reused
        assert torch.equal(grad, g if reused else before)


def test_bad_grad_mode(device):
    x, y = make_inputs(3, 4, torch.float32, device, "hard", seed=2)
    with pytest.raises(RuntimeError, match="grad_mode must be 0, 1 or 2, got 3"):
        torch.ops.cbfused.cb_loss(x, y, torch.ones(4, device=device), 0, 1.0, -1.0, 2, -100, 3)


def test_plain_backward_returns_the_kernel_gradient_without_a_copy():
    """loss.backward() on the CPU with hard targets and a mean: the kernel already folded
    1/D into its gradient buffer, and the backward hands that buffer over untouched."""
    x, y = make_inputs(16, 5, torch.float64, "cpu", "hard", seed=8)
    x.requires_grad_()
    w = torch.rand(5, dtype=torch.float64) + 0.5
    loss, grad, scale = torch.ops.cbfused.cb_loss(x, y, w, 2, 1.0, -1.0, 2, -100, 2)
    assert scale.item() == 1.0
    before = grad.detach().clone()
    ptr = grad.data_ptr()
    del grad  # like the public API, hold no reference: autograd can then take the buffer over
    loss.backward()
    assert x.grad.data_ptr() == ptr
    assert torch.equal(x.grad, before)
    ref = cbfused.reference.class_balanced_loss(x, y, w, loss_type="focal")
    (gr,) = torch.autograd.grad(ref, x)
    torch.testing.assert_close(x.grad, gr, rtol=1e-12, atol=1e-14)
