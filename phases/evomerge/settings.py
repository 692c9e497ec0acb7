"""Phase 2 EvoMerge settings: a section of PipelineConfig. Every field has a default (the tiny preset's
value) so a partial section validates against Prefect's parameter schema; SMALL holds the small
preset's overrides."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class EvoMergeSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    generations: int = Field(default=50, ge=1, description="upper bound; early stopping usually ends sooner")
    patience: int = Field(default=5, ge=1, description="stop when the best fitness of this many generations ...")
    min_improvement: float = Field(default=0.001, ge=0, description="... rose by less than this")
    mutation_sigma: float = Field(default=0.15, gt=0, description="std of the Gaussian noise on merge parameters")
    reseed_below: float = Field(default=0.2, ge=0, le=1, description="re-seed the weakest when diversity falls below")
    reseed_count: int = Field(default=3, ge=1)
    eval_rows: int = Field(default=8, ge=1, description="held-out rows (seq_len tokens each) for perplexity")
    accuracy_problems: int = Field(default=24, ge=1, description="held-out problems scored for accuracy")
    probe_rows: int = Field(default=2, ge=1, description="rows whose predictions measure diversity")
    max_perplexity_increase: float | None = Field(
        default=0.05, ge=0, description="candidates whose held-out perplexity exceeds the worst input's by more "
        "than this fraction score 0; empty: no limit")
    min_fitness_ratio: float = Field(default=1.2, description="gate: champion / best input fitness (test split)")
    min_diversity: float = Field(default=0.3, description="gate: lowest population diversity over the run")
    gate_mode: Literal["strict", "lenient"] | None = Field(
        default=None, description="EvoMerge's gates; empty: the pipeline's gates.mode")


SMALL: dict[str, Any] = {"eval_rows": 64, "accuracy_problems": 200, "probe_rows": 4}
