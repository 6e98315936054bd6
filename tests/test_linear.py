"""Fused linear + class-balanced loss: loss and all three gradients equal the unfused path
(nn.Linear then class_balanced_loss) for every loss type, target kind and reduction, in
chunks that never hold the whole [N, C] logits; gradcheck in float64."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from testing import LOSS_TYPES, REDUCTIONS, SOFTMAX_FAMILY, assert_close_scaled, make_counts, make_inputs

import cbfused


def _unfused(f, w, b, y, cw, **kw):
    logits = f @ w.t() + (b if b is not None else 0)
    return cbfused.class_balanced_loss(logits, y, weights=cw, **kw)


def _grads(fn, f, w, b):
    f = f.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    b = None if b is None else b.detach().clone().requires_grad_()
    loss = fn(f, w, b)
    go = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device).reshape(loss.shape)
    inputs = [f, w] + ([b] if b is not None else [])
    gs = torch.autograd.grad(loss, inputs, go)
    return loss, gs


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("kind", ["hard", "float"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_unfused(device, loss_type, kind, reduction, dtype):
    n, h, c = 45, 16, 23
    g = torch.Generator().manual_seed(3)
    f = torch.randn(n, h, generator=g).to(dtype).to(device)
    w = (torch.randn(c, h, generator=g) * 0.3).to(dtype).to(device)
    b = (torch.randn(c, generator=g) * 0.1).to(dtype).to(device)
    _, y = make_inputs(n, c, dtype, device, kind, loss_type, seed=5)
    cw = cbfused.class_balanced_weights(make_counts(c), 0.999, device=device)
    kw = dict(loss_type=loss_type, gamma=1.5, reduction=reduction)
    for bias in (b, None):
        l1, g1 = _grads(
            lambda f, w, b: cbfused.linear_class_balanced_loss(f, w, b, y, weights=cw, chunk_rows=8, **kw),
            f,
            w,
            bias,
        )
        l2, g2 = _grads(lambda f, w, b: _unfused(f, w, b, y, cw, **kw), f, w, bias)
        factor = 4.0 if dtype == torch.bfloat16 else 1.0  # the matmuls round differently in chunks
        assert_close_scaled(l1, l2, dtype, factor)
        for a, e in zip(g1, g2, strict=True):
            assert_close_scaled(a, e, dtype, factor)


@pytest.mark.parametrize("reduction", ["mean", "none", "weighted_mean"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradcheck(loss_type, reduction):
    g = torch.Generator().manual_seed(0)
    f = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 4, 2, -100, 1, 3, 3])
    cw = torch.rand(5, generator=g, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(
        lambda f, w, b: cbfused.linear_class_balanced_loss(
            f, w, b, y, weights=cw, loss_type=loss_type, gamma=0.5, reduction=reduction, chunk_rows=3
        ),
        (f, w, b),
    )


def test_module_and_chunking():
    counts = make_counts(50)
    m = cbfused.ClassBalancedLinearLoss(12, counts, beta=0.99, loss_type="focal", gamma=2.0)
    assert torch.allclose(torch.sigmoid(m.bias), torch.full((50,), 1 / 50))
    f = torch.randn(100, 12, requires_grad=True)
    y = torch.randint(0, 50, (100,))
    loss = m(f, y)
    ref = cbfused.class_balanced_loss(m.logits(f), y, weights=m.class_weight, loss_type="focal", gamma=2.0)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert m.weight.grad is not None and f.grad is not None
    assert cbfused.auto_chunk_rows(4096, 2048, 8142) == 512  # the row minimum
    assert cbfused.auto_chunk_rows(4096, 2048, 8142, torch.bfloat16) == 520  # 8 MiB of logits
    # the chunk of logits at most a fifth of the returned gradients (32000 x 1024 float32: 125 MiB)
    assert cbfused.auto_chunk_rows(8192, 1024, 32000) == 256
    assert cbfused.auto_chunk_rows(8192, 1024, 32000, torch.bfloat16) == 512  # + the float32 accumulator
    assert cbfused.auto_chunk_rows(64, 16, 100000) == 64  # the memory rule's row minimum
    assert cbfused.auto_chunk_rows(65536, 512, 100) == 20976  # 8 MiB of float32 logits
    assert cbfused.auto_chunk_rows(65536, 512, 100, torch.float64) == 10488
    assert cbfused.auto_chunk_rows(10, 64, 8142) == 10
    assert cbfused.auto_chunk_rows(0, 64, 10) == 1


def test_errors():
    f, w = torch.randn(4, 3), torch.randn(5, 3)
    y = torch.zeros(4).long()
    with pytest.raises(ValueError, match=r"features must be \[N, H\] and weight \[C, H\] with the same H"):
        cbfused.linear_class_balanced_loss(f, torch.randn(5, 2), None, y, weights=torch.ones(5))
    with pytest.raises(ValueError, match=r"bias must have shape \[5\], got \[4\]"):
        cbfused.linear_class_balanced_loss(f, w, torch.ones(4), y, weights=torch.ones(5))
    with pytest.raises(ValueError, match=r"class weights must have shape \[5\], got \[4\]"):
        cbfused.linear_class_balanced_loss(f, w, None, y, weights=torch.ones(4))
    with pytest.raises(RuntimeError, match=r"target 7 is out of range for 5 classes"):
        cbfused.linear_class_balanced_loss(f, w, None, torch.tensor([0, 7, 1, 1]), weights=torch.ones(5))


def _allocations(fn) -> list[int]:
    """The sizes of the CPU allocator's allocations during fn(), in order (the profiler's
    memory records, as the benchmark reads them)."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    from bench import cpu_memory_events

    return [e["args"]["Bytes"] for e in cpu_memory_events(fn) if e["args"]["Bytes"] > 0]


