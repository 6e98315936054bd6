"""The numerics of losses.md: finite loss and gradient at extreme inputs in every dtype,
where naive formulas give 0, inf or NaN; float32 / float64 accumulation."""

from __future__ import annotations

import pytest
import torch
from testing import LOSS_TYPES, assert_close_scaled

import cbfused
from cbfused import reference as R


def _loss_and_grad(x, y, w, **kw):
    x = x.clone().requires_grad_()
    loss = cbfused.class_balanced_loss(x, y, weights=w, **kw)
    loss.backward(torch.ones_like(loss))
    return loss, x.grad


@pytest.mark.parametrize(
    "dtype, logit",
    [
        (torch.float32, -100.0),
        (torch.float32, 100.0),
        (torch.float32, -1e4),
        (torch.float32, 3e38),
        (torch.float16, -12.0),
        (torch.float16, -65504.0),
        (torch.float16, 65504.0),
        (torch.bfloat16, -1e30),
        (torch.float64, -1e300),
    ],
)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_extreme_logits_finite_and_correct(device, dtype, logit, loss_type, gamma):
    c = 6
    x = torch.zeros(3, c, dtype=dtype, device=device)
    x[0, 2] = logit  # positive class at the extreme (its weight 0.5 keeps the loss in range)
    x[1, 4] = -abs(logit)  # a negative class at the extreme
    x[2] = torch.linspace(-3, 3, c, dtype=dtype)
    y = torch.tensor([2, 1, 5], device=device)
    w = torch.tensor([1.0, 2.0, 0.5, 1.0, 1.5, 1.0], dtype=torch.float64, device=device)
    loss, grad = _loss_and_grad(x, y, w, loss_type=loss_type, gamma=gamma, reduction="none")
    assert torch.isfinite(loss).all(), loss
    assert torch.isfinite(grad).all(), grad
    # the value is the exact one, from the float64 reference on the same (rounded) inputs
    ref = R.class_balanced_loss(x.double(), y, w, loss_type=loss_type, gamma=gamma, reduction="none")
    torch.testing.assert_close(loss.double(), ref, rtol=2e-2 if dtype != torch.float32 else 1e-5, atol=1e-6)


def test_focal_gamma_below_one_at_saturated_logits_has_finite_gradient(device):
    """(1 - p)**gamma with gamma < 1 has an infinite derivative at p = 1; the reference
    shows it, our kernel does not."""
    x = torch.tensor([[50.0, -50.0, 0.0], [30.0, 0.0, -30.0]], device=device)
    y = torch.tensor([0, 2], device=device)
    w = torch.ones(3, dtype=torch.float64, device=device)
    for loss_type in ("softmax_focal", "focal"):
        loss, grad = _loss_and_grad(x, y, w, loss_type=loss_type, gamma=0.5)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
    xr = x.double().requires_grad_()
    R.class_balanced_loss(xr, y, w, loss_type="softmax_focal", gamma=0.5).backward()
    assert not torch.isfinite(xr.grad).all()  # naive pow: NaN


