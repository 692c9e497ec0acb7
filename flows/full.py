"""agent-forge: the whole pipeline. prepare → cognate → evomerge; Quiet-STaR and BitNet join as they land."""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from flows.cognate import cognate
from flows.evomerge import EvoMerge, evomerge
from flows.prepare import prepare
from phases.common.config import PipelineConfig
from tasks.runtime import resolve_home


@flow(name="agent-forge", persist_result=True)
def full(config: PipelineConfig = PipelineConfig(), home: str | None = None) -> EvoMerge:
    home = resolve_home(home)
    run_group = str(flow_run.id)  # one W&B group per pipeline run; a retry keeps it
    prepared = prepare(config, home, run_group)
    phase1 = cognate(config, home, run_group, prepared)
    return evomerge(config, home, run_group, phase1.models, phase1.base, prepared)
