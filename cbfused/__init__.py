"""cbfused: fused class-balanced losses (Cui et al., CVPR 2019) for PyTorch."""

from __future__ import annotations

import torch  # noqa: F401  (loads libtorch, which the extension modules link against)

from . import _C, _cpu, reference
from . import _ops as _ops  # registers fake kernels and autograd
from ._ops import LOSS_KINDS, LossKind
from .functional import class_balanced_loss, sigmoid_focal_loss
from .init import init_sigmoid_bias_, param_groups_no_bias_decay
from .linear import ClassBalancedLinearLoss, auto_chunk_rows, linear_class_balanced_loss
from .longtail import adjust_logits, class_prior, ldam_margins
from .modules import ClassBalancedLoss
from .weights import all_reduce_class_counts, class_balanced_weights, class_counts, effective_number

__version__ = "0.1.0"

#: How this cbfused was built and what it runs: ``cpu_capabilities`` (the CPU ISAs compiled),
#: ``cpu_capability`` (the one in use here), ``cpu_supported`` (what this CPU executes),
#: ``cuda`` ("1" when the CUDA kernels were built) and ``cuda_archs``.
BUILD_INFO: dict[str, str] = {
    **_C.build_info(),
    "cpu_capabilities": ",".join(_cpu.compiled()),
    "cpu_capability": _cpu.load(),
    "cpu_supported": ",".join(_cpu.supported()),
}

__all__ = [
    "BUILD_INFO",
    "LOSS_KINDS",
    "LossKind",
    "ClassBalancedLinearLoss",
    "ClassBalancedLoss",
    "adjust_logits",
    "auto_chunk_rows",
    "all_reduce_class_counts",
    "class_balanced_loss",
    "class_balanced_weights",
    "class_counts",
    "class_prior",
    "effective_number",
    "init_sigmoid_bias_",
    "ldam_margins",
    "linear_class_balanced_loss",
    "param_groups_no_bias_decay",
    "reference",
    "sigmoid_focal_loss",
]