def test_softplus_precision_in_the_tails():
    """bce of a confident correct prediction is tiny but not zero, in float32."""
    x = torch.tensor([[-30.0, 30.0]])
    y = torch.tensor([1])
    w = torch.ones(2, dtype=torch.float64)
    loss = cbfused.class_balanced_loss(x, y, weights=w, loss_type="sigmoid", reduction="sum")
    exact = 2 * torch.log1p(torch.exp(torch.tensor(-30.0, dtype=torch.float64)))
    assert loss.item() == pytest.approx(exact.item(), rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_accumulates_in_float32(device, dtype):
    """Means of sums over 8142 classes and 512 rows: half accumulation would be off by far more."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8142, generator=g).to(dtype).to(device)
    y = torch.randint(0, 8142, (512,), generator=g).to(device)
    w = torch.rand(8142, generator=g, dtype=torch.float64).to(device) + 0.5
    for loss_type in LOSS_TYPES:
        ours = cbfused.class_balanced_loss(x, y, weights=w, loss_type=loss_type, reduction="mean")
        ref = R.class_balanced_loss(x, y, w, loss_type=loss_type, reduction="mean")
        assert_close_scaled(ours, ref, dtype)


# C = 200: a NaN in the row's unrolled blocks (0, 100), in its last whole block and in its
# partial tail (199); the CPU's max pass uses the hardware max, which may drop it.
@pytest.mark.parametrize("C,col", [(5, 2), (200, 0), (200, 100), (200, 190), (200, 199)])
def test_nan_logits_propagate(device, C, col):
    x = torch.randn(4, C, device=device)
    x[1, col] = float("nan")
    y = torch.tensor([0, 1, 2, 3], device=device)
    w = torch.ones(C, device=device)
    for loss_type in LOSS_TYPES:
        xg = x.clone().requires_grad_()
        per = cbfused.class_balanced_loss(xg, y, weights=w, loss_type=loss_type, reduction="none")
        assert torch.isnan(per[1]) and torch.isfinite(per[[0, 2, 3]]).all(), loss_type
        per.sum().backward()
        assert torch.isnan(xg.grad[1]).any() and torch.isfinite(xg.grad[[0, 2, 3]]).all(), loss_type
        assert torch.isnan(cbfused.class_balanced_loss(x, y, weights=w, loss_type=loss_type))


def test_loss_beyond_the_dtype_range_overflows_like_torch(device):
    """A per-sample loss larger than the dtype's max (here ~2 * 65504 in float16) is inf, as
    in F.cross_entropy; the gradient stays finite."""
    x = torch.zeros(1, 3, dtype=torch.float16, device=device)
    x[0, 0] = 65504.0
    y = torch.tensor([1], device=device)
    w = torch.tensor([1.0, 2.0, 1.0], device=device)
    loss, grad = _loss_and_grad(x, y, w, loss_type="softmax", reduction="sum")
    assert torch.isinf(loss)
    assert torch.isinf(torch.nn.functional.cross_entropy(x.float(), y, weight=w, reduction="sum").half())
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("loss_type", ["sigmoid", "focal", "softmax", "softmax_focal"])
@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_float64_gradient_exact_at_saturated_logits_vs_mpmath(loss_type, gamma):
    """float64 gradients at |x| up to 40 against 50-digit arithmetic: relative error ~1e-14,
    where autograd through the plain formula (the reference) loses ~8 digits."""
    import mpmath as mp

    mp.mp.dps = 50
    xs = [-40.0, -21.05, -3.0, 0.5, 21.05, 40.0]
    x = torch.tensor([xs], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1])
    w = torch.ones(len(xs), dtype=torch.float64)
    loss = cbfused.class_balanced_loss(x, y, weights=w, loss_type=loss_type, gamma=gamma, reduction="sum")
    (g,) = torch.autograd.grad(loss, x)
    xm = [mp.mpf(v) for v in xs]
    gm = mp.mpf(gamma)

    def sp(z):
        return mp.log(1 + mp.e**z)

    def exact_loss(v):
        if loss_type in ("sigmoid", "focal"):
            total = 0
            for c, xc in enumerate(v):
                t = 1 if c == 1 else 0
                bce = sp(xc) - t * xc
                m = mp.e ** (-gm * t * xc - gm * sp(-xc)) if loss_type == "focal" else 1
                total += m * bce
            return total
        lse = mp.log(sum(mp.e**xc for xc in v))
        logp = v[1] - lse
        return -logp if loss_type == "softmax" else (1 - mp.e**logp) ** gm * (-logp)

    for k in range(len(xs)):
        d = mp.diff(lambda z, k=k: exact_loss([z if i == k else xm[i] for i in range(len(xs))]), xm[k])
        assert abs(g[0, k].item() - float(d)) <= 1e-13 * max(1.0, abs(float(d))), (
            k,
            g[0, k].item(),
            float(d),
        )


@pytest.mark.parametrize("shift", [1e3, 1e4])
@pytest.mark.parametrize("kind", ["hard", "float"])
@pytest.mark.parametrize("loss_type", ["softmax", "softmax_focal"])
def test_float32_softmax_is_shift_invariant_to_an_ulp_of_one(device, loss_type, kind, shift):
    """Softmax losses do not depend on the logits' offset. log p is (x - max) - log(sum), as
    torch's log_softmax, so the float32 loss and gradient err by about an ulp of 1 wherever
    the logits sit; x - (max + log sum) would err by an ulp of the max (6e-5 at 1000, 5e-4
    at 10^4). Confident rows (margins up to 12) included, where 1 - p_y is small."""
    g = torch.Generator().manual_seed(5)
    n, c = 64, 9
    base = torch.randn(n, c, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, c, (n,), generator=g)
    base[torch.arange(n), y] += torch.linspace(0, 12, n, dtype=torch.float64)  # margins
    x = (base + shift).float()  # exact: shift and base both fit float32's 24 bits here
    if kind == "float":
        y = torch.nn.functional.one_hot(y, c).float() * 0.9 + 0.1 / c
    w = torch.ones(c)
    xa = x.clone().to(device).requires_grad_()
    loss = cbfused.class_balanced_loss(
        xa, y.to(device), weights=w.to(device), loss_type=loss_type, gamma=2.0, reduction="none"
    )
    loss.sum().backward()
    xr = (x.double() - shift).requires_grad_()  # the same logits, offset removed, in float64
    yr = y.double() if kind == "float" else y
    ref = R.class_balanced_loss(xr, yr, w.double(), loss_type=loss_type, gamma=2.0, reduction="none")
    ref.sum().backward()
    tol = 16 * torch.finfo(torch.float32).eps
    err_loss = (loss.detach().cpu().double() - ref.detach()).abs() / ref.detach().abs().clamp(min=1)
    err_grad = (xa.grad.cpu().double() - xr.grad).abs()
    assert err_loss.max() <= tol, f"loss off by {err_loss.max():.2e}"
    assert err_grad.max() <= tol, f"gradient off by {err_grad.max():.2e}"


def _assert_ulps(got: torch.Tensor, exact: torch.Tensor, ulps: float = 4.0):
    err = (got.double() - exact).abs()
    normal = exact.abs() >= torch.finfo(torch.float32).tiny
    ulp = torch.finfo(torch.float32).eps * exact.abs()
    assert (err[normal] <= ulps * ulp[normal]).all(), f"max {(err[normal] / ulp[normal]).max():.1f} ulp"
    assert (err[~normal] <= 2.0**-148).all()  # denormal results: within 2 units of the last place


@pytest.mark.parametrize("target", [0.0, 1.0])
def test_float32_sigmoid_terms_accurate_to_a_few_ulp_over_the_whole_range(target):
    """Per element, float32 softplus loss and sigmoid gradient against float64 for logits
    over [-103, 88]: checks the CPU kernel's own exp (denormal results included) and
    division-free log1p element by element, not only through sums that hide them."""
    x = torch.linspace(-103.0, 88.0, 40001, dtype=torch.float32)
    x = torch.cat([x, torch.tensor([-87.3, -87.4, -88.7, -100.0, -1e-3, 0.0, 1e-3, 1e-30, -1e-30])])
    n = x.shape[0]
    w = torch.ones(32, dtype=torch.float64)
    xd = x.double()
    # float targets; the row weight is sum_c t_c w_c, so a t = 0 element gets a partner
    # column with t = 1 and logit 200, whose loss and gradient are 0 in float32
    xa = torch.stack([x, torch.full_like(x, 200.0)], 1)[:, : 1 if target else 2].clone().requires_grad_()
    t = torch.tensor([target, 1.0]).expand(n, 2)[:, : xa.shape[1]]
    loss = cbfused.class_balanced_loss(xa, t, weights=w[: xa.shape[1]], loss_type="sigmoid", reduction="none")
    loss.sum().backward()
    _assert_ulps(loss.detach(), torch.nn.functional.softplus(xd if target == 0 else -xd))
    _assert_ulps(xa.grad[:, 0], torch.sigmoid(xd) if target == 0 else -torch.sigmoid(-xd))  # no cancellation
    # hard targets, the class in another vector block: the kernel's t = 0 path
    xb = torch.full((n, 32), -5.0)
    xb[:, 0] = x
    xb.requires_grad_()
    y = torch.full((n,), 31)
    cbfused.class_balanced_loss(xb, y, weights=w, loss_type="sigmoid", reduction="sum").backward()
    _assert_ulps(xb.grad[:, 0], torch.sigmoid(xd))


def _rounds_from(low: torch.Tensor, f32: torch.Tensor) -> bool:
    """Each element of `low` (float16 / bfloat16) is the float32 value, or that value moved
    by at most 4 float32 ulps, rounded to nearest: the float32 and the reduced-precision
    kernels are separate compilations of the same formulas, and the compiler's multiply-add
    contraction may differ by an ulp between them, which decides a rounding that falls on a
    tie. A value from the wrong lane, or a lane left unwritten, is not that close."""
    step = f32.abs() * 2.0**-21
    lo, hi = (f32 - step).to(low.dtype), (f32 + step).to(low.dtype)
    return bool(((low == lo) | (low == hi)).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "loss_type,alpha,gamma", [("sigmoid", None, 0.0), ("focal", None, 2.0), ("focal", 0.25, 1.5)]
)
def test_reduced_precision_rows_are_the_float32_rows_rounded(dtype, loss_type, alpha, gamma):
    """CPU, every column count from 1 to 72: a float16 / bfloat16 row is read as two float
    vectors a 32-element pack, and its tail as a masked pack or (bfloat16 on AVX512) as one
    vector when it has at most 16 elements, exactly 16 without a mask. Whatever the split,
    each per-sample loss and each gradient element must be the float32 kernel's on the same
    values, rounded once (_rounds_from): a lane read from the wrong place, a lane written
    short or a padding lane summed changes them. Hard targets with the class in every
    position (the one-hot vector of the tail included), and multi-hot float targets."""
    for C in range(1, 73):
        g = torch.Generator().manual_seed(C)
        n = max(C, 3)
        x = (torch.randn(n, C, generator=g) * 4).to(dtype)
        y = torch.arange(n) % C
        t = (torch.rand(n, C, generator=g) > 0.7).to(dtype)
        w = torch.rand(C, generator=g) + 0.5
        kw = dict(weights=w, loss_type=loss_type, gamma=gamma, alpha=alpha, reduction="none")
        for target in (y, t):
            xr = x.clone().requires_grad_()
            loss = cbfused.class_balanced_loss(xr, target, **kw)
            loss.backward(torch.ones_like(loss))
            xf = x.float().requires_grad_()
            tf = target if target.dtype == torch.int64 else target.float()
            loss_f = cbfused.class_balanced_loss(xf, tf, **kw)
            loss_f.backward(torch.ones_like(loss_f))
            what = (C, "hard" if target is y else "multi-hot")
            assert _rounds_from(loss.detach(), loss_f.detach()), what
            assert _rounds_from(xr.grad, xf.grad), what


@pytest.mark.parametrize(
    "loss_type,alpha,gamma",
    [
        ("sigmoid", None, 0.0),
        ("sigmoid", 0.25, 0.0),
        ("focal", None, 0.0),
        ("focal", 0.25, 2.0),
        ("focal", 0.75, 1.5),
        ("softmax", None, 0.0),
    ],
)
def test_bfloat16_gradients_round_like_torch_denormals_and_nan_included(loss_type, alpha, gamma):
    """bfloat16 gradients are the float32 gradient rounded to nearest even, as torch's own
    conversion does: denormal bfloat16 results are kept, not flushed to zero (the AVX512-BF16
    conversion flushes them; a pack with a denormal lane is converted the integer way), and a
    NaN logit gives NaN where it should. Each row mixes denormal, normal and (row 1) NaN lanes
    in the same 32-element pack. The class sits in the tail or in either half of the first
    pack; alpha (which the t = 0 vectors fold into one gradient scale) on and off, integer
    and fractional gamma. Per-sample losses are the float32 row sums, rounded once."""
    C = 40  # a whole pack of 32 and a tail of 8
    x = torch.linspace(-96.0, 4.0, C).repeat(5, 1)
    x[2] = torch.linspace(-90.0, -86.0, C)  # every gradient lane near the float32 normal limit
    x[1, 5] = float("nan")
    x = x.to(torch.bfloat16)
    y = torch.tensor([C - 1, C - 1, C - 1, 20, 3])
    w = torch.linspace(0.5, 2.0, C)
    kw = dict(weights=w, loss_type=loss_type, gamma=gamma, alpha=alpha, reduction="none")
    xg = x.clone().requires_grad_()
    loss_bf16 = cbfused.class_balanced_loss(xg, y, **kw)
    loss_bf16.sum().backward()
    # the float32 kernel's gradient, rounded by torch (round to nearest even, denormals kept)
    xf = x.float().requires_grad_()
    loss_f32 = cbfused.class_balanced_loss(xf, y, **kw)
    loss_f32.sum().backward()
    # per-sample losses: the float32 row sum, rounded once
    torch.testing.assert_close(
        loss_bf16.detach(), loss_f32.detach().to(torch.bfloat16), rtol=0, atol=0, equal_nan=True
    )
    want = xf.grad.to(torch.bfloat16)
    finite = torch.isfinite(want)
    assert torch.equal(xg.grad[finite], want[finite])
    assert torch.equal(torch.isnan(xg.grad), torch.isnan(want))
    tiny = finite & (want != 0) & (want.abs() < torch.finfo(torch.bfloat16).tiny)
    if loss_type != "softmax" and gamma == 0:  # sigmoid(-90) ~ 8e-40: bfloat16 denormals
        assert tiny.sum() >= 10, tiny.sum()


@pytest.mark.parametrize("gamma", [0.5, 1.5])
def test_float32_soft_focal_power_accurate_to_a_few_ulp_for_p_up_to_one_half(gamma):
    """The soft softmax focal rows take (1 - p)^gamma of every class with p <= 1/2 from
    log1p(-p) (the CPU vector version a polynomial of its own, math.h's log1p_neg_half):
    per row, one class at p = sigmoid(x) over [1e-30, 1/2] against float64, its focal loss
    (the reference) and gradient, the other classes at p = 0 (two
    vectors of a row, so the class's vector holds no p above 1/2)."""
    x = -torch.logspace(-4.0, 1.84, 20001, dtype=torch.float64).float()  # p from 1/2 - 2.5e-5 to 1e-30
    x = torch.cat([x, torch.tensor([0.0, -1e-6, -0.7, -3.0, -17.0, -40.0])])
    n, c = x.shape[0], 32
    z = torch.full((n, c), -200.0)
    z[:, 31] = x  # the class
    z[:, 0] = 0.0  # the row's other class with p > 0, in another vector
    t = torch.zeros(n, c)
    t[:, 31] = 1.0
    w = torch.ones(c, dtype=torch.float64)
    kw = dict(loss_type="softmax_focal", gamma=gamma, reduction="none")
    loss, grad = _loss_and_grad(z, t, w, **kw)
    _assert_ulps(loss, R.class_balanced_loss(z.double(), t.double(), w, **kw), 4.0)
    # the gradient in closed form, -(1 - p) G: autograd through the reference gives
    # 0 * inf = NaN where class 0's p rounds to 1 in float64 (gamma < 1, its target 0)
    xd = x.double()
    p, q = torch.sigmoid(xd), torch.sigmoid(-xd)
    logp = -torch.nn.functional.softplus(-xd)
    _assert_ulps(grad[:, 31], -q * q.pow(gamma - 1) * (q - gamma * p * logp), 4.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gamma", [0.5, 1.5, 10.0])
def test_sigmoid_focal_loss_binary_and_soft_targets_in_one_vector(device, dtype, gamma):
    """At a gamma that is no small integer, the CPU takes the term of a vector whose targets
    are all 0 or 1 as exp(-gamma z) (math.h, torchvision_focal_term's binary_t) and any other
    vector as B^gamma: rows all binary and rows with one soft target (0.3, or 1 - 2^-20, or 2^-20)
    at a position that moves from row to row, across vectors and the row's tail; each element's
    loss and gradient against the float64 reference."""
    g = torch.Generator().manual_seed(7)
    n, c = 48, 37
    x = (torch.randn(n, c, generator=g, dtype=torch.float64) * 3).clamp(-8, 8)
    t = (torch.rand(n, c, generator=g) < 0.3).double()
    soft = [0.3, 1 - 2.0**-20, 2.0**-20]
    for i in range(1, n, 2):
        t[i, (5 * i) % c] = soft[i % 3]
    x, t = x.to(dtype).to(device), t.to(dtype).to(device)
    w = torch.rand(c, generator=g, dtype=torch.float64).to(device) + 0.5
    kw = dict(alpha=0.25, gamma=gamma, weight=w)
    xa = x.clone().requires_grad_()
    ours = cbfused.sigmoid_focal_loss(xa, t, reduction="none", **kw)
    xr = x.double().requires_grad_()
    ref = R.sigmoid_focal_loss(xr, t.double(), reduction="none", **kw)
    go = torch.rand(n, c, generator=g, dtype=torch.float64).to(device)
    (ga,) = torch.autograd.grad(ours, xa, go.to(dtype))
    (gr,) = torch.autograd.grad(ref, xr, go)
    # float64: the reference's 1 - p_t cancels, gamma 2^-52 / (1 - p_t) relative, 3.3e-12 at
    # |x| = 8 and gamma = 10
    tol = dict(rtol=2e-5, atol=1e-30) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-300)
    torch.testing.assert_close(ours.double(), ref.detach(), **tol)
    torch.testing.assert_close(ga.double(), gr, **tol)
