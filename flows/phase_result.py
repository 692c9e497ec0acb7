"""What every phase flow returns beside its artifacts: its gate verdict and where its run is shown."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from phases.common.gates import GateReport
from tasks.runtime import run_link


class PhaseResult(BaseModel):
    gates_passed: bool
    failed_gates: list[str] = []  # ids of the gates that failed (lenient runs go on past them)
    run_url: str | None = None  # this phase's run in the Prefect UI (None where no UI URL is configured)


def verdict(report: GateReport) -> dict[str, Any]:
    """The PhaseResult fields of a phase that ended with ``report``, inside its flow run."""
    return {"gates_passed": report.passed, "failed_gates": [g.id for g in report.failed], "run_url": run_link()}
