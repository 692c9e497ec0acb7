"""Data-parallel training on one machine: N processes in one ``torch.distributed`` gloo group, each on its share
of every global batch, gradients averaged by an all-reduce before the optimizer steps. Every rank steps the same
optimizer on the same averaged gradients from the same weights, so the weights stay identical on every rank
without being broadcast; rank 0 alone writes (checkpoints, telemetry, the finished model) and reports progress,
and every rank reads what it wrote (a resume, a rollback). Ranks on GPUs would want NCCL, which is not wired here.

Why not ``DistributedDataParallel``: it buckets and overlaps the all-reduce with backward, which pays off for
large models on fast links; here the gain is the batch split, and an explicit all-reduce after backward keeps the
training loop's own clipping, rollback and Muon step unchanged between one process and N.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


@dataclass(frozen=True)
class Rank:
    """This process's place in the group. ``Rank()`` (the default) is a single process: every method is a no-op."""

    rank: int = 0
    size: int = 1

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def shard(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch (every ``size``-th, from ``rank``)."""
        if self.size == 1:
            return rows
        if len(rows) % self.size:
            raise ValueError(f"a global batch of {len(rows)} rows does not split over {self.size} ranks")
        return rows[self.rank::self.size]

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def sum(self, values: Sequence[float]) -> list[float]:
        """Each value summed over the ranks (float64, so the order of the sum is not in the result's bits)."""
        if self.size == 1:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def average_gradients(self, params: Sequence[torch.Tensor]) -> None:
        if self.size == 1:
            return
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])  # one all-reduce, not one per tensor
        dist.all_reduce(flat)
        flat.div_(self.size)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


SINGLE = Rank()  # one process, no group


def _rank_main(index: int, size: int, init_file: str, threads: int, result: str,
               fn: Callable[..., dict[str, Any]], args: tuple, progress: Any) -> None:
    from phases.common.workers import die_with_parent

    die_with_parent()  # a killed launcher takes its ranks with it: no orphan writes into a work directory
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=index, world_size=size)
    try:
        # rank 0 speaks for the group: every rank steps in lockstep, so its records are the run's
        out = fn(Rank(index, size), *args, on_progress=progress.put if progress is not None and index == 0 else None)
        if index == 0:
            Path(result).write_text(json.dumps(out))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _drain(queue: Any, on_progress: Callable[[dict[str, Any]], None] | None) -> None:
    while queue is not None and not queue.empty():
        on_progress(queue.get())


def launch(fn: Callable[..., dict[str, Any]], size: int, *args: Any, threads: int = 1,
           on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """``fn(rank, *args, on_progress=...)`` in ``size`` spawned processes joined in one gloo group; rank 0's result
    (JSON-able). Rank 0's progress records reach ``on_progress`` here, in this process, as the ranks train. A rank
    that fails fails the launch, with its traceback."""
    queue = mp.get_context("spawn").SimpleQueue() if on_progress is not None else None
    with tempfile.TemporaryDirectory(prefix="agent-forge-dp-") as tmp:
        result = os.path.join(tmp, "result.json")
        ranks = mp.spawn(_rank_main, args=(size, os.path.join(tmp, "rendezvous"), threads, result, fn, args, queue),
                         nprocs=size, join=False)
        while not ranks.join(timeout=0.5):
            _drain(queue, on_progress)
        _drain(queue, on_progress)
        return json.loads(Path(result).read_text())
