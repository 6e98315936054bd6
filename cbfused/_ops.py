"""The Python side of the raw ops ``torch.ops.cbfused.*`` (internal: the public API is the
functions and modules of ``cbfused``): the loss-kind table read from ``_C``, the one
validation of the options every entry point shares, the fake kernels for torch.compile, and
typed wrappers. The gradient hand-off (``grad_mode``, ``grad_scale``) is described once, in
docs/design.md.
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass

import torch

from . import _C  # importing it registers the ops


@dataclass(frozen=True)
class LossKind:
    """One row of the loss-kind table (csrc/cbfused/kinds.h, read through ``_C``)."""

    name: str
    code: int
    family: str  # "softmax" (softmax over the row) or "binary" (C sigmoid terms)
    focal: bool  # gamma applies
    alpha: bool  # torchvision's alpha applies
    doc: str


LOSS_KINDS: dict[str, LossKind] = {k["name"]: LossKind(**k) for k in _C.loss_kinds()}
LOSS_TYPES: dict[str, int] = {name: k.code for name, k in LOSS_KINDS.items()}
SOFTMAX_FAMILY: tuple[str, ...] = tuple(n for n, k in LOSS_KINDS.items() if k.family == "softmax")
BINARY_FAMILY: tuple[str, ...] = tuple(n for n, k in LOSS_KINDS.items() if k.family == "binary")
FOCAL_KINDS: tuple[str, ...] = tuple(n for n, k in LOSS_KINDS.items() if k.focal)
REDUCTIONS: dict[str, int] = dict(_C.reductions())
WEIGHTINGS: dict[str, int] = dict(_C.weightings())
_NONE = REDUCTIONS["none"]
GRAD_NONE, GRAD_KEEP, GRAD_REUSE = 0, 1, 2
DEFAULT_IGNORE_INDEX = -100


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# The one validation of the options of every public entry point (functional, module, linear).


@dataclass(frozen=True)
class LossOptions:
    """Validated options of a class-balanced loss, with the op's integer codes."""

    loss_type: str
    code: int
    gamma: float
    alpha: float  # -1.0: off
    reduction: str
    reduction_code: int
    ignore_index: int
    label_smoothing: float = 0.0
    weighting: str = "sample"
    weighting_code: int = 0
    logit_adjustment: float = 0.0  # tau of the offset tau log(pi)
    logit_scale: float = 1.0


def loss_type_code(loss_type: str) -> int:
    try:
        return LOSS_TYPES[loss_type]
    except (KeyError, TypeError):
        raise ValueError(f"loss_type must be one of {sorted(LOSS_TYPES)}, got {loss_type!r}") from None


def reduction_code(reduction: str, allowed: tuple[str, ...] = tuple(REDUCTIONS)) -> int:
    if reduction not in allowed:
        raise ValueError(f"reduction must be one of {list(allowed)}, got {reduction!r}")
    return REDUCTIONS[reduction]


def check_gamma(gamma: float) -> float:
    g = float(gamma)
    if not (math.isfinite(g) and g >= 0):
        raise ValueError(f"gamma must be a finite number >= 0, got {gamma}")
    return g


# PyTorch's class-weighting rule (weighting="class") weighs class term c by w_c: the
# softmax losses' terms. Label smoothing applies to every class-balanced loss type.
CLASS_WEIGHTING_KINDS: tuple[str, ...] = SOFTMAX_FAMILY


def _check_smoothing(loss_type: str, label_smoothing, weighting) -> tuple[float, int]:
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {list(WEIGHTINGS)}, got {weighting!r}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real):
        raise TypeError(f"label_smoothing must be a float in [0, 1], got {label_smoothing!r}")
    eps = float(label_smoothing)
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if weighting != "sample" and loss_type not in CLASS_WEIGHTING_KINDS:
        raise ValueError(
            f"weighting='class' applies to loss_type in {list(CLASS_WEIGHTING_KINDS)} only, got "
            f"loss_type={loss_type!r} (the sigmoid losses weigh each sample by s_i: weighting='sample')"
        )
    return eps, WEIGHTINGS[weighting]


