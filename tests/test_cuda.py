"""CUDA-only checks beyond the shared device matrix (every other test module also runs on
'cuda' where a GPU and the CUDA build are present). Skipped, with the reason, elsewhere."""

from __future__ import annotations

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
