"""Runs every CUDA kernel path of cbfused once (forward and backward; each loss, dtype and
kernel shape class: flat tiles, warp rows, block rows, misaligned views, float targets,
ignored rows) so that `compute-sanitizer --tool memcheck|racecheck|synccheck` can watch
them. Exits non-zero if any result disagrees with the CPU kernels.

    compute-sanitizer --tool memcheck python benchmarks/gpu_sanitize.py
"""

from __future__ import annotations

import sys

import torch

import cbfused

LOSSES = ["softmax", "sigmoid", "focal", "softmax_focal"]
# flat tiles (C <= 256), warp rows (C <= 1024), block rows (C > 1024), block rows whose row
# does not fit shared memory (float32 C > ~20k), one class
SHAPES = [(37, 10), (5, 80), (9, 1000), (3, 8142), (2, 25000), (4, 1)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def check(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, **kw) -> None:
    xc = x.cuda().requires_grad_()
    xh = x.detach().clone().requires_grad_()
    kc = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}  # margins, prior
    lc = cbfused.class_balanced_loss(xc, y.cuda(), weights=w.cuda(), **kc)
    lh = cbfused.class_balanced_loss(xh, y, weights=w, **kw)
    lc.sum().backward()
    lh.sum().backward()
    tol = 1e-5 if x.dtype in (torch.float32, torch.float64) else 2e-2
    torch.testing.assert_close(lc.detach().cpu(), lh.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(xc.grad.cpu(), xh.grad, rtol=tol, atol=tol)


def main() -> int:
    g = torch.Generator().manual_seed(0)
    n_checks = 0
    for loss_type in LOSSES:
        for n, c in SHAPES:
            for dtype in DTYPES:
                w = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
                x = (torch.randn(n, c + 3, generator=g) * 3).to(dtype)[:, 1 : c + 1]  # misaligned view
                y = torch.randint(0, c, (n,), generator=g)
                y[0] = -100
                for reduction in ("mean", "none"):
                    check(x, y, w, loss_type=loss_type, gamma=2.0, reduction=reduction)
                    n_checks += 1
                if loss_type in ("sigmoid", "focal"):
                    t = (torch.rand(n, c, generator=g) < 0.3).to(dtype)
                    check(x.contiguous(), t, w, loss_type=loss_type, gamma=1.5, alpha=0.25)
                    n_checks += 1
    # dense [N, C, H, W]: the planes kernel (NCHW, a crop), the row kernels on channels-last
    for loss_type in LOSSES:
        for dtype in DTYPES:
            x = (torch.randn(2, 19, 13, 21, generator=g) * 3).to(dtype)
            y = torch.randint(0, 19, (2, 13, 21), generator=g)
            y[0, 0] = 255
            w = torch.rand(19, generator=g, dtype=torch.float64) + 0.5
            for view in (x, x.contiguous(memory_format=torch.channels_last), x[:, :, 1:12]):
                yv = y[:, 1:12] if view.shape[2] == 11 else y
                check(view, yv.contiguous(), w, loss_type=loss_type, gamma=2.0, ignore_index=255)
                n_checks += 1
        x = torch.randn(2, 19, 9, 7, generator=g)
        t = (torch.rand(2, 19, 9, 7, generator=g) < 0.3).float()
        if loss_type in ("softmax", "softmax_focal"):
            t = torch.softmax(torch.randn(2, 19, 9, 7, generator=g), 1)
        check(x, t, torch.rand(19, generator=g, dtype=torch.float64) + 0.5, loss_type=loss_type, gamma=1.5)
        n_checks += 1
    # label smoothing / class weighting (kSmooth) and adjusted logits (kAdj): warp rows, block
    # rows, rows past the shared-memory cache, the planes kernel and channels-last rows
    for n, c in [(37, 10), (9, 1000), (3, 8142), (2, 25000)]:
        for dtype in (torch.float32, torch.bfloat16):
            counts = torch.randint(1, 1000, (c,), generator=g)
            w = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
            x = (torch.randn(n, c, generator=g) * 3).to(dtype)
            y = torch.randint(0, c, (n,), generator=g)
            y[0] = -100
            t = torch.softmax(torch.randn(n, c, generator=g), 1).to(dtype)
            m = cbfused.ldam_margins(counts)
            adj = dict(logit_adjustment=1.0, prior=counts / counts.sum(), logit_scale=2.0)
            for target, extra in ((y, {"margins": m}), (t, {})):
                for loss_type, smooth in (
                    ("softmax", {"label_smoothing": 0.1, "weighting": "class"}),
                    ("softmax_focal", {}),
                    ("softmax_focal", {"label_smoothing": 0.1}),
                    ("softmax_focal", {"label_smoothing": 0.1, "weighting": "class"}),
                ):
                    check(x, target, w, loss_type=loss_type, gamma=2.0, **smooth)
                    check(x, target, w, loss_type=loss_type, gamma=2.0, **smooth, **adj, **extra)
                    n_checks += 2
            # the sigmoid family with smoothing (the row kernel: never the flat one)
            tb = (torch.rand(n, c, generator=g) < 0.2).to(dtype)
            for target in (y, tb):
                for loss_type in ("sigmoid", "focal"):
                    check(x, target, w, loss_type=loss_type, gamma=2.0, alpha=0.25, label_smoothing=0.1)
                    n_checks += 1
    x = torch.randn(2, 19, 13, 21, generator=g)
    y = torch.randint(0, 19, (2, 13, 21), generator=g)
    counts = torch.randint(1, 1000, (19,), generator=g)
    for view in (x, x.contiguous(memory_format=torch.channels_last)):
        check(
            view,
            y,
            torch.ones(19, dtype=torch.float64),
            loss_type="softmax",
            label_smoothing=0.2,
            logit_adjustment=1.0,
            prior=counts / counts.sum(),
            margins=cbfused.ldam_margins(counts),
        )
        for loss_type in ("softmax_focal", "focal"):  # smoothed planes
            check(view, y, torch.ones(19, dtype=torch.float64), loss_type=loss_type, label_smoothing=0.2)
        n_checks += 3
    # torchvision-semantics focal
    for dtype in DTYPES:
        x = torch.randn(7, 33, generator=g).to(dtype)
        t = (torch.rand(7, 33, generator=g) < 0.2).to(dtype)
        a = cbfused.sigmoid_focal_loss(x.cuda(), t.cuda(), reduction="sum").cpu()
        b = cbfused.sigmoid_focal_loss(x, t, reduction="sum")
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
        n_checks += 1
        # weight along the class dimension of channels-first masks
        x4 = torch.randn(2, 5, 6, 7, generator=g).to(dtype)
        t4 = (torch.rand(2, 5, 6, 7, generator=g) < 0.2).to(dtype)
        w5 = torch.rand(5, generator=g) + 0.5
        a = cbfused.sigmoid_focal_loss(x4.cuda(), t4.cuda(), reduction="sum", weight=w5.cuda(), dim=1).cpu()
        b = cbfused.sigmoid_focal_loss(x4, t4, reduction="sum", weight=w5, dim=1)
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
        n_checks += 1
    torch.cuda.synchronize()
    print(f"gpu_sanitize: {n_checks} CUDA-vs-CPU checks passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