def _check_adjustment(loss_type: str, logit_adjustment, logit_scale) -> tuple[float, float]:
    for v, name in ((logit_adjustment, "logit_adjustment"), (logit_scale, "logit_scale")):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"{name} must be a float, got {v!r}")
    tau, s = float(logit_adjustment), float(logit_scale)
    if not math.isfinite(tau):
        raise ValueError(f"logit_adjustment must be a finite number, got {logit_adjustment}")
    if not (math.isfinite(s) and s > 0):
        raise ValueError(f"logit_scale must be a finite number > 0, got {logit_scale}")
    if (tau != 0.0 or s != 1.0) and loss_type not in SOFTMAX_FAMILY:
        raise ValueError(
            f"logit_adjustment and logit_scale apply to the softmax losses {list(SOFTMAX_FAMILY)} only, "
            f"got loss_type={loss_type!r} with logit_adjustment={logit_adjustment}, logit_scale={logit_scale}"
        )
    return tau, s


def _check_options(
    loss_type,
    gamma,
    alpha,
    reduction,
    ignore_index,
    label_smoothing=0.0,
    weighting="sample",
    logit_adjustment=0.0,
    logit_scale=1.0,
) -> LossOptions:
    code = loss_type_code(loss_type)
    red = reduction_code(reduction)
    g = check_gamma(gamma)
    if alpha is None:
        a = -1.0
    else:
        if not LOSS_KINDS[loss_type].alpha:
            raise ValueError(
                f"alpha applies to the sigmoid-based losses only, not to loss_type={loss_type!r}"
            )
        a = float(alpha)
        if not 0.0 <= a <= 1.0:
            raise ValueError(f"alpha must be in [0, 1] (or None), got {alpha}")
    # any integer (numpy's too, as int() accepted before), not a bool or a float
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    eps, wcode = _check_smoothing(loss_type, label_smoothing, weighting)
    tau, scale = _check_adjustment(loss_type, logit_adjustment, logit_scale)
    return LossOptions(
        loss_type, code, g, a, reduction, red, int(ignore_index), eps, weighting, wcode, tau, scale
    )


# Options repeat call after call: validate each combination once (they are plain values).
_check_options_cached = functools.lru_cache(maxsize=256)(_check_options)


