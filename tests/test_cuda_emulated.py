"""The CUDA kernels' own source, run in the CPU emulation of the CUDA thread model
(csrc/cuda/emulator.h, built as cbfused._emulated_cuda: every CUDA thread an OS thread,
__syncthreads and warp shuffles real barriers) against the float64 reference.

This executes the kernels' logic here, without a GPU: warp / block / flat-tile
dispatch, 128-bit pack splits with scalar heads and tails, the shared-memory row cache,
the reductions and the device-side asserts. It does not execute nvcc's code or the GPU's
math library, timing or memory model: tests/test_cuda.py does, where a GPU is present.
"""

from __future__ import annotations

import os

import pytest
import torch
import torchvision
from testing import (
    CUDA_BUILT,
    HAS_CUDA,
    LOSS_TYPES,
    REDUCTIONS,
    assert_close_scaled,
    make_counts,
    make_inputs,
)

import cbfused
from cbfused import reference

if os.environ.get("CBFUSED_EMULATION") == "1":  # the test command built it: it must be there
    import cbfused._emulated_cuda as emu_ext
else:
    emu_ext = pytest.importorskip(
        "cbfused._emulated_cuda",
        reason="the CUDA emulation is built by `make test` (CBFUSED_BUILD_EMULATION=1)",
    )
LT = cbfused._ops.LOSS_TYPES
RED = cbfused._ops.REDUCTIONS

# The same cases run on the emulation everywhere and on the real kernels where a GPU is.
BACKENDS = ["emulated"] + (["cuda"] if HAS_CUDA and CUDA_BUILT else [])


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def same_layout_on(a: torch.Tensor, device: str) -> torch.Tensor:
    """A copy of `a` on `device` with the same sizes, strides and storage offset, so a
    view that starts off a 16-byte boundary on the CPU does so on the GPU too."""
    span = 1 + sum((n - 1) * st for n, st in zip(a.shape, a.stride(), strict=True)) if a.numel() else 0
    buf = torch.zeros(a.storage_offset() + span, dtype=a.dtype, device=device)
    out = buf.as_strided(a.shape, a.stride(), a.storage_offset())
    out.copy_(a)
    return out


def test_same_layout_on_keeps_offsets_and_strides():
    a = torch.arange(40.0)[3:].view(37)[1:31].view(5, 6)[:, 1:5]
    b = same_layout_on(a, "cpu")
    assert torch.equal(a, b) and a.stride() == b.stride() and a.storage_offset() == b.storage_offset()


def run_op(backend, name, *args):
    """torch.ops.cbfused_emu.<name> on CPU tensors, or torch.ops.cbfused.<name> on the GPU
    (same strides and offsets); results on the CPU."""
    if backend == "emulated":
        return getattr(torch.ops.cbfused_emu, name)(*args)
    moved = [same_layout_on(a, "cuda") if isinstance(a, torch.Tensor) else a for a in args]
    return tuple(o.cpu() for o in getattr(torch.ops.cbfused, name)(*moved))


def run_cb_loss(
    x, y, w, loss_type, reduction="mean", gamma=2.0, alpha=None, ignore_index=-100, backend="emulated"
):
    """Loss and d(loss.sum())/dx from the CUDA op (emulated, or on the GPU)."""
    loss, grad, scale = run_op(
        backend,
        "cb_loss",
        x,
        y,
        w,
        LT[loss_type],
        gamma,
        -1.0 if alpha is None else alpha,
        RED[reduction],
        ignore_index,
        1,
    )
    return loss, (grad.double() * scale.double()).to(x.dtype)


def expected(x, y, w, loss_type, reduction="mean", gamma=2.0, alpha=None, ignore_index=-100):
    xr = x.detach().double().requires_grad_()
    yr = y if y.dtype == torch.int64 else y.double()
    ref = reference.class_balanced_loss(
        xr,
        yr,
        w,
        loss_type=loss_type,
        gamma=gamma,
        alpha=alpha,
        reduction=reduction,
        ignore_index=ignore_index,
    )
    ref.sum().backward()
    return ref.detach(), xr.grad


