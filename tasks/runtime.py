"""What every task shares: the cache policy, the store, the producer record, the execution journal."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from prefect.cache_policies import INPUTS, TASK_SOURCE
from prefect.runtime import flow_run, task_run

from storage import ArtifactStore

# Keyed by inputs and the task's source, never by run id: a retried parent gives its subflows new run
# ids, and the finished work must still come back Cached (DESIGN.md, "Resume").
CACHED = INPUTS + TASK_SOURCE
JOURNAL = "executions.jsonl"


def resolve_home(home: str | None) -> str:
    raw = home or os.environ.get("AGENT_FORGE_HOME") or "./.agent-forge"
    return str(Path(raw).expanduser().resolve())


def store(home: str) -> ArtifactStore:
    return ArtifactStore(home)


def producer() -> dict[str, Any]:
    return {
        "flow_run_id": str(flow_run.id) if flow_run.id else None,
        "flow_run_name": flow_run.name,
        "flow": flow_run.flow_name,
        "task_run_id": str(task_run.id) if task_run.id else None,
        "task": task_run.task_name,
    }


def record_execution(home: str, task_name: str) -> None:
    """Append one line per real execution of a task body: cached tasks never reach this, so the
    journal is how a user (and the resume tests) can see what actually ran."""
    path = Path(home) / JOURNAL
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"task": task_name, "flow_run_id": str(flow_run.id), "at": time.time(), "pid": os.getpid()})
    with open(path, "a") as f:
        f.write(line + "\n")


def read_journal(home: str) -> list[dict[str, Any]]:
    path = Path(home) / JOURNAL
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
