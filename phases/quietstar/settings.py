"""Phase 3 Quiet-STaR settings: a section of PipelineConfig, one block per step. Every field has a default
(the tiny preset's value) so a partial section validates against Prefect's parameter schema; SMALL holds
the small preset's overrides.

``bake`` and ``rl`` are the recipes of the baked and the reinforced model: each model's cache key is the
dump of its block, so a field added there is in the key by construction. ``data`` is read by the
reasoning-data task; ``eval`` and ``gates`` are read after training, so changing them never retrains."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from phases.common.config import MuonGrokfastConfig, Strict
from phases.quietstar.tokens import STRATEGIES

# data generation: five frontier models on OpenRouter (the planned count) and [prompt, completion] US$ per
# million tokens. Prices are configuration, not measurements: they were list prices when written and
# change; check openrouter.ai/models and keep them at or above the real figures.
OPENROUTER_PRICES: dict[str, tuple[float, float]] = {
    "openai/gpt-4o-mini": (0.15, 0.60),
    "anthropic/claude-3.5-haiku": (0.80, 4.00),
    "google/gemini-2.0-flash-001": (0.10, 0.40),
    "meta-llama/llama-3.3-70b-instruct": (0.60, 0.80),
    "deepseek/deepseek-chat": (0.60, 1.80),
}


class ReasoningData(Strict):
    """What ``phases/quietstar/reasoning_data/`` writes or buys, and how it talks to OpenRouter."""

    source: Literal["local", "openrouter"] = Field(
        default="local", description="local: thoughts written offline from the curriculum's problems; openrouter: "
        "frontier models (key: $OPENROUTER_API_KEY or the Prefect Secret block openrouter_key_block)")
    models: list[str] = Field(default_factory=lambda: list(OPENROUTER_PRICES), min_length=1,
                              description="OpenRouter model ids (openrouter source)")
    strategies: list[str] = Field(default_factory=lambda: list(STRATEGIES), min_length=1)
    examples_per_pair: int = Field(default=40, ge=1, description="per (model, strategy); local: per strategy")
    max_prompt_chars: int | None = Field(
        default=240, ge=20, description="skip longer curriculum problems: prompt + thinking must fit seq_len")
    budget_usd: float = Field(default=2.0, ge=0, description="hard cap on OpenRouter spend, over all reruns")
    accept_partial: bool = Field(
        default=False, description="at the cap, store what was bought (summary: complete=false) instead of failing")
    max_concurrency: int = Field(default=4, ge=1, description="requests in flight at once")
    timeout_s: float = Field(default=60.0, gt=0, description="per request")
    max_retries: int = Field(default=4, ge=0, description="on 429, 5xx and timeouts")
    backoff_s: float = Field(default=1.0, ge=0, description="first retry wait; doubles per retry, with jitter")
    backoff_max_s: float = Field(
        default=60.0, ge=0, description="longest wait; a longer Retry-After leaves the example for a rerun")
    max_tokens: int = Field(default=400, ge=16, description="completion limit per request; sets its worst case")
    temperature: float = Field(default=0.7, ge=0, le=2)
    prices: dict[str, tuple[float, float]] = Field(
        default_factory=lambda: dict(OPENROUTER_PRICES),
        description="model -> [prompt, completion] US$ per million tokens; keep them at or above OpenRouter's "
        "list prices: the cap is only as hard as these")
    openrouter_base_url: str | None = Field(
        default=None, description="empty: $OPENROUTER_BASE_URL, else https://openrouter.ai/api/v1")
    openrouter_key_block: str = Field(
        default="openrouter-api-key", description="Prefect Secret block read when $OPENROUTER_API_KEY is unset")

    @model_validator(mode="after")
    def _consistent(self) -> ReasoningData:
        unknown = sorted(set(self.strategies) - set(STRATEGIES))
        if unknown:
            raise ValueError(f"strategies: unknown {unknown}; known: {list(STRATEGIES)}")
        if len(set(self.strategies)) != len(self.strategies) or len(set(self.models)) != len(self.models):
            raise ValueError("strategies and models must not repeat an entry")
        unpriced = [m for m in self.models if m not in self.prices]
        if self.source == "openrouter" and unpriced:
            raise ValueError(f"prices has no price for {unpriced}: the budget cap needs one per model")
        return self


# Tiny defaults train a 1M-parameter model for a few dozen steps, so they use a larger step than the
# baking preset (lr 1e-4, Grokfast λ 0.2, KL 0), which SMALL sets.
class BakeOptim(MuonGrokfastConfig):
    # Tiny, 300 steps at 0.02: without replay (Baking.replay) the champion's held-out recall went from 98% to 0%;
    # with 70% of the rows replayed it keeps 72% and the structure is learned (gate set: structure-token accuracy
    # 0.94, 92% of greedy completions well-formed). At 0.002, 60 steps without replay kept 68% but learned no
    # structure (0.42, none well-formed)
    muon_lr: float = Field(default=0.02, gt=0, description="Muon (hidden matrices)")
    adam_lr: float = Field(default=3e-3, gt=0, description="AdamW (embeddings, norms, gains); baking preset: 1e-4")
    weight_decay: float = Field(default=0.0, ge=0)
    grokfast_lambda: float = Field(default=0.2, ge=0, description="baking preset: 0.2")


class Baking(Strict):
    """Prompt baking (phases/quietstar/baking.py): the recipe of the baked model."""

    max_steps: int = Field(default=300, ge=1, description="upper bound; baking stops once converged")
    batch_size: int = Field(default=8, ge=1)
    seq_len: int | None = Field(default=None, ge=16, description="empty: model.seq_len")
    eval_every: int = Field(default=50, ge=1, description="held-out structure check (and checkpoint) interval")
    target: float = Field(default=0.85, gt=0, le=1, description="convergence gate on held-out structure accuracy")
    heldout_fraction: float = Field(default=0.1, gt=0, lt=1, description="problems held out of baking")
    heldout_examples: int = Field(
        default=12, ge=1,
        description="held-out examples in each of two sets: one the stopping rule and the kept state read, one "
                    "the convergence gate reads")
    replay: float = Field(
        default=0.7, ge=0, lt=1,
        description="share of baking rows that are curriculum training problems, labelled on their answers: "
                    "what the input model could do is rehearsed while the structure is learned")
    embed_init_noise: float = Field(default=0.02, ge=0, description="new token rows: text-mean + this x embedding std")
    kl_weight: float = Field(default=0.0, ge=0, description="KL to the input model; baking preset: 0")
    optim: BakeOptim = Field(default_factory=BakeOptim)


class RLOptim(MuonGrokfastConfig):
    muon_lr: float = Field(default=0.002, gt=0, description="Muon part (hidden matrices)")
    adam_lr: float = Field(default=5e-4, gt=0, description="AdamW part; RL preset: 5e-4")
    weight_decay: float = Field(default=0.0, ge=0)
    grokfast_lambda: float = Field(default=0.1, ge=0, description="RL preset: 0.1")


class AntiTheater(Strict):
    """The checks that roll reinforcement back (and their thresholds, which the gates reuse): they decide
    which weights are kept, so they are part of the reinforced model's recipe."""

    check_every: int = Field(default=6, ge=1, description="anti-theater check interval (and at the end)")
    max_retries: int = Field(
        default=0, ge=0, description="rollbacks (KL doubled each) before the gate fails; tiny: 0 (a retry doubles RL time)")
    problems: int = Field(default=6, ge=1, description="held-out problems per anti-theater check")
    eval_thoughts: int = Field(default=4, ge=2, description="sampled thoughts per problem (correlation)")
    min_divergence: float = Field(default=0.30, description="anti-theater: mean TV(thought-mixed, direct) >")
    min_ablation: float = Field(default=0.02, description="anti-theater: accuracy with thoughts - without >")
    min_correlation: float = Field(default=0.5, description="anti-theater: corr(thought quality, correctness) >")