@pytest.mark.parametrize("reduction", ["mean", "weighted_mean", "none"])
@pytest.mark.parametrize("kind", ["hard", "float"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_chunks_share_one_buffer(loss_type, kind, reduction):
    """On the CPU the chunks of a pass reuse one [rows, C] buffer, and each chunk's gradient
    is written over its logits: one chunk-sized allocation per pass over the batch (the
    forward, and for 'none' the backward), however many chunks. A chunk-sized allocation per
    chunk would leave the C library's heap holding freed chunks (docs/performance.md)."""
    n, h, c, rows = 64, 8, 300, 16
    g = torch.Generator().manual_seed(5)
    f = torch.randn(n, h, generator=g, requires_grad=True)
    w = torch.randn(c, h, generator=g, requires_grad=True)
    b = torch.randn(c, generator=g, requires_grad=True)
    _, y = make_inputs(n, c, torch.float32, kind=kind, loss_type=loss_type, seed=5)
    cw = torch.rand(c, generator=g) + 0.5
    kw = dict(weights=cw, loss_type=loss_type, gamma=2.0, reduction=reduction, chunk_rows=rows)
    if reduction == "weighted_mean" and kind == "float" and loss_type not in SOFTMAX_FAMILY:
        kw["reduction"] = "mean"

    def step():
        cbfused.linear_class_balanced_loss(f, w, b, y, **kw).sum().backward()

    sizes = _allocations(step)
    chunk = rows * c * 4
    assert sizes.count(chunk) == (2 if reduction == "none" else 1), sizes
    # Against the unfused loss in float64: with reduction "none" the gradients are sums over
    # the rows (entries up to ~3e3 here), and an entry where they nearly cancel carries the
    # float32 rounding of its terms (~1e-4), in the unfused float32 matmuls as in ours; a
    # float32-to-float32 comparison at atol 1e-5 then passed or failed with the BLAS's order
    # of summation. Tolerance: float32 rounding of terms of the gradient's largest size.
    opts = {k: v for k, v in kw.items() if k not in ("chunk_rows", "weights")}
    f64, w64, b64 = (t.detach().double().requires_grad_() for t in (f, w, b))
    y64 = y.double() if y.is_floating_point() else y
    want = torch.autograd.grad(_unfused(f64, w64, b64, y64, cw.double(), **opts).sum(), (f64, w64, b64))
    for got, e in zip((f.grad, w.grad, b.grad), want, strict=True):
        torch.testing.assert_close(got.double(), e, rtol=1e-5, atol=1e-6 * e.abs().max().item())


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_backward_hands_over_the_forward_gradients(scale):
    """The backward gives autograd the buffers the forward filled (scaled in place), no copy:
    .grad is the forward's buffer; with retain_graph it scales a copy, so a second backward
    sees the same gradients; without it, a second backward is a clear error."""
    g = torch.Generator().manual_seed(1)
    f = torch.randn(20, 6, generator=g, requires_grad=True)
    w = torch.randn(9, 6, generator=g, requires_grad=True)
    b = torch.randn(9, generator=g, requires_grad=True)
    y = torch.randint(0, 9, (20,), generator=g)
    cw = torch.rand(9, generator=g) + 0.5
    kw = dict(weights=cw, loss_type="focal", gamma=2.0, chunk_rows=8)
    want = torch.autograd.grad(_unfused(f, w, b, y, cw, loss_type="focal", gamma=2.0) * scale, (f, w, b))

    loss = cbfused.linear_class_balanced_loss(f, w, b, y, **kw)
    ptrs = [t.data_ptr() for t in loss.grad_fn.grads]
    (loss * scale).backward()
    assert [f.grad.data_ptr(), w.grad.data_ptr(), b.grad.data_ptr()] == ptrs
    for got, exp in zip((f.grad, w.grad, b.grad), want, strict=True):
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-6)

    f.grad = w.grad = b.grad = None
    loss = cbfused.linear_class_balanced_loss(f, w, b, y, **kw)
    ptrs = [t.data_ptr() for t in loss.grad_fn.grads]
    (loss * scale).backward(retain_graph=True)
    # the kept graph still owns its buffers: .grad must not alias them
    assert all(p not in ptrs for p in (f.grad.data_ptr(), w.grad.data_ptr(), b.grad.data_ptr()))
    (loss * scale).backward()
    for got, exp in zip((f.grad, w.grad, b.grad), want, strict=True):
        torch.testing.assert_close(got, 2 * exp, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="backward ran a second time on a graph that was not kept"):
        loss.backward()


def test_bfloat16_weight_gradient_by_class_blocks(monkeypatch):
    """bfloat16 chunks add their weight gradient into the float32 accumulator in blocks of
    classes (64 here: 3 blocks, the last partial): same result as the unfused path."""
    import cbfused.linear as L

    monkeypatch.setattr(L, "_PRODUCT_BLOCK_BYTES", 64 * 16 * 2)
    g = torch.Generator().manual_seed(2)
    f = torch.randn(40, 16, generator=g).to(torch.bfloat16)
    w = (torch.randn(150, 16, generator=g) * 0.3).to(torch.bfloat16)
    b = (torch.randn(150, generator=g) * 0.1).to(torch.bfloat16)
    y = torch.randint(0, 150, (40,), generator=g)
    cw = torch.rand(150, generator=g) + 0.5
    kw = dict(loss_type="focal", gamma=2.0)
    l1, g1 = _grads(
        lambda f, w, b: cbfused.linear_class_balanced_loss(f, w, b, y, weights=cw, chunk_rows=16, **kw),
        f,
        w,
        b,
    )
    l2, g2 = _grads(lambda f, w, b: _unfused(f, w, b, y, cw, **kw), f, w, b)
    assert_close_scaled(l1, l2, torch.bfloat16, 4.0)
    for a, e in zip(g1, g2, strict=True):
        assert_close_scaled(a, e, torch.bfloat16, 4.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(3, 5), (7, 150), (257, 131)])
