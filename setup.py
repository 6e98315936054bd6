"""Builds cbfused._C: the fused class-balanced loss kernels as a torch extension.

Switches (environment variables):
  FORCE_ONLY_CPU=1          build the CPU kernels only, even where nvcc is present.
  FORCE_CUDA=1              build the CUDA kernels even where no GPU is visible (fails
                            without nvcc / a CUDA build of torch).
  TORCH_CUDA_ARCH_LIST      CUDA architectures; default below when unset.
  CBFUSED_CPU_CAPABILITY    DEFAULT | AVX2 | AVX512 | AVX512_BF16: the x86 vector ISA of the CPU
                            kernels; default: the best the build machine has. The built
                            module refuses to import on a CPU without that ISA.
"""

from __future__ import annotations

import glob
import os
import platform
import sys

from setuptools import setup

# The default guess from /usr/local/bin/nvcc is wrong on some machines: prefer the
# toolkit where it normally lives, unless the user says otherwise.
if "CUDA_HOME" not in os.environ and os.path.isdir("/usr/local/cuda"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
# Ampere (sm_80 SASS also runs on sm_86 / sm_89: Ada), Hopper, Blackwell (datacenter and
# consumer), and PTX of the newest for GPUs after these.
DEFAULT_CUDA_ARCHS = "8.0;9.0;10.0;12.0+PTX"

CPU_FLAGS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"],
    "AVX512": [
        "-mavx512f",
        "-mavx512bw",
        "-mavx512vl",
        "-mavx512dq",
        "-mfma",
        "-mf16c",
        "-DCPU_CAPABILITY_AVX512",
    ],
}
# AVX512 plus AVX512-BF16's one-instruction float -> bfloat16 conversion for bfloat16 outputs
# (the vector code is otherwise AVX512's: at::vec's CPU_CAPABILITY namespace is AVX512).
CPU_FLAGS["AVX512_BF16"] = [*CPU_FLAGS["AVX512"], "-mavx512bf16"]
ATEN_CAPABILITY = {"DEFAULT": "DEFAULT", "AVX2": "AVX2", "AVX512": "AVX512", "AVX512_BF16": "AVX512"}
CPU_NEEDS = {
    "DEFAULT": set(),
    "AVX2": {"avx2", "fma", "f16c"},
    "AVX512": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"},
}
CPU_NEEDS["AVX512_BF16"] = CPU_NEEDS["AVX512"] | {"avx512_bf16"}


def _cpu_flags_present() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_capability() -> str:
    asked = os.environ.get("CBFUSED_CPU_CAPABILITY")
    if asked:
        if asked not in CPU_FLAGS:
            sys.exit(f"CBFUSED_CPU_CAPABILITY={asked!r}: expected one of {sorted(CPU_FLAGS)}")
        return asked
    if platform.machine() not in ("x86_64", "AMD64"):
        return "DEFAULT"
    have = _cpu_flags_present()
    for cap in ("AVX512_BF16", "AVX512", "AVX2"):
        if CPU_NEEDS[cap] <= have:
            return cap
    return "DEFAULT"


def want_cuda(cuda_sources: list[str]) -> tuple[bool, str]:
    if os.environ.get("FORCE_ONLY_CPU") == "1":
        return False, "FORCE_ONLY_CPU=1"
    if not cuda_sources:
        return False, "no CUDA sources in csrc/cuda"
    if os.environ.get("FORCE_CUDA") == "1":
        return True, "FORCE_CUDA=1"
    if torch.version.cuda is None:
        return False, "torch is a CPU-only build"
    if cpp_extension.CUDA_HOME is None:
        return False, "no CUDA toolkit (nvcc) found"
    return True, f"nvcc in {cpp_extension.CUDA_HOME}, torch built for CUDA {torch.version.cuda}"


def extensions():
    cap = cpu_capability()
    # -fopenmp: at::parallel_for is an inline OpenMP template (torch's own libgomp serves it).
    cxx = [
        "-O3",
        "-fno-math-errno",
        "-fopenmp",
        f"-DCPU_CAPABILITY={ATEN_CAPABILITY[cap]}",
        f'-DCBFUSED_CPU_CAPABILITY_NAME="{cap}"',
    ]
    cxx += CPU_FLAGS[cap]
    sources = ["csrc/ops.cpp", "csrc/checks.cpp", "csrc/autograd.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    with_cuda, why = want_cuda(cuda_sources)
    include_dirs = [os.path.join(ROOT, "csrc")]
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        archs = os.environ["TORCH_CUDA_ARCH_LIST"]
        # No --use_fast_math: the CUDA kernels keep the accuracy the CPU tests certify.
        # -Xptxas -v prints registers / spills per kernel into the build log.
        defs = ["-DCBFUSED_WITH_CUDA", f'-DCBFUSED_CUDA_ARCHS="{archs}"']
        nvcc = ["-O3", "-lineinfo", "-Xptxas", "-v", *defs]
        cxx += defs
        ext = cpp_extension.CUDAExtension(
            "cbfused._C",
            sources + cuda_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
        print(
            f"cbfused: building CPU ({cap}) + CUDA kernels ({why}); archs {os.environ['TORCH_CUDA_ARCH_LIST']}"
        )
    else:
        ext = cpp_extension.CppExtension(
            "cbfused._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
        print(f"cbfused: building CPU kernels only ({cap}); CUDA skipped: {why}")
    return [ext, emulated_cuda_extension()]


def emulated_cuda_extension():
    """cbfused._emulated_cuda: the CUDA kernels' source built with the host compiler
    against a CPU emulation of the CUDA thread model (csrc/cuda/emulator.h), so that the
    tests run the kernels' logic on machines without a GPU (torch.ops.cbfused_emu).
    A test facility, not a fast path: every CUDA thread is an OS thread."""
    return cpp_extension.CppExtension(
        "cbfused._emulated_cuda",
        sorted(glob.glob("csrc/emulated/*.cpp")),
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": ["-O1", "-pthread", "-std=c++20"]},  # std::barrier
        extra_link_args=["-pthread"],
    )


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