def loss_options(
    loss_type: str,
    gamma: float,
    alpha: float | None,
    reduction: str,
    ignore_index: int,
    label_smoothing: float = 0.0,
    weighting: str = "sample",
    logit_adjustment: float = 0.0,
    logit_scale: float = 1.0,
) -> LossOptions:
    """Validates the options of a class-balanced loss (ValueError / TypeError naming the value)."""
    args = (
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
    if torch.compiler.is_compiling():  # dynamo traces the function, not the cache
        return _check_options(*args)
    try:
        return _check_options_cached(*args)
    except TypeError as e:
        if "unhashable" not in str(e):
            raise
        return _check_options(*args)


def check_target_options(target: torch.Tensor, ignore_index: int) -> None:
    """What the options cannot say alone: ignore_index means nothing for float targets
    (F.cross_entropy refuses it too)."""
    if ignore_index != DEFAULT_IGNORE_INDEX and target.is_floating_point():
        raise ValueError(
            f"ignore_index={ignore_index} is set but the target is a float tensor ({target.dtype}): "
            "ignore_index applies to class-index targets only"
        )


def _same_device(ref: torch.Tensor, ref_name: str, *others: tuple[torch.Tensor | None, str]) -> None:
    # Checked before dispatch: with mixed devices the dispatcher could pick the wrong kernel.
    for t, name in others:
        if t is not None and t.device != ref.device:
            raise ValueError(
                f"cbfused: {name} are on {t.device} but {ref_name} are on {ref.device}; "
                "move them to the same device (a ClassBalancedLoss module moves its weights with .to())"
            )


def _grad_mode(t: torch.Tensor) -> int:
    return GRAD_REUSE if (t.requires_grad and torch.is_grad_enabled()) else GRAD_NONE


# ---------------------------------------------------------------------------------------------
# cbfused::cb_loss


def _reads_channels_last(logits: torch.Tensor) -> bool:
    """Whether cb_loss reads [N, C, d...] logits as channels-last rows (csrc/checks.cpp,
    CbLossPlan): then its gradient takes the logits' strides."""
    if logits.dim() < 3 or logits.shape[1] <= 1 or logits.numel() == 0:
        return False
    if math.prod(logits.shape[2:]) == 1:
        return False
    return logits.stride(1) == 1 and logits.movedim(1, -1).is_contiguous()


@torch.library.register_fake("cbfused::cb_loss")
def _cb_loss_fake(
    logits,
    target,
    class_weight,
    loss_type,
    gamma,
    alpha,
    reduction,
    ignore_index,
    grad_mode,
    label_smoothing=0.0,
    weighting=0,
    logit_offset=None,
    margins=None,
    logit_scale=1.0,
    class_alpha=None,
):
    torch._check(
        logits.dim() >= 1,
        lambda: "cbfused: logits must be [N, C, d1, ..., dk] (class dimension 1) or [C], got a 0-d tensor",
    )
    if reduction == _NONE:
        loss_shape = () if logits.dim() == 1 else (logits.shape[0], *logits.shape[2:])
        loss = logits.new_empty(loss_shape)
    else:
        loss = logits.new_empty(())
    if not grad_mode:
        grad = logits.new_empty((0,))
    elif _reads_channels_last(logits):
        grad = torch.empty_strided(logits.shape, logits.stride(), dtype=logits.dtype, device=logits.device)
    else:
        grad = logits.new_empty(logits.shape)
    grad_scale = logits.new_empty((), dtype=_acc_dtype(logits.dtype))
    return loss, grad, grad_scale


@torch.library.register_fake("cbfused::cb_loss_")
def _cb_loss_inplace_fake(logits, target, class_weight, loss_type, gamma, alpha, reduction, *args):
    """cb_loss_ (CPU): cb_loss with the gradient written over the [N, C] logits."""
    torch._check(
        logits.dim() in (1, 2),
        lambda: f"cbfused: cb_loss_ takes [N, C] logits, got shape {list(logits.shape)}",
    )
    loss = logits.new_empty((logits.shape[0],) if reduction == _NONE and logits.dim() == 2 else ())
    return loss, logits.new_empty((), dtype=_acc_dtype(logits.dtype))


# The loss kinds a per-class alpha vector applies to: the sigmoid-based (alpha_c for t = 1,
# 1 - alpha_c for t = 0) and softmax focal (alpha_y on the sample).
CLASS_ALPHA_KINDS: tuple[str, ...] = tuple(n for n, k in LOSS_KINDS.items() if k.alpha) + ("softmax_focal",)


def split_alpha(alpha) -> tuple[float | None, torch.Tensor | None]:
    """alpha as the options take it (a number or None) and as a per-class tensor (or None)."""
    if isinstance(alpha, torch.Tensor):
        return None, alpha
    return alpha, None


def check_class_alpha(alpha: torch.Tensor, loss_type: str, device: torch.device) -> torch.Tensor:
    """A per-class alpha: 1-D, finite, in [0, 1], for the kinds it applies to; float64 on device."""
    if loss_type not in CLASS_ALPHA_KINDS:
        raise ValueError(
            f"a per-class alpha applies to loss_type in {list(CLASS_ALPHA_KINDS)}, not to {loss_type!r}"
        )
    if alpha.dim() != 1:
        raise ValueError(f"a per-class alpha must be a 1-D [C] tensor, got shape {list(alpha.shape)}")
    a = alpha.detach().to(device=device, dtype=torch.float64)
    bad = ~((a >= 0) & (a <= 1))
    if torch.compiler.is_compiling():  # no data-dependent branch in a graph: an assert op
        torch._assert_async(~bad.any(), "cbfused: a per-class alpha must be in [0, 1]")
        return a
    if bool(bad.any()):
        c = int(bad.nonzero()[0])
        raise ValueError(f"a per-class alpha must be in [0, 1], got {a[c].item()} for class {c}")
    return a


def check_margins(margins: torch.Tensor | None, opts: LossOptions, target: torch.Tensor) -> None:
    """What the kernels cannot say as well: margins belong to the softmax losses and to
    class-index targets."""
    if margins is None:
        return
    if opts.loss_type not in SOFTMAX_FAMILY:
        raise ValueError(
            f"margins apply to the softmax losses {list(SOFTMAX_FAMILY)} only, not to loss_type={opts.loss_type!r}"
        )
    if not isinstance(margins, torch.Tensor) or margins.dim() != 1:
        shape = list(margins.shape) if isinstance(margins, torch.Tensor) else type(margins).__name__
        raise ValueError(f"margins must be a 1-D [C] tensor, got {shape}")
    if target.is_floating_point():
        raise ValueError(
            "margins apply to class-index targets only (the margin is on the target class's logit)"
        )


def cb_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    class_weight: torch.Tensor,
    opts: LossOptions,
    offset: torch.Tensor | None = None,
    margins: torch.Tensor | None = None,
    class_alpha: torch.Tensor | None = None,
) -> torch.Tensor:
    """Calls the fused op with validated options; computes the gradient only when autograd
    will need it. offset: tau log(pi) [C] (logit adjustment), margins: [C] (LDAM)."""
    check_target_options(target, opts.ignore_index)
    dev = logits.device
    if margins is not None:
        check_margins(margins, opts, target)
        if margins.device != dev:
            _same_device(logits, "logits", (margins, "margins"))
    dev = logits.device  # one device object, not four: this runs every step
    if target.device != dev or class_weight.device != dev:
        _same_device(logits, "logits", (target, "target"), (class_weight, "class weights"))
    loss, _, _ = torch.ops.cbfused.cb_loss.default(
        logits,
        target,
        class_weight,
        opts.code,
        opts.gamma,
        opts.alpha,
        opts.reduction_code,
        opts.ignore_index,
        _grad_mode(logits),
        opts.label_smoothing,
        opts.weighting_code,
        offset,
        margins,
        opts.logit_scale,
        class_alpha,
    )
    return loss


