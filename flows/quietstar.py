"""quietstar: a model (default: the newest EvoMerge champion, else the newest Cognate model in the store)
→ reasoning data (local or OpenRouter) → prompt baking → Quiet-STaR reinforcement → held-out evaluation →
exit gates → W&B."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.parameters import described
from flows.phase_result import PhaseResult, handed_on, verdict
from flows.prepare import Prepared, prepare
from phases.config import PipelineConfig
from phases.quietstar.gates import quietstar_gates
from storage import ArtifactRef
from tasks import showcase
from tasks.gates import close_phase
from tasks.quietstar import bake, evaluate, reinforce
from tasks.quietstar_data import generate_reasoning_data
from tasks.runtime import latest_artifact, resolve_home, store

INPUT_KINDS = ("evomerge-champion", "cognate-model")  # the pipeline's order: the latest phase's output


class QuietStar(PhaseResult):
    input: ArtifactRef
    data: ArtifactRef
    baked: ArtifactRef
    model: ArtifactRef


def latest_model(home: str) -> ArtifactRef:
    return latest_artifact(home, INPUT_KINDS, "quietstar needs a model")


@flow(name="quietstar", persist_result=True)
@described
def quietstar(config: PipelineConfig = PipelineConfig(), home: str | None = None, run_group: str | None = None,
              model: ArtifactRef | None = None, prepared: Prepared | None = None) -> QuietStar:
    home = resolve_home(home)
    run_group = run_group or str(flow_run.id)
    model = model or latest_model(home)
    get_run_logger().info("Quiet-STaR on %s", model)
    if prepared is None:
        prepared = handed_on(prepare(config, home, run_group))

    data = generate_reasoning_data(config, prepared.curriculum, home)
    baked = bake(config, model, data, prepared.curriculum, home)
    reinforced = reinforce(config, baked, prepared.curriculum, home)
    evaluation = evaluate(config, baked, reinforced, prepared.curriculum, home)
    showcase.loss_curve(home, "quietstar-baking-loss", baked, "Quiet-STaR baking")
    showcase.loss_curve(home, "quietstar-reinforce-loss", reinforced, "Quiet-STaR reinforcement")

    st = store(home)
    baking, reinforcement = st.manifest(baked)["metrics"], st.manifest(reinforced)["metrics"]
    report = quietstar_gates(baking, reinforcement, evaluation, config.quietstar,
                             config.gate_mode("quietstar"))
    close_phase(report, config, run_group, home,
                {"data": st.manifest(data)["metrics"], "baking": baking, "reinforcement": reinforcement,
                 "evaluation": evaluation},
                [data, baked, reinforced],
                images={"loss/baking": str(st.file(baked, "loss.png")), "loss/reinforce": str(st.file(reinforced, "loss.png"))})
    return QuietStar(input=model, data=data, baked=baked, model=reinforced, **verdict(report))
