"""Functional API, mirroring ``torch.nn.functional``."""

from __future__ import annotations

import torch

from . import _ops
from .weights import CountsLike, class_balanced_weights

__all__ = ["class_balanced_loss", "sigmoid_focal_loss"]


def resolve_weights(
    logits: torch.Tensor,
    samples_per_class: CountsLike | None,
    weights: torch.Tensor | CountsLike | None,
    beta: float,
    zero_count: str,
) -> torch.Tensor:
    if weights is not None and samples_per_class is not None:
        raise ValueError("give either samples_per_class (and beta) or weights, not both")
    if weights is None:
        if samples_per_class is None:
            raise ValueError(
                "class_balanced_loss needs samples_per_class (counted over the whole training set) "
                "or ready per-class weights"
            )
        return class_balanced_weights(samples_per_class, beta, zero_count=zero_count, device=logits.device)
    if not isinstance(weights, torch.Tensor):
        return torch.as_tensor(weights, dtype=torch.float64, device=logits.device)
    return weights


def class_balanced_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    samples_per_class: CountsLike | None = None,
    weights: torch.Tensor | CountsLike | None = None,
    beta: float = 0.9999,
    loss_type: str = "focal",
    gamma: float = 1.0,
    alpha: float | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    zero_count: str = "error",
) -> torch.Tensor:
    r"""Class-balanced loss (Cui et al., CVPR 2019), fused: one pass computes the loss and,
    when autograd needs it, the gradient.

    Per sample i with class weight :math:`s_i = w_{y_i}` (hard targets) or
    :math:`s_i = \sum_c t_{ic} w_c` (float targets), :math:`w_c = (1-\beta)/(1-\beta^{n_c})`
    normalised to :math:`\sum_c w_c = C`:

    - ``"softmax"``: :math:`l_i = s_i (\log\sum_c e^{x_{ic}} - x_{iy_i})`
    - ``"sigmoid"``: :math:`l_i = s_i \sum_c \mathrm{bce}(x_{ic}, t_{ic})`
    - ``"focal"``: :math:`l_i = s_i \sum_c \alpha_t\, m_{ic}\, \mathrm{bce}(x_{ic}, t_{ic})`,
      :math:`m = e^{-\gamma t x - \gamma\,\mathrm{softplus}(-x)} = (1-p_t)^\gamma`
    - ``"softmax_focal"``: :math:`l_i = s_i (1-p_{iy})^\gamma (-\log p_{iy})`

    Args:
        logits: [N, C] float16 / bfloat16 / float32 / float64.
        target: int64 / int32 class indices [N] (``ignore_index`` allowed), or float [N, C]
            multi-hot / soft labels in [0, 1] of the logits' dtype.
        samples_per_class: counts per class over the whole training set (with ``beta``), or
        weights: ready per-class weights [C] on the logits' device.
        beta: in [0, 1). gamma: >= 0 (focal losses). alpha: torchvision-style alpha for the
            sigmoid-based losses (None: off).
        reduction: ``"mean"`` (sum / number of non-ignored samples, or / sum of float targets:
            the authors' normalisation), ``"weighted_mean"`` (sum / sum of sample weights, as
            ``F.cross_entropy(weight=...)``), ``"sum"`` or ``"none"`` ([N]).
        zero_count: policy for classes with no samples, see :func:`class_balanced_weights`.
    """
    w = resolve_weights(logits, samples_per_class, weights, beta, zero_count)
    return _ops.cb_loss(logits, target, w, loss_type, gamma, alpha, reduction, ignore_index)


def sigmoid_focal_loss(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    alpha: float = 0.25,
    gamma: float = 2,
    reduction: str = "none",
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Fused drop-in for ``torchvision.ops.sigmoid_focal_loss`` (same semantics, any shape):
    elementwise :math:`\alpha_t (1-p_t)^\gamma \mathrm{bce}(x, t)`, ``"mean"`` over all
    elements. ``weight`` (optional, [C]) multiplies each element by its class's weight (the
    last dimension), e.g. class-balanced weights. ``alpha < 0`` disables alpha.
    """
    return _ops.sigmoid_focal(inputs, targets, weight, alpha, gamma, reduction)
