"""Real DistributedDataParallel on 2 CPU processes (gloo) gives the same gradients as one
process on the whole batch.

The exact recipe (also in README): count the classes over the whole training set (each
rank counts its shard, then all_reduce_class_counts), use reduction="sum" and divide by
the GLOBAL denominator (all-reduced count of non-ignored samples), times the world size
because DDP averages gradients over ranks. A per-rank "mean" is exact only when every
rank has the same number of non-ignored samples."""

from __future__ import annotations

import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import cbfused

N, H, C = 48, 6, 5


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, H, generator=g)
    y = torch.randint(0, C, (N,), generator=g)
    y[::7] = -100  # uneven ignored samples across the two shards
    return x, y


def _model():
    torch.manual_seed(1)
    return torch.nn.Linear(H, C)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x, y = _data()
        shard = slice(0, 20) if rank == 0 else slice(20, N)  # unequal shards
        xs, ys = x[shard], y[shard]
        counts = cbfused.class_counts(ys, C).double()
        cbfused.all_reduce_class_counts(counts)
        model = torch.nn.parallel.DistributedDataParallel(_model())
        crit = cbfused.ClassBalancedLoss(counts, beta=0.99, loss_type="focal", gamma=0.5, reduction="sum")
        denom = torch.tensor(float((ys != -100).sum()))
        dist.all_reduce(denom)
        loss = crit(model(xs), ys) / denom * world
        loss.backward()
        torch.save(
            {"grad_w": model.module.weight.grad, "grad_b": model.module.bias.grad, "counts": counts},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
        # Both ranks done with every collective before either tears gloo down: destroying
        # the group while the peer is still in flight aborted a rank once in CI
        # ("terminate called without an active exception").
        del model
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_two_processes_match_one_process():
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(2, _free_port(), d), nprocs=2, join=True)
        r0 = torch.load(os.path.join(d, "rank0.pt"))
        r1 = torch.load(os.path.join(d, "rank1.pt"))
    x, y = _data()
    counts = cbfused.class_counts(y, C).double()
    torch.testing.assert_close(r0["counts"], counts)
    torch.testing.assert_close(r1["counts"], counts)
    model = _model()
    crit = cbfused.ClassBalancedLoss(counts, beta=0.99, loss_type="focal", gamma=0.5, reduction="mean")
    crit(model(x), y).backward()
    for r in (r0, r1):
        torch.testing.assert_close(r["grad_w"], model.weight.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(r["grad_b"], model.bias.grad, rtol=1e-5, atol=1e-7)
