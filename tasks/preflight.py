"""Preflight: disk, VRAM/RAM and device, checked before any heavy work."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from phases.common import resources
from phases.common.config import PipelineConfig
from phases.common.sizing import GB
from tasks.runtime import CACHED, record_execution


# Cached like the work it guards: its strategy (the batch size picked from free memory) feeds later
# tasks' inputs, so a retry must see the same answer or it would invalidate finished work. A new
# config or home checks again.
@task(name="preflight", cache_policy=CACHED, persist_result=True)
def preflight(config: PipelineConfig, home: str) -> dict[str, Any]:
    logger = get_run_logger()
    record_execution(home, "preflight")
    res = resources.probe(Path(home), config.preflight.device)
    needs = resources.check(config, Path(home), res)  # raises PreflightError with advice
    logger.info(
        "preflight ok on %s: disk need %.2f GB / free %.2f GB; %s need %.2f GB / free %.2f GB; "
        "~%s params, batch %d",
        res.device, needs.disk_bytes / GB, res.free_disk_bytes / GB, res.memory_kind,
        needs.memory_bytes / GB, res.free_memory_bytes / GB, f"{needs.params:,}", needs.batch_size,
    )
    return {"resources": res.as_dict(), "needs": {k: v for k, v in needs.__dict__.items() if k != "strategy"},
            "strategy": needs.strategy.as_dict()}
