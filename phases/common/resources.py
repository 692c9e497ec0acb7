"""Preflight arithmetic: what a run needs, what the machine has, and advice when they disagree."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # phases/common sits below the phase packages that PipelineConfig assembles
    from phases.config import PipelineConfig
from phases.common.sizing import GB, MB, Recursion, Strategy, estimate_params, model_size, strategy_for


class PreflightError(RuntimeError):
    """Raised before heavy work starts, with what is needed, what is free and what to change."""


@dataclass(frozen=True)
class Resources:
    device: str
    free_disk_bytes: int
    free_memory_bytes: int
    memory_kind: str  # "VRAM" or "RAM"
    total_memory_bytes: int | None = None  # what the strategy is sized against; None: the free memory

    def as_dict(self) -> dict:
        return asdict(self)


def free_disk(path: Path) -> int:
    """Free bytes on the filesystem that holds ``path`` (or its nearest existing parent)."""
    p = Path(path).resolve()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def _meminfo(field: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def free_ram() -> int:
    return _meminfo("MemAvailable") or os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def total_ram() -> int:
    return _meminfo("MemTotal") or os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def return_freed_memory(threshold: int = MB) -> bool:
    """Make glibc give blocks of at least ``threshold`` bytes back to the OS when they are freed.

    Its default threshold rises (up to 32 MiB) each time a large block is freed, after which blocks of the
    size of Cognate's d×d memory states come from the heap, and the heap keeps what training frees: one
    small-preset step at batch 1 peaked at 2.85 GB of RSS with the default, 0.88 GB with 1 MiB fixed.
    Returns whether the setting took (False off glibc)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, threshold))  # -3: M_MMAP_THRESHOLD, which also stops the rise
    except (OSError, AttributeError):
        return False


def pick_device(preference: str) -> str:
    if preference == "cuda" and not torch.cuda.is_available():
        raise PreflightError("device 'cuda' was asked for but torch sees no CUDA GPU; set preflight.device to 'auto' or 'cpu'")
    if preference == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return preference


def probe(home: Path, preference: str) -> Resources:
    device = pick_device(preference)
    if device == "cuda":
        free, total = torch.cuda.mem_get_info()
        return Resources(device, free_disk(home), int(free), "VRAM", int(total))
    return Resources(device, free_disk(home), free_ram(), "RAM", total_ram())


@dataclass(frozen=True)
class Needs:
    params: int
    disk_bytes: int
    memory_bytes: int
    batch_size: int
    strategy: Strategy


# Checkpoints kept per model (the last 5, enough to roll back past a damaged one), models trained at once in Phase 1, and the
# EvoMerge population held on disk.
_CHECKPOINTS_KEPT, _PHASE1_MODELS, _POPULATION = 5, 3, 8


def estimate_needs(config: PipelineConfig, res: Resources) -> Needs:
    params = estimate_params(config.model, config.tokenizer.vocab_size)
    size = model_size(params)
    sized_against = res.total_memory_bytes if res.total_memory_bytes is not None else res.free_memory_bytes
    # Phase 1 trains the largest activation footprint: Cognate's recursion (the steps that keep a graph), at the
    # smallest memory chunk its schedule reaches.
    cog = config.cognate
    recursion = Recursion(steps=cog.graph_steps(), mem_chunk=cog.train.chunk_floor, vocab_size=config.tokenizer.vocab_size,
                          checkpointing=cog.train.activation_checkpointing)
    strategy = strategy_for(size, config.model, sized_against, config.preflight.memory_headroom, recursion)
    weights = params * 4
    # A checkpoint holds weights and two optimizer moments; finished models hold weights only.
    checkpoints = _PHASE1_MODELS * _CHECKPOINTS_KEPT * weights * 3
    models = (_PHASE1_MODELS + _POPULATION + 4) * weights
    per_example = 4 * config.model.seq_len  # generated text, generously
    data = 3 * (config.data.train_per_stage + 2 * config.data.eval_per_stage) * per_example * 2
    disk = int(checkpoints + models + data + config.preflight.disk_headroom_gb * GB)
    return Needs(params, disk, strategy.training_memory_bytes, strategy.batch_size, strategy)


def _fmt(n: float) -> str:
    return f"{n / GB:.2f} GB" if n >= 0.1 * GB else f"{n / MB:.1f} MB"


def check(config: PipelineConfig, home: Path, res: Resources) -> Needs:
    """Raise PreflightError naming the shortfall, or return the estimate that fits."""
    needs = estimate_needs(config, res)
    problems = []
    if needs.disk_bytes > res.free_disk_bytes:
        problems.append(
            f"disk at {home}: need {_fmt(needs.disk_bytes)}, free {_fmt(res.free_disk_bytes)}. "
            "Free space there, set AGENT_FORGE_HOME to a larger disk"
            + (", or lower preflight.disk_headroom_gb" if config.preset == "tiny"
               else ", lower preflight.disk_headroom_gb, or use a smaller preset (--preset tiny)")
        )
    usable = res.free_memory_bytes * (1 - config.preflight.memory_headroom)
    if needs.memory_bytes > usable:
        problems.append(
            f"{res.memory_kind} on {res.device}: training needs {_fmt(needs.memory_bytes)} at batch size "
            f"{needs.batch_size}, usable {_fmt(usable)} of {_fmt(res.free_memory_bytes)} free. "
            + ("Use " if config.preset == "tiny" else "Use a smaller preset (--preset tiny), ")
            + "a shorter model.seq_len or fewer model.n_layers, or free memory held by other processes"
        )
    if problems:
        raise PreflightError("preflight failed before any heavy work: " + " | ".join(problems))
    return needs


def usable_cpus() -> int:
    """Cores this process may run on (its affinity mask, which a container's CPU set narrows), not the
    machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

