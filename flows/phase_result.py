"""What every phase flow returns beside its artifacts: its gate verdict and where its run is shown."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel

from phases.common.gates import GateReport
from tasks.runtime import run_link


class PhaseResult(BaseModel):
    gates_passed: bool
    failed_gates: list[str] = []  # ids of the gates that failed (lenient runs go on past them)
    run_url: str | None = None  # this phase's run in the Prefect UI (None where no UI URL is configured)


M = TypeVar("M", bound=BaseModel)


def handed_on(result: M) -> M:
    """A subflow's result as the next task or subflow takes it: a copy. Prefect records an input that *is* a flow
    run's result as a "flow_run" task input, and the Prefect 3.8 UI's Task Runs tab cannot read those (it lists
    no task runs at all); a copy carries the same values and no such link. The flow run graph still shows the
    phases in order."""
    return result.model_copy(deep=True)


def verdict(report: GateReport) -> dict[str, Any]:
    """The PhaseResult fields of a phase that ended with ``report``, inside its flow run."""
    return {"gates_passed": report.passed, "failed_gates": [g.id for g in report.failed], "run_url": run_link()}
