"""The kernel benchmark: cbfused's fused ops against the eager reference, the compiled
reference and the peers a user would pick today, on the same inputs in the same run.

    python benchmarks/bench.py                    # quick grid, one run (what `make bench` runs)
    python benchmarks/bench.py --full             # the whole grid
    python benchmarks/bench.py --runs 3 --publish # three runs: the published tables

Writes a CSV (one row per kernel, provider, mode, dtype, shape) and a plot of the speed-up
over the eager reference to benchmarks/results/latest/ (untracked; --out picks another
directory or a .csv path), and prints the tables. --publish writes the tracked
benchmarks/results/<device>-<grid>.csv / .png instead and regenerates the tables of
README.md and docs/performance.md from them.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

# The allocator. glibc maps every buffer above 32 MB fresh and returns it on free, so each
# step page-faults its large tensors in again (a 16384 x 1000 float32 gradient is 65 MB):
# measured here, that costs more than the losses themselves and varies 3-10x run to run.
# Like CUDA's caching allocator on a GPU, jemalloc told to keep freed memory
# (dirty/muzzy_decay_ms:-1) removes those faults. The benchmark re-executes itself under it
# when the library exists (every provider runs in that one process) and records which
# allocator it used; --system-malloc measures glibc. --thp sets THP_MEM_ALLOC_ENABLE=1.
# (Both are read here, before argparse, because they must be set before the process starts.)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import report  # noqa: E402

import cbfused  # noqa: E402
from cbfused import reference as R  # noqa: E402

LOSSES = ["softmax", "sigmoid", "focal", "softmax_focal"]
GAMMA = 2.0
BETA = 0.999
ROUNDS = 5  # interleaved timing rounds per cell (see interleaved)
QUICK_SHAPES = [(128, 10), (1024, 100), (1024, 1000), (65536, 80), (16384, 1000)]
FULL_SHAPES = [(128, 10), (1024, 100), (1024, 1000), (1024, 8142), (65536, 80), (16384, 1000)]
QUICK_BF16_SHAPES = [(1024, 1000), (65536, 80), (16384, 1000)]
# fused linear + loss (N, H, C): iNaturalist-sized and a 32k-class catalogue
QUICK_LINEAR = [(4096, 2048, 8142)]
FULL_LINEAR = [(4096, 2048, 8142), (8192, 1024, 32000)]


# dense prediction [N, C, H, W] (fwd+bwd, float32 and bfloat16, NCHW and channels-last):
# Cityscapes-like at half resolution and ADE20K-like
DENSE_SHAPES = [(8, 19, 256, 512), (16, 150, 64, 64)]
DENSE_LAYOUTS = {"NCHW": torch.contiguous_format, "NHWC": torch.channels_last}

# cells up to this many logits also time the functional entry points (report.ENTRY_POINTS)
SMALL_CELL = 1 << 17
ENTRY_COUNTS = "class_balanced_loss(samples_per_class)"
SMOOTHING = 0.1
OPT_SMOOTH = "cbfused label_smoothing=0.1"
OPT_SMOOTH_CLASS = "cbfused label_smoothing=0.1, weighting=class"
OPT_LA = "cbfused logit_adjustment=1"
OPT_LDAM = "cbfused margins"
# LDAM's margins at a logit scale where s Delta exceeds log 2 (up to 1): the kernels apply
# the margin inside the passes there, not after them (docs/performance.md)
OPT_LDAM_SCALED = "cbfused margins, logit_scale=2"
ENTRY_WEIGHTS = "class_balanced_loss(weights)"


@dataclass
class Row:
    kernel: str
    provider: str
    mode: str
    dtype: str
    N: int
    C: int
    median_ms: float
    q20_ms: float
    q80_ms: float
    reps: int
    elems_per_s: float
    x_floor: float = float("nan")
    speedup_vs_ref: float = float("nan")
    peak_extra_bytes: float = float("nan")
    peak_extra_x_nc: float = float("nan")
    # fused linear + loss (CPU): peak extra resident memory of one call in a fresh process
    # (benchmarks/linear_memory.py) and the floor of the returned gradients
    peak_resident_bytes: float = float("nan")
    floor_bytes: float = float("nan")
    compile_s: float = float("nan")
    H: int = 0
    thp: str = ""
    allocator: str = ""
    unit: str = "ms"
    device: str = ""
    device_name: str = ""
    threads: int = 0
    torch_version: str = ""
    cbfused_version: str = ""
    git_commit: str = ""
    run: int = 0
    cpu_capability: str = ""
    load_avg: str = ""  # the machine's 1 / 5 / 15-minute load when the run started
    shape: str = ""  # dense cells: the logits' shape, N x C x H x W (N, C above: positions, classes)
    layout: str = ""  # dense cells: NCHW or NHWC (channels-last)
    extra: dict = field(default_factory=dict)


JEMALLOC_PATHS = [
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib64/libjemalloc.so.2",
    "/usr/lib/libjemalloc.so.2",
]


def reexec_with_allocator() -> None:
    """Re-executes this script with the allocator and THP settings of the command line (they
    must be in the environment before the process starts); records the allocator."""
    if "CBFUSED_BENCH_ALLOCATOR" in os.environ:
        return
    env = dict(os.environ)
    if "--thp" in sys.argv:
        env["THP_MEM_ALLOC_ENABLE"] = "1"
    lib = next((p for p in JEMALLOC_PATHS if os.path.exists(p)), None)
    if lib and "--system-malloc" not in sys.argv:
        env["CBFUSED_BENCH_ALLOCATOR"] = "jemalloc (dirty_decay_ms:-1)"
        env["LD_PRELOAD"] = (lib + " " + env.get("LD_PRELOAD", "")).strip()
        env["MALLOC_CONF"] = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
    else:
        env["CBFUSED_BENCH_ALLOCATOR"] = "glibc malloc"
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE, capture_output=True, text=True
        )
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores)"


# ---------------------------------------------------------------------------------------------
# Timing and memory


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_fn(
    fn: Callable[[], None], device: str, min_reps: int, budget_s: float, max_reps: int = 200, warmup: int = 2
) -> list[float]:
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < budget_s):
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return times


def timing_row(
    kernel: str, provider: str, mode: str, dtype: str, n: int, c: int, times: list[float], **fields
) -> Row:
    """A Row from repeated timings (seconds): median, 20/80 % quantiles, reps, elements/s."""
    med = statistics.median(times)
    return Row(
        kernel,
        provider,
        mode,
        dtype,
        n,
        c,
        med * 1e3,
        quantile(times, 0.2) * 1e3,
        quantile(times, 0.8) * 1e3,
        len(times),
        n * c / med,
        **fields,
    )


def quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's C++ side (kineto) logs every start and stop to the process's stderr
    ("USDT ... profiler_start", and on a machine without a GPU "gpuGetDeviceCount failed"):
    hundreds of lines through the table. Silenced while the profiler runs, and only then."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(devnull)
        os.close(saved)


def peak_extra_bytes(fn: Callable[[], None], device: str) -> float:
    """Peak bytes allocated above the state before the call (the call's extra memory)."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - base)
    # CPU: every allocation and free the profiler records, in time order, with the CPU
    # allocator's running total ("Total Allocated"): the peak of that total above its value
    # before the call. (Summing each op's *self* memory instead, as this benchmark once did,
    # misses transient buffers that an op frees inside a parent op, such as the chunks of
    # the fused linear path: its frees are booked at the parent's start.)
    with _quiet_stderr():
        mem = cpu_memory_events(fn)
    if not mem:
        return 0.0
    base = mem[0]["args"]["Total Allocated"] - mem[0]["args"]["Bytes"]
    return float(max(0, max(e["args"]["Total Allocated"] for e in mem) - base))


def cpu_memory_events(fn: Callable[[], None]) -> list[dict]:
    """The CPU allocator's allocations and frees during fn() as the profiler records them,
    in time order (chrome-trace "[memory]" events: args Bytes, negative for a free, and
    Total Allocated)."""
    import json
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    return sorted(
        (e for e in events if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0),
        key=lambda e: e["ts"],
    )


# ---------------------------------------------------------------------------------------------
# Providers: each builds a loss function of (x, y) for one (kernel, shape, dtype).


@dataclass
class Case:
    kernel: str
    n: int
    c: int
    dtype: torch.dtype
    device: str
    counts: list[int]
    w64: torch.Tensor  # class-balanced weights, float64, on device
    y: torch.Tensor


def make_case(kernel: str, n: int, c: int, dtype: torch.dtype, device: str) -> tuple[Case, torch.Tensor]:
    g = torch.Generator().manual_seed(n * 7919 + c)
    i = torch.arange(c, dtype=torch.float64)
    counts = (5000 * 100.0 ** (-i / max(c - 1, 1))).floor().clamp(min=1).long().tolist()
    w64 = cbfused.class_balanced_weights(counts, BETA, device=device)
    x = (torch.randn(n, c, generator=g) * 2).to(dtype).to(device)
    y = torch.randint(0, c, (n,), generator=g).to(device)
    return Case(kernel, n, c, dtype, device, counts, w64, y), x


def providers(case: Case) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    k, y = case.kernel, case.y
    acc = torch.float32 if case.dtype != torch.float64 else torch.float64
    w_acc = case.w64.to(acc)
    w_in = case.w64.to(case.dtype)
    crit = cbfused.ClassBalancedLoss(case.counts, beta=BETA, loss_type=k, gamma=GAMMA).to(case.device)

    def ref(x):
        return R.class_balanced_loss(x, y, w_acc, loss_type=k, gamma=GAMMA, compute_dtype=acc)

    out: dict[str, Callable] = {"cbfused": lambda x: crit(x, y), "reference": ref}
    if case.n * case.c <= SMALL_CELL:
        # the functional entry points, where per-call overhead shows: with the class counts
        # (a tensor, as class_counts returns them) and with ready weights
        counts_t = torch.tensor(case.counts, device=case.device)
        out[ENTRY_COUNTS] = lambda x: cbfused.class_balanced_loss(
            x, y, samples_per_class=counts_t, beta=BETA, loss_type=k, gamma=GAMMA
        )
        out[ENTRY_WEIGHTS] = lambda x: cbfused.class_balanced_loss(
            x, y, weights=case.w64, loss_type=k, gamma=GAMMA
        )
    out["reference+compile"] = torch.compile(ref, dynamic=False)
    # label smoothing (every kind) and PyTorch's class weighting (the softmax losses): their
    # cost over plain "cbfused"
    smoothings = [(OPT_SMOOTH, "sample")]
    if k in ("softmax", "softmax_focal"):
        smoothings.append((OPT_SMOOTH_CLASS, "class"))
    for name, weighting in smoothings:
        c_opt = cbfused.ClassBalancedLoss(
            case.counts, beta=BETA, loss_type=k, gamma=GAMMA, label_smoothing=SMOOTHING, weighting=weighting
        ).to(case.device)
        out[name] = lambda x, c_opt=c_opt: c_opt(x, y)
    if k == "softmax":
        out["F.cross_entropy(weight)"] = lambda x: F.cross_entropy(x, y, weight=w_in)
        out["F.cross_entropy(weight, label_smoothing)"] = lambda x: F.cross_entropy(
            x, y, weight=w_in, label_smoothing=SMOOTHING
        )
    if k in ("softmax", "softmax_focal"):
        # adjusted logits: their cost over plain "cbfused"
        margins = cbfused.ldam_margins(case.counts)
        for name, kw in (
            (OPT_LA, {"logit_adjustment": 1.0}),
            (OPT_LDAM, {"margins": margins}),
            (OPT_LDAM_SCALED, {"margins": margins, "logit_scale": 2.0}),
        ):
            c_opt = cbfused.ClassBalancedLoss(case.counts, beta=BETA, loss_type=k, gamma=GAMMA, **kw).to(
                case.device
            )
            out[name] = lambda x, c_opt=c_opt: c_opt(x, y)
    if k == "sigmoid":

        def bce(x):
            t = F.one_hot(y, case.c).to(x.dtype)
            s = w_in[y].unsqueeze(1)
            return F.binary_cross_entropy_with_logits(x, t, weight=s, reduction="sum") / case.n

        out["F.bce_with_logits(weight)"] = bce
    if k == "focal":
        import torchvision

        def tv(x):
            t = F.one_hot(y, case.c).to(x.dtype)
            per = torchvision.ops.sigmoid_focal_loss(x, t, alpha=-1, gamma=GAMMA).sum(1)
            return (per * w_in[y]).mean()

        out["torchvision focal x w"] = tv
    if k in ("softmax", "focal", "sigmoid"):
        try:
            from balanced_loss import Loss
        except ImportError:
            Loss = None
        if Loss is not None:
            bl_type = {"softmax": "cross_entropy", "focal": "focal_loss", "sigmoid": "binary_cross_entropy"}[
                k
            ]
            bl = Loss(
                loss_type=bl_type,
                beta=BETA,
                fl_gamma=GAMMA,
                samples_per_class=case.counts,
                class_balanced=True,
            )
            out["balanced-loss"] = lambda x: bl(x, y)
    return out


def dense_providers(case: Case, shape: tuple[int, ...], y: torch.Tensor) -> dict[str, Callable]:
    """Loss functions of dense logits x [N, C, H, W]: cbfused on x as it is, and what a user
    writes today: the 2-D losses after x.movedim(1, -1).reshape(-1, C) (a view of channels-last
    memory, a copy of NCHW), F.cross_entropy on x itself."""
    k, c = case.kernel, case.c
    flat = providers(case)  # the 2-D providers, on [N*H*W, C] rows (case.y is y flattened)
    crit = cbfused.ClassBalancedLoss(case.counts, beta=BETA, loss_type=k, gamma=GAMMA).to(case.device)
    acc = torch.float32 if case.dtype != torch.float64 else torch.float64
    w_acc = case.w64.to(acc)

    def rows(x):
        return x.movedim(1, -1).reshape(-1, c)

    def ref(x):
        return R.class_balanced_loss(x, y, w_acc, loss_type=k, gamma=GAMMA, compute_dtype=acc)

    # the same loss on the equivalent [N*H*W, C] input, contiguous and ready (a leaf of its own)
    x2 = torch.empty(case.n, c, dtype=case.dtype, device=case.device).normal_().requires_grad_()

    def equivalent_2d(x):
        x2.grad = None
        return flat["cbfused"](x2)

    out: dict[str, Callable] = {
        "cbfused": lambda x: crit(x, y),
        "cbfused 2-D (permute)": lambda x: flat["cbfused"](rows(x)),
        "cbfused 2-D [N*H*W, C] input": equivalent_2d,
        "reference": ref,
        "reference+compile": torch.compile(ref, dynamic=False),
    }
    if k == "softmax":
        w_in = case.w64.to(case.dtype)
        out["F.cross_entropy(weight)"] = lambda x: F.cross_entropy(x, y, weight=w_in)
    for name in ("torchvision focal x w", "F.bce_with_logits(weight)"):
        if name in flat:
            out[name + " (permute)"] = lambda x, f=flat[name]: f(rows(x))
    return out


def dense_cells(shape: tuple[int, ...], kernel: str, quick: bool, device: str, meta: dict) -> list[Row]:
    """One dense shape and loss, fwd+bwd: float32 and bfloat16, NCHW and NHWC interleaved."""
    n, c = shape[0], shape[1]
    positions = n * math.prod(shape[2:])
    g = torch.Generator().manual_seed(positions + c)
    y = torch.randint(0, c, (n, *shape[2:]), generator=g).to(device)
    base = (torch.randn(shape, generator=g) * 2).to(device)
    entries = {}
    for dtype in (torch.float32, torch.bfloat16):
        case, _ = make_case(kernel, 1, c, dtype, device)
        case = Case(kernel, positions, c, dtype, device, case.counts, case.w64, y.reshape(-1))
        for layout, fmt in DENSE_LAYOUTS.items():
            x0 = base.to(dtype).contiguous(memory_format=fmt)
            for name, fn in dense_providers(case, shape, y).items():
                entries[(dtype, layout, name)] = (case, x0, fn)
    rows, ref_med = [], {}
    results = run_cells(entries, "fwd+bwd", quick)
    for (dtype, layout, name), (times, _, _) in results.items():
        if name == "reference":
            ref_med[(dtype, layout)] = statistics.median(times)
    shape_s = "x".join(map(str, shape))
    for (dtype, layout, name), (times, peak, compile_s) in results.items():
        dname = str(dtype).replace("torch.", "")
        med = statistics.median(times)
        esize = torch.empty((), dtype=dtype).element_size()
        rows.append(
            timing_row(
                kernel,
                name,
                "fwd+bwd",
                dname,
                positions,
                c,
                times,
                speedup_vs_ref=ref_med[(dtype, layout)] / med,
                peak_extra_bytes=peak,
                peak_extra_x_nc=peak / (positions * c * esize),
                compile_s=compile_s,
                shape=shape_s,
                layout=layout,
                **meta,
            )
        )
        print(
            f"  {kernel:13s} {name:34s} {dname:8s} {shape_s} {layout} {med * 1e3:10.2f} ms"
            f"  peak {peak / (positions * c * esize):.2f} NxCxS"
            + (f"  compile {compile_s:.1f}s" if compile_s == compile_s else ""),
            flush=True,
        )
    return rows


def interleaved(
    steps: dict, device: str, min_reps: int, budget: float, rounds: int = 0, warmup: int = 2
) -> dict:
    """{key: step} -> {key: times}. ROUNDS rounds, each running every step for its share of
    the budget (after a warm-up in the first), so that a slow drift of this shared machine (a
    neighbour, the CPU clock, memory) lands on every step alike instead of on whichever ran
    during it: ratios between the steps are what the benchmark reports."""
    rounds = rounds or ROUNDS
    times: dict = {key: [] for key in steps}
    for r in range(rounds):
        for key, step in steps.items():
            times[key] += time_fn(
                step,
                device,
                -(-min_reps // rounds),
                budget / rounds,
                max_reps=max(1, 200 // rounds),
                warmup=warmup if r == 0 else 0,
            )
    return times


def run_cells(entries: dict, mode: str, quick: bool) -> dict:
    """{key: (case, x0, fn)} -> {key: (times, peak extra bytes (fwd+bwd only), compile
    seconds)}, the providers of a shape (float32 and bfloat16 together) timed interleaved."""
    steps, compile_s = {}, {}
    for key, (case, x0, fn) in entries.items():
        x = x0.detach().clone().requires_grad_(mode == "fwd+bwd")
        if mode == "fwd+bwd":

            def step(fn=fn, x=x):
                loss = fn(x)
                loss.backward()
                x.grad = None
        else:

            def step(fn=fn, x=x):
                with torch.no_grad():
                    fn(x)

        compile_s[key] = float("nan")
        if key[-1] == "reference+compile":
            if not any(k[-1] == "reference+compile" for k in steps):
                torch._dynamo.reset()  # once per cell: a reset would drop the other dtype's graph
            t = time.perf_counter()
            step()
            sync(case.device)
            compile_s[key] = time.perf_counter() - t
        steps[key] = step
    case = next(iter(entries.values()))[0]
    elems = case.n * case.c
    budget = (0.25 if quick else 1.0) if elems < 2_000_000 else (0.6 if quick else 2.0)
    times = interleaved(steps, case.device, 5 if quick else 15, budget)
    out = {}
    for key, step in steps.items():
        peak = peak_extra_bytes(step, case.device) if mode == "fwd+bwd" else float("nan")
        out[key] = (times[key], peak, compile_s[key])
    return out


def _linear_row(kernel: str, name: str, dname: str, nhc, times, peak: float, f0, meta: dict, **extra) -> Row:
    """A fused linear cell's Row: forward+backward times and the allocator's peak."""
    n, h, c = nhc
    return timing_row(
        kernel,
        name,
        "fwd+bwd",
        dname,
        n,
        c,
        times,
        peak_extra_bytes=peak,
        peak_extra_x_nc=peak / (n * c * f0.element_size()),
        H=h,
        **extra,
        **meta,
    )


def linear_cell(
    n: int, h: int, c: int, dtype: torch.dtype, device: str, quick: bool, meta: dict
) -> list[Row]:
    """Fused linear + CB focal loss vs nn.Linear followed by cbfused's loss (fwd+bwd)."""
    dname = str(dtype).replace("torch.", "")
    g = torch.Generator().manual_seed(n + c)
    f0 = torch.randn(n, h, generator=g).to(dtype).to(device)
    y = torch.randint(0, c, (n,), generator=g).to(device)
    counts = torch.randint(1, 1000, (c,), generator=g)
    fused = cbfused.ClassBalancedLinearLoss(h, counts, beta=BETA, loss_type="focal", gamma=GAMMA)
    fused = fused.to(device=device, dtype=dtype)
    crit = cbfused.ClassBalancedLoss(counts, beta=BETA, loss_type="focal", gamma=GAMMA).to(device)
    lin = fused.linear
    providers = {
        "cbfused linear (chunked)": lambda f: fused(f, y),
        "nn.Linear + cbfused": lambda f: crit(lin(f), y),
    }
    steps = {}
    for name, fn in providers.items():
        f = f0.detach().clone().requires_grad_()

        def step(fn=fn, f=f):
            fn(f).backward()
            f.grad = None
            lin.weight.grad = None
            lin.bias.grad = None

        steps[name] = step
    # one repetition per provider per round, interleaved
    times = interleaved(steps, device, 3 if quick else 5, 0.0, rounds=3 if quick else 5, warmup=1)
    rows = []
    for name, step in steps.items():
        peak = peak_extra_bytes(step, device)
        med = statistics.median(times[name])
        rows.append(_linear_row("linear+focal", name, dname, (n, h, c), times[name], peak, f0, meta))
        print(
            f"  linear+focal  {name:26s} fwd+bwd {dname:8s} {n}x{h}x{c} {med * 1e3:10.1f} ms  "
            f"peak {peak / 2**20:.0f} MiB",
            flush=True,
        )
    return rows


def linear_softmax_cell(
    n: int, h: int, c: int, dtype: torch.dtype, device: str, quick: bool, meta: dict
) -> list[Row]:
    """Fused linear + softmax cross-entropy with class weights (a weighted mean, the one
    semantics cbfused and torch share): cbfused against torch's F.linear_cross_entropy
    (chunked, default options and aspect_ratio:4) and the unfused F.linear +
    F.cross_entropy, fwd+bwd. Time interleaved in this process; memory twice: the
    profiler's allocator peak (here) and the peak resident set of a fresh process per
    provider (linear_memory.py; CPU only)."""
    import linear_memory

    from cbfused.linear import floor_bytes

    dname = str(dtype).replace("torch.", "")
    names = {
        "cbfused linear (chunked)": "cbfused softmax (weighted_mean)",
        "torch linear_cross_entropy (chunked)": "torch linear_cross_entropy (chunked)",
        "torch linear_cross_entropy (aspect_ratio:4)": "torch linear_cross_entropy (aspect_ratio:4)",
        "torch linear + cross_entropy": "torch linear + cross_entropy (unfused)",
    }
    fns = linear_memory.providers()
    f0, w0, b0, y, cw = (t.to(device) for t in linear_memory.make_inputs(n, h, c, dtype))
    f0, w0, b0 = (t.detach().requires_grad_() for t in (f0, w0, b0))
    steps = {}
    for name, key in names.items():

        def step(fn=fns[key]):
            fn(f0, w0, b0, y, cw).backward()
            f0.grad = w0.grad = b0.grad = None

        steps[name] = step
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's chunked path warns that it is a prototype
        times = interleaved(steps, device, 3 if quick else 5, 0.0, rounds=3 if quick else 5, warmup=1)
        floor = floor_bytes(n, h, c, dtype)
        rows = []
        for name, step in steps.items():
            peak = peak_extra_bytes(step, device)
            resident = linear_memory.measure(names[name], n, h, c, dname) if device == "cpu" else float("nan")
            rows.append(
                _linear_row(
                    "linear+softmax",
                    name,
                    dname,
                    (n, h, c),
                    times[name],
                    peak,
                    f0,
                    meta,
                    peak_resident_bytes=resident,
                    floor_bytes=floor,
                )
            )
            print(
                f"  linear+softmax {name:44s} {dname:8s} {n}x{h}x{c} "
                f"{statistics.median(times[name]) * 1e3:10.1f} ms  peak {peak / 2**20:.0f} MiB  "
                f"resident {resident / 2**20:.0f} MiB (floor {floor / 2**20:.0f})",
                flush=True,
            )
    return rows


def write_csv(rows: list[Row], path: str) -> None:
    fields = [f for f in Row.__dataclass_fields__ if f != "extra"]
    with open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=fields)
        wr.writeheader()
        for r in rows:
            d = asdict(r)
            d.pop("extra")
            wr.writerow(d)


def set_gamma(gamma: float) -> None:
    """The focal gamma every cell of this process uses (--gamma)."""
    global GAMMA
    GAMMA = gamma


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="the whole grid (slow)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--losses", default=",".join(LOSSES))
    ap.add_argument("--shapes", help="e.g. 128x10,1024x1000 (default: the grid's)")
    ap.add_argument(
        "--out",
        default=os.path.join(HERE, "results", "latest"),
        help="a directory, or a .csv path (the plot goes beside it); default: benchmarks/results/latest/",
    )
    ap.add_argument(
        "--runs",
        type=int,
        default=1,
        help="run the grid N times, each in a fresh process; the tables show the median ratio and its range",
    )
    ap.add_argument(
        "--publish",
        action="store_true",
        help="write benchmarks/results/<device>-<grid>.csv / .png and regenerate README's and docs/performance.md's tables",
    )
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--no-linear", action="store_true", help="skip the fused linear + loss cells")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense [N, C, H, W] cells")
    ap.add_argument("--dense-only", action="store_true", help="only the dense [N, C, H, W] cells")
    ap.add_argument(
        "--linear-only",
        action="store_true",
        help="only the fused linear + loss cells (with --full: both shapes)",
    )
    ap.add_argument("--system-malloc", action="store_true", help="measure with glibc malloc, not jemalloc")
    ap.add_argument("--thp", action="store_true", help="set THP_MEM_ALLOC_ENABLE=1 (PyTorch's huge pages)")
    ap.add_argument(
        "--gamma",
        type=float,
        default=GAMMA,
        help=f"the focal losses' gamma (default {GAMMA}; the published tables are at the default)",
    )
    ap.add_argument("--run-index", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error(f"--runs must be >= 1, got {args.runs}")
    if not (args.gamma >= 0 and math.isfinite(args.gamma)):
        ap.error(f"--gamma must be a finite number >= 0, got {args.gamma}")
    if args.publish and args.gamma != GAMMA:
        ap.error(f"--publish writes the tables at gamma = {GAMMA}; got --gamma {args.gamma}")
    set_gamma(args.gamma)
    grid = "full" if args.full else "quick"
    if args.publish:
        path = os.path.join(HERE, "results", f"{args.device}-{grid}.csv")
    elif args.out.endswith(".csv"):
        path = args.out
    else:
        path = os.path.join(args.out, f"{args.device}-{grid}.csv")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if args.runs > 1:
        return run_several(args, argv if argv is not None else sys.argv[1:], path)
    measure(args, path)
    return finish(args, path)


def run_several(args, argv: list[str], path: str) -> int:
    """The grid N times, each in a fresh process (its own allocator state, its own warm-up),
    into one CSV with a run column."""
    keep = []
    skip = False
    for a in argv:  # the child gets the grid's arguments, not --runs / --out / --publish
        if skip:
            skip = False
            continue
        if a in ("--runs", "--out"):
            skip = True
            continue
        if a.startswith(("--runs=", "--out=")) or a == "--publish":
            continue
        keep.append(a)
    parts = []
    for k in range(args.runs):
        part = f"{path[: -len('.csv')]}.run{k}.csv"
        print(f"\n=== run {k + 1} of {args.runs} ===", flush=True)
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            *keep,
            "--no-plot",
            "--out",
            part,
            "--run-index",
            str(k),
        ]
        subprocess.run(
            cmd, check=True, env={k2: v for k2, v in os.environ.items() if k2 != "CBFUSED_BENCH_ALLOCATOR"}
        )
        parts.append(part)
    with open(path, "w", newline="") as out:
        for i, part in enumerate(parts):
            with open(part) as f:
                lines = f.readlines()
            out.writelines(lines if i == 0 else lines[1:])
            os.remove(part)
    return finish(args, path)


