"""Where a forward + backward spends its GPU time, kernel by kernel (torch.profiler, CUDA
activity): the loss kernels at a few shapes, and the fused linear path against the
unfused one. For the notes; no GPU timing is asserted anywhere.

    python benchmarks/gpu_profile.py
"""

from __future__ import annotations

import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

import cbfused

STEPS = 5


def kernel_times(fn) -> dict[str, float]:
    """Mean GPU microseconds per step of fn, per kernel name (shortened)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(STEPS):
            fn()
        torch.cuda.synchronize()
    out: dict[str, float] = defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            name = e.name.split("(")[0].split("<")[0][-60:]
            out[name] += e.device_time / STEPS
    return dict(out)


def show(title: str, times: dict[str, float]) -> None:
    total = sum(times.values())
    parts = ", ".join(f"{k} {v:.1f}" for k, v in sorted(times.items(), key=lambda kv: -kv[1])[:6])
    print(f"{title:48s} total {total:8.1f} us: {parts}", flush=True)


def main() -> int:
    for n, c in [(65536, 80), (16384, 1000), (65536, 1000)]:
        for dtype in (torch.float32, torch.bfloat16):
            for loss in ("softmax", "sigmoid", "focal"):
                x = (torch.randn(n, c, device="cuda") * 2).to(dtype).requires_grad_()
                y = torch.randint(0, c, (n,), device="cuda")
                w = torch.rand(c, device="cuda") + 0.5

                def step(x=x, y=y, w=w, loss=loss):
                    out = cbfused.class_balanced_loss(x, y, weights=w, loss_type=loss, gamma=2.0)
                    torch.autograd.grad(out, x)

                show(f"{loss} {n}x{c} {str(dtype)[6:]}", kernel_times(step))
    n, h, c = 4096, 2048, 8142
    for dtype in (torch.float32, torch.bfloat16):
        f = torch.randn(n, h, device="cuda", dtype=dtype, requires_grad=True)
        wt = (torch.randn(c, h, device="cuda") * 0.02).to(dtype).requires_grad_()
        y = torch.randint(0, c, (n,), device="cuda")
        cw = torch.rand(c, device="cuda") + 0.5

        def fused(f=f, wt=wt, y=y, cw=cw):
            out = cbfused.linear_class_balanced_loss(f, wt, None, y, weights=cw, loss_type="softmax")
            torch.autograd.grad(out, (f, wt))

        def unfused(f=f, wt=wt, y=y, cw=cw):
            out = cbfused.class_balanced_loss(f @ wt.t(), y, weights=cw, loss_type="softmax")
            torch.autograd.grad(out, (f, wt))

        rows = cbfused.auto_chunk_rows(n, h, c, dtype)
        show(f"linear fused {n}x{h}x{c} {str(dtype)[6:]} ({rows} rows)", kernel_times(fused))
        show(f"linear unfused {n}x{h}x{c} {str(dtype)[6:]}", kernel_times(unfused))
    return 0


if __name__ == "__main__":
    sys.exit(main())
