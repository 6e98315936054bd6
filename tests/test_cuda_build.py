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


def parse_resource_usage(dump: str) -> list[tuple[str, str, dict[str, int]]]:
    """(arch, kernel, {REG, STACK, LOCAL, ...}) per kernel entry of `--dump-resource-usage`.
    cuobjdump prints the usage on the line after the "Function name:" line."""
    entries = []
    arch, name = "?", None
    for line in dump.splitlines():
        m = re.search(r"arch = (sm_\d+a?)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"\s*Function (\S+):\s*(.*)$", line)
        if m:
            name, rest = m.group(1), m.group(2)
            if "REG:" not in rest:
                continue  # usage on the next line
            line = rest
        if name is not None and "REG:" in line:
            usage = {k: int(v) for k, v in re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", line)}
            entries.append((arch, name, usage))
            name = None
    return entries


def test_resource_usage_parser_reads_both_layouts():
    two_lines = "arch = sm_90\n Function _ZN7cbfused4cuda1kE:\n  REG:40 STACK:8 SHARED:0 LOCAL:4\n"
    one_line = "arch = sm_80\n Function _ZN7cbfused4cuda1kE: REG:30 STACK:0 SHARED:0 LOCAL:0\n"
    assert parse_resource_usage(two_lines) == [
        ("sm_90", "_ZN7cbfused4cuda1kE", {"REG": 40, "STACK": 8, "SHARED": 0, "LOCAL": 4})
    ]
    assert parse_resource_usage(one_line)[0][2]["REG"] == 30


def test_no_spills_or_stack_frames_in_loss_kernels():
    entries = [e for e in parse_resource_usage(_run("--dump-resource-usage")) if "cbfused" in e[1]]
    assert len(entries) >= 8, f"found only {len(entries)} cbfused kernels in the resource dump"
    bad = [
        f"{arch} {name[:90]}: {usage}"
        for arch, name, usage in entries
        if usage.get("STACK", 0) or usage.get("LOCAL", 0)
    ]
    assert not bad, f"register spills / stack frames in {len(bad)} of {len(entries)} entries:\n" + "\n".join(
        bad
    )
