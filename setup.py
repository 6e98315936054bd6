"""Builds cbfused's extension modules and says what it builds.

- cbfused._C: the op schemas, autograd, input checks, the CPU host entries and (when built)
  the CUDA kernels.
- cbfused._cpu_<ISA>: the vectorised CPU kernels, compiled once per x86 ISA (DEFAULT, AVX2,
  AVX512, AVX512_BF16); at import cbfused picks the best one the running CPU executes
  (override: CBFUSED_CPU_CAPABILITY), as ATen's DispatchStub does. A wheel built on one x86
  machine runs on any.
- cbfused._emulated_cuda (tests only, CBFUSED_BUILD_EMULATION=1): the CUDA kernels' source
  built for the CPU emulation of csrc/cuda/emulator.h.

Switches (environment variables):
  FORCE_CUDA=1              build the CUDA kernels even where no GPU is visible (needs nvcc
                            and a CUDA build of torch); by default they are built when a GPU
                            is visible, as torchvision and pytorch_scatter do.
  FORCE_ONLY_CPU=1          never build the CUDA kernels.
  TORCH_CUDA_ARCH_LIST      CUDA architectures; default: the visible GPUs', or (FORCE_CUDA
                            without a GPU) the list below.
  CBFUSED_CPU_CAPABILITIES  the ISAs to compile, comma-separated, or "native" for the build
                            machine's best one only (a quick local build); default: all
                            four on x86-64 (AVX512_BF16 where the compiler has it), DEFAULT
                            elsewhere.
  CBFUSED_BUILD_EMULATION=1 also build cbfused._emulated_cuda (the test command sets it).
"""

from __future__ import annotations

