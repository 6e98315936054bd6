"""cbfused: fused class-balanced losses (Cui et al., CVPR 2019) for PyTorch."""

from __future__ import annotations

import torch

from . import _C, reference
from . import _ops as _ops  # registers fake kernels and autograd
from ._ops import LOSS_KINDS, LossKind
from .functional import class_balanced_loss, sigmoid_focal_loss
from .init import init_sigmoid_bias_, param_groups_no_bias_decay
from .linear import ClassBalancedLinearLoss, auto_chunk_rows, linear_class_balanced_loss
from .modules import ClassBalancedLoss
from .weights import all_reduce_class_counts, class_balanced_weights, class_counts, effective_number

__version__ = "0.1.0"

BUILD_INFO: dict[str, str] = _C.build_info()

_ISA_NEEDS = {
    "DEFAULT": set(),
    "AVX2": {"avx2", "fma", "f16c"},
    "AVX512": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"},
    "AVX512_BF16": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "avx512_bf16"},
}


def _check_cpu() -> None:
    """The CPU kernels are compiled for one x86 ISA (see setup.py): refuse, clearly, to run
    them on a CPU without it instead of dying on an illegal instruction."""
    built = BUILD_INFO["cpu_capability"]
    if built == "DEFAULT":
        return
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), None)
    except OSError:
        flags = None
    if flags is None:  # no /proc/cpuinfo: ask torch what it dispatches to
        have = torch.backends.cpu.get_cpu_capability()
        # torch does not say whether the CPU has AVX512-BF16: that build is refused here
        ok = (built == "AVX512" and have.startswith("AVX512")) or (
            built == "AVX2" and have in ("AVX2", "AVX512")
        )
    else:
        ok = _ISA_NEEDS[built] <= flags
    if not ok:
        raise ImportError(
            f"cbfused was built for {built} CPUs but this CPU lacks it; rebuild here with "
            "CBFUSED_CPU_CAPABILITY=DEFAULT (or AVX2 / AVX512) pip install --no-build-isolation ."
        )


_check_cpu()

__all__ = [
    "BUILD_INFO",
    "LOSS_KINDS",
    "LossKind",
    "ClassBalancedLinearLoss",
    "ClassBalancedLoss",
    "auto_chunk_rows",
    "all_reduce_class_counts",
    "class_balanced_loss",
    "class_balanced_weights",
    "class_counts",
    "effective_number",
    "init_sigmoid_bias_",
    "linear_class_balanced_loss",
    "param_groups_no_bias_decay",
    "reference",
    "sigmoid_focal_loss",
]
