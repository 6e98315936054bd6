"""The paper's recipe for the sigmoid-based losses: bias prior and no weight decay on it."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["init_sigmoid_bias_", "param_groups_no_bias_decay"]

_NO_DECAY_ATTR = "_cbfused_no_weight_decay"


def init_sigmoid_bias_(linear: nn.Linear, prior: float | None = None) -> nn.Linear:
    """Sets the classifier's bias to ``-log((1 - prior) / prior)`` (default prior ``1 / C``,
    the authors' ``-log(C - 1)``), so the initial sigmoid outputs equal the prior and the
    many negatives do not swamp the first steps. Marks the bias for
    :func:`param_groups_no_bias_decay`. Returns ``linear``.
    """
    if linear.bias is None:
        raise ValueError("init_sigmoid_bias_: the layer has no bias (create it with bias=True)")
    c = linear.bias.numel()
    p = 1.0 / c if prior is None else float(prior)
    if not 0.0 < p < 1.0:
        raise ValueError(
            f"prior must be in (0, 1), got {p}" + (" (1/C with C = 1 class)" if prior is None else "")
        )
    with torch.no_grad():
        linear.bias.fill_(-math.log((1.0 - p) / p))
    setattr(linear.bias, _NO_DECAY_ATTR, True)
    return linear


def param_groups_no_bias_decay(
    model: nn.Module, weight_decay: float, no_decay: Iterable[torch.Tensor] = ()
) -> list[dict]:
    """Optimizer parameter groups: weight decay on everything except the biases set by
    :func:`init_sigmoid_bias_` (and any tensors in ``no_decay``), which get none.

    ``torch.optim.SGD(param_groups_no_bias_decay(model, 2e-4), lr=0.1, momentum=0.9)``
    """
    extra = {id(p) for p in no_decay}
    decay, skip = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (skip if getattr(p, _NO_DECAY_ATTR, False) or id(p) in extra else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if skip:
        groups.append({"params": skip, "weight_decay": 0.0})
    return groups
