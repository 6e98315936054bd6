"""Picks the CPU kernels at import, as ATen's DispatchStub does.

The vectorised CPU kernels are compiled once per x86 ISA into ``cbfused._cpu_<ISA>``
(DEFAULT, AVX2, AVX512, AVX512_BF16; see setup.py). This module imports the best one that
was built and that the running CPU executes (``_C.cpu_capabilities_supported()``, which also
checks that the OS saves the vector registers) and hands its kernel table to ``_C``.
``CBFUSED_CPU_CAPABILITY=<ISA>`` picks a lower one instead (the tests use it to run every
ISA this machine has); asking for one the CPU lacks, or one that was not built, is an error.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

from . import _C

ORDER = ("DEFAULT", "AVX2", "AVX512", "AVX512_BF16")


def compiled() -> list[str]:
    """The ISAs whose kernel module was built (present next to _C)."""
    return [c for c in ORDER if importlib.util.find_spec(f"{__package__}._cpu_{c}") is not None]


def supported() -> list[str]:
    return list(_C.cpu_capabilities_supported())


def choose(asked: str | None = None) -> str:
    built, runs = compiled(), supported()
    usable = [c for c in ORDER if c in built and c in runs]
    if asked:
        if asked not in ORDER:
            raise ImportError(f"CBFUSED_CPU_CAPABILITY={asked!r}: expected one of {list(ORDER)}")
        if asked not in built:
            raise ImportError(
                f"CBFUSED_CPU_CAPABILITY={asked!r}: cbfused was built with CPU kernels for {built} only"
            )
        if asked not in runs:
            raise ImportError(f"CBFUSED_CPU_CAPABILITY={asked!r}: this CPU executes only {runs}")
        return asked
    if not usable:
        raise ImportError(
            f"cbfused was built with CPU kernels for {built}, none of which this CPU executes (it has "
            f"{runs}); rebuild with CBFUSED_CPU_CAPABILITIES=DEFAULT pip install --no-build-isolation ."
        )
    return usable[-1]


def load() -> str:
    """Imports the chosen kernels and makes them the ones in use; returns the ISA."""
    cap = choose(os.environ.get("CBFUSED_CPU_CAPABILITY") or None)
    module = importlib.import_module(f"{__package__}._cpu_{cap}")
    return _C.set_cpu_kernels(module.kernels)