def test_accumulate_adds_exactly(dtype, shape):
    """cbfused::accumulate_ (the CPU path's float32 accumulation of reduced-precision
    weight-gradient products) is acc + src.float() to the bit: whole 32-value blocks,
    partial tails, a transposed (non-contiguous) addend; and it passes torch's opcheck."""
    g = torch.Generator().manual_seed(shape[1])
    acc = torch.randn(shape, generator=g) * 1e3
    for src in (
        torch.randn(shape, generator=g).to(dtype),
        torch.randn(shape[::-1], generator=g).to(dtype).t(),
    ):
        want = acc + src.float()
        torch.ops.cbfused.accumulate_.default(acc, src)
        assert torch.equal(acc, want)
    torch.library.opcheck(torch.ops.cbfused.accumulate_.default, (acc, src))


def test_accumulate_errors():
    acc = torch.zeros(4, 6)
    with pytest.raises(RuntimeError, match="the accumulator must be float32, got Double"):
        torch.ops.cbfused.accumulate_(acc.double(), acc)
    with pytest.raises(RuntimeError, match="the addend must be float32, bfloat16 or float16, got Long"):
        torch.ops.cbfused.accumulate_(acc, acc.long())
    with pytest.raises(
        RuntimeError, match=r"the accumulator has shape \[4, 6\] but the addend has shape \[6, 4\]"
    ):
        torch.ops.cbfused.accumulate_(acc, torch.zeros(6, 4))
    with pytest.raises(RuntimeError, match="the accumulator must be contiguous"):
        torch.ops.cbfused.accumulate_(torch.zeros(6, 4).t(), acc.bfloat16())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compile_traces_the_chunks(dtype):
    """torch.compile(fullgraph=True): dynamo traces the forward's chunk loop (the cb_loss and
    accumulate_ fake kernels, accumulate_'s in-place write into a slice of the accumulator)
    and the backward's hand-over without a graph break, and the loss and gradients equal
    eager's: float32 within a few ulp (inductor may
    reorder the mean's sums), bfloat16 within its rounding (inductor may round the
    compiled matmuls differently)."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(3)
    f0 = torch.randn(40, 16, generator=g).to(dtype)
    w0 = (torch.randn(150, 16, generator=g) * 0.3).to(dtype)
    y = torch.randint(0, 150, (40,), generator=g)
    cw = torch.rand(150, generator=g) + 0.5

    def fn(f, w):
        return cbfused.linear_class_balanced_loss(
            f, w, None, y, weights=cw, chunk_rows=16, loss_type="focal", gamma=2.0
        )

    def run(fn):
        f, w = f0.clone().requires_grad_(), w0.clone().requires_grad_()
        loss = fn(f, w)
        loss.backward()
        return loss, f.grad, w.grad

    want = run(fn)
    got = run(torch.compile(fn, backend="inductor", fullgraph=True))
    for a, e in zip(got, want, strict=True):
        if dtype == torch.float32:
            torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-7)
        else:
            assert_close_scaled(a, e, dtype, 2.0)
    # the ops dynamo put in the graph (the autograd.Function's forward and backward are
    # subgraphs): the chunks' kernel (on the CPU cb_loss_, the gradient over the logits), and
    # for bfloat16 accumulate_
    ex = torch._dynamo.explain(fn)(f0.clone().requires_grad_(), w0.clone().requires_grad_())
    assert ex.graph_break_count == 0
    ops = {
        n.target
        for gm in ex.graphs
        for m in gm.modules()
        if isinstance(m, torch.fx.GraphModule)
        for n in m.graph.nodes
        if n.op == "call_function"
    }
    assert torch.ops.cbfused.cb_loss_.default in ops
    assert (torch.ops.cbfused.accumulate_.default in ops) == (dtype == torch.bfloat16)
