"""``nn.Module`` losses, mirroring ``torch.nn``."""

from __future__ import annotations

import torch
from torch import nn

from . import _ops
from .longtail import log_prior
from .weights import CountsLike, check_beta, class_balanced_weights

__all__ = ["ClassBalancedLoss"]

# the options that live in the validated record (logit_adjustment is fixed at construction:
# the offset buffer is built from it)
_OPTION_NAMES = ("loss_type", "gamma", "alpha", "reduction", "ignore_index", "label_smoothing", "weighting")


def _check_epoch(epoch, name: str) -> int:
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"{name} must be an int >= 0, got {epoch!r}")
    return epoch


def apply_keeping_dtype(module: nn.Module, buffer: str | tuple[str, ...], apply, fn, recurse: bool):
    """nn.Module._apply that keeps some buffers' dtype and values: .half() / .to(dtype) cast
    every floating buffer, but the class weights (and the per-class offsets and margins) stay
    float64 (the kernels read them in the accumulation type); only the device follows."""
    names = (buffer,) if isinstance(buffer, str) else buffer
    before = {n: getattr(module, n) for n in names}
    out = apply(fn, recurse)
    for n, b in before.items():
        after = getattr(module, n)
        if b is not None and after.dtype != b.dtype:
            setattr(module, n, b.to(device=after.device))
    return out


