"""The configuration sections every phase shares: the model's shape, data, tokenizer, tracking,
preflight and gates. Each phase's own section lives in its package (``phases/<phase>/settings.py``);
``phases/config.py`` assembles them into PipelineConfig with the presets."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


def _no_defaults(schema: dict) -> None:
    """A section's fields carry no default in the JSON schema, so the Prefect run form shows them empty:
    the chosen preset fills what the user leaves out. A default there is the tiny preset's value, and the
    form would send it back as if typed, pinning a `small` run's section to tiny's numbers."""
    for prop in schema.get("properties", {}).values():
        prop.pop("default", None)


class Strict(BaseModel):
    """Every field has a default (the tiny preset's) so that the JSON schema Prefect validates
    parameters against accepts a partial section; the chosen preset fills what is left out."""

    # Unknown fields are errors, and so are inf and nan: a learning rate or a budget of inf is a typo.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, json_schema_extra=lambda schema, _cls: _no_defaults(schema))


class ModelShape(Strict):
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


class DataConfig(Strict):
    seed: int = 1234
    train_per_stage: int = Field(default=4000, ge=10, description="generated training examples per curriculum stage")
    eval_per_stage: int = Field(default=60, ge=5, description="validation and test examples per stage, each")
    hub_datasets: list[str] = Field(default_factory=list, description=(
        "registry names (phases/data/hub_registry.py) whose rows join the tokenizer, each Cognate stage's training "
        "mix (cognate.train.hub_share) and, where the dataset has a labelled held-out split, the forging report"))
    hub_max_examples: int = Field(default=2000, ge=1, description="training rows kept per downloaded dataset")
    hub_eval_examples: int = Field(default=200, ge=1, description="held-out rows kept per dataset with its own eval split")
    hub_mirror: str | None = Field(default=None, description=(
        "a directory of dataset repositories in the Hub's layout (<mirror>/openai/gsm8k: Parquet + README), read "
        "instead of the Hub"))
    hub_revisions: dict[str, str] = Field(default_factory=dict, description=(
        "a commit to read per dataset name, over the registry's revision"))
    offline_fallback: bool = Field(default=False, description=(
        "on a failed download, go on without that dataset (its task fails with the reason, the prepare gate table "
        "lists it); off, the failure stops the run"))


class TokenizerConfig(Strict):
    vocab_size: int = Field(default=1024, ge=300, description="byte-level BPE: 256 bytes + merges + special tokens")
    min_frequency: int = Field(default=2, ge=1)


class TrackingConfig(Strict):
    wandb_mode: Literal["offline", "online", "disabled"] = Field(
        default="offline", description="WANDB_MODE in the environment overrides this"
    )
    project: str = "agent-forge"


class PreflightConfig(Strict):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    disk_headroom_gb: float = Field(default=0.5, ge=0, description="free disk kept beyond the estimate")
    memory_headroom: float = Field(default=0.2, ge=0, lt=1, description="fraction of free memory left unused")


class ReportConfig(Strict):
    problems_per_skill: int = Field(default=50, ge=1, description=(
        "held-out test problems per skill that every stage's model answers in the forging report"))
    hub_problems: int = Field(default=100, ge=1, description=(
        "held-out problems per selected hub dataset with an eval split that every stage's model is scored on"))


class GateConfig(Strict):
    """The pipeline's gate mode. A phase's own ``gates.mode``, where set, wins for that phase (the one rule:
    ``PipelineConfig.gate_mode``); presets set only this one, so ``--set gates.mode=strict`` makes every
    phase strict. A lenient preset names the phases it lets through and why, phase by phase."""

    mode: Literal["strict", "lenient"] = Field(default="strict", description="strict gates fail the flow")
    reasons: dict[Literal["prepare", "cognate", "evomerge", "quietstar", "bitnet"], str] = Field(
        default_factory=dict, description=(
            "where set, lenient applies only to these phases, each with why its targets are out of reach (shown in "
            "its gate table's title); the others stay strict. Empty: lenient applies to every phase"))


class MuonGrokfastConfig(Strict):
    """The optimizer block every training step nests (``cognate.train.optim``, ``quietstar.bake.optim``, ...)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    muon_lr: float = Field(default=0.02, gt=0, description="Muon, for hidden 2-D weight matrices")
    adam_lr: float = Field(default=3e-4, gt=0, description="AdamW, for embeddings, head, norms, gains, biases")
    weight_decay: float = Field(default=0.01, ge=0)
    grokfast_alpha: float = Field(default=0.98, ge=0, lt=1, description="EMA decay of the gradient filter")
    grokfast_lambda: float = Field(default=2.0, ge=0, description="amplification of the slow gradient")
