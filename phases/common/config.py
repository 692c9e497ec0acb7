"""Pipeline configuration: pydantic models (so the Prefect UI renders a form) and presets.

A config names a preset; every field it leaves out comes from that preset, so ``{"preset": "small",
"data": {"seed": 7}}`` is the small preset with one change. Unknown fields are errors, not ignored.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from phases.bitnet import settings as bitnet_settings
from phases.bitnet.settings import BitNetSection
from phases.evomerge import settings as evomerge_settings
from phases.evomerge.settings import EvoMergeSection
from phases.quietstar import settings as quietstar_settings
from phases.quietstar.settings import QuietStarSection

PresetName = Literal["tiny", "small"]


class _Strict(BaseModel):
    """Every field has a default (the tiny preset's) so that the JSON schema Prefect validates
    parameters against accepts a partial section; the chosen preset fills what is left out."""

    model_config = ConfigDict(extra="forbid")


class ModelShape(_Strict):
    """The backbone's shape, known before any model exists, for sizing and preflight estimates."""

    n_layers: int = Field(default=2, ge=1)
    d_model: int = Field(default=192, ge=8)
    n_heads: int = Field(default=4, ge=1)
    seq_len: int = Field(default=128, ge=8)

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelShape:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        return self


class DataConfig(_Strict):
    seed: int = 1234
    train_per_stage: int = Field(default=4000, ge=10, description="generated training examples per curriculum stage")
    eval_per_stage: int = Field(default=60, ge=5, description="validation and test examples per stage, each")
    hub_datasets: list[str] = Field(
        default_factory=list, description="registry names to pre-download (needs the Hub), e.g. ['gsm8k']"
    )
    hub_max_examples: int = Field(default=2000, ge=1, description="rows kept per downloaded dataset")
    offline_fallback: bool = Field(
        default=True, description="on a failed download, warn and train on the built-in curriculum"
    )


class TokenizerConfig(_Strict):
    vocab_size: int = Field(default=1024, ge=300, description="byte-level BPE: 256 bytes + merges + special tokens")
    min_frequency: int = Field(default=2, ge=1)


class TrackingConfig(_Strict):
    wandb_mode: Literal["offline", "online", "disabled"] = Field(
        default="offline", description="WANDB_MODE in the environment overrides this"
    )
    project: str = "agent-forge"


class PreflightConfig(_Strict):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    disk_headroom_gb: float = Field(default=0.5, ge=0, description="free disk kept beyond the estimate")
    memory_headroom: float = Field(default=0.2, ge=0, lt=1, description="fraction of free memory left unused")


class GateConfig(_Strict):
    mode: Literal["strict", "lenient"] = Field(default="strict", description="strict gates fail the flow")


class CognateSection(_Strict):
    """Phase 1 training and gate targets. Shapes come from ``model``; these are the rest."""

    act_max_steps: int = Field(default=3, ge=1, description="TRM recursion bound T_max of the shared base")
    window_size: int = Field(default=64, ge=1, description="sliding attention window (tokens)")
    n_persistent: int = Field(default=8, ge=1, description="persistent memory tokens per layer")
    shard_length: int = Field(default=2048, ge=1, description="memory resets every this many tokens")
    chunk_start: int = Field(default=32, ge=1, description="C_start of the memory chunk-size schedule")
    foundation_steps: int = Field(default=120, ge=1, description="steps of the shared foundation stage")
    stage_steps: int = Field(default=50, ge=1, description="steps per later stage, per specialist")
    batch_size: int | None = Field(default=None, ge=1, description="empty: the size-adaptive strategy's")
    muon_lr: float = Field(default=0.02, gt=0)
    adam_lr: float = Field(default=3e-3, gt=0)
    weight_decay: float = Field(default=0.01, ge=0)
    grokfast_alpha: float = Field(default=0.98, ge=0, lt=1)
    grokfast_lambda: float = Field(default=0.3, ge=0)
    polarization_weight: float = Field(default=0.2, ge=0)
    eval_every: int = Field(default=20, ge=1, description="held-out check + checkpoint every this many steps")
    niah_every: int = Field(default=25, ge=1)
    eval_rows: int = Field(default=16, ge=1, description="held-out rows for the spike detector and PPL")
    accuracy_examples: int = Field(default=60, ge=1, description="held-out problems decoded per model")
    min_halting_spread: float = Field(default=2.0, description="diversity gate: max - min of mean halting steps")
    min_ltm_spread: float = Field(default=0.3, description="diversity gate: max - min of LTM usage")
    min_latency_spread_ms: float = Field(default=10.0, description="diversity gate: max - min latency")
    gate_mode: Literal["strict", "lenient"] | None = Field(
        default=None, description="Cognate's gates; empty: the pipeline's gates.mode")


class PipelineConfig(_Strict):
    preset: PresetName = Field(default="tiny", description="sections left empty come from this preset")
    seed: int = 0
    # Sections default to None in the schema so the Prefect UI form leaves them empty and the chosen
    # preset fills them; after validation they are always set.
    model: ModelShape | None = None
    data: DataConfig | None = None
    tokenizer: TokenizerConfig | None = None
    tracking: TrackingConfig | None = None
    preflight: PreflightConfig | None = None
    gates: GateConfig | None = None
    cognate: CognateSection | None = None
    evomerge: EvoMergeSection | None = None
    quietstar: QuietStarSection | None = None
    bitnet: BitNetSection | None = None

    @model_validator(mode="before")
    @classmethod
    def _fill_from_preset(cls, values: Any) -> Any:
        if isinstance(values, BaseModel):
            return values
        values = dict(values or {})
        name = values.get("preset", "tiny")
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return deep_merge(PRESETS[name], {k: v for k, v in values.items() if v is not None})

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> PipelineConfig:
        return cls.model_validate({"preset": name, **overrides})


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, BaseModel):
            v = v.model_dump()
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


