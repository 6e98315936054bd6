"""Checks of the compiled CUDA code that need no GPU: device code for every architecture
the build targeted, and no register spills / local-memory stack frames in any kernel
(read with cuobjdump from the built extension)."""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess

import pytest

import cbfused

pytestmark = pytest.mark.skipif(
    cbfused.BUILD_INFO["cuda"] != "1",
    reason="cbfused was built without CUDA kernels (no nvcc or FORCE_ONLY_CPU=1)",
)


def _cuobjdump() -> str:
    found = shutil.which("cuobjdump")
    if found:
        return found
    import triton  # torch's dependency ships cuobjdump

    cands = glob.glob(
        os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    )
    if not cands:
        pytest.skip("cuobjdump not found (neither on PATH nor in triton/backends/nvidia/bin)")
    return cands[0]


def _so() -> str:
    return cbfused._C.__file__


def _run(*args: str) -> str:
    return subprocess.run([_cuobjdump(), *args, _so()], capture_output=True, text=True, check=True).stdout


def _archs() -> tuple[set[str], set[str]]:
    sass, ptx = set(), set()
    for a in cbfused.BUILD_INFO["cuda_archs"].replace(",", ";").split(";"):
        a = a.strip()
        if not a:
            continue
        num = a.replace("+PTX", "").replace(".", "")
        sass.add(f"sm_{num}")
        if a.endswith("+PTX"):
            ptx.add(f"sm_{num}")
    return sass, ptx


def test_device_code_for_every_architecture():
    sass, ptx = _archs()
    assert sass, "BUILD_INFO has no CUDA architectures"
    elf = set(re.findall(r"\.(sm_\d+a?)\.cubin", _run("--list-elf")))
    assert sass <= elf, f"missing SASS for {sorted(sass - elf)}; found {sorted(elf)}"
    if ptx:
        ptx_found = set(re.findall(r"\.(sm_\d+a?)\.ptx", _run("--list-ptx")))
        assert ptx <= ptx_found, f"missing PTX for {sorted(ptx - ptx_found)}"


def test_no_spills_or_stack_frames_in_loss_kernels():
    out = _run("--dump-resource-usage")
    kernels = 0
    bad = []
    arch = "?"
    for line in out.splitlines():
        m = re.search(r"arch = (sm_\d+)", line)
        if m:
            arch = m.group(1)
        m = re.search(r"Function (\S+):", line)
        if not m or "cbfused" not in m.group(1):
            continue
        kernels += 1
        usage = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", line))
        if int(usage.get("STACK", 0)) or int(usage.get("LOCAL", 0)):
            bad.append(f"{arch} {m.group(1)[:90]}: {line.strip()[-80:]}")
    assert kernels >= 8, f"found only {kernels} cbfused kernels in the resource dump"
    assert not bad, "register spills / stack frames:\n" + "\n".join(bad)
