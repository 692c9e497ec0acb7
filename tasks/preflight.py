"""Preflight: disk, VRAM/RAM and device, checked before any heavy work."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from phases.common import resources
from phases.common.sizing import GB
from phases.config import PipelineConfig
from tasks.runtime import record_execution


# Never cached: a retry must look at the disk and memory it will run on. Its strategy still feeds later
# tasks' recipes, so it depends only on the config and the machine's total memory, never on what
# happens to be free: the same config on the same machine always gets the same batch size.
@task(name="preflight", cache_policy=NO_CACHE)
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
