"""Fused linear + class-balanced loss for large class counts: the N x C logits are never
materialised whole.

The batch is processed in chunks of rows. For each chunk: logits = features @ weight.T +
bias (one matmul into a chunk buffer reused for every chunk), the fused kernel computes the
chunk's loss and its logit-gradient in one pass (on the CPU the gradient is written over the
chunk's logits), and the gradients of features, weight and bias are accumulated with matmuls.
Only one chunk of logits exists at a time (and, on CUDA, one chunk of their gradient).

Use it where C is large (thousands of classes and up: iNaturalist, LVIS, product
catalogues), where the logits and their gradient dominate memory. With a few hundred
classes the logits are small and the plain path (nn.Linear + class_balanced_loss) is as
good and simpler.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import _ops
from .functional import resolve_class_alpha, resolve_offset, resolve_weights
from .longtail import class_prior
from .modules import apply_keeping_dtype
from .weights import CountsLike, check_beta, class_balanced_weights

__all__ = ["linear_class_balanced_loss", "ClassBalancedLinearLoss", "auto_chunk_rows"]

_SUM = _ops.REDUCTIONS["sum"]


def _cb_loss_op(*args):
    """The fused kernel each chunk calls (one place, so that a test can run the chunked path
    on the CUDA kernels' source in the CPU emulation). Its grad_scale output is ignored here:
    for 'sum' and 'none' every backend returns the gradient unscaled (grad_scale 1)."""
    return torch.ops.cbfused.cb_loss.default(*args)


# Devices whose chunks take cbfused::cb_loss_ (the gradient written over the chunk's
# logits: one chunk-sized buffer, not two). CUDA takes cb_loss, a new gradient buffer
# (the CUDA kernels do not take the gradient over their logits).
_IN_PLACE_DEVICES: tuple[str, ...] = ("cpu",)


def _chunk_op(f, weight, bias, target, class_weight, op: tuple, reduction: int, grad_mode: int, buf):
    """The fused kernel on one chunk's logits f @ weight.T + bias, computed into buf (the
    chunk buffer, reused for every chunk); op = (loss type, gamma, alpha, ignore_index,
    label_smoothing, weighting code, logit offset, margins, logit scale, per-class alpha).
    Returns (loss, gradient): with grad_mode on the CPU the gradient is buf itself."""
    logits = buf[: f.shape[0]]
    if bias is not None:
        torch.addmm(bias, f, weight.t(), out=logits)
    else:
        torch.mm(f, weight.t(), out=logits)
    lt, gamma, alpha, ignore_index, eps, wcode, offset, margins, scale, class_alpha = op
    opts = (eps, wcode, offset, margins, scale, class_alpha)
    if grad_mode and logits.device.type in _IN_PLACE_DEVICES:
        loss, _ = torch.ops.cbfused.cb_loss_.default(
            logits, target, class_weight, lt, gamma, alpha, reduction, ignore_index, *opts
        )
        return loss, logits
    loss, g, _ = _cb_loss_op(
        logits, target, class_weight, lt, gamma, alpha, reduction, ignore_index, grad_mode, *opts
    )
    return loss, g


def _chunk_buffer(features: torch.Tensor, c: int, rows: int) -> torch.Tensor:
    """One chunk's [rows, C] logits (and, on the CPU, its gradient), allocated once per pass:
    reused chunk after chunk, so that the allocator has no chunk-sized block to hold on to
    between chunks (glibc's heap kept 50-100 MiB of freed chunks at 4096 x 2048 x 8142)."""
    return features.new_empty((min(rows, features.shape[0]), c))


# Chunk size, for time: at least 8 MiB of logits (2^21 float32 / 2^22 bfloat16 elements)
# and at least _MIN_CHUNK_ROWS rows. Every chunk streams the C x H float32 grad_weight
# accumulator once (and, for bf16 on the CPU, a bf16 C x H product: torch has no bf16 x bf16
# -> fp32 matmul there), so a chunk needs enough rows to amortise it. For memory: the chunk
# buffer at most 1/_FLOOR_SHARE of the returned gradients (floor_bytes), so that the
# path's peak stays near that floor (docs/performance.md, fused linear + loss). Measured
# fwd+bwd, one interleaved run each (benchmarks/linear_memory.py's providers, 2 threads):
#   8192 x 1024 x 32000 float32: 256 rows 0.88x the unfused time, 384 rows 0.83x, 512 rows 0.81x
#   4096 x 2048 x 8142 float32: 256 rows 1.10x, 512 rows 1.01x, 1024 rows 1.00x
#   4096 x 2048 x 8142 bf16: 256 rows 1.02x, 512 rows 1.05x, 1024 rows 0.97x
_CHUNK_BYTES = 8 << 20
_PRODUCT_BLOCK_BYTES = 4 << 20
_MIN_CHUNK_ROWS = 512
_FLOOR_SHARE = 5
_MIN_MEMORY_ROWS = 64
# addmm with out_dtype (CUDA, torch >= 2.8): a bfloat16 / float16 product accumulated by
# cuBLAS straight into the float32 grad_weight. Without it, on an H100 the bf16 weight
# gradient of 4096 x 2048 x 8142 went through 64 class-block products and their bf16 ->
# fp32 adds (0.76 ms of elementwise work, 3.6 ms fwd+bwd against 1.7 ms unfused).
_ADDMM_OUT_DTYPE = "out_dtype" in "".join(
    str(s) for s in torch._C._jit_get_schemas_for_operator("aten::addmm")
)


def floor_bytes(n: int, h: int, c: int, dtype: torch.dtype = torch.float32) -> int:
    """The memory any linear + loss method has resident at the end of its backward: the
    returned gradients of features, weight and bias, and for float16 / bfloat16 the float32
    weight-gradient accumulator of an accurate method."""
    acc = c * h * 4 if dtype.itemsize < 4 else 0
    return (n * h + c * h + c) * dtype.itemsize + acc


def auto_chunk_rows(n: int, h: int, c: int, dtype: torch.dtype = torch.float32) -> int:
    """Rows per chunk: enough for 8 MiB of logits and at least 512 rows, but a chunk of
    logits at most a fifth of :func:`floor_bytes` (and at least 64 rows); never more than N.
    A multiple of 8 rows for the matmuls."""
    if n == 0:
        return 1
    elems = _CHUNK_BYTES // max(dtype.itemsize, 2)
    rows = max(_MIN_CHUNK_ROWS, elems // max(c, 1))
    rows = int(math.ceil(rows / 8) * 8)
    mem_rows = floor_bytes(n, h, c, dtype) // (_FLOOR_SHARE * max(c, 1) * dtype.itemsize) // 8 * 8
    rows = min(rows, max(_MIN_MEMORY_ROWS, mem_rows))
    return max(1, min(n, rows))


def _denominator(target, class_weight, reduction: str, ignore_index: int) -> torch.Tensor | None:
    """The mean's D over the whole batch, as a device tensor (no host sync); None for sum / none."""
    if reduction not in ("mean", "weighted_mean"):
        return None
    if target.is_floating_point():
        if reduction == "weighted_mean":
            return (target @ class_weight.to(target.dtype)).sum(dtype=torch.float64)
        return target.sum(dtype=torch.float64)
    valid = target != ignore_index
    if reduction == "mean":
        return valid.sum().to(torch.float64)
    y = torch.where(valid, target, torch.zeros_like(target)).long()
    w = class_weight.to(torch.float64)
    return (w[y] * valid).sum()


def _product_step(h: int, itemsize: int) -> int:
    """Classes per block product of _accumulate's reduced-precision path (about 4 MiB)."""
    return max(64, _PRODUCT_BLOCK_BYTES // (h * itemsize))


def _accumulates_directly(gw: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether grad_weight += g^T f runs as one matmul into gw for g and f of this dtype
    (the same dtype, or CUDA's addmm with out_dtype), rather than by block products."""
    return dtype == gw.dtype or (gw.is_cuda and _ADDMM_OUT_DTYPE)


def _product_buffer(gw: torch.Tensor | None, features: torch.Tensor) -> torch.Tensor | None:
    """The buffer of _accumulate's block products, allocated once per pass like the chunk
    buffer; None where the matmul accumulates straight into gw."""
    if gw is None or _accumulates_directly(gw, features.dtype):
        return None
    c, h = gw.shape
    return features.new_empty((min(c, _product_step(h, features.element_size())), h))


def _accumulate(
    gw: torch.Tensor | None,
    gb: torch.Tensor | None,
    g: torch.Tensor,
    f: torch.Tensor,
    prod_buf: torch.Tensor | None,
) -> None:
    """grad_weight += g^T f, grad_bias += sum_rows g, into float32 / float64 accumulators."""
    if gw is not None:
        if _accumulates_directly(gw, g.dtype):
            if g.dtype == gw.dtype:
                gw.addmm_(g.t(), f)  # no C x H temporary
            else:
                torch.addmm(gw, g.t(), f, out_dtype=gw.dtype, out=gw)  # float32 accumulation, no temporary
        else:
            # reduced precision: the matmul in the input dtype (CPU has no bf16 x bf16 -> fp32
            # addmm), added into the float32 accumulator by blocks of classes (prod_buf) so
            # that the product's temporary stays small (a whole C x H one in bf16 was a
            # quarter of the unfused path's memory at 4096 x 2048 x 8142). On the CPU by
            # cbfused::accumulate_, which widens as it adds: add_ would first copy the block
            # to float32.
            c = gw.shape[0]
            step = prod_buf.shape[0]
            cpu = gw.device.type == "cpu"
            for c0 in range(0, c, step):
                c1 = min(c, c0 + step)
                prod = torch.mm(g[:, c0:c1].t(), f, out=prod_buf[: c1 - c0])
                if cpu:
                    torch.ops.cbfused.accumulate_.default(gw[c0:c1], prod)
                else:
                    gw[c0:c1].add_(prod)
    if gb is not None:
        gb += g.sum(0, dtype=gb.dtype)


def _hand_over(ctx, go: torch.Tensor) -> list[torch.Tensor | None]:
    """The forward's finished gradients times grad_output, without a second copy of them.

    Unless the graph is kept for another backward, ctx lets go of the buffers and they are
    scaled in place (not at all when grad_output is exactly 1 on the CPU, where reading it
    needs no device sync), so autograd can take them as the .grad tensors. A copy here (and
    the one autograd makes of a buffer that ctx still holds) would double the gradients'
    memory at the end of the backward: the unfused path's own floor."""
    grads = ctx.grads
    # Under torch.compile the backward is traced ahead of time: take the functional path
    # (the graph task's retain_graph flag and grad_output's value are run-time facts).
    compiling = torch.compiler.is_compiling()
    keep = compiling or torch._C._autograd._get_current_graph_task_keep_graph()
    if not keep:
        ctx.grads = None
    if grads is None:
        raise RuntimeError(
            "cbfused: linear_class_balanced_loss: backward ran a second time on a graph that was "
            "not kept; call backward(retain_graph=True) the first time"
        )
    one = not compiling and go.device.type == "cpu" and go.numel() == 1 and go.item() == 1.0
    out = []
    for t in grads:
        if t is None or one:
            out.append(t)
        elif keep:
            out.append(t * go.to(t.dtype))
        else:
            out.append(t.mul_(go.to(t.dtype)))
    return out


class _LinearCBLoss(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        features,
        weight,
        bias,
        target,
        class_weight,
        op,
        reduction,
        rows,
    ):
        n, _h = features.shape
        c = weight.shape[0]
        need = ctx.needs_input_grad
        want_grad = any(need[:3])
        ctx.reduction = reduction
        ignore_index = op[3]
        d = _denominator(target, class_weight, reduction, ignore_index)
        inv = (
            None
            if d is None
            else torch.where(d != 0, 1.0 / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(d))
        )
        if reduction == "none":
            # the per-sample gradient needs grad_output: computed (chunk by chunk) in backward
            out = features.new_empty((n,))
            buf = _chunk_buffer(features, c, rows)
            for i in range(0, n, rows):
                j = min(n, i + rows)
                out[i:j] = _chunk_op(
                    features[i:j],
                    weight,
                    bias,
                    target[i:j],
                    class_weight,
                    op,
                    _ops.REDUCTIONS["none"],
                    0,
                    buf,
                )[0]
            del buf
            ctx.save_for_backward(features, weight, bias, target, class_weight)
            ctx.args = (op, rows)
            return out
        acc = torch.float64 if features.dtype == torch.float64 else torch.float32
        total = torch.zeros((), dtype=acc, device=features.device)
        gf = torch.empty_like(features) if want_grad and need[0] else None
        gw = (
            torch.zeros((c, features.shape[1]), dtype=acc, device=features.device)
            if want_grad and need[1]
            else None
        )
        gb = (
            torch.zeros((c,), dtype=acc, device=features.device)
            if want_grad and bias is not None and need[2]
            else None
        )
        grad_mode = 1 if (gf is not None or gw is not None or gb is not None) else 0
        buf, prod_buf = _chunk_buffer(features, c, rows), _product_buffer(gw, features)
        for i in range(0, n, rows):
            j = min(n, i + rows)
            f = features[i:j]
            loss, g = _chunk_op(f, weight, bias, target[i:j], class_weight, op, _SUM, grad_mode, buf)
            total += loss.to(acc)
            if grad_mode:
                if inv is not None:
                    g.mul_(inv.to(g.dtype))
                if gf is not None:
                    torch.mm(g, weight, out=gf[i:j])
                _accumulate(gw, gb, g, f, prod_buf)
            del g  # CUDA: the chunk's gradient, before the next chunk's
        del buf, prod_buf
        loss = total * inv if inv is not None else total
        # The gradients are finished here. They are kept on ctx (not save_for_backward: they
        # are neither inputs nor outputs) so that backward can hand the buffers themselves
        # to autograd; see _hand_over.
        ctx.grads = [
            gf,
            None if gw is None else gw.to(weight.dtype),
            None if gb is None else gb.to(bias.dtype),
        ]
        del gw, gb
        return loss.to(features.dtype)

    @staticmethod
    def backward(ctx, go):
        if torch.is_grad_enabled():
            raise RuntimeError("cbfused: linear_class_balanced_loss supports first derivatives only")
        if ctx.reduction != "none":
            return (*_hand_over(ctx, go), *[None] * 5)
        features, weight, bias, target, class_weight = ctx.saved_tensors
        op, rows = ctx.args
        need = ctx.needs_input_grad
        n = features.shape[0]
        acc = torch.float64 if features.dtype == torch.float64 else torch.float32
        gf = torch.empty_like(features) if need[0] else None
        gw = torch.zeros(weight.shape, dtype=acc, device=features.device) if need[1] else None
        gb = (
            torch.zeros(weight.shape[:1], dtype=acc, device=features.device)
            if bias is not None and need[2]
            else None
        )
        buf, prod_buf = _chunk_buffer(features, weight.shape[0], rows), _product_buffer(gw, features)
        for i in range(0, n, rows):
            j = min(n, i + rows)
            f = features[i:j]
            _, g = _chunk_op(f, weight, bias, target[i:j], class_weight, op, _ops.REDUCTIONS["none"], 1, buf)
            g.mul_(go[i:j].unsqueeze(1).to(g.dtype))
            if gf is not None:
                torch.mm(g, weight, out=gf[i:j])
            _accumulate(gw, gb, g, f, prod_buf)
        del buf, prod_buf
        grads = (gf, None if gw is None else gw.to(weight.dtype), None if gb is None else gb.to(bias.dtype))
        return (*grads, *[None] * 5)


def linear_class_balanced_loss(
    features: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    samples_per_class: CountsLike | None = None,
    weights: torch.Tensor | None = None,
    beta: float = 0.9999,
    loss_type: str = "focal",
    gamma: float = 1.0,
    alpha: float | torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    zero_count: str = "error",
    chunk_rows: int | None = None,
    label_smoothing: float = 0.0,
    weighting: str = "sample",
    logit_adjustment: float = 0.0,
    prior: torch.Tensor | None = None,
    margins: torch.Tensor | None = None,
    logit_scale: float = 1.0,
) -> torch.Tensor:
    """``class_balanced_loss(features @ weight.T + bias, target, ...)`` without materialising the
    [N, C] logits: see the module docstring. ``features`` [N, H], ``weight`` [C, H], ``bias``
    [C] or None; every other argument as in :func:`cbfused.class_balanced_loss`.
    ``chunk_rows`` overrides the automatic chunk size (:func:`auto_chunk_rows`)."""
    if features.dim() != 2 or weight.dim() != 2 or features.shape[1] != weight.shape[1]:
        raise ValueError(
            f"features must be [N, H] and weight [C, H] with the same H, got {list(features.shape)} and {list(weight.shape)}"
        )
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"bias must have shape [{weight.shape[0]}], got {list(bias.shape)}")
    if features.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise ValueError(
            f"features, weight and bias must share a dtype, got {features.dtype} and {weight.dtype}"
        )
    for t, name in ((weight, "weight"), (target, "target")):
        if t.device != features.device:
            raise ValueError(f"cbfused: {name} is on {t.device} but features are on {features.device}")
    c = weight.shape[0]
    cw = resolve_weights(features, samples_per_class, weights, beta, zero_count)
    if cw.shape != (c,):
        raise ValueError(f"class weights must have shape [{c}], got {list(cw.shape)}")
    alpha, class_alpha = _ops.split_alpha(alpha)
    o = _ops.loss_options(
        loss_type,
        gamma,
        alpha,
        reduction,
        ignore_index,
        label_smoothing,
        weighting,
        logit_adjustment,
        logit_scale,
    )
    _ops.check_target_options(target, ignore_index)
    _ops.check_margins(margins, o, target)
    offset = resolve_offset(features, samples_per_class, prior, o.logit_adjustment)
    if class_alpha is not None:
        class_alpha = resolve_class_alpha(features, class_alpha, loss_type)
    n = features.shape[0]
    rows = chunk_rows if chunk_rows is not None else auto_chunk_rows(n, features.shape[1], c, features.dtype)
    if rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {rows}")
    target = target.long() if not target.is_floating_point() else target
    return _LinearCBLoss.apply(
        features,
        weight,
        bias,
        target,
        cw,
        (
            o.code,
            o.gamma,
            o.alpha,
            o.ignore_index,
            o.label_smoothing,
            o.weighting_code,
            offset,
            margins,
            o.logit_scale,
            class_alpha,
        ),
        o.reduction,
        rows,
    )


class ClassBalancedLinearLoss(nn.Module):
    """The classifier (a Linear layer's ``weight`` [C, H] and ``bias`` [C]) and the
    class-balanced loss in one module, computed chunk by chunk without materialising the
    [N, C] logits. ``forward(features, target)`` returns the loss; ``logits(features)`` gives
    the classifier's output for inference.

    ``init="sigmoid_prior"`` (default for the sigmoid-based losses) sets the bias to the
    paper's prior -log(C - 1) and marks it for :func:`cbfused.param_groups_no_bias_decay`.
    """

    class_weight: torch.Tensor

    def __init__(
        self,
        in_features: int,
        samples_per_class: CountsLike,
        beta: float = 0.9999,
        loss_type: str = "focal",
        gamma: float = 1.0,
        alpha: float | torch.Tensor | None = None,
        reduction: str = "mean",
        ignore_index: int = -100,
        bias: bool = True,
        zero_count: str = "error",
        chunk_rows: int | None = None,
        device=None,
        dtype=None,
        label_smoothing: float = 0.0,
        weighting: str = "sample",
        logit_adjustment: float = 0.0,
        margins: torch.Tensor | None = None,
        logit_scale: float = 1.0,
    ) -> None:
        super().__init__()
        o = _ops.loss_options(
            loss_type,
            gamma,
            _ops.split_alpha(alpha)[0],
            reduction,
            ignore_index,
            label_smoothing,
            weighting,
            logit_adjustment,
            logit_scale,
        )
        cw = class_balanced_weights(samples_per_class, check_beta(beta), zero_count=zero_count)
        self.register_buffer("class_weight", cw)
        # adjusted logits: the class prior (for logit_adjustment) and LDAM's margins, float64
        self.register_buffer("prior", class_prior(samples_per_class) if o.logit_adjustment else None)
        self.register_buffer(
            "margins",
            None if margins is None else torch.as_tensor(margins, dtype=torch.float64).detach().clone(),
        )
        self.logit_adjustment, self.logit_scale = o.logit_adjustment, o.logit_scale
        self.linear = nn.Linear(in_features, cw.numel(), bias=bias, device=device, dtype=dtype)
        if bias and loss_type in _ops.BINARY_FAMILY and cw.numel() > 1:
            from .init import init_sigmoid_bias_

            init_sigmoid_bias_(self.linear)
        self.loss_type, self.gamma, self.alpha = loss_type, float(gamma), alpha
        self.reduction, self.ignore_index, self.chunk_rows = reduction, ignore_index, chunk_rows
        self.beta = beta
        self.label_smoothing, self.weighting = float(label_smoothing), weighting

    def _apply(self, fn, recurse=True):
        return apply_keeping_dtype(self, ("class_weight", "prior", "margins"), super()._apply, fn, recurse)

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.linear.bias

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features)

    def forward(self, features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return linear_class_balanced_loss(
            features,
            self.linear.weight,
            self.linear.bias,
            target,
            weights=self.class_weight,
            loss_type=self.loss_type,
            gamma=self.gamma,
            alpha=self.alpha,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            chunk_rows=self.chunk_rows,
            label_smoothing=self.label_smoothing,
            weighting=self.weighting,
            logit_adjustment=self.logit_adjustment,
            prior=self.prior,
            margins=self.margins,
            logit_scale=self.logit_scale,
        )

    def extra_repr(self) -> str:
        return f"loss_type={self.loss_type!r}, beta={self.beta}, gamma={self.gamma}, reduction={self.reduction!r}"
