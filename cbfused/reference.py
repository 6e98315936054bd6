"""Pure-PyTorch implementations of every cbfused loss: the oracle for the tests and the
benchmark's eager baseline. Never on the fast path.

Computes in float64 (or the dtype given by ``compute_dtype``) with plain, stable torch ops
and returns the logits' dtype. Same arguments and semantics as :mod:`cbfused.functional`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._ops import BINARY_FAMILY, SOFTMAX_FAMILY
from .weights import class_balanced_weights

__all__ = ["class_balanced_weights", "class_balanced_loss", "sigmoid_focal_loss"]


def _softplus(z: torch.Tensor) -> torch.Tensor:
    """log(1 + e^z) to a few ulp for every z, and sigmoid(z) as its gradient (at z = 0 too).
    F.softplus returns z itself above its threshold (20), which is 2e-9 short there: far
    beyond float64's precision, and it made the focal modulator exactly 1 at logits past
    -20 (relative errors of 8e-10 in the loss)."""
    return torch.logaddexp(z, torch.zeros_like(z))


def _targets(x: torch.Tensor, target: torch.Tensor, w: torch.Tensor, ignore_index: int):
    """-> (t [N, C] float, s [N] sample weights, valid [N] or None)."""
    c = x.shape[1]
    if target.is_floating_point():
        t = target.to(x.dtype)
        return t, t @ w, None
    valid = target != ignore_index
    y = torch.where(valid, target, torch.zeros_like(target)).long()
    t = F.one_hot(y, c).to(x.dtype) * valid.unsqueeze(1).to(x.dtype)
    s = w[y] * valid.to(x.dtype)
    return t, s, valid


def _as_rows(logits: torch.Tensor, target: torch.Tensor):
    """[N, C, d...] or [C] logits (and their target) as [rows, C]; the shape of a 'none' loss."""
    if logits.dim() == 1:
        t = target.reshape(1, -1) if target.is_floating_point() else target.reshape(1)
        return logits.reshape(1, -1), t, ()
    c = logits.shape[1]
    out_shape = (logits.shape[0], *logits.shape[2:])
    x = logits.movedim(1, -1).reshape(-1, c)
    t = target.movedim(1, -1).reshape(-1, c) if target.is_floating_point() else target.reshape(-1)
    return x, t, out_shape


def class_balanced_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor,
    loss_type: str = "focal",
    gamma: float = 1.0,
    alpha: float | torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    compute_dtype: torch.dtype = torch.float64,
    label_smoothing: float = 0.0,
    weighting: str = "sample",
    logit_offset: torch.Tensor | None = None,
    margins: torch.Tensor | None = None,
    logit_scale: float = 1.0,
) -> torch.Tensor:
    """Reference class-balanced loss (see ``cbfused.class_balanced_loss``). Logits
    [N, C, d1, ..., dk] and [C] are computed as the rows of [N * d1 * ... * dk, C].

    Label smoothing and the class-weighting rule (softmax family): the row's target
    distribution is ``t' = (1 - eps) t + eps / C`` (zero for an ignored sample), and its loss
    ``sum_c e_c f(p_c)`` with ``e = s t'`` ('sample') or ``e = w * t'`` ('class'),
    ``f(p) = -log p`` (softmax) or ``-(1 - p)^gamma log p`` (softmax focal, ``e`` times a
    per-class alpha). Sigmoid family: every target becomes ``(1 - eps) t + eps / 2``; the
    sample weight and the mean's denominator keep the unsmoothed labels'.

    Adjusted logits (softmax family): the loss is taken on ``z = s x + b``, less ``s margins[y]``
    on the target class, with ``s = logit_scale`` and ``b = logit_offset``."""
    if logits.dim() != 2:
        x2, t2, out_shape = _as_rows(logits, target)
        out = class_balanced_loss(
            x2,
            t2,
            weights,
            loss_type,
            gamma,
            alpha,
            reduction,
            ignore_index,
            compute_dtype,
            label_smoothing,
            weighting,
            logit_offset,
            margins,
            logit_scale,
        )
        return out.reshape(out_shape) if reduction == "none" else out
    x = logits.to(compute_dtype)
    w = weights.to(device=x.device, dtype=compute_dtype)
    t, s, valid = _targets(x, target, w, ignore_index)
    if isinstance(alpha, torch.Tensor):  # a per-class alpha, along the classes
        alpha = alpha.to(device=x.device, dtype=x.dtype)
    if logit_offset is not None or margins is not None or logit_scale != 1.0:
        if loss_type not in SOFTMAX_FAMILY:
            raise ValueError(f"adjusted logits apply to the softmax losses only, not {loss_type!r}")
        x = logit_scale * x
        if logit_offset is not None:
            x = x + logit_offset.to(device=x.device, dtype=x.dtype)
        if margins is not None:  # on the target class (one-hot t; zero for an ignored sample)
            x = x - logit_scale * t * margins.to(device=x.device, dtype=x.dtype)
    smoothed = label_smoothing != 0 or weighting != "sample"
    if weighting != "sample" and loss_type not in SOFTMAX_FAMILY:
        raise ValueError(f"weighting='class' applies to the softmax losses only, not {loss_type!r}")
    if loss_type in SOFTMAX_FAMILY:
        logp = F.log_softmax(x, dim=1)
        if smoothed:
            live = torch.ones_like(s) if valid is None else valid.to(x.dtype)
            t_s = (1 - label_smoothing) * t + label_smoothing / x.shape[1] * live.unsqueeze(1)
            e = w * t_s if weighting == "class" else s.unsqueeze(1) * t_s
            if loss_type == "softmax":
                per = -(e * logp).sum(1)
            else:  # softmax focal: the focal term of every class, weighted by e (and alpha_c)
                ea = e * alpha if isinstance(alpha, torch.Tensor) else e
                per = (ea * (-torch.expm1(logp)).pow(gamma) * -logp).sum(1)
            scale = torch.ones_like(s)  # e carries the weights
        elif loss_type == "softmax":
            per = -(t * logp).sum(1)
            scale = s
        else:
            one_minus_p = -torch.expm1(logp)
            ta = t * alpha if isinstance(alpha, torch.Tensor) else t  # per-class alpha: alpha_y
            per = (ta * one_minus_p.pow(gamma) * -logp).sum(1)
            scale = s
    elif loss_type in BINARY_FAMILY:
        tb = (1 - label_smoothing) * t + label_smoothing / 2  # smoothing; s and D keep t
        bce = F.binary_cross_entropy_with_logits(x, tb, reduction="none")
        if loss_type == "focal":
            bce = torch.exp(-gamma * tb * x - gamma * _softplus(-x)) * bce
        if alpha is not None:
            bce = (alpha * tb + (1 - alpha) * (1 - tb)) * bce
        per = bce.sum(1)
        scale = s
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    loss = scale * per
    if reduction == "none":
        out = loss
    elif reduction == "sum":
        out = loss.sum()
    elif reduction in ("mean", "weighted_mean"):
        if reduction == "weighted_mean":
            d = s.sum()
        elif valid is not None:
            d = valid.sum().to(x.dtype)
        else:
            d = t.sum()
        out = torch.where(d != 0, loss.sum() / torch.where(d != 0, d, torch.ones_like(d)), loss.sum() * 0)
    else:
        raise ValueError(f"unknown reduction {reduction!r}")
    return out.to(logits.dtype)


def sigmoid_focal_loss(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    alpha: float | torch.Tensor = 0.25,
    gamma: float = 2,
    reduction: str = "none",
    weight: torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.float64,
    dim: int = -1,
) -> torch.Tensor:
    """Reference for :func:`cbfused.sigmoid_focal_loss` (torchvision's formula; a tensor
    alpha and the weight are per class along ``dim``)."""
    x = inputs.to(compute_dtype)
    t = targets.to(compute_dtype)
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce * ((1 - p_t) ** gamma)
    shape = [1] * loss.dim()
    if loss.dim():
        shape[dim] = -1
    if isinstance(alpha, torch.Tensor):
        alpha = alpha.to(compute_dtype).reshape(shape)
    if isinstance(alpha, torch.Tensor) or alpha >= 0:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    if weight is not None:
        loss = loss * weight.to(compute_dtype).reshape(shape)
    if reduction == "mean":
        loss = loss.mean() if loss.numel() else loss.sum()
    elif reduction == "sum":
        loss = loss.sum()
    return loss.to(inputs.dtype)
