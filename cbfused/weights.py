"""Effective number of samples and class-balanced weights (Cui et al., CVPR 2019).

    E(n) = (1 - beta^n) / (1 - beta)          w_c = 1 / E(n_c),  normalised to sum_c w_c = C

Everything is computed in float64 without cancellation: 1 - beta^n is
-expm1(n * log1p(-(1 - beta))), exact where ``1 - beta**n`` loses every digit
(beta = 0.9999, n = 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["effective_number", "class_balanced_weights", "class_counts", "all_reduce_class_counts"]

CountsLike = torch.Tensor | Sequence[float] | Sequence[int]


def check_beta(beta: float) -> float:
    b = float(beta)
    if not (math.isfinite(b) and 0.0 <= b < 1.0):
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    return b


def _counts(samples_per_class: CountsLike, device: torch.device | str | None = None) -> torch.Tensor:
    if isinstance(samples_per_class, torch.Tensor):
        n = samples_per_class.detach()
        if n.is_complex() or n.dtype == torch.bool:
            raise TypeError(f"samples_per_class must hold real counts, got dtype {n.dtype}")
        n = n.to(dtype=torch.float64, device=device if device is not None else n.device)
    else:
        try:
            n = torch.as_tensor(samples_per_class, dtype=torch.float64, device=device)
        except (TypeError, ValueError) as e:
            raise TypeError(f"samples_per_class must be a 1-D sequence or tensor of counts: {e}") from None
    if n.dim() != 1 or n.numel() == 0:
        raise ValueError(f"samples_per_class must be 1-D with one count per class, got shape {list(n.shape)}")
    bad = ~torch.isfinite(n)
    if bool(bad.any()):
        c = int(bad.nonzero()[0])
        raise ValueError(f"samples_per_class has non-finite count {n[c].item()} for class {c}")
    neg = n < 0
    if bool(neg.any()):
        c = int(neg.nonzero()[0])
        raise ValueError(f"samples_per_class has negative count {n[c].item():g} for class {c}")
    return n


def effective_number(samples_per_class: CountsLike, beta: float) -> torch.Tensor:
    """Effective number of samples ``E(n) = (1 - beta^n) / (1 - beta)`` per class, float64.

    ``beta = 0`` gives 1 for every non-empty class; ``beta -> 1`` tends to ``n``. ``E(0) = 0``.
    """
    b = check_beta(beta)
    n = _counts(samples_per_class)
    one_minus_beta = 1.0 - b
    # 1 - beta^n = -expm1(n * log(beta)). Near 1, log(beta) = log1p(-(1 - beta)) (exact: 1 - beta
    # is exact there); below 0.5 log(beta) itself is accurate (and 1 - beta may round to 1).
    if b == 0:
        log_beta = -math.inf
    elif b < 0.5:
        log_beta = math.log(b)
    else:
        log_beta = math.log1p(-one_minus_beta)
    e = -torch.expm1(n * log_beta) / one_minus_beta
    return torch.where(n > 0, e, torch.zeros_like(e))


def class_balanced_weights(
    samples_per_class: CountsLike,
    beta: float = 0.9999,
    normalize: bool = True,
    zero_count: str = "error",
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Class-balanced weights ``w_c = (1 - beta) / (1 - beta^(n_c))``.

    Args:
        samples_per_class: samples per class, counted over the whole training set (not per
            batch: per-batch counts give empty classes and noisy weights).
        beta: in [0, 1). 0 gives every weight 1; values near 1 approach inverse frequency.
        normalize: scale so that the weights sum to the number of (present) classes, as the
            authors' code does; keeps the loss on the scale of the unweighted loss.
        zero_count: what a class with no samples gets. ``"error"`` (default) raises, naming
            the classes: its weight 1 / E(0) is undefined. ``"zero"`` gives it weight 0 and
            normalises over the present classes.
        device, dtype: of the result (default: the counts' device, float64).
    """
    if zero_count not in ("error", "zero"):
        raise ValueError(f"zero_count must be 'error' or 'zero', got {zero_count!r}")
    n = _counts(samples_per_class)
    e = effective_number(n, beta)
    empty = n == 0
    if bool(empty.any()):
        if zero_count == "error" or bool(empty.all()):
            idx = empty.nonzero().flatten().tolist()
            shown = ", ".join(map(str, idx[:10])) + (f", ... ({len(idx)} in all)" if len(idx) > 10 else "")
            what = (
                "every class has zero samples"
                if bool(empty.all())
                else f"classes [{shown}] have zero samples"
            )
            raise ValueError(
                f"samples_per_class: {what}, so their class-balanced weight 1/E(0) is undefined. "
                "Pass samples_per_class counted over the whole training set (not per batch), "
                "or zero_count='zero' to give empty classes weight 0."
            )
    w = torch.where(empty, torch.zeros_like(e), 1.0 / torch.where(empty, torch.ones_like(e), e))
    if normalize:
        present = int((~empty).sum())
        w = w * (present / w.sum())
    return w.to(device=device if device is not None else w.device, dtype=dtype)


def class_counts(targets: torch.Tensor, num_classes: int, ignore_index: int | None = -100) -> torch.Tensor:
    """Samples per class from labels: int class indices of any shape ([N], or [N, H, W]
    masks: int64 counts, ``ignore_index`` skipped) or float [N, C, d...] multi-hot / soft
    labels (float64 sums over every dimension but the classes', 1)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if targets.is_floating_point():
        if targets.dim() < 2 or targets.shape[1] != num_classes:
            raise ValueError(
                f"float targets must have shape [N, {num_classes}, ...] (classes along dimension 1), "
                f"got {list(targets.shape)}"
            )
        return targets.detach().to(torch.float64).movedim(1, 0).reshape(num_classes, -1).sum(1)
    if targets.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(
            f"targets must be integer class indices or float [N, C] labels, got dtype {targets.dtype}"
        )
    y = targets.detach().reshape(-1).long()
    if ignore_index is not None:
        y = y[y != ignore_index]
    if y.numel():
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= num_classes:
            bad = lo if lo < 0 else hi
            raise ValueError(f"target {bad} is out of range for {num_classes} classes")
    return torch.bincount(y, minlength=num_classes)


def all_reduce_class_counts(counts: torch.Tensor, group=None) -> torch.Tensor:
    """Sums per-rank class counts over a ``torch.distributed`` process group (in place,
    returned). Count over each rank's shard of the training set, then call this on every
    rank so all ranks build the same weights."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("all_reduce_class_counts needs an initialised torch.distributed process group")
    dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
    return counts
