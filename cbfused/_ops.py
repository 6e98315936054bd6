"""Typed wrappers over ``torch.ops.cbfused.*``: fake kernels and autograd.

The kernels compute the loss and, when a gradient is needed, d(loss)/d(logits) in
the same pass (for the un-normalised sum). The backward only scales that saved
gradient by ``grad_output`` (and by the mean's 1/D). With ``grad_mode=2`` (what the
public API passes: it never hands the gradient buffer out) it scales it in place when
the autograd graph is not kept, so forward+backward holds one N x C buffer, not two.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

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


def _is_plain_eager(*tensors: torch.Tensor) -> bool:
    if _get_current_dispatch_mode() is not None:
        return False
    return all(type(t) is torch.Tensor for t in tensors)


def _scale_saved_grad(grad: torch.Tensor, scale: torch.Tensor, may_reuse: bool) -> torch.Tensor:
    """grad * scale; in place (no second N x C buffer) when nothing can read `grad` again,
    and not at all when the scale is exactly 1 (loss.backward() on the CPU)."""
    if torch.is_grad_enabled():
        # create_graph=True: the saved gradient is a constant here, so a second
        # derivative through it would silently be wrong.
        if not torch.compiler.is_compiling():
            raise RuntimeError(
                "cbfused losses support first derivatives only (backward with create_graph=True is not supported)"
            )
        return grad * scale
    if not may_reuse or torch.compiler.is_compiling() or not _is_plain_eager(grad, scale):
        # Traced (AOTAutograd, make_fx, fake / functional tensors): stay functional.
        return grad * scale
    try:
        keep_graph = torch._C._autograd._get_current_graph_task_keep_graph()
    except RuntimeError:
        keep_graph = True
    if keep_graph:
        # retain_graph=True (or gradcheck) may run this backward again: keep the saved gradient intact.
        return grad * scale
    if scale.device.type == "cpu" and scale.numel() == 1 and scale.item() == 1.0:
        return grad  # reading a CPU scalar costs no device sync
    return grad.mul_(scale)


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


def _cb_loss_setup(ctx, inputs, output):
    # Only the loss is differentiated: without this autograd would allocate and zero an
    # N x C "gradient" for the grad output on every backward.
    ctx.set_materialize_grads(False)
    ctx.reduction = inputs[6]
    ctx.grad_mode = inputs[8]
    _, grad, grad_scale = output
    ctx.save_for_backward(grad, grad_scale)


def _cb_loss_backward(ctx, g_loss, _g_grad, _g_inv):
    grad, grad_scale = ctx.saved_tensors
    if g_loss is None:  # no gradient reached the loss (grads are not materialised)
        return (None,) * 9
    if not ctx.grad_mode:
        raise RuntimeError("cbfused: cb_loss ran with grad_mode=0, so it saved no gradient to backpropagate")
    scale = g_loss.unsqueeze(-1) if ctx.reduction == _NONE else g_loss * grad_scale
    return (_scale_saved_grad(grad, scale, ctx.grad_mode == GRAD_REUSE), *[None] * 8)


torch.library.register_autograd("cbfused::cb_loss", _cb_loss_backward, setup_context=_cb_loss_setup)


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


def _sigmoid_focal_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    ctx.grad_mode = inputs[6]
    ctx.save_for_backward(output[1])


def _sigmoid_focal_backward(ctx, g_loss, _g_grad):
    (grad,) = ctx.saved_tensors
    if g_loss is None:
        return (None,) * 7
    if not ctx.grad_mode:
        raise RuntimeError("cbfused: sigmoid_focal ran with grad_mode=0, so it saved no gradient")
    return _scale_saved_grad(grad, g_loss, ctx.grad_mode == GRAD_REUSE), None, None, None, None, None, None


torch.library.register_autograd(
    "cbfused::sigmoid_focal", _sigmoid_focal_backward, setup_context=_sigmoid_focal_setup
)


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
