"""Phase 4 BitNet settings: a section of PipelineConfig. Every field has a default (the tiny preset's value) so a
partial section validates against Prefect's parameter schema; SMALL holds the small preset's overrides.

One block per step, each the whole of what that step reads, so a step's recipe is the dump of its blocks:
``quantize``, ``finetune``, ``evaluate``; ``heldout`` is the held-out cut every step makes, so every step's recipe
includes it; ``gates`` is read by the flow only, so changing a threshold never recomputes an artifact.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from phases.common.config import MuonGrokfastConfig, Strict


class BitNetHeldout(Strict):
    """The curriculum's held-out rows and problems (steps.Data) that all three steps measure on."""

    eval_rows: int = Field(default=8, ge=1, description="held-out rows for the staged checks and perplexity")
    problems_per_skill: int = Field(
        default=50, ge=1,
        description="held-out problems per skill: validation ones judge fine-tuning, test ones are reported")


class BitNetQuantize(Strict):
    group_drop_budget: float = Field(
        default=0.25, ge=0,
        description="a layer group whose quantization alone lowers held-out next-token accuracy by more than this "
                    "fraction (relative, vs the model before that group) is kept in FP16")
    calibration_rows: int = Field(default=4, ge=1, description="held-out rows the scale calibration sees")
    calibrate: bool = Field(default=True, description="fit each layer's output scale on calibration rows")
    # Gate targets, but quantization resolves them (an empty one from the size-adaptive strategy of the model it
    # measures) and records them with the staged artifact, where the report and the gates read them.
    compression_target: float | None = Field(default=None, gt=0, description="empty: the size-adaptive strategy's")
    sparsity_target: float | None = Field(default=None, ge=0, le=1, description="empty: the size-adaptive strategy's")


class FinetuneOptim(MuonGrokfastConfig):
    """Phase 4 has no optimiser numbers of its own; the one supervised fine-tuning preset (Phase 3 baking: lr 1e-4,
    λ 0.2) sets AdamW's rate and Grokfast's λ. Muon's rate is per orthogonalised update, not comparable with
    AdamW's, so it keeps the shared default."""

    adam_lr: float = Field(default=1e-4, gt=0, description="AdamW, for embeddings, head, norms, gains, biases")
    weight_decay: float = Field(default=0.0, ge=0)
    grokfast_lambda: float = Field(default=0.2, ge=0, description="amplification of the slow gradient")


class BitNetFinetune(Strict):
    """Quantization-aware fine-tuning: whether it runs, and how."""

    threshold: float = Field(
        default=0.02, ge=0,
        description="fine-tune when held-out skill accuracy or next-token accuracy after quantization dropped by "
                    "more than this fraction")
    objective: Literal["both", "answers", "text"] = Field(
        default="both",
        description="answers: the training split's problems, loss on their answer tokens (the skills); text: "
                    "packed curriculum text, loss on every token; both: the two in alternate steps")
    steps: int = Field(default=100, ge=0, description="0: never fine-tune")
    batch_size: int = Field(default=16, ge=1)
    grad_clip: float = Field(default=1.0, gt=0)
    eval_every: int = Field(default=25, ge=1,
                            description="held-out check during fine-tuning; the best state is kept")
    optim: FinetuneOptim = Field(default_factory=FinetuneOptim)


class BitNetEvaluate(Strict):
    speed_tokens: int = Field(default=8, ge=1, description="tokens decoded per timed generation")
    speed_repeats: int = Field(default=2, ge=1)


class BitNetGates(Strict):
    max_accuracy_drop: float = Field(default=0.10, ge=0, description="gate: relative drop in held-out accuracy")
    min_speedup: float = Field(default=2.0, gt=0, description="gate: packed vs FP32 decode tokens/s (target: 2x)")
    mode: Literal["strict", "lenient"] | None = Field(
        default=None, description="BitNet's gates; empty: the pipeline's gates.mode")


class BitNetSection(Strict):
    heldout: BitNetHeldout = Field(default_factory=BitNetHeldout)
    quantize: BitNetQuantize = Field(default_factory=BitNetQuantize)
    finetune: BitNetFinetune = Field(default_factory=BitNetFinetune)
    evaluate: BitNetEvaluate = Field(default_factory=BitNetEvaluate)
    gates: BitNetGates = Field(default_factory=BitNetGates)


SMALL: dict[str, Any] = {
    "heldout": {"eval_rows": 64, "problems_per_skill": 200},
    "quantize": {"calibration_rows": 32, "group_drop_budget": 0.10},
    "finetune": {"steps": 500, "batch_size": 16, "eval_every": 50},
    "evaluate": {"speed_tokens": 64, "speed_repeats": 3},
}
