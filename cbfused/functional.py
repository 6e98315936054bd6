"""Functional API, mirroring ``torch.nn.functional``."""

from __future__ import annotations

import weakref

import torch

from . import _ops
from .longtail import log_prior
from .weights import CountsLike, class_balanced_weights

__all__ = ["class_balanced_loss", "sigmoid_focal_loss"]


# Class weights the functional API computed, by their arguments: a training loop passes the
# same counts every step, and class_balanced_weights costs more than a small batch's whole
# loss (77 us for 10 classes). A tensor of counts is known by identity and version (an in-place
# change of the counts makes a new entry); a list or tuple by its values.
_WEIGHTS_CACHE: dict[tuple, tuple[object, torch.Tensor]] = {}
_WEIGHTS_CACHE_SIZE = 32


def _cached(key: tuple | None, owner: torch.Tensor | None, make) -> torch.Tensor:
    if key is None or torch.compiler.is_compiling():
        return make()
    hit = _WEIGHTS_CACHE.get(key)
    if hit is not None and (owner is None or hit[0]() is owner):
        return hit[1]
    w = make()
    if len(_WEIGHTS_CACHE) >= _WEIGHTS_CACHE_SIZE:
        _WEIGHTS_CACHE.pop(next(iter(_WEIGHTS_CACHE)))
    _WEIGHTS_CACHE[key] = (weakref.ref(owner) if owner is not None else None, w)
    return w


def _key(kind: str, values, *rest) -> tuple[tuple | None, torch.Tensor | None]:
    if isinstance(values, torch.Tensor):
        return (kind, "tensor", id(values), values._version, *rest), values
    try:
        key = (kind, "seq", tuple(values), *rest)
        hash(key)
    except TypeError:  # not a flat sequence of numbers: no caching, the maker reports it
        return None, None
    return key, None


def resolve_weights(
    logits: torch.Tensor,
    samples_per_class: CountsLike | None,
    weights: torch.Tensor | CountsLike | None,
    beta: float,
    zero_count: str,
) -> torch.Tensor:
    """The per-class weights a functional call uses, on the logits' device."""
    if weights is not None and samples_per_class is not None:
        raise ValueError("give either samples_per_class (and beta) or weights, not both")
    device = logits.device
    if weights is None:
        if samples_per_class is None:
            raise ValueError(
                "class_balanced_loss needs samples_per_class (counted over the whole training set) "
                "or ready per-class weights"
            )
        key, owner = _key("counts", samples_per_class, beta, zero_count, str(device))
        return _cached(
            key,
            owner,
            lambda: class_balanced_weights(samples_per_class, beta, zero_count=zero_count, device=device),
        )
    if not isinstance(weights, torch.Tensor):
        key, owner = _key("weights", weights, str(device))
        return _cached(key, owner, lambda: torch.as_tensor(weights, dtype=torch.float64, device=device))
    return weights


def resolve_offset(
    logits: torch.Tensor,
    samples_per_class: CountsLike | None,
    prior: torch.Tensor | None,
    tau: float,
) -> torch.Tensor | None:
    """The logit adjustment's offset tau log(pi) [C] (float64, on the logits' device), from
    ``prior`` when given, else from ``samples_per_class``; None when tau = 0."""
    if tau == 0.0:
        if prior is not None:
            raise ValueError("prior is given but logit_adjustment is 0: set logit_adjustment=tau to use it")
        return None
    if prior is None and samples_per_class is None:
        raise ValueError(
            f"logit_adjustment={tau} needs the class prior: give samples_per_class (the training set's "
            "class counts) or prior"
        )
    device = logits.device
    source = prior if prior is not None else samples_per_class
    key, owner = _key("log_prior", source, prior is not None, tau, str(device))

    def make():
        if prior is not None:
            return tau * log_prior(prior=prior, device=device)
        return tau * log_prior(samples_per_class, device=device)

    return _cached(key, owner, make)


def resolve_class_alpha(logits: torch.Tensor, alpha: torch.Tensor, loss_type: str) -> torch.Tensor:
    """A per-class alpha, validated once per tensor (and version), float64 on the logits' device."""
    key, owner = _key("class_alpha", alpha, loss_type, str(logits.device))
    return _cached(key, owner, lambda: _ops.check_class_alpha(alpha, loss_type, logits.device))


