"""agent-forge: the whole pipeline. prepare → cognate → evomerge → quietstar → bitnet → the forging report; each
phase takes the previous one's artifact refs, so a retried run re-enters and finished phases come back Cached."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from prefect import flow
from prefect.runtime import flow_run
from prefect.utilities.annotations import quote
from pydantic import BaseModel

from flows.bitnet import BitNet, bitnet
from flows.cognate import Cognate, cognate
from flows.evomerge import EvoMerge, evomerge
from flows.parameters import described
from flows.phase_result import handed_on
from flows.prepare import prepare
from flows.quietstar import QuietStar, quietstar
from phases.config import PipelineConfig
from storage import ArtifactRef
from tasks import scaling
from tasks.preflight import preflight
from tasks.report import forging_report
from tasks.runtime import resolve_home

T = TypeVar("T")


class Forged(BaseModel):
    cognate: Cognate
    evomerge: EvoMerge
    quietstar: QuietStar
    bitnet: BitNet
    report: ArtifactRef | None = None  # the forging report's stored table (tasks/report.py) ...
    report_text: str = ""  # ... and the whole report, gates and wall times included


@flow(name="agent-forge", persist_result=True, task_runner=scaling.task_runner())  # Ray starts once, here
@described
def full(config: PipelineConfig = PipelineConfig(), home: str | None = None) -> Forged:
    """The whole pipeline, every phase's gates, then the forging report."""
    home = resolve_home(home)
    run_group = str(flow_run.id)  # one W&B group per pipeline run; a retry keeps it
    # Checked here, in the top-level run, as well as in prepare: a Retry re-enters this body but takes a
    # finished prepare subflow as it was, and disk and memory must be checked again on every attempt.
    checked = preflight(config, home)
    prepared = handed_on(prepare(config, home, run_group, checked))
    seconds: dict[str, float] = {}

    def timed(name: str, run: Callable[[], T]) -> T:
        start = time.perf_counter()
        try:
            return handed_on(run())
        finally:
            seconds[name] = time.perf_counter() - start

    phase1 = timed("cognate", lambda: cognate(config, home, run_group, prepared))
    phase2 = timed("evomerge", lambda: evomerge(config, home, run_group, phase1.models, phase1.base, prepared))
    phase3 = timed("quietstar", lambda: quietstar(config, home, run_group, phase2.champion, prepared))
    phase4 = timed("bitnet", lambda: bitnet(config, home, run_group, phase3.model, prepared))
    forged = Forged(cognate=phase1, evomerge=phase2, quietstar=phase3, bitnet=phase4)
    stages = [*((f"cognate {name}", ref, False, False) for name, ref in phase1.models.items()),
              ("evomerge champion", phase2.champion, False, False), ("quietstar baked", phase3.baked, False, False),
              ("quietstar", phase3.model, False, False), ("quietstar + thoughts", phase3.model, False, True),
              ("bitnet ternary", phase4.packed, True, False)]
    phases = [{"name": name, "passed": getattr(forged, name).gates_passed, "failed": getattr(forged, name).failed_gates,
               "seconds": took, "link": getattr(forged, name).run_url} for name, took in seconds.items()]  # phase order
    # quoted: values read off the phases' results would be recorded as "flow_run" inputs (see handed_on)
    forged.report, forged.report_text = forging_report(config, quote(stages), prepared.curriculum, quote(phases),
                                                       run_group, home, prepared.hub_datasets)
    return forged
