"""agent-forge: the whole pipeline. prepare → cognate; EvoMerge, Quiet-STaR and BitNet join as they land."""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from flows.cognate import Cognate, cognate
from flows.prepare import prepare
from phases.common.config import PipelineConfig
from tasks.runtime import resolve_home


@flow(name="agent-forge", persist_result=True)
def full(config: PipelineConfig = PipelineConfig(), home: str | None = None) -> Cognate:
    home = resolve_home(home)
    run_group = str(flow_run.id)  # one W&B group per pipeline run; a retry keeps it
    prepared = prepare(config, home, run_group)
    return cognate(config, home, run_group, prepared)