def class_balanced_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    samples_per_class: CountsLike | None = None,
    weights: torch.Tensor | CountsLike | None = None,
    beta: float = 0.9999,
    loss_type: str = "focal",
    gamma: float = 1.0,
    alpha: float | torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    zero_count: str = "error",
    label_smoothing: float = 0.0,
    weighting: str = "sample",
    logit_adjustment: float = 0.0,
    prior: torch.Tensor | None = None,
    margins: torch.Tensor | None = None,
    logit_scale: float = 1.0,
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
        logits: [N, C], [N, C, d1, ..., dk] (dense prediction, classes along dimension 1, as
            ``F.cross_entropy``; every position is a sample, read in place in contiguous and
            channels-last memory) or unbatched [C]; float16 / bfloat16 / float32 / float64.
        target: int64 / int32 class indices of the logits' shape without dimension 1 ([N],
            [N, d1, ..., dk] or []; ``ignore_index`` allowed), or float multi-hot / soft
            labels in [0, 1] of the logits' shape and dtype.
        samples_per_class: counts per class over the whole training set (with ``beta``), or
        weights: ready per-class weights [C] on the logits' device.
        beta: in [0, 1). gamma: >= 0 (focal losses). alpha: torchvision-style alpha for the
            sigmoid-based losses (None: off), or a per-class [C] tensor of alphas in [0, 1]
            (sigmoid-based: alpha_c for t = 1, 1 - alpha_c for t = 0; ``"softmax_focal"``:
            the sample's loss times alpha[y]).
        reduction: ``"mean"`` (sum / number of non-ignored samples, or / sum of float targets:
            the authors' normalisation), ``"weighted_mean"`` (sum / sum of sample weights, as
            ``F.cross_entropy(weight=...)``), ``"sum"`` or ``"none"`` ([N, d1, ..., dk]).
        zero_count: policy for classes with no samples, see :func:`class_balanced_weights`.
        label_smoothing: in [0, 1]: the softmax losses' targets become
            ``(1 - eps) t + eps / C``, as ``F.cross_entropy(label_smoothing=eps)``; the sigmoid
            losses' ``(1 - eps) t + eps / 2``. Sample weights and the mean's denominator keep
            the unsmoothed targets'.
        weighting: how class weights apply to targets that are not one-hot (label smoothing,
            soft labels; the softmax losses): ``"sample"`` (the paper's: the sample weight
            :math:`s_i` times its whole loss) or ``"class"`` (PyTorch's: class term c times
            :math:`w_c`; then the loss equals ``F.cross_entropy(weight=w, label_smoothing=eps)``
            with ``reduction="weighted_mean"`` for class indices). docs/losses.md has the formulas.
        logit_adjustment, prior, margins, logit_scale (the softmax losses): the loss is taken on
            the adjusted logits ``z_c = s x_c + tau log(pi_c) - s margins[y] [c == y]``, with
            ``tau = logit_adjustment`` (1: Balanced Softmax; Menon et al.'s logit-adjusted
            loss), ``pi`` the class prior of ``samples_per_class`` (or ``prior``), LDAM's
            ``margins`` [C] on the target class (:func:`cbfused.ldam_margins`; class indices
            only) and ``s = logit_scale`` (LDAM uses 30 with normalised features).
    """
    alpha, class_alpha = _ops.split_alpha(alpha)
    opts = _ops.loss_options(
        loss_type,
        gamma,
        alpha,
        reduction,
        ignore_index,
        label_smoothing,
        weighting,
        logit_adjustment,
        logit_scale,
    )
    w = resolve_weights(logits, samples_per_class, weights, beta, zero_count)
    offset = resolve_offset(logits, samples_per_class, prior, opts.logit_adjustment)
    if class_alpha is not None:
        class_alpha = resolve_class_alpha(logits, class_alpha, loss_type)
    return _ops.cb_loss(logits, target, w, opts, offset, margins, class_alpha)


def sigmoid_focal_loss(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    alpha: float | torch.Tensor = 0.25,
    gamma: float = 2,
    reduction: str = "none",
    weight: torch.Tensor | None = None,
    dim: int = -1,
) -> torch.Tensor:
    r"""Fused drop-in for ``torchvision.ops.sigmoid_focal_loss`` (same semantics, any shape):
    elementwise :math:`\alpha_t (1-p_t)^\gamma \mathrm{bce}(x, t)`, ``"mean"`` over all
    elements. ``weight`` (optional, [C]) multiplies each element by its class's weight, the
    classes running along dimension ``dim`` (default -1, the last; 1 for channels-first
    [N, C, H, W] masks), e.g. class-balanced weights. ``alpha < 0`` disables alpha; a [C]
    tensor of alphas in [0, 1] along ``dim`` gives class c
    :math:`\alpha_t = \alpha_c t + (1 - \alpha_c)(1 - t)`.
    """
    alpha, class_alpha = _ops.split_alpha(alpha)
    if class_alpha is not None:
        class_alpha = resolve_class_alpha(inputs, class_alpha, "focal")
    return _ops.sigmoid_focal(inputs, targets, weight, alpha, gamma, reduction, dim, class_alpha)
