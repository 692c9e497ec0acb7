"""diagnose: a Cognate-family model (default: the newest Quiet-STaR, else EvoMerge, else Cognate output in the
store) → state diagnostics D1-D4 and the go/no-go verdict → a report in the UI, the store and W&B."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from flows.parameters import described
from phases.cognate.gates import diagnosis_gates
from phases.config import PipelineConfig
from storage import ArtifactRef
from tasks.cognate import diagnose_model, go_no_go_markdown
from tasks.gates import close_phase
from tasks.runtime import latest_artifact, resolve_home, store

DIAGNOSABLE = ("quietstar-model", "evomerge-champion", "cognate-model")


@flow(name="diagnose", persist_result=True)
@described
def diagnose(config: PipelineConfig = PipelineConfig(), home: str | None = None, run_group: str | None = None,
             model: ArtifactRef | None = None) -> ArtifactRef:
    home = resolve_home(home)
    run_group = run_group or str(flow_run.id)
    model = model or latest_artifact(home, DIAGNOSABLE, "diagnose needs a Cognate-family model")
    st = store(home)
    name = f"{model.kind} {model.id[:12]}"
    ref = diagnose_model(name, config, model, home)
    create_markdown_artifact(key="diagnosis", markdown=go_no_go_markdown(home, {name: ref}),
                             description=f"state diagnostics D1-D4 and the go/no-go verdict of {name}")
    report = diagnosis_gates(st.manifest(ref)["metrics"], config.cognate, config.gates.mode)
    close_phase(report, config, run_group, home, {"diagnosis": st.manifest(ref)["metrics"]}, [ref],
                images={"diagnosis": str(st.file(ref, "diagnosis.png"))})
    return ref