def check(x, y, w, loss_type, reduction="mean", factor=1.0, backend="emulated", **kw):
    loss, grad = run_cb_loss(x, y, w, loss_type, reduction, backend=backend, **kw)
    ref_loss, ref_grad = expected(x, y, w, loss_type, reduction, **kw)
    ref_loss = ref_loss.to(x.dtype)
    if torch.isfinite(ref_loss).all():
        assert_close_scaled(loss, ref_loss, x.dtype, factor)
    else:  # a float16 sum past 65504: inf, as the reference rounded to float16
        assert torch.equal(loss, ref_loss)
    assert_close_scaled(grad, ref_grad.to(x.dtype), x.dtype, factor)


# (N, C) per kernel path: flat tiles for sigmoid / focal up to C = 256 (several tiles, a
# partial last tile, C = 1), warp per row up to C = 1024, block per row above.
SHAPES = [(37, 10), (70, 80), (300, 1), (9, 257), (5, 1000), (3, 1025), (2, 8142)]


@pytest.mark.parametrize("kind", ["hard", "soft"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_matches_reference(loss_type, dtype, shape, kind, backend):
    n, c = shape
    if dtype in (torch.float64, torch.float16) and c > 1024:
        pytest.skip("block-per-row path covered by float32 / bfloat16 (keeps the emulation fast)")
    x, y = make_inputs(n, c, dtype, kind=kind, loss_type=loss_type, seed=n + c)
    w = cbfused.class_balanced_weights(make_counts(c, seed=c), 0.999)
    # every reduction appears across the matrix; 'mean' for each case
    reduction = REDUCTIONS[(n + c + len(loss_type)) % len(REDUCTIONS)]
    check(x, y, w, loss_type, reduction, backend=backend)
    if reduction != "mean":
        check(x, y, w, loss_type, "mean", backend=backend)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("c", [10, 80, 1000, 1500])
def test_strided_and_misaligned_rows(loss_type, dtype, c, backend):
    """Rows that do not start on 16-byte boundaries (scalar heads / tails, all-scalar
    when x and the gradient are misaligned differently) and rows with a stride > C."""
    n = 11
    x, y = make_inputs(n, c, dtype, kind="hard", seed=c)
    w = cbfused.class_balanced_weights(make_counts(c, seed=1), 0.99)
    buf = torch.empty(n * c + 3, dtype=dtype)
    shifted = buf[3:].view(n, c)  # base 3 elements past an aligned allocation
    shifted.copy_(x)
    wide = torch.zeros(n, c + 5, dtype=dtype)[:, 2 : 2 + c]  # row stride c + 5, offset 2
    wide.copy_(x)
    for xx in (shifted, wide):
        assert xx.data_ptr() % 16 != 0
        check(xx, y, w, loss_type, "sum", backend=backend)
    t = make_inputs(n, c, dtype, kind="soft", loss_type=loss_type, seed=c)[1]
    tbuf = torch.empty(n * c + 1, dtype=dtype)
    tt = tbuf[1:].view(n, c)
    tt.copy_(t)
    check(shifted, tt, w, loss_type, "mean", backend=backend)


@pytest.mark.parametrize("loss_type", ["softmax", "softmax_focal"])
@pytest.mark.parametrize(
    ("dtype", "c"),
    [(torch.float64, 8142), (torch.float64, 12000), (torch.float32, 30000)],
    ids=["f64-8142-cached", "f64-12000-uncached", "f32-30000-uncached"],
)
def test_softmax_row_cache_and_fallback(loss_type, dtype, c, backend):
    """Rows that fit the shared-memory row cache (80 KiB) and rows that do not (the
    gradient pass then reads the row from global memory again)."""
    x, y = make_inputs(2, c, dtype, kind="hard", seed=c, ignore_frac=0)
    w = cbfused.class_balanced_weights(make_counts(c), 0.9999)
    check(x, y, w, loss_type, "mean", backend=backend)
    xs, ys = make_inputs(2, c, dtype, kind="soft", loss_type=loss_type, seed=c)
    check(xs, ys, w, loss_type, "sum", backend=backend)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("c", [10, 1000])
def test_ignored_rows_alpha_gamma(loss_type, c, backend):
    x, y = make_inputs(40, c, torch.float32, kind="hard", seed=3, ignore_frac=0.5)
    w = cbfused.class_balanced_weights(make_counts(c), 0.999)
    for gamma, alpha in [(0.0, None), (0.5, 0.25), (3.0, 0.75)]:
        check(
            x,
            y,
            w,
            loss_type,
            "weighted_mean",
            gamma=gamma,
            alpha=alpha if loss_type in ("sigmoid", "focal") else None,
            backend=backend,
        )
    y_all = torch.full_like(y, -1)
    loss, grad = run_cb_loss(x, y_all, w, loss_type, "mean", ignore_index=-1, backend=backend)
    assert loss.item() == 0.0 and not grad.any()  # D = 0: zero, not NaN


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("c", [10, 1000])
def test_saturated_logits(loss_type, c, backend):
    x, y = make_inputs(16, c, torch.float32, kind="hard", seed=4, scale=1e4, ignore_frac=0)
    w = cbfused.class_balanced_weights(make_counts(c), 0.999)
    check(x, y, w, loss_type, "sum", backend=backend)


@pytest.mark.parametrize(
    "case", ["softmax-hard", "softmax_focal-hard", "softmax-float", "softmax_focal-float"]
)
@pytest.mark.parametrize("c", [9, 1500])
def test_softmax_shift_invariant_to_an_ulp_of_one(case, c, backend):
    """As on the CPU (test_numerics): log p is (x - max) - log sum, so float32 losses and
    gradients at logits near 1000 err by about an ulp of 1, not of 1000 (float-target
    cross-entropy: sum t (x - max) re-based per thread in the online pass)."""
    loss_type, kind = case.split("-")
    g = torch.Generator().manual_seed(6)
    n, shift = 48, 1000.0
    base = torch.randn(n, c, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, c, (n,), generator=g)
    base[torch.arange(n), y] += torch.linspace(0, 12, n, dtype=torch.float64)
    x = (base + shift).float()
    if kind == "float":
        y = torch.nn.functional.one_hot(y, c).float() * 0.9 + 0.1 / c
    w = torch.ones(c)
    loss, grad = run_cb_loss(x, y, w, loss_type, "none", backend=backend)
    ref_loss, ref_grad = expected(
        x.double() - shift, y.double() if kind == "float" else y, w, loss_type, "none"
    )
    tol = 16 * torch.finfo(torch.float32).eps
    assert ((loss.double() - ref_loss).abs() / ref_loss.abs().clamp(min=1)).max() <= tol
    assert (grad.double() - ref_grad).abs().max() <= tol


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("c", [10, 1000])
def test_device_asserts_emulated(loss_type, c):
    """Bad targets are caught on the device (no host sync); the emulation reports the
    failed CUDA_KERNEL_ASSERT as the launch's error. (Not run on a GPU: a device-side
    assert leaves the CUDA context unusable for the rest of the process.)"""
    x, y = make_inputs(20, c, torch.float32, kind="hard", seed=5, ignore_frac=0)
    w = torch.ones(c)
    bad = y.clone()
    bad[7] = c
    with pytest.raises(RuntimeError, match="device-side assertion.*target out of range"):
        run_cb_loss(x, bad, w, loss_type)
    bad[7] = -3
    with pytest.raises(RuntimeError, match="device-side assertion"):
        run_cb_loss(x, bad, w, loss_type)
    t = make_inputs(20, c, torch.float32, kind="soft", loss_type=loss_type, seed=5)[1]
    for v in (1.5, -0.25, float("nan")):
        tb = t.clone()
        tb[3, c // 2] = v
        with pytest.raises(RuntimeError, match="device-side assertion.*float target"):
            run_cb_loss(x, tb, w, loss_type)


@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "offset"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("shape", [(64, 80), (3, 5), (1000,)], ids=str)
def test_sigmoid_focal_matches_torchvision(reduction, shape, dtype, offset, backend):
    """The torchvision-semantics focal op: packs over the flattened input, scalar head /
    tail, and the all-scalar walk when the inputs start off the outputs' alignment."""
    g = torch.Generator().manual_seed(0)
    n = torch.Size(shape).numel()
    x = (torch.randn(n + offset, generator=g, dtype=torch.float64) * 3).to(dtype)[offset:].view(shape)
    t = (torch.rand(n + offset, generator=g) > 0.9).to(dtype)[offset:].view(shape)
    w = torch.rand(shape[-1], generator=g, dtype=torch.float64) + 0.5
    xr = x.double().requires_grad_()
    ref = torchvision.ops.sigmoid_focal_loss(xr, t.double(), alpha=0.25, gamma=2.0, reduction="none") * w
    ref = {"none": ref, "sum": ref.sum(), "mean": ref.mean()}[reduction]
    ref.sum().backward()
    loss, grad = run_op(backend, "sigmoid_focal", x, t, w, 0.25, 2.0, RED[reduction], 1)
    assert_close_scaled(loss, ref.detach().to(dtype), dtype)
    assert_close_scaled(grad, xr.grad.to(dtype), dtype)


@pytest.mark.parametrize("kind", ["hard", "soft"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_fused_linear_chunks_on_the_emulated_kernels(loss_type, reduction, kind, monkeypatch):
    """linear_class_balanced_loss with the CUDA kernels' source (emulated) as its per-chunk
    kernel: loss and the three gradients equal the unfused CPU path (3 chunks of rows, the
    last partial, ignored rows). It also holds the CUDA host code to what the chunked path
    relies on: for 'sum' (the forward's chunks) and 'none' (their backward) the returned
    grad_scale is 1, the gradient unscaled."""
    import cbfused.linear as L

    calls = []

    def emulated(*args):
        out = torch.ops.cbfused_emu.cb_loss.default(*args)
        assert args[6] in (RED["sum"], RED["none"]) and out[2].item() == 1.0
        calls.append(args[0].shape[0])
        return out

    monkeypatch.setattr(L, "_cb_loss_op", emulated)
    monkeypatch.setattr(L, "_IN_PLACE_DEVICES", ())  # every chunk through _cb_loss_op, as on CUDA
    n, h, c = 20, 6, 9
    _, y = make_inputs(n, c, torch.float64, kind=kind, loss_type=loss_type, seed=c)
    g = torch.Generator().manual_seed(1)
    f0 = torch.randn(n, h, generator=g, dtype=torch.float64)
    w0 = torch.randn(c, h, generator=g, dtype=torch.float64)
    b0 = torch.randn(c, generator=g, dtype=torch.float64)
    cw = cbfused.class_balanced_weights(make_counts(c, seed=c), 0.999)
    kw = dict(weights=cw, loss_type=loss_type, gamma=2.0, reduction=reduction)
    go = torch.linspace(0.5, 1.5, n if reduction == "none" else 1, dtype=torch.float64)

    def run(fn):
        f, w, b = (t.clone().requires_grad_() for t in (f0, w0, b0))
        loss = fn(f, w, b)
        return (loss, *torch.autograd.grad(loss, (f, w, b), go.reshape(loss.shape)))

    got = run(lambda f, w, b: cbfused.linear_class_balanced_loss(f, w, b, y, chunk_rows=8, **kw))
    assert calls[:3] == [8, 8, 4]  # the chunks ran on the emulated kernels
    want = run(lambda f, w, b: cbfused.class_balanced_loss(f @ w.t() + b, y, **kw))
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("in_place", [False, True], ids=["new", "in_place"])
@pytest.mark.parametrize("offset", [0, 1, 3], ids=lambda o: f"offset{o}")
@pytest.mark.parametrize("n", [0, 1, 7, 1000, 4099])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_scale_grad_is_one_rounding_of_the_scalars_product(dtype, n, offset, in_place):
    """The GPU backward's scaling kernel (cuda::scale_grad; on a GPU the autograd tests
    check it through backward): grad * (g_loss * grad_scale), the two scalars multiplied
    in float32 (float64 for float64) and each element rounded once, bit for bit what torch
    computes on the CPU from the upcast operands. Packs, a scalar head for views that start
    off a 16-byte boundary, and a tail."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(n + offset)
    base = (torch.randn(n + offset, generator=g, dtype=torch.float64) * 3).to(dtype)
    grad = base[offset:]
    before = grad.clone()
    for go, scale in ((1.0, 1 / 3), (-7.1, 0.3), (0.3, 1 / 45)):
        g_loss = torch.tensor(go, dtype=dtype)
        s = torch.tensor(scale, dtype=acc)
        want = (before.to(acc) * (g_loss.to(acc) * s)).to(dtype)
        work = base.clone()[offset:] if in_place else grad
        out = torch.ops.cbfused_emu.scale_grad(work, g_loss, s, in_place)
        assert torch.equal(out, want), (go, scale)
        if n:
            assert (out.data_ptr() == work.data_ptr()) is in_place
        assert torch.equal(grad, before)  # not in place: the input is untouched


@pytest.mark.parametrize("reduction", ["sum", "mean", "weighted_mean"])
@pytest.mark.parametrize("n", [4096, 9001])
def test_final_reduction_over_many_rows(n, reduction, backend):
    """finish_kernel sums the per-row losses (and denominators) of n rows with 1024
    threads of four accumulators each: n = 4096 is one whole step, 9001 two and a
    partial third. In float64 the sum matches the reference to rounding; a dropped or
    doubled row moves it far more."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 8, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 8, (n,), generator=g)
    y[::7] = -100
    w = torch.rand(8, generator=g, dtype=torch.float64) + 0.5
    loss, _ = run_cb_loss(x, y, w, "sigmoid", reduction, backend=backend)
    ref, _ = expected(x, y, w, "sigmoid", reduction)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)


# Dense [N, C, d...] logits: the planes kernel (contiguous NCHW, views whose spatial
# dimensions collapse, a batch slice), the row kernels on channels-last memory, and the
# copy of a crop; several blocks of positions (3 x 300 > 256) and a partial last block.
DENSE = [
    ((2, 7, 5, 9), "contiguous"),
    ((3, 5, 300), "contiguous"),
    ((2, 7, 5, 9), "channels_last"),
    ((2, 6, 4, 5), "crop"),
    ((3, 4, 2, 3, 5), "batch_slice"),
    ((1, 1, 40), "contiguous"),
]


def _dense_layout(x, layout):
    if layout == "contiguous":
        return x
    if layout == "channels_last":
        return x.movedim(1, -1).contiguous().movedim(-1, 1)
    if layout == "crop":
        big = torch.nn.functional.pad(x, [1, 2] * (x.dim() - 2), value=3.0)
        return big[(slice(None), slice(None), *(slice(1, 1 + s) for s in x.shape[2:]))]
    return torch.stack([x, x], 1)[:, 0]  # batch_slice


@pytest.mark.parametrize("kind", ["hard", "soft"])
@pytest.mark.parametrize("case", DENSE, ids=lambda c: f"{'x'.join(map(str, c[0]))}-{c[1]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_dense_matches_reference(loss_type, dtype, case, kind, backend):
    shape, layout = case
    g = torch.Generator().manual_seed(sum(shape))
    c = shape[1]
    x = _dense_layout((torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(dtype), layout)
    if kind == "hard":
        y = torch.randint(0, c, (shape[0], *shape[2:]), generator=g)
        y[torch.rand(y.shape, generator=g) < 0.15] = 255
    else:
        t = torch.rand(shape, generator=g, dtype=torch.float64)
        t = t / t.sum(1, keepdim=True) if loss_type in ("softmax", "softmax_focal") else (t > 0.7).double()
        y = _dense_layout(t.to(dtype), layout)
    w = cbfused.class_balanced_weights(make_counts(c, seed=c), 0.999)
    alpha = 0.25 if loss_type in ("sigmoid", "focal") else None
    ignore = 255 if kind == "hard" else -100
    for reduction in ("none", "mean", "weighted_mean"):
        loss, grad = run_cb_loss(
            x, y, w, loss_type, reduction, alpha=alpha, ignore_index=ignore, backend=backend
        )
        ref_loss, ref_grad = expected(x, y, w, loss_type, reduction, alpha=alpha, ignore_index=ignore)
        assert_close_scaled(loss, ref_loss.to(dtype), dtype)
        assert_close_scaled(grad, ref_grad.to(dtype), dtype)
        if layout in ("contiguous", "channels_last"):
            assert grad.stride() == x.stride()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("case", [((2, 5, 3, 7), 1), ((4, 6, 9), -2), ((3, 4, 300), 0)], ids=str)
def test_sigmoid_focal_weight_along_a_dimension(case, reduction, dtype, backend):
    """weight_dim: the class weight of element i is w[(i / inner) % K] (channels-first masks)."""
    shape, dim = case
    g = torch.Generator().manual_seed(len(shape))
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(dtype)
    t = (torch.rand(shape, generator=g) > 0.8).to(dtype)
    k = shape[dim]
    w = torch.rand(k, generator=g, dtype=torch.float64) + 0.5
    view = [1] * len(shape)
    view[dim] = k
    xr = x.double().requires_grad_()
    ref = torchvision.ops.sigmoid_focal_loss(
        xr, t.double(), alpha=0.25, gamma=2.0, reduction="none"
    ) * w.view(view)
    ref = {"none": ref, "mean": ref.mean()}[reduction]
    ref.sum().backward()
    loss, grad = run_op(backend, "sigmoid_focal", x, t, w, 0.25, 2.0, RED[reduction], 1, dim)
    assert_close_scaled(loss, ref.detach().to(dtype), dtype)
    assert_close_scaled(grad, xr.grad.to(dtype), dtype)
