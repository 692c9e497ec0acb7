"""agent-forge: the whole pipeline. prepare → cognate → evomerge → quietstar → bitnet; each phase takes
the previous one's artifact refs, so a retried run re-enters and finished phases come back Cached."""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run
from pydantic import BaseModel

from flows.bitnet import BitNet, bitnet
from flows.cognate import Cognate, cognate
from flows.evomerge import EvoMerge, evomerge
from flows.prepare import prepare
from flows.quietstar import QuietStar, quietstar
from phases.config import PipelineConfig
from tasks.preflight import preflight
from tasks.runtime import resolve_home


class Forged(BaseModel):
    cognate: Cognate
    evomerge: EvoMerge
    quietstar: QuietStar
    bitnet: BitNet


@flow(name="agent-forge", persist_result=True)
def full(config: PipelineConfig = PipelineConfig(), home: str | None = None) -> Forged:
    home = resolve_home(home)
    run_group = str(flow_run.id)  # one W&B group per pipeline run; a retry keeps it
    # Checked here, in the top-level run, as well as in prepare: a Retry re-enters this body but takes a
    # finished prepare subflow as it was, and disk and memory must be checked again on every attempt.
    checked = preflight(config, home)
    prepared = prepare(config, home, run_group, checked)
    phase1 = cognate(config, home, run_group, prepared)
    phase2 = evomerge(config, home, run_group, phase1.models, phase1.base, prepared)
    phase3 = quietstar(config, home, run_group, phase2.champion, prepared)
    phase4 = bitnet(config, home, run_group, phase3.model, prepared)
    return Forged(cognate=phase1, evomerge=phase2, quietstar=phase3, bitnet=phase4)
