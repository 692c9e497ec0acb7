"""cognate: prepare's data → the shared foundation → three specialists in parallel → held-out
evaluation and state diagnostics (go/no-go) → exit gates → W&B."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from flows.parameters import described
from flows.phase_result import PhaseResult, handed_on, verdict
from flows.prepare import Prepared, prepare
from phases.cognate.gates import cognate_gates
from phases.cognate.specialists import specialists
from phases.common.resources import pick_device, usable_cpus
from phases.config import PipelineConfig
from storage import ArtifactRef
from tasks import scaling, showcase
from tasks.cognate import diagnose_model, evaluate_cognate, go_no_go_markdown, train_foundation, train_specialist
from tasks.gates import close_phase
from tasks.runtime import resolve_home, store


class Cognate(PhaseResult):
    base: ArtifactRef
    models: dict[str, ArtifactRef]


@flow(name="cognate", persist_result=True, task_runner=scaling.task_runner())
@described
def cognate(config: PipelineConfig = PipelineConfig(), home: str | None = None, run_group: str | None = None,
            prepared: Prepared | None = None) -> Cognate:
    home = resolve_home(home)
    run_group = run_group or str(flow_run.id)
    if prepared is None:
        prepared = handed_on(prepare(config, home, run_group))
    batch_size = config.cognate.train.batch_size or prepared.strategy["batch_size"]

    hub = prepared.hub_datasets  # their training rows join each stage's mix (cognate.train.hub_share)
    base = train_foundation(config, prepared.curriculum, prepared.tokenizer, batch_size, home, hub)
    with scaling.claim(pick_device(config.preflight.device), usable_cpus() / len(specialists())):
        futures = {s.name: train_specialist.submit(s.name, config, base, prepared.curriculum, batch_size, home, hub)
                   for s in specialists()}
    models = {name: f.result() for name, f in futures.items()}
    for label, ref in {"base": base, **models}.items():
        showcase.loss_curve(home, f"cognate-{label}-loss", ref, f"Cognate {label}")
        showcase.finished(f"cognate-{label}-progress", f"Cognate {label}: training")
    evaluation = evaluate_cognate(config, models, prepared.curriculum, home)
    diagnoses = {}
    if config.cognate.diagnose.run:
        futures = {name: diagnose_model.submit(name, config, ref, home, len(models)) for name, ref in models.items()}
        diagnoses = {name: f.result() for name, f in futures.items()}
        create_markdown_artifact(key="cognate-go-no-go", markdown=go_no_go_markdown(home, diagnoses),
                                 description="Cognate: state diagnostics D1-D4 and the go/no-go verdict per model")

    st = store(home)
    training = {name: st.manifest(ref)["metrics"] for name, ref in models.items()}
    diagnosed = {name: st.manifest(ref)["metrics"] for name, ref in diagnoses.items()}
    report = cognate_gates(evaluation, training, config.cognate, config.gate_mode("cognate"), diagnosed)
    close_phase(report, config, run_group, home,
                {"evaluation": evaluation, "training": training, "base": st.manifest(base)["metrics"],
                 "diagnosis": diagnosed},
                [base, *models.values(), *diagnoses.values()],
                images={f"loss/{name}": str(st.file(ref, "loss.png")) for name, ref in {"base": base, **models}.items()}
                | {f"diagnosis/{name}": str(st.file(ref, "diagnosis.png")) for name, ref in diagnoses.items()})
    return Cognate(base=base, models=models, **verdict(report))
