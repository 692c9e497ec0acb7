"""W&B at phase boundaries: one run per phase, grouped by pipeline run.

Lineage lives in our store's manifests; W&B gets a copy for browsing (artifacts that reference the
store's files), never the source of truth: ``use_artifact`` does not work offline.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import INPUTS, TASK_SOURCE

from phases.common.gates import GateReport
from storage import ArtifactRef
from tasks.runtime import record_execution, store


def wandb_mode(configured: str) -> str:
    """WANDB_MODE in the environment wins over the config, so `WANDB_MODE=disabled` always works."""
    mode = os.environ.get("WANDB_MODE") or configured
    if mode in ("dryrun",):
        mode = "offline"
    if mode not in ("offline", "online", "disabled"):
        raise ValueError(f"WANDB_MODE={mode!r}: use offline, online or disabled")
    return mode


# The pipeline run (group) is not part of the key: the same outputs need not be logged twice.
# Keyed by what is logged, never by the run group: a retried parent must not log a finished phase twice.
@task(name="wandb-phase-boundary", cache_policy=INPUTS + TASK_SOURCE - "run_group", persist_result=True)
def log_phase_boundary(
    phase: str,
    run_group: str,
    home: str,
    mode: str,
    project: str,
    config: dict[str, Any],
    metrics: dict[str, Any],
    gates: GateReport,
    outputs: list[ArtifactRef],
    images: dict[str, str] | None = None,
) -> str | None:
    """Returns the W&B run directory, or None when W&B is disabled."""
    logger = get_run_logger()
    mode = wandb_mode(mode)
    if mode == "disabled":
        logger.info("W&B disabled: phase %s not logged", phase)
        return None
    record_execution(home, f"wandb:{phase}")
    import wandb  # imported here: it is slow, and a disabled run should not pay for it

    wandb_dir = Path(home) / "wandb"
    wandb_dir.mkdir(parents=True, exist_ok=True)
    for crashed in mark_crashed_runs(wandb_dir):
        logger.warning("W&B: a killed process left a partial run; marked crashed, not synced: %s", crashed)
    run = wandb.init(
        project=project,
        group=run_group,
        job_type=phase,
        name=f"{phase}-{run_group[:8]}",
        config=config,
        dir=str(wandb_dir),
        mode=mode,
        reinit="create_new",
        # no system-stats monitor: its own process (wandb-symon) outlived a SIGKILL of the run's process group
        settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
    )
    marker = _open_run(wandb_dir, Path(run.dir).parent)
    try:
        run.summary.update(_flatten(metrics))
        run.summary["gates/passed"] = gates.passed
        for g in gates.gates:
            run.summary[f"gates/{g.id}/measured"] = g.measured
            run.summary[f"gates/{g.id}/passed"] = g.passed
        for f in gates.facts:
            run.summary[f"facts/{f.id}"] = f.value
        rows = gates.rows()
        run.log({"gates": wandb.Table(columns=list(rows[0]) if rows else ["gate"], data=[list(r.values()) for r in rows])})
        for name, path in (images or {}).items():
            run.log({name: wandb.Image(path)})
        st = store(home)
        for ref in outputs:
            manifest = st.manifest(ref)
            art = wandb.Artifact(
                name=f"{ref.kind}-{ref.id}",
                type=ref.kind,
                metadata={"store_id": ref.id, "inputs": manifest["inputs"], "config": manifest["config"],
                          "metrics": _json_safe(manifest["metrics"]), "manifest_sha256": ref.manifest_sha256},
            )
            art.add_reference(Path(ref.path).as_uri(), checksum=True)
            run.log_artifact(art)
        run_dir = str(Path(run.dir).parent)
    finally:
        run.finish()
        marker.unlink()
    logger.info("W&B %s run for phase %s written to %s", mode, phase, run_dir)
    return run_dir


# A W&B run is open from init to finish. A SIGKILL in between leaves a partial offline run that nothing in
# that process can close, so each open run leaves a marker naming its directory and process, removed at finish.
_OPEN = "open-runs"
CRASHED_PREFIX = "crashed-"


def _open_run(wandb_dir: Path, run_dir: Path) -> Path:
    marker = wandb_dir / _OPEN / f"{os.getpid()}-{run_dir.name}.json"
    marker.parent.mkdir(exist_ok=True)
    marker.write_text(json.dumps({"pid": os.getpid(), "run_dir": str(run_dir)}))
    return marker


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def mark_crashed_runs(wandb_dir: Path) -> list[Path]:
    """Runs whose process died before finishing them: each directory is renamed ``crashed-<name>`` with a
    CRASHED.txt saying so, so `wandb sync .../offline-run-*` leaves them out. Returns the new directories."""
    marked = []
    for marker in sorted((wandb_dir / _OPEN).glob("*.json")):
        info = json.loads(marker.read_text())
        if _alive(info["pid"]):
            continue
        run_dir = Path(info["run_dir"])
        if run_dir.is_dir():
            crashed = run_dir.with_name(CRASHED_PREFIX + run_dir.name)
            run_dir.rename(crashed)
            (crashed / "CRASHED.txt").write_text(
                f"process {info['pid']} was killed before this W&B run finished; its records may be partial. "
                "The phase is logged again when its flow runs again.\n")
            marked.append(crashed)
        marker.unlink()
    return marked


def _json_safe(value: Any) -> Any:
    """Non-finite floats as strings ("inf", "nan"): W&B artifact metadata is strict JSON, and a diagnosis can
    measure an infinite ratio (a path with no gradient at all)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        else:
            out[key] = v
    return out
