"""Peak resident memory of fused linear + loss on the CPU, one fresh process per provider.

    python benchmarks/linear_memory.py [--shape 4096x2048x8142] [--dtypes float32,bfloat16]

For each provider a new Python process builds features [N, H], weight [C, H], bias [C],
targets and class weights, runs one small call of the same provider (so that library
start-up, MKL's and OpenMP's buffers, is not counted), resets the peak resident set
(`/proc/self/clear_refs` with 5), runs forward + backward once at the full shape and reports
VmHWM after the call minus VmRSS before it: every byte the call touched and had resident at
its peak, whoever allocated it. The allocator's profiler figure (bench.py's
peak_extra_bytes) misses what the C library keeps of freed blocks; this one does not.

The floor (cbfused.linear.floor_bytes) is the gradients any method returns (features, weight
and bias: N H + C H + C elements), plus for bfloat16 / float16 the float32 weight-gradient
accumulator of an accurate method (C H float32 beside the C H bfloat16 result): memory at
least that size is resident at the end of every backward.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

from cbfused.linear import floor_bytes

SHAPE = (4096, 2048, 8142)
DTYPES = ("float32", "bfloat16")


def _lce_options(method: str | None):
    from torch.nn import LinearCrossEntropyOptions

    return (
        LinearCrossEntropyOptions() if method is None else LinearCrossEntropyOptions(chunking_method=method)
    )


def providers() -> dict[str, object]:
    """name -> fn(f, w, b, y, cw) returning the loss. The softmax rows with class weights
    share one semantics (F.cross_entropy(weight=cw), a weighted mean); the focal row is the
    paper's class-balanced focal loss, which torch does not offer."""
    import cbfused

    def cb(loss_type, reduction):
        def fn(f, w, b, y, cw):
            return cbfused.linear_class_balanced_loss(
                f, w, b, y, weights=cw, loss_type=loss_type, gamma=2.0, reduction=reduction
            )

        return fn

    def lce(method):
        def fn(f, w, b, y, cw):
            return F.linear_cross_entropy(
                f, w, y, linear_bias=b, weight=cw.to(f.dtype), options=_lce_options(method)
            )

        return fn

    def cb_none(loss_type):
        def fn(f, w, b, y, cw):
            return cb(loss_type, "none")(f, w, b, y, cw).sum()

        return fn

    return {
        "cbfused softmax (weighted_mean)": cb("softmax", "weighted_mean"),
        "cbfused softmax (sum)": cb("softmax", "sum"),
        "cbfused softmax (none)": cb_none("softmax"),
        "cbfused softmax_focal (mean)": cb("softmax_focal", "mean"),
        "cbfused sigmoid (mean)": cb("sigmoid", "mean"),
        "cbfused focal (mean)": cb("focal", "mean"),
        "torch linear_cross_entropy (chunked)": lce(None),
        "torch linear_cross_entropy (aspect_ratio:4)": lce("aspect_ratio:4"),
        "torch linear + cross_entropy (unfused)": lambda f, w, b, y, cw: F.cross_entropy(
            F.linear(f, w, b), y, weight=cw.to(f.dtype)
        ),
    }


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def make_inputs(n, h, c, dtype, seed=0):
    """The fused linear cells' inputs (features, weight, bias, target, class weights), the
    same for this script and bench.py's linear+softmax cell."""
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(n, h, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(c, h, generator=g) * h**-0.5).to(dtype).requires_grad_()
    b = torch.zeros(c, dtype=dtype).requires_grad_()
    y = torch.randint(0, c, (n,), generator=g)
    cw = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    return f, w, b, y, cw


def child(name: str, n: int, h: int, c: int, dtype_name: str) -> dict:
    """One provider, in this (fresh) process: the peak extra resident bytes of one call."""
    dtype = getattr(torch, dtype_name)
    fn = providers()[name]
    small = make_inputs(64, 32, 300, dtype)
    fn(*small).backward()  # library start-up, outside the measurement
    del small
    f, w, b, y, cw = make_inputs(n, h, c, dtype)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM to the current resident set
    before = _status("VmRSS")
    fn(f, w, b, y, cw).backward()
    peak = _status("VmHWM")
    return {"name": name, "dtype": dtype_name, "peak_extra_bytes": peak - before}


def measure(name: str, n: int, h: int, c: int, dtype_name: str, threads: int | None = None) -> float:
    """Runs child() in a new process (the same interpreter and environment, glibc's malloc);
    its bytes."""
    # the C library's malloc, as a user's process has it (bench.py may run under jemalloc)
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF")}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    out = subprocess.run(
        [
            sys.executable,
            os.path.abspath(__file__),
            "--child",
            name,
            "--shape",
            f"{n}x{h}x{c}",
            "--dtypes",
            dtype_name,
        ],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_bytes"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="x".join(map(str, SHAPE)), help="N x H x C")
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--providers", default=None, help="comma-separated provider names (default: all)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    n, h, c = (int(v) for v in args.shape.split("x"))
    if args.child:
        print(json.dumps(child(args.child, n, h, c, args.dtypes)))
        return 0
    names = args.providers.split(",") if args.providers else list(providers())
    print(f"peak extra resident memory, forward + backward, {n} x {h} x {c}, one fresh process each")
    for d in args.dtypes.split(","):
        fl = floor_bytes(n, h, c, getattr(torch, d))  # the returned gradients (+ a float32 accumulator)
        print(f"{d}: floor {fl / 2**20:.0f} MiB")
        for name in names:
            b = measure(name, n, h, c, d)
            print(f"  {name:45s} {b / 2**20:7.0f} MiB  {b / fl:5.2f}x the floor", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