import glob
import os
import platform
import subprocess
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
ALL_CAPABILITIES = ["DEFAULT", "AVX2", "AVX512", "AVX512_BF16"]
# What each ISA needs of the CPU (the names of /proc/cpuinfo), for "native".
CPU_NEEDS = {
    "DEFAULT": set(),
    "AVX2": {"avx2", "fma", "f16c"},
    "AVX512": {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq"},
}
CPU_NEEDS["AVX512_BF16"] = CPU_NEEDS["AVX512"] | {"avx512_bf16"}
# -g0: no debug info (Python's CFLAGS ask for -g; it slowed the template-heavy kernel files).
# -Wno-unknown-pragmas / -Wno-psabi: torch's headers' "#pragma unroll" and GCC's note on
# 64-byte vector arguments, thousands of lines that hid what the build says.
COMMON_CXX = ["-O3", "-g0", "-fno-math-errno", "-fopenmp", "-Wno-unknown-pragmas", "-Wno-psabi"]
# GCC 12 reports its own intrinsics' _mm512_undefined_*() idiom, inlined into the vector
# kernels, as (maybe-)uninitialized: 5400 false warnings per ISA build.
KERNEL_CXX = ["-Wno-maybe-uninitialized", "-Wno-uninitialized"]


def _cpu_flags_present() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _compiler_accepts(flag: str) -> bool:
    cxx = os.environ.get("CXX", "c++")
    try:
        r = subprocess.run([cxx, flag, "-x", "c++", "-E", "-"], input="", capture_output=True, text=True)
    except OSError:
        return False
    return r.returncode == 0


def cpu_capabilities() -> list[str]:
    x86 = platform.machine() in ("x86_64", "AMD64")
    asked = os.environ.get("CBFUSED_CPU_CAPABILITIES", "").strip()
    if asked == "native":
        have = _cpu_flags_present()
        best = next((c for c in reversed(ALL_CAPABILITIES) if x86 and CPU_NEEDS[c] <= have), "DEFAULT")
        return [best]
    if asked:
        caps = [c.strip() for c in asked.split(",") if c.strip()]
        bad = [c for c in caps if c not in CPU_FLAGS]
        if bad:
            sys.exit(f"CBFUSED_CPU_CAPABILITIES={asked!r}: {bad} not among {ALL_CAPABILITIES} (or 'native')")
        if not x86 and caps != ["DEFAULT"]:
            sys.exit(f"CBFUSED_CPU_CAPABILITIES={asked!r}: only DEFAULT exists on {platform.machine()}")
        return caps
    if not x86:
        return ["DEFAULT"]
    caps = ["DEFAULT", "AVX2", "AVX512"]
    if _compiler_accepts("-mavx512bf16"):
        caps.append("AVX512_BF16")
    return caps


def _visible_gpu_archs() -> list[str]:
    try:
        if not torch.cuda.is_available():
            return []
        return sorted(
            {"{}.{}".format(*torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())}
        )
    except Exception:  # a driver that cannot be queried: as if no GPU
        return []


def want_cuda(cuda_sources: list[str]) -> tuple[bool, str]:
    if os.environ.get("FORCE_ONLY_CPU") == "1":
        return False, "FORCE_ONLY_CPU=1"
    if not cuda_sources:
        return False, "no CUDA sources in csrc/cuda"
    if torch.version.cuda is None:
        if os.environ.get("FORCE_CUDA") == "1":
            sys.exit("FORCE_CUDA=1 but this torch is a CPU-only build")
        return False, "torch is a CPU-only build"
    if cpp_extension.CUDA_HOME is None:
        if os.environ.get("FORCE_CUDA") == "1":
            sys.exit("FORCE_CUDA=1 but no CUDA toolkit (nvcc) was found; set CUDA_HOME")
        return False, "no CUDA toolkit (nvcc) found"
    if os.environ.get("FORCE_CUDA") == "1":
        return True, "FORCE_CUDA=1"
    if not _visible_gpu_archs():
        return False, "no GPU visible (FORCE_CUDA=1 builds them anyway)"
    return True, "a GPU is visible"


def core_extension():
    """cbfused._C: schemas, autograd, checks, the CPU host entries, the CUDA kernels."""
    cxx = [*COMMON_CXX, "-DCPU_CAPABILITY=DEFAULT"]
    sources = [
        "csrc/library.cpp",
        "csrc/checks.cpp",
        "csrc/autograd.cpp",
        *sorted(glob.glob("csrc/cpu/*.cpp")),
    ]
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    with_cuda, why = want_cuda(cuda_sources)
    include_dirs = [os.path.join(ROOT, "csrc")]
    if not with_cuda:
        print(f"cbfused: _C without CUDA kernels ({why})", flush=True)
        return cpp_extension.CppExtension(
            "cbfused._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(_visible_gpu_archs()) or DEFAULT_CUDA_ARCHS
    archs = os.environ["TORCH_CUDA_ARCH_LIST"]
    # No --use_fast_math: the CUDA kernels keep the accuracy the CPU tests certify.
    # -Xptxas -v prints registers / spills per kernel into the build log.
    defs = ["-DCBFUSED_WITH_CUDA", f'-DCBFUSED_CUDA_ARCHS="{archs}"']
    print(f"cbfused: _C with CUDA kernels ({why}) for architectures {archs}", flush=True)
    return cpp_extension.CUDAExtension(
        "cbfused._C",
        sources + cuda_sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx + defs, "nvcc": ["-O3", "-lineinfo", "-Xptxas", "-v", *defs]},
        extra_link_args=["-fopenmp"],
    )


def cpu_kernel_extension(cap: str):
    """cbfused._cpu_<cap>: csrc/cpu/kernels/ compiled for one ISA."""
    cxx = [
        *COMMON_CXX,
        *KERNEL_CXX,
        f"-DCPU_CAPABILITY={ATEN_CAPABILITY[cap]}",
        f"-DCBFUSED_ISA={cap}",
        *CPU_FLAGS[cap],
    ]
    return cpp_extension.CppExtension(
        f"cbfused._cpu_{cap}",
        sorted(glob.glob("csrc/cpu/kernels/*.cpp")),
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )


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


def extensions():
    caps = cpu_capabilities()
    print(f"cbfused: CPU kernels for {', '.join(caps)} (cbfused._cpu_<ISA>)", flush=True)
    exts = [core_extension(), *(cpu_kernel_extension(c) for c in caps)]
    if os.environ.get("CBFUSED_BUILD_EMULATION") == "1":
        print("cbfused: the CUDA emulation for the tests (cbfused._emulated_cuda)", flush=True)
        exts.append(emulated_cuda_extension())
    return exts


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