class Reinforcement(Strict):
    """Quiet-STaR reinforcement (phases/quietstar/{thoughts,mixing,reinforce}.py): the recipe of the
    reinforced model. Thought count x length come from the size-adaptive strategy (8x20 ... 4x10); the
    caps keep CPU runs short."""

    thought_count_cap: int | None = Field(default=2, ge=2, description="empty: the strategy's thought_count")
    thought_length_cap: int | None = Field(default=8, ge=1, description="empty: the strategy's thought_length")
    n_true: int = Field(default=4, ge=1, description="true tokens after a thought whose log-likelihood is the reward")
    reward_on: Literal["talk", "mixed"] = Field(
        default="talk", description=(
            "the log-likelihood the reward scores: 'talk', right after the thought before mixing (informative while "
            "the mixing weight is still 0), or 'mixed', after the mixing head"))
    positive_advantages: bool = Field(
        default=False, description=(
            "drop negative advantages, as the Quiet-STaR authors' code does (remove_negative_rewards): only "
            "thoughts better than their position's mean are reinforced"))
    steps: int = Field(default=6, ge=1)
    batch_size: int = Field(default=2, ge=1)
    seq_len: int = Field(default=32, ge=8, description="rows end right after a training problem's answer")
    mixing_lr: float = Field(default=1e-3, gt=0, description="AdamW for the mixing head")
    kl_weight: float = Field(default=0.1, ge=0, description="KL to the baked model, against drift; RL preset: 0.1")
    temperature: float = Field(default=1.0, gt=0, description="thought sampling temperature")
    optim: RLOptim = Field(default_factory=RLOptim)
    theater: AntiTheater = Field(default_factory=AntiTheater)


