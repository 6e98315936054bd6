"""cbfused::cb_loss_ (CPU): cb_loss with the gradient written over the logits, the fused
linear path's one chunk buffer. Every CPU row kernel must give the same loss and the same
gradient bits when its gradient row is its logits row (csrc/cpu/kernels.h): a kernel that
read a logit after storing part of that row's gradient (the target's logit after the exps
were parked, soft softmax focal's third pass) would differ here."""

from __future__ import annotations

import pytest
import torch
from testing import BINARY_FAMILY, DTYPES, LOSS_TYPES, SOFTMAX_FAMILY, make_counts, make_inputs

import cbfused
from cbfused import _ops

RED = _ops.REDUCTIONS
WEIGHTING = _ops.WEIGHTINGS

# (name, applies to (loss type, target kind), keyword options of the op)
OPTIONS = {
    "plain": {},
    "smooth": {"eps": 0.1},
    "smooth_class": {"eps": 0.1, "weighting": "class"},
    "class_weighting": {"weighting": "class"},  # float targets: PyTorch's rule
    "adjusted": {"offset": True, "margins": True, "scale": 2.0},
    "class_alpha": {"class_alpha": True},
}


def _applies(option: str, loss_type: str, kind: str) -> bool:
    o = OPTIONS[option]
    if "weighting" in o and loss_type not in SOFTMAX_FAMILY:
        return False
    if option == "class_weighting" and kind == "hard":
        return False  # the same as plain for one-hot targets
    if "offset" in o and (loss_type not in SOFTMAX_FAMILY or kind != "hard"):
        return False  # margins need class indices
    if "class_alpha" in o and loss_type not in ("focal", "sigmoid", "softmax_focal"):
        return False
    return True


def _args(x, y, loss_type, option, reduction, c):
    o = OPTIONS[option]
    counts = make_counts(c, seed=c)
    w = cbfused.class_balanced_weights(counts, 0.999)
    g = torch.Generator().manual_seed(c)
    offset = torch.randn(c, generator=g, dtype=torch.float64) if o.get("offset") else None
    margins = torch.rand(c, generator=g, dtype=torch.float64) * 0.5 if o.get("margins") else None
    class_alpha = torch.rand(c, generator=g, dtype=torch.float64) if o.get("class_alpha") else None
    alpha = 0.25 if loss_type in BINARY_FAMILY and class_alpha is None else -1.0
    head = (x, y, w, _ops.LOSS_TYPES[loss_type], 2.0, alpha, RED[reduction], -100)
    tail = (o.get("eps", 0.0), WEIGHTING[o.get("weighting", "sample")], offset, margins, o.get("scale", 1.0))
    return head, (*tail, class_alpha)


CASES = [
    (lt, kind, opt)
    for lt in LOSS_TYPES
    for kind in ("hard", "float")
    for opt in OPTIONS
    if _applies(opt, lt, kind)
]


@pytest.mark.parametrize("shape", [(37, 131), (5, 1037), (9, 3)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("loss_type,kind,option", CASES, ids=lambda v: str(v))
def test_gradient_over_the_logits_equals_a_new_gradient(loss_type, kind, option, dtype, reduction, shape):
    n, c = shape
    x, y = make_inputs(n, c, dtype, kind=kind, loss_type=loss_type, seed=n + c)
    head, tail = _args(x, y, loss_type, option, reduction, c)
    loss, grad, scale = torch.ops.cbfused.cb_loss.default(*head, 1, *tail)
    buf = x.clone()
    loss2, scale2 = torch.ops.cbfused.cb_loss_.default(buf, *head[1:], *tail)
    assert torch.equal(loss2, loss)
    assert torch.equal(scale2, scale)
    assert torch.equal(buf, grad), (buf - grad).abs().max()
    assert not torch.equal(buf, x)  # the logits were overwritten


def test_gradient_over_the_logits_refuses_other_layouts():
    x, y = make_inputs(6, 5, torch.float32)
    head, tail = _args(x, y, "softmax", "plain", "sum", 5)
    for bad, what in (
        (x.t().contiguous().t(), "strided"),
        (x.reshape(6, 5, 1).expand(6, 5, 2).contiguous(), "dense"),
    ):
        t = y if what == "strided" else y.reshape(6, 1).expand(6, 2).contiguous()
        with pytest.raises(RuntimeError, match=r"cb_loss_ writes the gradient over the logits.*shape"):
            torch.ops.cbfused.cb_loss_.default(bad, t, *head[2:], *tail)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_opcheck_gradient_over_the_logits(loss_type):
    """The schema's mutation (the logits) and the fake kernel agree with the CPU kernel."""
    for kind in ("hard", "float"):
        for reduction in ("sum", "none"):
            x, y = make_inputs(7, 11, torch.float32, kind=kind, loss_type=loss_type, seed=3)
            head, tail = _args(x, y, loss_type, "plain", reduction, 11)
            torch.library.opcheck(torch.ops.cbfused.cb_loss_.default, (*head, *tail))
