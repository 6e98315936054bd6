"""Typed wrappers over ``torch.ops.cbfused.*``: fake kernels and autograd.

The kernels compute the loss and, when a gradient is needed, d(loss)/d(logits) in
the same pass. Autograd is registered in C++ (csrc/autograd.cpp): the backward only
scales that saved gradient by ``grad_output`` (and the mean's 1/D where the kernel left
it). With ``grad_mode=2`` (what the public API passes: it never hands the gradient buffer
out) it scales it in place when the autograd graph is not kept, and returns it untouched
when the scale is 1 on the CPU, so forward+backward holds one N x C buffer, not two.
Here: the fake (meta) kernels for torch.compile, and typed wrappers.
"""

from __future__ import annotations

import torch

from . import _C  # noqa: F401  (importing it registers the ops)

LOSS_TYPES = {"softmax": 0, "sigmoid": 1, "focal": 2, "softmax_focal": 3}
REDUCTIONS = {"none": 0, "sum": 1, "mean": 2, "weighted_mean": 3}
_NONE = REDUCTIONS["none"]
GRAD_NONE, GRAD_KEEP, GRAD_REUSE = 0, 1, 2


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def loss_type_code(loss_type: str) -> int:
    try:
        return LOSS_TYPES[loss_type]
    except (KeyError, TypeError):
        raise ValueError(f"loss_type must be one of {sorted(LOSS_TYPES)}, got {loss_type!r}") from None


def reduction_code(reduction: str, allowed: tuple[str, ...] = tuple(REDUCTIONS)) -> int:
    if reduction not in allowed:
        raise ValueError(f"reduction must be one of {list(allowed)}, got {reduction!r}")
    return REDUCTIONS[reduction]


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


@torch.library.register_fake("cbfused::cb_loss")
def _cb_loss_fake(logits, target, class_weight, loss_type, gamma, alpha, reduction, ignore_index, grad_mode):
    torch._check(logits.dim() == 2, lambda: f"cbfused: logits must be 2-D [N, C], got {logits.dim()}-D")
    n, c = logits.shape
    loss = logits.new_empty((n,)) if reduction == _NONE else logits.new_empty(())
    grad = logits.new_empty((n, c)) if grad_mode else logits.new_empty((0,))
    grad_scale = logits.new_empty((), dtype=_acc_dtype(logits.dtype))
    return loss, grad, grad_scale


def cb_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    class_weight: torch.Tensor,
    loss_type: str,
    gamma: float,
    alpha: float | None,
    reduction: str,
    ignore_index: int,
) -> torch.Tensor:
    """Calls the fused op; computes the gradient only when autograd will need it."""
    lt = loss_type_code(loss_type)
    red = reduction_code(reduction)
    _same_device(logits, "logits", (target, "target"), (class_weight, "class weights"))
    if alpha is None:
        a = -1.0
    else:
        if lt in (LOSS_TYPES["softmax"], LOSS_TYPES["softmax_focal"]):
            raise ValueError(
                f"alpha applies to the sigmoid-based losses only, not to loss_type={loss_type!r}"
            )
        a = float(alpha)
        if not 0.0 <= a <= 1.0:
            raise ValueError(f"alpha must be in [0, 1] (or None), got {alpha}")
    loss, _, _ = torch.ops.cbfused.cb_loss.default(
        logits, target, class_weight, lt, float(gamma), a, red, int(ignore_index), _grad_mode(logits)
    )
    return loss


# ---------------------------------------------------------------------------------------------
# cbfused::sigmoid_focal


@torch.library.register_fake("cbfused::sigmoid_focal")
def _sigmoid_focal_fake(inputs, targets, weight, alpha, gamma, reduction, grad_mode):
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
) -> torch.Tensor:
    red = reduction_code(reduction, ("none", "sum", "mean"))
    _same_device(inputs, "inputs", (targets, "targets"), (weight, "weight"))
    loss, _ = torch.ops.cbfused.sigmoid_focal.default(
        inputs, targets, weight, float(alpha), float(gamma), red, _grad_mode(inputs)
    )
    return loss


# ---------------------------------------------------------------------------------------------
# cbfused::accumulate_ (CPU): acc += src without a float32 copy of a bfloat16 / float16 src


@torch.library.register_fake("cbfused::accumulate_")
def _accumulate_fake(acc, src):
    torch._check(acc.shape == src.shape, lambda: f"cbfused: accumulate_: shapes {acc.shape} and {src.shape}")