class QuietStarEvaluation(Strict):
    problems: int = Field(default=12, ge=1, description="curriculum test problems for the accuracy gate")
    max_new_tokens: int = Field(default=160, ge=1, description="room for a written thinking block + answer")


class QuietStarGates(Strict):
    min_accuracy_delta: float = Field(default=0.03, description="accuracy after RL - after baking (target: +3 points)")
    max_latency_ms_per_token: float = Field(default=200.0, gt=0, description="target: < 200 ms with thoughts")
    mode: Literal["strict", "lenient"] | None = Field(
        default=None, description="Quiet-STaR's gates; empty: the pipeline's gates.mode")


class QuietStarSection(Strict):
    data: ReasoningData = Field(default_factory=ReasoningData)
    bake: Baking = Field(default_factory=Baking)
    rl: Reinforcement = Field(default_factory=Reinforcement)
    eval: QuietStarEvaluation = Field(default_factory=QuietStarEvaluation)
    gates: QuietStarGates = Field(default_factory=QuietStarGates)


SMALL: dict[str, Any] = {
    # data generation: 5 models x 10 strategies x 500 (25,000 examples, estimated at ~$100-200)
    "data": {"examples_per_pair": 500, "max_prompt_chars": 1200, "budget_usd": 200.0, "max_tokens": 600},
    # baking: the supervised preset (lr 1e-4, Grokfast λ 0.2, KL 0) over the 25,000 examples
    "bake": {"max_steps": 3000, "batch_size": 16, "eval_every": 250, "heldout_examples": 64,
             "optim": {"adam_lr": 1e-4, "muon_lr": 0.002}},
    # reinforcement: the RL preset (lr 5e-4, Grokfast λ 0.1, KL 0.1 against drift), the strategy's thought count x length
    "rl": {"thought_count_cap": None, "thought_length_cap": None, "steps": 1000, "batch_size": 4, "seq_len": 128,
           "theater": {"check_every": 250, "max_retries": 3, "problems": 64}},
    "eval": {"problems": 300, "max_new_tokens": 256},
}
