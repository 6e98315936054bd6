"""Shared test matrix and helpers for every test module (device x dtype lists, tolerances, input makers)."""

from __future__ import annotations

import torch

import cbfused

# The loss kinds and reductions come from the one table (csrc/cbfused/kinds.h): a new kind
# joins every test that runs this matrix.
LOSS_TYPES = list(cbfused._ops.LOSS_TYPES)
REDUCTIONS = list(cbfused._ops.REDUCTIONS)
SOFTMAX_FAMILY = list(cbfused._ops.SOFTMAX_FAMILY)
BINARY_FAMILY = list(cbfused._ops.BINARY_FAMILY)
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

HAS_CUDA = torch.cuda.is_available()
CUDA_BUILT = cbfused.BUILD_INFO["cuda"] == "1"
if HAS_CUDA and CUDA_BUILT:
    CUDA_SKIP_REASON = ""
elif HAS_CUDA:
    CUDA_SKIP_REASON = "cbfused was built without CUDA kernels (FORCE_ONLY_CPU=1 or no nvcc at build time)"
elif CUDA_BUILT:
    CUDA_SKIP_REASON = (
        "no CUDA GPU on this machine: the CUDA kernels are compiled here, not executed "
        "(benchmarks/gpu_session.sh runs these tests on a GPU; README says where they last ran)"
    )
else:
    CUDA_SKIP_REASON = "no CUDA GPU on this machine, and cbfused was built without CUDA kernels"
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA and CUDA_BUILT else [])

# Relative tolerance of one result element against the float64 reference, scaled by the
# largest reference element (atol = RTOL * max|ref|): the kernels accumulate in float32 for
# float16 / bfloat16 / float32 and round once to the output dtype.
RTOL = {torch.float64: 1e-10, torch.float32: 3e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def assert_close_scaled(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, factor: float = 1.0
):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert torch.isfinite(a).all(), "non-finite values in result"
    rtol = RTOL[dtype] * factor
    scale = e.abs().max().item() if e.numel() else 0.0
    torch.testing.assert_close(a, e, rtol=rtol, atol=rtol * scale + 1e-300)


def assert_loss_close(actual: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """A loss as the float64 reference rounded to dtype (assert_close_scaled); where the rounded
    reference is inf (a float16 sum past 65504), the result must be the same inf."""
    ref = ref.to(dtype)
    if torch.isfinite(ref).all():
        assert_close_scaled(actual, ref, dtype)
    else:
        assert torch.equal(actual, ref)


def value_and_grad(fn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fn(x) and d sum(fn(x)) / dx, on a fresh leaf copy of x."""
    xi = x.detach().clone().requires_grad_()
    out = fn(xi)
    (g,) = torch.autograd.grad(out.sum(), xi)
    return out.detach(), g


def assert_compiles_like_eager(fn, x: torch.Tensor) -> None:
    """fn under torch.compile(fullgraph=True) gives eager's loss and gradient w.r.t. x."""
    eager = value_and_grad(fn, x)
    compiled = value_and_grad(torch.compile(fn, fullgraph=True), x)
    torch.testing.assert_close(compiled[0], eager[0])
    torch.testing.assert_close(compiled[1], eager[1])


def assert_bitwise_across_threads(loss_fn, x: torch.Tensor, thread_counts=(1, 2, 4)) -> None:
    """loss_fn(x) and its gradient are bit for bit the same under each of thread_counts."""
    before = torch.get_num_threads()
    results = []
    try:
        for threads in thread_counts:
            torch.set_num_threads(threads)
            xi = x.clone().requires_grad_()
            loss = loss_fn(xi)
            loss.backward()
            results.append((loss.detach(), xi.grad))
    finally:
        torch.set_num_threads(before)
    for loss, grad in results[1:]:
        assert torch.equal(loss, results[0][0])
        assert torch.equal(grad, results[0][1])


def make_counts(c: int, seed: int = 0, n_max: int = 5000, imbalance: float = 100.0) -> torch.Tensor:
    """Long-tailed counts n_i = n_max * IF^(-i / (C - 1)), shuffled."""
    g = torch.Generator().manual_seed(seed)
    i = torch.arange(c, dtype=torch.float64)
    n = (n_max * imbalance ** (-i / max(c - 1, 1))).floor().clamp(min=1)
    return n[torch.randperm(c, generator=g)].long()


def make_inputs(
    n, c, dtype, device="cpu", kind="hard", loss_type="softmax", seed=0, scale=3.0, ignore_frac=0.1
):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, generator=g, dtype=torch.float64) * scale).to(dtype)
    if kind == "hard":
        y = torch.randint(0, c, (n,), generator=g)
        if n and ignore_frac:
            y[torch.rand(n, generator=g) < ignore_frac] = -100
    else:
        t = torch.rand(n, c, generator=g, dtype=torch.float64)
        if loss_type in SOFTMAX_FAMILY:
            t = t / t.sum(1, keepdim=True)  # class probabilities
        else:
            t = (t > 0.7).to(torch.float64)  # multi-hot
        y = t.to(dtype)
    return x.to(device), y.to(device)


def make_dense_inputs(shape, dtype, kind="hard", loss_type="softmax", seed=0, mixup=False):
    """Logits of `shape` ([N, C, d...], classes along dimension 1) and their target: class
    indices (every fifth ignored, -100) or float targets (class probabilities for the softmax
    family; multi-hot for the binary family, with `mixup` some soft entries too). Returns the
    generator as well, to draw more from the same seed."""
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = (torch.randn(*shape, generator=g, dtype=torch.float64) * 3).to(dtype)
    if kind == "hard":
        y = torch.randint(0, c, (shape[0], *shape[2:]), generator=g)
        y.view(-1)[::5] = -100
        return x, y, g
    t = torch.rand(*shape, generator=g, dtype=torch.float64)
    if loss_type in SOFTMAX_FAMILY:
        t = t / t.sum(1, keepdim=True)
    elif mixup:
        t = torch.where(t > 0.7, torch.ones_like(t), t * (t < 0.3))
    else:
        t = (t > 0.7).double()
    return x, t.to(dtype), g
