"""No leaks: many forward+backward calls keep the process's memory flat."""

from __future__ import annotations

import gc
import os

import pytest
import torch

import cbfused


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
def test_ten_thousand_calls_keep_memory_flat():
    crit = cbfused.ClassBalancedLoss(torch.randint(1, 500, (37,)), beta=0.999, loss_type="focal", gamma=0.5)
    x = torch.randn(64, 37, requires_grad=True)
    y = torch.randint(0, 37, (64,))
    t = (torch.rand(64, 37) > 0.8).float()

    def step(i):
        loss = (
            crit(x, y)
            if i % 2
            else cbfused.class_balanced_loss(x, t, weights=crit.weight, loss_type="sigmoid")
        )
        loss.backward()
        x.grad = None

    for i in range(1000):  # warm-up: allocator pools, autograd caches
        step(i)
    gc.collect()
    before = rss_bytes()
    for i in range(10_000):
        step(i)
    gc.collect()
    grown = rss_bytes() - before
    # one leaked 64 x 37 float gradient per call would be ~95 MB
    assert grown < 8 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB over 10,000 calls"
