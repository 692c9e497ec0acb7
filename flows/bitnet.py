"""bitnet: a model (default: the newest Quiet-STaR, else EvoMerge, else Cognate output in the store) → staged,
calibrated ternary quantization → fine-tuning when the drop asks for it → packed artifact → evaluation against the
input → exit gates → W&B."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.parameters import described
from flows.phase_result import PhaseResult, handed_on, verdict
from flows.prepare import Prepared, prepare
from phases.bitnet.gates import bitnet_gates
from phases.bitnet.steps import FIGURE
from phases.config import PipelineConfig
from storage import ArtifactRef
from tasks import showcase
from tasks.bitnet import evaluate, finetune, quantize
from tasks.gates import close_phase
from tasks.runtime import latest_artifact, resolve_home, store

# the pipeline's order: the latest phase's output is what BitNet compresses
INPUT_KINDS = ("quietstar-model", "evomerge-champion", "cognate-model")


class BitNet(PhaseResult):
    source: ArtifactRef  # the model that was quantized
    packed: ArtifactRef
    report: ArtifactRef


def latest_model(home: str) -> ArtifactRef:
    """The newest readable artifact of the first kind in INPUT_KINDS that the store holds."""
    return latest_artifact(home, INPUT_KINDS, "bitnet needs a model to quantize")


@flow(name="bitnet", persist_result=True)
@described
def bitnet(config: PipelineConfig = PipelineConfig(), home: str | None = None, run_group: str | None = None,
           model: ArtifactRef | None = None, prepared: Prepared | None = None) -> BitNet:
    home = resolve_home(home)
    run_group = run_group or str(flow_run.id)
    model = model or latest_model(home)
    get_run_logger().info("quantizing %s", model)
    if prepared is None:
        prepared = handed_on(prepare(config, home, run_group))

    staged = quantize(config, model, prepared.curriculum, prepared.tokenizer, home)
    packed = finetune(config, staged, model, prepared.curriculum, home)
    report_ref = evaluate(config, model, staged, packed, prepared.curriculum, home)
    showcase.bitnet_report(home, report_ref)

    st = store(home)
    report = st.manifest(report_ref)["metrics"]  # report.json and this run's timings
    gates = bitnet_gates(report, config.bitnet.gates, config.gate_mode("bitnet"))
    close_phase(gates, config, run_group, home,
                {"report": report, "quantize": st.manifest(staged)["metrics"], "finetune": st.manifest(packed)["metrics"]},
                [packed, report_ref], images={"bitnet/sparsity_accuracy": str(st.file(report_ref, FIGURE))})
    return BitNet(source=model, packed=packed, report=report_ref, **verdict(gates))
