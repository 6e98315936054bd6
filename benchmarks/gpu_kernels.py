"""GPU kernel benchmark: the CUDA kernels' own time (CUDA-graph replays, so no Python or
launch overhead), their achieved memory bandwidth against a device-to-device copy on the
same GPU, and forward + backward against the peers, all in one run.

    python benchmarks/gpu_kernels.py [--out DIR]       # on a GPU: measure, write the CSV
    python benchmarks/gpu_kernels.py --report CSV [--readme README.md]   # anywhere: the table

Each timing: the step captured N_INNER times into one CUDA graph, replayed (after a
warm-up) ROUNDS times between CUDA events; the median per step. Inputs above the L2 size
(50 MB on an H100) stream from HBM; smaller ones partly sit in L2 (flagged in the table).
Bytes counted are the fewest any implementation must move: the logits read once, the
gradient written once (forward + backward), the targets read once.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import statistics
import sys

import torch
import torch.nn.functional as F

import cbfused
from cbfused import reference as R

N_INNER = 10
ROUNDS = 7
SHAPES = [(1024, 1000), (16384, 1000), (65536, 80), (4096, 8142), (65536, 1000)]
COMPILED_SHAPES = {(16384, 1000), (65536, 80)}
LOSSES = ["softmax", "sigmoid", "focal", "softmax_focal"]
GAMMA, BETA = 2.0, 0.999
MEAN = cbfused._ops.REDUCTIONS["mean"]
# timed from CUDA-graph replays; every fwd+bwd provider (cbfused too) is timed eagerly,
# as a training step runs it, and cbfused's fwd+bwd also from graph replays
GRAPH_TIMED = ("kernel (cb_loss op)", "cbfused (graph)")


def graph_time(fn, graph: bool = True) -> tuple[float, str]:
    """Median seconds per call of fn: from CUDA-graph replays (graph=True; back-to-back
    eager calls if fn cannot be captured), or from back-to-back eager calls between events
    (the host runs ahead of the GPU as long as the GPU work is the longer)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    try:
        if not graph:
            raise LookupError("eager timing asked for")
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(N_INNER):
                fn()
        run, how = g.replay, "graph"
    except Exception as e:  # noqa: BLE001 - report and time eagerly
        if graph:
            print(f"    (no graph: {type(e).__name__}: {str(e)[:80]})", file=sys.stderr)
        torch.cuda.synchronize()

        def run():
            for _ in range(N_INNER):
                fn()

        how = "eager"
    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(ROUNDS):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / N_INNER)
    return statistics.median(times), how