# ---------------------------------------------------------------------------------------------
# cbfused::sigmoid_focal


@torch.library.register_fake("cbfused::sigmoid_focal")
def _sigmoid_focal_fake(
    inputs, targets, weight, alpha, gamma, reduction, grad_mode, weight_dim=-1, class_alpha=None
):
    loss = (
        torch.empty_like(inputs, memory_format=torch.contiguous_format)
        if reduction == _NONE
        else inputs.new_empty(())
    )
    grad = (
        torch.empty_like(inputs, memory_format=torch.contiguous_format)
        if grad_mode
        else inputs.new_empty((0,))
    )
    return loss, grad


def sigmoid_focal(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    weight: torch.Tensor | None,
    alpha: float,
    gamma: float,
    reduction: str,
    weight_dim: int = -1,
    class_alpha: torch.Tensor | None = None,
) -> torch.Tensor:
    """class_alpha: a validated per-class alpha (check_class_alpha), in place of alpha."""
    red = reduction_code(reduction, ("none", "sum", "mean"))
    g = check_gamma(gamma)
    a = -1.0 if class_alpha is not None else float(alpha)
    if not a <= 1.0:  # NaN too
        raise ValueError(f"alpha must be in [0, 1] (or negative to disable it), got {alpha}")
    _same_device(inputs, "inputs", (targets, "targets"), (weight, "weight"))
    if isinstance(weight_dim, bool) or not isinstance(weight_dim, numbers.Integral):
        raise TypeError(f"dim must be an int, got {weight_dim!r}")
    loss, _ = torch.ops.cbfused.sigmoid_focal.default(
        inputs, targets, weight, a, g, red, _grad_mode(inputs), int(weight_dim), class_alpha
    )
    return loss


# ---------------------------------------------------------------------------------------------
# cbfused::accumulate_ (CPU): acc += src without a float32 copy of a bfloat16 / float16 src


@torch.library.register_fake("cbfused::accumulate_")
def _accumulate_fake(acc, src):
    torch._check(acc.shape == src.shape, lambda: f"cbfused: accumulate_: shapes {acc.shape} and {src.shape}")
