"""cbfused: fused class-balanced losses (Cui et al., CVPR 2019) for PyTorch."""

from __future__ import annotations

import torch

from . import _C, reference
from . import _ops as _ops  # registers fake kernels and autograd
from .functional import class_balanced_loss, sigmoid_focal_loss
from .init import init_sigmoid_bias_, param_groups_no_bias_decay
from .modules import ClassBalancedLoss
from .weights import all_reduce_class_counts, class_balanced_weights, class_counts, effective_number

__version__ = "0.1.0"

BUILD_INFO: dict[str, str] = _C.build_info()

_ISA_ORDER = ["DEFAULT", "AVX2", "AVX512"]


def _check_cpu() -> None:
    built = BUILD_INFO["cpu_capability"]
    if built == "DEFAULT":
        return
    have = torch.backends.cpu.get_cpu_capability()
    have = "AVX512" if have.startswith("AVX512") else have
    if have not in _ISA_ORDER or _ISA_ORDER.index(have) < _ISA_ORDER.index(built):
        raise ImportError(
            f"cbfused was built for {built} CPUs but this CPU supports {have}; "
            "rebuild with CBFUSED_CPU_CAPABILITY=DEFAULT pip install --no-build-isolation ."
        )


_check_cpu()

__all__ = [
    "BUILD_INFO",
    "ClassBalancedLoss",
    "all_reduce_class_counts",
    "class_balanced_loss",
    "class_balanced_weights",
    "class_counts",
    "effective_number",
    "init_sigmoid_bias_",
    "param_groups_no_bias_decay",
    "reference",
    "sigmoid_focal_loss",
]
