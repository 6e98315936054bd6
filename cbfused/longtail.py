"""Per-class quantities of the long-tail methods that cbfused's losses are compared and
combined with: the class prior, post-hoc logit adjustment (Menon et al., ICLR 2021) and
LDAM's margins (Cao et al., NeurIPS 2019). All from the training set's class counts, in
float64."""

from __future__ import annotations

import torch

from .weights import CountsLike, _counts

__all__ = ["adjust_logits", "class_prior", "ldam_margins"]


def _nonzero_counts(samples_per_class: CountsLike, what: str, device=None) -> torch.Tensor:
    n = _counts(samples_per_class, device)
    empty = n == 0
    if bool(empty.any()):
        classes = empty.nonzero().flatten().tolist()
        raise ValueError(
            f"{what} needs every class to have samples; classes {classes[:10]}"
            + (" ..." if len(classes) > 10 else "")
            + " have none"
        )
    return n


def class_prior(samples_per_class: CountsLike, device: torch.device | str | None = None) -> torch.Tensor:
    """The class prior ``pi_c = n_c / sum_c n_c`` (float64, [C]); every class needs samples
    (log pi would be -inf)."""
    n = _nonzero_counts(samples_per_class, "class_prior", device)
    return n / n.sum()


def log_prior(
    samples_per_class: CountsLike | None = None,
    prior: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``log(pi)`` (float64, [C]) of the class prior from ``samples_per_class`` or of a ``prior``
    of finite, positive entries (exactly one of the two), with errors that name the value."""
    if (samples_per_class is None) == (prior is None):
        raise ValueError("give exactly one of samples_per_class or prior")
    if prior is None:
        return class_prior(samples_per_class, device=device).log()
    pi = torch.as_tensor(prior, dtype=torch.float64, device=device)
    if pi.dim() != 1:
        raise ValueError(f"prior must be 1-D [C], got shape {list(pi.shape)}")
    if not bool((pi > 0).all()) or not bool(torch.isfinite(pi).all()):
        bad = int((~((pi > 0) & torch.isfinite(pi))).nonzero()[0])
        raise ValueError(
            f"prior must be finite and > 0 for every class, got {pi[bad].item()} for class {bad}"
        )
    return pi.log()


def check_tau(tau: float, name: str = "tau") -> float:
    t = float(tau)
    if t != t or t in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be a finite number, got {tau}")
    return t


def adjust_logits(
    logits: torch.Tensor,
    samples_per_class: CountsLike | None = None,
    tau: float = 1.0,
    prior: torch.Tensor | None = None,
) -> torch.Tensor:
    """Post-hoc logit adjustment (Menon et al., ICLR 2021): ``logits - tau * log(pi)`` with
    the class prior ``pi`` from ``samples_per_class`` (or a ``prior`` of positive entries),
    for prediction with a model trained on long-tailed data. Classes run along dimension 1
    of [N, C, d1, ..., dk] logits (dimension 0 of [C]); returns the logits' dtype."""
    t = check_tau(tau)
    log_pi = log_prior(samples_per_class, prior, logits.device)
    cdim = 0 if logits.dim() == 1 else 1
    c = logits.shape[cdim]
    if log_pi.numel() != c:
        raise ValueError(f"the prior has {log_pi.numel()} classes but the logits have {c} (dimension {cdim})")
    shape = [1] * logits.dim()
    shape[cdim] = c
    return (logits - (t * log_pi).reshape(shape).to(logits.dtype)).to(logits.dtype)


def ldam_margins(
    samples_per_class: CountsLike, max_margin: float = 0.5, device: torch.device | str | None = None
) -> torch.Tensor:
    """LDAM's per-class margins (Cao et al., NeurIPS 2019): ``Delta_c`` proportional to
    ``n_c^(-1/4)``, scaled so that the largest (the rarest class's) is ``max_margin``;
    float64, [C]."""
    m = float(max_margin)
    if not (m > 0 and m != float("inf")):
        raise ValueError(f"max_margin must be a finite number > 0, got {max_margin}")
    n = _nonzero_counts(samples_per_class, "ldam_margins", device)
    d = n.pow(-0.25)
    return d * (m / d.max())