def finish(args, path: str) -> int:
    rows = report.load(path)
    print(f"\nwrote {path} ({len(rows)} rows, {len(report.runs(rows))} run(s))\n")
    print(report.markdown_table(rows))
    print()
    print(report.linear_table(rows))
    print(report.linear_softmax_table(rows))
    if report.option_table(rows):
        print(report.option_table(rows))
    print()
    if report.dense_table(rows):
        print(report.dense_table(rows))
        print()
    print(report.targets_text(rows))
    if not args.no_plot:
        png = path[: -len(".csv")] + ".png"
        if report.plot(rows, png):
            print(f"\nplot: {png}")
    if args.publish:
        root = os.path.join(HERE, "..")
        report.update_docs(
            os.path.join(root, "README.md"), os.path.join(root, "docs", "performance.md"), path
        )
        print("updated README.md and docs/performance.md")
    return 0


def measure(args, path: str) -> None:

    device = args.device
    shapes = FULL_SHAPES if args.full else QUICK_SHAPES
    bf16_shapes = FULL_SHAPES if args.full else QUICK_BF16_SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
        bf16_shapes = [s for s in shapes if s in bf16_shapes]
    combos = [(s, torch.float32) for s in shapes] + [(s, torch.bfloat16) for s in bf16_shapes]
    if args.dense_only:
        combos, args.no_linear, args.no_dense = [], True, False
    if args.linear_only:
        combos, args.no_linear, args.no_dense = [], False, True
    losses = args.losses.split(",")
    meta = dict(
        thp=os.environ.get("THP_MEM_ALLOC_ENABLE", ""),
        allocator=os.environ.get("CBFUSED_BENCH_ALLOCATOR", "glibc malloc"),
        device=device,
        device_name=device_name(device),
        threads=torch.get_num_threads(),
        torch_version=torch.__version__,
        cbfused_version=cbfused.__version__,
        git_commit=git_commit(),
        cpu_capability=cbfused.BUILD_INFO["cpu_capability"],
        run=args.run_index,
        load_avg=" ".join(f"{v:.2f}" for v in os.getloadavg()),
    )
    print(
        f"cbfused benchmark ({'full' if args.full else 'quick'}) on {meta['device_name']}, {meta['threads']} threads, "
        f"allocator {meta['allocator']}, THP_MEM_ALLOC_ENABLE={meta['thp'] or 'unset'}, torch {torch.__version__}, "
        f"cbfused {cbfused.__version__} ({cbfused.BUILD_INFO}), commit {meta['git_commit']}, "
        f"load average {meta['load_avg']}",
        flush=True,
    )
    rows: list[Row] = []
    t_start = time.time()
    for n, c in dict.fromkeys(s for s, _ in combos):
        dtypes = [dt for s, dt in combos if s == (n, c)]
        # the floor: one sigmoid pass over the same logits (one read, one write, one exp)
        floor_steps = {}
        for dtype in dtypes:
            xf = torch.randn(n, c, device=device).to(dtype)
            buf = torch.empty_like(xf)
            floor_steps[dtype] = lambda xf=xf, buf=buf: torch.sigmoid(xf, out=buf)
        ft = interleaved(floor_steps, device, 10, 0.2 * len(dtypes))
        floor_s = {dtype: statistics.median(ft[dtype]) for dtype in dtypes}
        for dtype in dtypes:
            dname = str(dtype).replace("torch.", "")
            rows.append(
                timing_row("floor", "torch.sigmoid(out=)", "fwd", dname, n, c, ft[dtype], x_floor=1.0, **meta)
            )
        for kernel in losses:
            cases = {dtype: make_case(kernel, n, c, dtype, device) for dtype in dtypes}
            for mode in ("fwd+bwd", "fwd"):
                entries = {
                    (dtype, name): (case, x0, fn)
                    for dtype, (case, x0) in cases.items()
                    for name, fn in providers(case).items()
                    # compiled reference: fwd+bwd only (compile time dominates the grid)
                    if not (mode == "fwd" and name == "reference+compile")
                }
                ref_med = {}
                for (dtype, name), (times, peak, compile_s) in run_cells(
                    entries, mode, not args.full
                ).items():
                    dname = str(dtype).replace("torch.", "")
                    x0 = cases[dtype][1]
                    med = statistics.median(times)
                    if name == "reference":
                        ref_med[dtype] = med
                    rows.append(
                        timing_row(
                            kernel,
                            name,
                            mode,
                            dname,
                            n,
                            c,
                            times,
                            x_floor=med / floor_s[dtype],
                            speedup_vs_ref=(ref_med[dtype] / med) if dtype in ref_med else float("nan"),
                            peak_extra_bytes=peak,
                            peak_extra_x_nc=peak / (n * c * x0.element_size()),
                            compile_s=compile_s,
                            **meta,
                        )
                    )
                    print(
                        f"  {kernel:13s} {name:26s} {mode:7s} {dname:8s} {n:6d}x{c:<5d} {med * 1e3:10.3f} ms"
                        + (f"  peak {peak / (n * c * x0.element_size()):.2f} NxC" if peak == peak else "")
                        + (f"  compile {compile_s:.1f}s" if compile_s == compile_s else ""),
                        flush=True,
                    )
        write_csv(rows, path)  # after every shape: a run cut short keeps what it measured
        # this shape's rows as a table at once: the first results within minutes of the start
        shape_rows = [r for r in report.load(path) if (r["N"], r["C"]) == (n, c)]
        print(
            f"\n{n} x {c}, measured {time.time() - t_start:.0f} s into the run:\n"
            + report.markdown_table(shape_rows, modes=("fwd+bwd",))
            + "\n",
            flush=True,
        )
    if not args.no_dense:
        for shape in DENSE_SHAPES:
            for kernel in losses:
                rows += dense_cells(shape, kernel, not args.full, device, meta)
                write_csv(rows, path)
            print(
                f"\n{'x'.join(map(str, shape))}, measured {time.time() - t_start:.0f} s into the run:\n"
                + report.dense_table(
                    [r for r in report.load(path) if r.get("shape") == "x".join(map(str, shape))]
                )
                + "\n",
                flush=True,
            )
    if not args.no_linear:
        lin_shapes = FULL_LINEAR if args.full else QUICK_LINEAR
        for (n, h, c), dtype in itertools.product(lin_shapes, [torch.float32, torch.bfloat16]):
            rows += linear_cell(n, h, c, dtype, device, not args.full, meta)
            rows += linear_softmax_cell(n, h, c, dtype, device, not args.full, meta)
    write_csv(rows, path)
    print(f"measured in {time.time() - t_start:.0f} s", flush=True)


if __name__ == "__main__":
    reexec_with_allocator()
    sys.exit(main())