def copy_bandwidth() -> float:
    src = torch.empty(2**28, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    t, _ = graph_time(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / t


def cases(loss, n, c, dtype):
    g = torch.Generator(device="cuda").manual_seed(n + c)
    x = (torch.randn(n, c, device="cuda", generator=g) * 2).to(dtype)
    y = torch.randint(0, c, (n,), device="cuda", generator=g)
    i = torch.arange(c, dtype=torch.float64)
    counts = (5000 * 100.0 ** (-i / max(c - 1, 1))).floor().clamp(min=1).long().tolist()
    w64 = cbfused.class_balanced_weights(counts, BETA, device="cuda")
    w32, w_in = w64.float(), w64.to(dtype)
    xr = x.clone().requires_grad_()
    lt = cbfused._ops.LOSS_TYPES[loss]

    def fwd_bwd(f):
        def step():
            (gx,) = torch.autograd.grad(f(xr), xr)
            return gx

        return step

    out = {
        "kernel (cb_loss op)": lambda: torch.ops.cbfused.cb_loss(x, y, w32, lt, GAMMA, -1.0, MEAN, -100, 1),
        "cbfused": fwd_bwd(
            lambda v: cbfused.class_balanced_loss(v, y, weights=w64, loss_type=loss, gamma=GAMMA)
        ),
    }

    def ref(v):
        return R.class_balanced_loss(v, y, w32, loss_type=loss, gamma=GAMMA, compute_dtype=torch.float32)

    out["cbfused (graph)"] = out["cbfused"]
    out["reference"] = fwd_bwd(ref)
    if (n, c) in COMPILED_SHAPES and dtype == torch.float32:
        out["reference+compile"] = fwd_bwd(torch.compile(ref, dynamic=False))
    if loss == "softmax":
        out["F.cross_entropy(weight)"] = fwd_bwd(lambda v: F.cross_entropy(v, y, weight=w_in))
    if loss == "sigmoid":
        out["F.bce_with_logits(weight)"] = fwd_bwd(
            lambda v: (
                F.binary_cross_entropy_with_logits(
                    v, F.one_hot(y, c).to(v.dtype), weight=w_in[y].unsqueeze(1), reduction="sum"
                )
                / n
            )
        )
    if loss == "focal":
        import torchvision

        out["torchvision focal x w"] = fwd_bwd(
            lambda v: (
                torchvision.ops.sigmoid_focal_loss(v, F.one_hot(y, c).to(v.dtype), alpha=-1, gamma=GAMMA).sum(
                    1
                )
                * w_in[y]
            ).mean()
        )
    return out


README_START = (
    "<!-- GPU-BENCH:START (generated by benchmarks/gpu_kernels.py --report from the CSV; do not edit) -->"
)
README_END = "<!-- GPU-BENCH:END -->"
PEERS = ("F.cross_entropy(weight)", "F.bce_with_logits(weight)", "torchvision focal x w")


def markdown(csv_path: str) -> str:
    """The README table from a CSV of this script: per loss, shape and dtype, the kernel's
    time and bandwidth (graph replays), cbfused forward + backward (graph replays and eager,
    as a training step runs it), and the eager ratios of the others to cbfused."""
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    cells: dict = {}
    for r in rows:
        cells.setdefault((r["loss"], int(r["N"]), int(r["C"]), r["dtype"]), {})[r["provider"]] = r
    first = rows[0]
    out = [
        f"{first['device']}, torch {first['torch']}; device-to-device copy {float(first['copy_gbps']):.0f} GB/s "
        "(bytes read + written). Kernel: the `cb_loss` op alone (loss and gradient in one pass), from "
        "CUDA-graph replays; GB/s counts the fewest bytes any implementation moves (logits read once, "
        "gradient written once, targets). fwd+bwd: `class_balanced_loss` and `autograd.grad`, from graph "
        "replays and eager (host overhead included, as a training step runs it). Ratios: the other's eager "
        "fwd+bwd time over cbfused's (> 1: cbfused faster).",
        "",
        "| loss | N x C | dtype | kernel us | GB/s | % of copy | fwd+bwd us (graph / eager) "
        "| vs eager reference | vs compiled reference | vs torch / torchvision |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (loss, n, c, dtype), p in sorted(
        cells.items(), key=lambda kv: (kv[0][0], kv[0][1] * kv[0][2], kv[0][3])
    ):
        k, cb = p["kernel (cb_loss op)"], float(p["cbfused"]["us"])

        def ratio(name, p=p, cb=cb):
            return f"{float(p[name]['us']) / cb:.1f}x" if name in p else "-"

        peer = next((name for name in PEERS if name in p), None)
        out.append(
            f"| {loss} | {n} x {c} | {dtype} | {float(k['us']):.1f} | {float(k['gbps']):.0f} | "
            f"{float(k['pct_copy']):.0f}% | {float(p['cbfused (graph)']['us']):.1f} / {cb:.1f} | "
            f"{ratio('reference')} | {ratio('reference+compile')} | "
            + (f"{ratio(peer)} ({peer})" if peer else "-")
            + " |"
        )
    return "\n".join(out)


def update_readme(readme: str, csv_path: str) -> None:
    with open(readme) as f:
        text = f.read()
    pat = re.compile(re.escape(README_START) + ".*?" + re.escape(README_END), re.S)
    if not pat.search(text):
        raise SystemExit(f"{readme} has no GPU benchmark markers")
    block = f"{README_START}\n{markdown(csv_path)}\n{README_END}"
    with open(readme, "w") as f:
        f.write(pat.sub(lambda _: block, text))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--report", metavar="CSV", help="print the markdown table of a CSV (no GPU needed)")
    ap.add_argument("--readme", help="with --report: rewrite this README's GPU table")
    args = ap.parse_args()
    if args.report:
        print(markdown(args.report))
        if args.readme:
            update_readme(args.readme, args.report)
        return 0
    torch.backends.cuda.matmul.allow_tf32 = False
    bw = copy_bandwidth()
    name = torch.cuda.get_device_name()
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0)
    print(
        f"{name}: device-to-device copy {bw / 1e9:.0f} GB/s (read + write), L2 {l2 / 2**20:.0f} MiB",
        flush=True,
    )
    rows = []
    for n, c in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            es = torch.finfo(dtype).bits // 8
            min_bytes = 2 * n * c * es + 8 * n  # logits read, gradient written, targets read
            for loss in LOSSES:
                times = {}
                for prov, fn in cases(loss, n, c, dtype).items():
                    t, how = graph_time(fn, graph=prov in GRAPH_TIMED)
                    times[prov] = t
                    rows.append(
                        dict(
                            loss=loss,
                            N=n,
                            C=c,
                            dtype=str(dtype)[6:],
                            provider=prov,
                            us=t * 1e6,
                            timing=how,
                            gbps=min_bytes / t / 1e9,
                            pct_copy=100 * min_bytes / t / bw,
                            device=name,
                            copy_gbps=bw / 1e9,
                            torch=torch.__version__,
                        )
                    )
                k, cb = times["kernel (cb_loss op)"], times["cbfused"]
                peers = {
                    p: v
                    for p, v in times.items()
                    if p not in ("kernel (cb_loss op)", "cbfused", "cbfused (graph)")
                }
                print(
                    f"{loss:13s} {n:6d}x{c:<5d} {str(dtype)[6:]:8s} kernel {k * 1e6:7.1f} us "
                    f"({min_bytes / k / 1e9:5.0f} GB/s, {100 * min_bytes / k / bw:3.0f}% of copy)  "
                    f"fwd+bwd {cb * 1e6:7.1f} us (graph {times['cbfused (graph)'] * 1e6:7.1f})  "
                    + "  ".join(f"{p} {v / cb:4.1f}x" for p, v in peers.items()),
                    flush=True,
                )
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "cuda-kernels.csv")
    with open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    print(f"wrote {path}\n")
    print(markdown(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
