"""What every task shares: the cache policy, the store, the producer record, the execution journal."""

from __future__ import annotations

import base64
import hashlib
import inspect
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.cache_policies import INPUTS, TASK_SOURCE, CacheKeyFnPolicy, CachePolicy
from prefect.exceptions import MissingContextError
from prefect.runtime import flow_run, task_run

from storage import ArtifactNotFound, ArtifactRef, ArtifactStore, Recipe
from tasks.code_version import code_version

JOURNAL = "executions.jsonl"


def _home_tag(home: str) -> str:
    return hashlib.sha256(resolve_home(home).encode()).hexdigest()[:12]


def recipe_cache(recipe: Callable[..., Recipe]) -> CachePolicy:
    """Prefect's cache key for a task that builds one store artifact: that artifact's recipe key (plus
    the store it lives in), computed by ``recipe`` from the task's own parameters. Prefect and the store
    then agree on what "the same work" is: new inputs, config or code give a new key in both, and a
    retried parent (new run ids) still gets finished work back Cached."""
    wanted = list(inspect.signature(recipe).parameters)

    def key(_context: Any, parameters: dict[str, Any]) -> str:
        r = recipe(**{name: parameters[name] for name in wanted if name in parameters})  # absent: its default
        st = store(parameters["home"])
        # Verify before reuse: Prefect's cached result is only a ref, so the files behind it are checked
        # here. A corrupt artifact goes to quarantine, which changes the key: Prefect misses, and the
        # task builds the recipe again instead of handing the damaged copy on.
        d = st.artifact_dir(r.kind, r.key)
        if d.exists():
            st.verified_or_quarantined(d)
        return f"{r.kind}-{r.key}-{_home_tag(parameters['home'])}-r{st.times_quarantined(r.kind, r.key)}"

    return CacheKeyFnPolicy(cache_key_fn=key)


def phase_cache(package: str) -> CachePolicy:
    """For a task whose result is not a store artifact (an evaluation, a measurement): its inputs, its
    own source, and the code version of ``package`` (what the result is computed by)."""
    return INPUTS + TASK_SOURCE + CacheKeyFnPolicy(cache_key_fn=lambda _c, _p: code_version(package))


def resolve_home(home: str | None) -> str:
    raw = home or os.environ.get("AGENT_FORGE_HOME") or "./.agent-forge"
    return str(Path(raw).expanduser().resolve())


def _log_repair(line: str) -> None:
    try:
        get_run_logger().warning(line)
    except MissingContextError:  # outside a flow or task run (a cache-key computation, the CLI)
        logging.getLogger("agent_forge").warning(line)


def store(home: str) -> ArtifactStore:
    """The store at ``home``; a corrupt artifact it meets is quarantined, logged in one line, rebuilt."""
    return ArtifactStore(home, on_repair=_log_repair)


def producer() -> dict[str, Any]:
    return {
        "flow_run_id": str(flow_run.id) if flow_run.id else None,
        "flow_run_name": flow_run.name,
        "flow": flow_run.flow_name,
        "task_run_id": str(task_run.id) if task_run.id else None,
        "task": task_run.task_name,
    }


def record_execution(home: str, task_name: str, artifact: Recipe | None = None) -> None:
    """Append one line per real execution of a task body: cached tasks never reach this, so the
    journal is how a user (and the resume tests) can see what actually ran, and which artifact it built."""
    path = Path(home) / JOURNAL
    path.parent.mkdir(parents=True, exist_ok=True)
    # host and pid: where it ran (another process, or another machine, under --task-runner ray)
    entry = {"task": task_name, "flow_run_id": str(flow_run.id), "at": time.time(), "host": socket.gethostname(),
             "pid": os.getpid()}
    if artifact is not None:
        entry["artifact"] = f"{artifact.kind}/{artifact.key}"
    line = json.dumps(entry)
    with open(path, "a") as f:
        f.write(line + "\n")


def read_journal(home: str) -> list[dict[str, Any]]:
    path = Path(home) / JOURNAL
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def create(home: str, recipe: Recipe, journal: str, build: Callable[[Path], dict | None]) -> ArtifactRef:
    """The artifact for ``recipe``: ``build(out)`` runs, journaled under ``journal``, only when it is not stored."""

    def journaled(out: Path) -> dict | None:
        record_execution(home, journal, recipe)
        return build(out)

    return store(home).get_or_create(recipe, journaled, producer())


def work_dir(home: str, recipe: Recipe) -> Path:
    """Where a task checkpoints while it builds ``recipe``: named by the recipe, so a retry resumes there."""
    return Path(home) / "work" / recipe.kind / recipe.key


def stored_with_checkpoints(home: str, recipe: Recipe, journal: str, run: Callable[[Path, Path], dict]) -> ArtifactRef:
    """The artifact for ``recipe``: ``run(workdir, out)`` runs only when it is not stored yet, checkpointing
    into ``work_dir``, which is removed once the artifact is whole."""
    work = work_dir(home, recipe)
    ref = create(home, recipe, journal, lambda out: run(work, out))
    shutil.rmtree(work, ignore_errors=True)  # checkpoints are only for resuming; the artifact is whole
    return ref


def run_link() -> str | None:
    """This flow run's page in the Prefect UI; None where no UI URL is configured (a local run's temporary
    server), where prefect would give a link that starts with "None"."""
    from prefect.settings import get_current_settings

    return flow_run.ui_url if get_current_settings().ui_url else None


def png_markdown(png: Path, alt: str) -> str:
    """An inline PNG for a Prefect markdown artifact (the UI cannot reach files in the store)."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()})"


def latest_artifact(home: str, kinds: tuple[str, ...], purpose: str) -> ArtifactRef:
    """The newest readable artifact of the first kind in ``kinds`` that the store holds."""
    st = store(home)
    for kind in kinds:
        found = [m for m in st.list(kind) if "error" not in m]
        if found:
            return st.ref(found[-1]["id"])
    raise ArtifactNotFound(f"{purpose} and the store at {home} has none of the kinds {', '.join(kinds)}: run "
                           "`agent-forge run cognate` first, or pass model=<ArtifactRef>")
