"""Phase 4 BitNet settings: a section of PipelineConfig. Every field has a default (the tiny preset's value) so a
partial section validates against Prefect's parameter schema; SMALL holds the small preset's overrides.

Fine-tuning optimiser: Muon × Grokfast, with no numbers of its own for Phase 4; the one supervised fine-tuning
preset (Phase 3 baking: lr 1e-4, λ 0.2) sets AdamW's rate and Grokfast's λ here. Muon's rate is per
orthogonalised update, not comparable with AdamW's, so it has its own field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class BitNetSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # --- staged quantization
    group_drop_budget: float = Field(
        default=0.25, ge=0,
        description="a layer group whose quantization alone lowers held-out next-token accuracy by more than this "
                    "fraction (relative, vs the model before that group) is kept in FP16")
    eval_rows: int = Field(default=8, ge=1, description="held-out rows for the staged checks and perplexity")
    calibration_rows: int = Field(default=4, ge=1, description="held-out rows the scale calibration sees")
    calibrate: bool = Field(default=True, description="fit each layer's output scale on calibration rows")
    # --- quantization-aware fine-tuning
    finetune_threshold: float = Field(
        default=0.02, ge=0,
        description="fine-tune when held-out next-token accuracy after quantization dropped by more than this fraction")
    finetune_steps: int = Field(default=16, ge=0)
    batch_size: int = Field(default=4, ge=1)
    muon_lr: float = Field(default=0.02, gt=0)
    adam_lr: float = Field(default=1e-4, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    grokfast_alpha: float = Field(default=0.98, ge=0, lt=1)
    grokfast_lambda: float = Field(default=0.2, ge=0)
    grad_clip: float = Field(default=1.0, gt=0)
    eval_every: int = Field(default=4, ge=1, description="held-out check during fine-tuning; the best state is kept")
    # --- evaluation and gates
    accuracy_examples: int = Field(default=16, ge=1, description="held-out problems decoded before and after")
    speed_tokens: int = Field(default=8, ge=1, description="tokens decoded per timed generation")
    speed_repeats: int = Field(default=2, ge=1)
    max_accuracy_drop: float = Field(default=0.10, ge=0, description="gate: relative drop in held-out accuracy")
    min_speedup: float = Field(default=2.0, gt=0, description="gate: packed vs FP32 decode tokens/s (target: 2x)")
    compression_target: float | None = Field(default=None, gt=0, description="empty: the size-adaptive strategy's")
    sparsity_target: float | None = Field(default=None, ge=0, le=1, description="empty: the size-adaptive strategy's")
    # tiny: on CPU the packed model decodes slower than FP32 (PyTorch has no 2-bit kernels; unpacking costs more
    # than it saves at this size) and a 4-minute model answers no held-out problem, so its speed-up and task-accuracy
    # gates fail honestly; they are shown but do not stop the demo. The small preset uses the pipeline's mode.
    gate_mode: Literal["strict", "lenient"] | None = Field(
        default="lenient", description="BitNet's gates; empty: the pipeline's gates.mode")


SMALL: dict[str, Any] = {
    "eval_rows": 64, "calibration_rows": 32, "finetune_steps": 500, "batch_size": 16, "eval_every": 50,
    "accuracy_examples": 300, "speed_tokens": 64, "speed_repeats": 3, "group_drop_budget": 0.10, "gate_mode": None,
}
