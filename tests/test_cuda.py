"""CUDA-only checks beyond the shared device matrix (every other test module also runs on
'cuda' where a GPU and the CUDA build are present). Skipped, with the reason, elsewhere."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from testing import CUDA_BUILT, CUDA_SKIP_REASON, HAS_CUDA, LOSS_TYPES, make_counts, make_inputs

import cbfused

pytestmark = pytest.mark.skipif(not (HAS_CUDA and CUDA_BUILT), reason=CUDA_SKIP_REASON)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cuda_matches_cpu(loss_type, dtype):
    for n, c in [(1000, 10), (64, 8142), (4096, 80), (3, 1)]:
        x, y = make_inputs(n, c, dtype, "cpu", "hard", seed=c)
        w = cbfused.class_balanced_weights(make_counts(c), 0.999)
        xc = x.cuda().requires_grad_()
        xh = x.clone().requires_grad_()
        lc = cbfused.class_balanced_loss(xc, y.cuda(), weights=w.cuda(), loss_type=loss_type)
        lh = cbfused.class_balanced_loss(xh, y, weights=w, loss_type=loss_type)
        lc.backward()
        lh.backward()
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(lc.cpu(), lh, rtol=tol, atol=tol)
        torch.testing.assert_close(xc.grad.cpu(), xh.grad, rtol=tol, atol=tol)


def test_cuda_non_default_stream():
    x, y = make_inputs(512, 100, torch.float32, "cuda", "hard", seed=1)
    w = torch.ones(100, device="cuda")
    ref = cbfused.class_balanced_loss(x, y, weights=w, loss_type="softmax")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        out = cbfused.class_balanced_loss(x, y, weights=w, loss_type="softmax")
    torch.cuda.current_stream().wait_stream(s)
    assert torch.equal(out, ref)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_cuda_second_device():
    x, y = make_inputs(64, 10, torch.float32, "cuda:1", "hard", seed=1)
    w = torch.ones(10, device="cuda:1")
    out = cbfused.class_balanced_loss(x, y, weights=w, loss_type="focal")
    assert out.device == torch.device("cuda:1")


def _x(n=4, c=10, dtype=torch.float32):
    return torch.randn(n, c, dtype=dtype, device="cuda")


CUDA_BAD_INPUTS = {
    # checks in the CUDA op's host code (C++): each must raise, not take the process down
    "grad_mode": (
        lambda: torch.ops.cbfused.cb_loss(
            _x(),
            torch.zeros(4, dtype=torch.long, device="cuda"),
            torch.ones(10, device="cuda"),
            0,
            1.0,
            -1.0,
            2,
            -100,
            3,
        ),
        r"grad_mode must be 0, 1 or 2, got 3",
    ),
    "target shape": (
        lambda: cbfused.class_balanced_loss(
            _x(), torch.zeros(3, dtype=torch.long, device="cuda"), weights=torch.ones(10, device="cuda")
        ),
        r"class-index target must have shape \[4\] for logits of shape \[4, 10\], got \[3\]",
    ),
    "float target dtype": (
        lambda: cbfused.class_balanced_loss(
            _x(), torch.rand(4, 10, dtype=torch.float64, device="cuda"), weights=torch.ones(10, device="cuda")
        ),
        r"float target dtype Double does not match the logits' dtype Float",
    ),
    "focal targets shape": (
        lambda: cbfused.sigmoid_focal_loss(_x(), torch.rand(4, 9, device="cuda")),
        r"targets must have the inputs' shape \[4, 10\], got \[4, 9\]",
    ),
}


@pytest.mark.parametrize("case", list(CUDA_BAD_INPUTS))
def test_cuda_bad_input_raises(case):
    fn, match = CUDA_BAD_INPUTS[case]
    with pytest.raises(RuntimeError, match=match):
        fn()
    # the process and the device are fine afterwards
    x, y = make_inputs(8, 10, torch.float32, "cuda", "hard", seed=0)
    assert torch.isfinite(cbfused.class_balanced_loss(x, y, weights=torch.ones(10, device="cuda")))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("kind", ["hard", "float"])
def test_cuda_graph_capture_forward_and_backward(loss_type, kind):
    """Forward and backward record into a CUDA graph: a host synchronisation anywhere
    (an .item(), a device-to-host copy) would make the capture raise. A replay on new
    logits gives what eager gives on them."""
    c = 100
    x, y = make_inputs(256, c, torch.float32, "cuda", kind, loss_type, seed=3)
    w = cbfused.class_balanced_weights(make_counts(c), 0.999, device="cuda")
    xr = x.clone().requires_grad_()

    def step():
        loss = cbfused.class_balanced_loss(xr, y, weights=w, loss_type=loss_type, gamma=2.0)
        (gx,) = torch.autograd.grad(loss, xr)
        return loss, gx

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm-up outside the capture (allocator, lazy init)
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss_g, gx_g = step()
    with torch.no_grad():
        xr.copy_(torch.randn_like(x) * 3)
    graph.replay()
    torch.cuda.synchronize()
    loss_e, gx_e = step()
    assert torch.equal(loss_g, loss_e)
    assert torch.equal(gx_g, gx_e)


@pytest.mark.parametrize(
    "target",
    [
        "torch.zeros(64, dtype=torch.long, device='cuda').index_fill_(0, torch.tensor([37], device='cuda'), 10)",
        "torch.rand(64, 10, device='cuda').index_fill_(0, torch.tensor([5], device='cuda'), 1.5)",
    ],
    ids=["class index out of range", "float target above 1"],
)
def test_cuda_bad_target_is_a_device_side_assert(target):
    """A target out of range is caught on the device, without a host sync in the op: a
    device-side assert, as in F.cross_entropy. It leaves the CUDA context unusable, so it
    runs in a subprocess; the process must fail with the assert, not return a loss."""
    code = (
        "import torch, cbfused\n"
        "x = torch.randn(64, 10, device='cuda')\n"
        f"loss = cbfused.class_balanced_loss(x, {target}, weights=torch.ones(10, device='cuda'), loss_type='focal')\n"
        "torch.cuda.synchronize()\n"
        "print('no assert: loss', loss.item())\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=dict(os.environ)
    )
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "device-side assert" in out, out