# tiny: CPU, CI and the README demo. small: the seeds' shape (8 layers) for one ~6 GB GPU.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "preset": "tiny",
        "model": {"n_layers": 2, "d_model": 192, "n_heads": 4, "seq_len": 128},
        "data": {"train_per_stage": 4000, "eval_per_stage": 60},
        "tokenizer": {"vocab_size": 1024},
        "tracking": {}, "preflight": {}, "gates": {},
        # T_max 3 gives the specialists 4 / 3 / 1 recursion steps
        "cognate": {"act_max_steps": 3, "window_size": 64, "foundation_steps": 120, "stage_steps": 50,
                    "batch_size": 8, "min_halting_spread": 2.0,
                    # a 1M-parameter model after ~4 CPU-minutes cannot beat the majority baseline: its
                    # gates are shown (FAIL where they fail) but do not stop the demo
                    "gate_mode": "lenient"},
        # a 1M-parameter merge's fitness creeps up by < 0.5% per generation for dozens of generations
        # on perplexity noise-level gains; the tiny demo stops when 5 generations gain < 0.005
        "evomerge": {"min_improvement": 0.005, "gate_mode": "lenient"}, "quietstar": {}, "bitnet": {},
    },
    "small": {
        "preset": "small",
        "model": {"n_layers": 8, "d_model": 512, "n_heads": 8, "seq_len": 512},
        "data": {"train_per_stage": 20000, "eval_per_stage": 500},
        "tokenizer": {"vocab_size": 8192},
        "tracking": {}, "preflight": {}, "gates": {},
        "cognate": {"act_max_steps": 6, "window_size": 256, "foundation_steps": 3000, "stage_steps": 2000,
                    "eval_every": 100, "niah_every": 1000, "eval_rows": 64, "accuracy_examples": 300,
                    "adam_lr": 1e-3, "min_halting_spread": 2.0},
        "evomerge": evomerge_settings.SMALL, "quietstar": quietstar_settings.SMALL, "bitnet": bitnet_settings.SMALL,
    },
}