class ClassBalancedLoss(nn.Module):
    """Class-balanced loss as a module. The class weights live in the ``weight`` buffer
    (float64): they move with ``.to()`` and are saved in ``state_dict``.

    See :func:`cbfused.class_balanced_loss` for the formulas and arguments.

    Deferred re-weighting (DRW, Cao et al., NeurIPS 2019): with ``drw_epoch=E`` the loss
    uses weights of 1 until the training loop's ``set_epoch(e)`` reaches ``e >= E``, and the
    class weights from then on (the paper: E = 160 of 200 epochs, ``beta=0.9999``).

    Example::

        counts = cbfused.class_counts(train_labels, num_classes)   # whole training set
        criterion = cbfused.ClassBalancedLoss(counts, beta=0.999, loss_type="focal", gamma=0.5)
        loss = criterion(model(x), y)
    """

    weight: torch.Tensor

    def __init__(
        self,
        samples_per_class: CountsLike | None = None,
        beta: float = 0.9999,
        loss_type: str = "focal",
        gamma: float = 1.0,
        alpha: float | torch.Tensor | None = None,
        reduction: str = "mean",
        ignore_index: int = -100,
        zero_count: str = "error",
        weights: torch.Tensor | CountsLike | None = None,
        drw_epoch: int | None = None,
        label_smoothing: float = 0.0,
        weighting: str = "sample",
        logit_adjustment: float = 0.0,
        prior: torch.Tensor | None = None,
        margins: torch.Tensor | None = None,
        logit_scale: float = 1.0,
    ) -> None:
        super().__init__()
        alpha, class_alpha = _ops.split_alpha(alpha)
        self._opts = _ops.loss_options(
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
        if (samples_per_class is None) == (weights is None):
            raise ValueError("give exactly one of samples_per_class (with beta) or weights")
        if weights is None:
            w = class_balanced_weights(samples_per_class, beta, zero_count=zero_count)
            self.beta: float | None = check_beta(beta)
        else:
            w = torch.as_tensor(weights, dtype=torch.float64).detach().clone()
            if w.dim() != 1:
                raise ValueError(f"weights must be 1-D [C], got shape {list(w.shape)}")
            self.beta = None
        self.register_buffer("weight", w)
        # adjusted logits: the offset tau log(pi) and LDAM's margins, float64 [C] (or None)
        offset = None
        if self._opts.logit_adjustment != 0.0:
            if prior is None and samples_per_class is None:
                raise ValueError("logit_adjustment needs the class prior: give samples_per_class or prior")
            lp = log_prior(None if prior is not None else samples_per_class, prior)
            offset = self._opts.logit_adjustment * lp
        elif prior is not None:
            raise ValueError("prior is given but logit_adjustment is 0: set logit_adjustment=tau to use it")
        if offset is not None and offset.numel() != w.numel():
            raise ValueError(f"the prior has {offset.numel()} classes but the weights {w.numel()}")
        self.register_buffer("logit_offset", offset)
        m = None
        if margins is not None:
            m = torch.as_tensor(margins, dtype=torch.float64).detach().clone()
            if m.dim() != 1 or m.numel() != w.numel():
                raise ValueError(f"margins must have shape [{w.numel()}], got {list(m.shape)}")
            if self.loss_type not in _ops.SOFTMAX_FAMILY:
                raise ValueError(
                    f"margins apply to the softmax losses only, not to loss_type={self.loss_type!r}"
                )
        self.register_buffer("margins", m)
        # a per-class alpha (float64 [C]), or None
        if class_alpha is not None:
            class_alpha = _ops.check_class_alpha(class_alpha, loss_type, torch.device("cpu")).clone()
            if class_alpha.numel() != w.numel():
                raise ValueError(
                    f"a per-class alpha must have shape [{w.numel()}], got {list(class_alpha.shape)}"
                )
        self.register_buffer("class_alpha", class_alpha)
        # DRW: weights of 1 before drw_epoch (not saved: the training loop sets the epoch)
        self.register_buffer("_unit_weight", torch.ones_like(w), persistent=False)
        self.drw_epoch = _check_epoch(drw_epoch, "drw_epoch") if drw_epoch is not None else None
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Tells the loss the current epoch (0-based); with ``drw_epoch`` set, the class
        weights apply from epoch ``drw_epoch`` on. Call it at the start of every epoch."""
        self.epoch = _check_epoch(epoch, "epoch")

    @property
    def weights_active(self) -> bool:
        """Whether the class weights apply now (always, unless deferred by ``drw_epoch``)."""
        return self.drw_epoch is None or self.epoch >= self.drw_epoch

    # The options live in one validated record; setting one validates it with the others.
    def _option(name: str):  # noqa: N805  (a property factory, called in the class body)
        def get(self):
            if name == "alpha" and getattr(self, "class_alpha", None) is not None:
                return self.class_alpha
            v = getattr(self._opts, name)
            return None if name == "alpha" and v < 0 else v

        def set_(self, value):
            if name == "alpha" and isinstance(value, torch.Tensor):
                raise TypeError("set a per-class alpha when constructing the module")
            if name == "alpha" and getattr(self, "class_alpha", None) is not None:
                self.class_alpha = None  # a number (or None) replaces the per-class alpha
            o = {f: getattr(self._opts, f) for f in _OPTION_NAMES + ("logit_scale",)}
            o["alpha"] = None if o["alpha"] < 0 else o["alpha"]
            o[name] = value
            self._opts = _ops.loss_options(**o, logit_adjustment=self._opts.logit_adjustment)

        return property(get, set_)

    loss_type = _option("loss_type")
    gamma = _option("gamma")
    alpha = _option("alpha")
    reduction = _option("reduction")
    ignore_index = _option("ignore_index")
    label_smoothing = _option("label_smoothing")
    weighting = _option("weighting")
    logit_scale = _option("logit_scale")
    del _option

    @property
    def logit_adjustment(self) -> float:
        """tau of the training-time logit adjustment (fixed at construction)."""
        return self._opts.logit_adjustment

    def _apply(self, fn, recurse=True):
        return apply_keeping_dtype(
            self, ("weight", "logit_offset", "margins", "class_alpha"), super()._apply, fn, recurse
        )

    @property
    def num_classes(self) -> int:
        return self.weight.numel()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        w = self.weight if self.weights_active else self._unit_weight
        return _ops.cb_loss(logits, target, w, self._opts, self.logit_offset, self.margins, self.class_alpha)

    def extra_repr(self) -> str:
        parts = [f"num_classes={self.num_classes}", f"loss_type={self.loss_type!r}"]
        if self.beta is not None:
            parts.append(f"beta={self.beta}")
        if self.loss_type in _ops.FOCAL_KINDS:
            parts.append(f"gamma={self.gamma}")
        if self.class_alpha is not None:
            parts.append("alpha=[per class]")
        elif self.alpha is not None:
            parts.append(f"alpha={self.alpha}")
        parts.append(f"reduction={self.reduction!r}")
        if self.label_smoothing:
            parts.append(f"label_smoothing={self.label_smoothing}")
        if self.weighting != "sample":
            parts.append(f"weighting={self.weighting!r}")
        if self.logit_adjustment:
            parts.append(f"logit_adjustment={self.logit_adjustment}")
        if self.margins is not None:
            parts.append("margins=[...]")
        if self.logit_scale != 1.0:
            parts.append(f"logit_scale={self.logit_scale}")
        if self.drw_epoch is not None:
            parts.append(f"drw_epoch={self.drw_epoch}, epoch={self.epoch}")
        return ", ".join(parts)
