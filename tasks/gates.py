"""Show a phase's gate table in the Prefect UI and the log, then apply strict/lenient."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from phases.common.gates import GateReport
from phases.config import PipelineConfig
from storage import ArtifactRef
from tasks.tracking import log_phase_boundary


def publish_gates(report: GateReport) -> None:
    """A table artifact under key `<phase>-gates`, so each run's gates sit in the UI side by side."""
    logger = get_run_logger()
    create_table_artifact(key=f"{report.phase}-gates", table=report.rows(), description=report.title())
    if report.facts:
        create_table_artifact(key=f"{report.phase}-facts", description=f"{report.phase}: reported, not gated",
                              table=[{"fact": f.id, "what": f.description, "value": "not measured" if f.value is None
                                      else f"{f.value:.6g}"} for f in report.facts])
    logger.info("%s:\n%s", report.title(), report.markdown())


def enforce_gates(report: GateReport) -> None:
    for warning in report.enforce():  # strict mode raises here
        get_run_logger().warning("lenient gate failed: %s", warning)


def publish_summary(key: str, markdown: str) -> None:
    create_markdown_artifact(key=key, markdown=markdown)


def close_phase(report: GateReport, config: PipelineConfig, run_group: str, home: str, metrics: dict[str, Any],
                outputs: list[ArtifactRef], images: dict[str, str] | None = None) -> None:
    """How every phase ends: its gate table in the UI and the log, one W&B run at the boundary (config,
    metrics, gates, outputs, images), then strict or lenient applied, so a strict failure comes after
    everything a user needs to see why."""
    if report.mode == "lenient" and config.gates.mode == "lenient":  # the pipeline's leniency, and its reason
        report.reason = config.gates.reasons.get(report.phase, "")
    publish_gates(report)
    log_phase_boundary(report.phase, run_group, home, config.tracking.wandb_mode, config.tracking.project,
                       config.model_dump(mode="json"), metrics, report, outputs, images=images)
    enforce_gates(report)
