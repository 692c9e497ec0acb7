"""Phase 2 EvoMerge settings: a section of PipelineConfig. Every field has a default (the tiny preset's
value) so a partial section validates against Prefect's parameter schema; TINY and SMALL hold the
presets' overrides.

Three blocks: ``search`` (what the genetic algorithm reads) and ``fitness`` (how a candidate is measured)
decide the champion, so both are in its recipe; ``gates`` is read after the search, so changing a
threshold never searches again."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from phases.common.config import Strict


class EvoMergeSearch(Strict):
    """The genetic algorithm (evolution.py). A later generation is ``elites`` kept, ``children_per_elite``
    mutants of each, and ``loser_groups`` children merged from groups of ``loser_group_size`` least fit."""

    generations: int = Field(default=50, ge=1, description="upper bound; early stopping usually ends sooner")
    patience: int = Field(default=5, ge=1, description="stop when the best fitness of this many generations ...")
    min_improvement: float = Field(default=0.001, ge=0, description="... rose by less than this")
    mutation_sigma: float = Field(default=0.15, gt=0, description="std of the Gaussian noise on merge parameters")
    reseed_below: float = Field(default=0.2, ge=0, le=1, description="re-seed the weakest when diversity falls below")
    reseed_count: int = Field(default=3, ge=1)
    elites: int = Field(default=2, ge=1, description="fittest recipes kept unchanged into the next generation")
    children_per_elite: int = Field(default=3, ge=0, description="Gaussian mutants of each elite")
    loser_groups: int = Field(default=2, ge=0, description="children merged from the least fit, one per group")
    loser_group_size: int = Field(default=3, ge=1, description="least-fit recipes merged into one child")


class EvoMergeFitness(Strict):
    eval_rows: int = Field(default=8, ge=1, description="held-out rows (seq_len tokens each) for perplexity")
    accuracy_problems: int = Field(default=20, ge=1, description="held-out problems per skill scored for accuracy")
    probe_rows: int = Field(default=2, ge=1, description="rows whose predictions measure diversity")
    max_perplexity_increase: float | None = Field(
        default=0.05, ge=0, description="candidates whose held-out perplexity exceeds the worst input's by more "
        "than this fraction score 0; empty: no limit")


class EvoMergeGates(Strict):
    min_fitness_ratio: float = Field(default=1.2, description="gate: champion / best input fitness (test split)")
    min_diversity: float = Field(default=0.3, description="gate: lowest population diversity over the run")
    max_gain_p: float = Field(default=0.05, gt=0, le=1, description=(
        "gate: the champion's accuracy gain over the most accurate input must be significant at this level"))
    mode: Literal["strict", "lenient"] | None = Field(
        default=None, description="EvoMerge's gates; empty: the pipeline's gates.mode")


class EvoMergeSection(Strict):
    search: EvoMergeSearch = Field(default_factory=EvoMergeSearch)
    fitness: EvoMergeFitness = Field(default_factory=EvoMergeFitness)
    gates: EvoMergeGates = Field(default_factory=EvoMergeGates)


TINY: dict[str, Any] = {
    # a 1M-parameter merge's fitness creeps up by < 0.5% per generation for dozens of generations
    # on perplexity noise-level gains; the tiny demo stops when 5 generations gain < 0.005
    "search": {"min_improvement": 0.005},
}
SMALL: dict[str, Any] = {"fitness": {"eval_rows": 64, "accuracy_problems": 100, "probe_rows": 4}}
