"""Phase 1 Cognate settings: a section of PipelineConfig. Every field has a default (the tiny preset's
value) so a partial section validates against Prefect's parameter schema; TINY and SMALL hold the
presets' overrides."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, PositiveFloat, PositiveInt

from phases.common.config import MuonGrokfastConfig, Strict

SpecialistName = Literal["reasoning", "memory", "speed"]


class CognateOptim(MuonGrokfastConfig):
    adam_lr: float = Field(default=3e-3, gt=0, description="AdamW, for embeddings, head, norms, gains, biases")
    grokfast_lambda: float = Field(default=0.3, ge=0, description="amplification of the slow gradient")


class CognateTraining(Strict):
    """What the trainer reads: steps, schedule, checks, rollback and the optimizer. All of it shapes the
    weights, so all of it is in the models' recipe."""

    foundation_steps: int = Field(default=120, ge=1, description="steps of the shared foundation stage")
    stage_steps: int = Field(default=55, ge=1, description=(
        "steps per later stage, per specialist, at the base's T_max: a specialist recursing less takes "
        "proportionally more (equal compute)"))
    batch_size: int | None = Field(default=None, ge=1, description="empty: the size-adaptive strategy's")
    data_parallel: int = Field(default=1, ge=1, description=(
        "processes the shared foundation trains across on this machine, each on its share of every batch (the "
        "batch size must divide by it); 1: one process"))
    rotate_regimes: bool = Field(default=True, description="foundation batches rotate through the specialists' runtime "
                                 "settings, so no specialist starts in a regime the base never trained in")
    foundation_act_steps: int | None = Field(default=None, ge=1, description=(
        "recursion bound T_max the foundation trains at; empty: the base's act_max_steps"))
    foundation_polarization: bool = Field(default=True, description=(
        "the foundation trains with the gate polarization loss too; off, the gates polarize in the specialists, "
        "on their own skills"))
    chunk_start: int = Field(default=32, ge=1, description="C_start of the memory chunk-size schedule")
    # Backward keeps three d×d matrices per memory write (W, S and the Q-K sum A), so a layer step's memory
    # grows as T/C. One layer step at d=512, T=512, one sequence, C = 32 / 16 / 8 / 4 / 2 / 1: 107 / 155 / 251 /
    # 443 / 827 / 1595 MiB kept for backward, and forward + backward take 1.4× / 1.7× / 2.5× / 11× / 36× as long
    # at 16 / 8 / 4 / 2 / 1 as at 32 (below 16 the per-write d×d work, not the tokens, sets the time).
    chunk_floor: int = Field(default=16, ge=1, description="the chunk-size schedule never goes below this")
    # TRM back-propagates through its last recursion only. It makes a tiny step 1.5x faster (bench/cognate.py:
    # 0.39x a Llama's tokens/s against 0.26x) and a small one 2.8x (0.14x against 0.05x), but it learns far less
    # per step: arithmetic alone, T_max 3, 300 steps: held-out loss 0.735 and 1.3% of the test, against 0.054 and
    # 33.3% with every step back-propagating (in 110 s against 185 s). So training keeps the full gradient.
    grad_steps: int = Field(default=0, ge=0, description=(
        "recursion steps, counted from the last, that back-propagate in training (the earlier ones run without "
        "a graph: TRM's one-step gradient); 0: all of them"))
    activation_checkpointing: bool = Field(
        default=True, description="recompute each (recursion step, layer) in backward: one layer step's memory, not T_max·L")
    eval_every: int = Field(default=20, ge=1, description="held-out check + checkpoint every this many steps")
    niah_every: int = Field(default=25, ge=1)
    eval_rows: int = Field(default=16, ge=1, description="held-out rows for the spike detector and PPL")
    polarization_weight: float = Field(default=0.2, ge=0, description="gate polarization loss, reached at half the steps")
    keep_last: int = Field(default=5, ge=2, description="checkpoints kept; rollback goes to the second-most-recent")
    max_rollbacks: int = Field(default=3, ge=0, description="a rollback past this many fails the training clearly")
    spike_threshold: float = Field(default=0.05, gt=0, description="held-out perplexity jump (fraction) that rolls back")
    # the gate starts at 0.95 (CognateConfig.gate_init): at 0.02 the tiny speed specialist's mean gate came
    # within one step of a false alarm (0.981); "shut" is beyond the polarization poles, 0.1 and 0.99
    gate_collapse_limit: float = Field(default=0.01, gt=0, lt=0.5, description="mean gate this close to 0 or 1 ...")
    gate_collapse_patience: int = Field(default=20, ge=1, description="... for this many steps in a row fails fast")
    # A constant learning rate leaves the tiny model's arithmetic in the noise: arithmetic alone, T_max 1, 600
    # steps: 11.5% of the test at a constant rate, 74.5% with the rate falling linearly over the last 80%
    lr_decay_fraction: float = Field(default=0.8, ge=0, le=1, description=(
        "the learning rate falls linearly over this last share of a model's steps (a specialist's: both its "
        "stages together); 0: constant"))
    lr_floor: float = Field(default=0.05, ge=0, le=1, description="the decay ends at this share of the learning rate")
    compute_shares: dict[SpecialistName, PositiveFloat] = Field(default_factory=dict, description=(
        "a specialist's share of training compute against the others' 1, by name, in place of its own (speed "
        "1.5, the others 1)"))
    hub_share: float = Field(default=0.25, ge=0, lt=1, description=(
        "share of each stage's training examples drawn from the selected hub datasets of that stage and the "
        "stages below it (data.hub_datasets); with none selected, every example is the curriculum's"))
    optim: CognateOptim = Field(default_factory=CognateOptim)


class CognateEvaluation(Strict):
    accuracy_per_skill: int = Field(default=200, ge=1, description="held-out test problems decoded per skill and model")
    heldout_rows: int = Field(default=64, ge=1, description="packed test rows for held-out loss, halting, LTM usage")
    memory_ablation: bool = Field(default=True, description="decode the recall problems again with the memory read zeroed")


class CognateDiagnostics(Strict):
    """The state diagnostics (phases/cognate/diagnostics.py) run on each trained model; read after training."""

    run: bool = Field(default=True, description="diagnose every specialist at the end of the phase")
    shards: int = Field(default=3, ge=1, description="D1/D2: the traced sequence spans this many memory shards ...")
    max_tokens: int = Field(default=8192, ge=64, description="... up to this many tokens")
    inputs: int = Field(default=4, ge=2, description="D1/D2: sequences traced side by side (D2 compares their states)")
    span: int = Field(default=64, ge=1, description="D1: tokens per cached forward call, the trace's resolution")
    early_tokens: int = Field(default=256, ge=1, description="D1: the state norm growth is measured against this point")
    coupling_tokens: int = Field(default=256, ge=2, description="D3: tokens per input in the gradient-coupling pass")
    trials: int = Field(default=48, ge=8, description="D4: problems per distance")
    beyond: list[int] = Field(default=[32, 128, 256], min_length=1, description=(
        "D4: distances beyond the attention window (two more sit inside it: half and seven eighths of the window)"))
    seed: int = Field(default=1234, description="seeds the probe sequences and D4's codes")


class CognateGates(Strict):
    # above what the runtime settings alone give: the tiny base's own weights under the three specialists'
    # settings disagree on 0.12 of positions; the three trained specialists on 0.67
    min_disagreement: float = Field(default=0.3, description=(
        "diversity gate: mean share of held-out positions where two models' greedy next tokens differ"))
    min_arithmetic: float = Field(default=0.9, description="best model's held-out arithmetic accuracy")
    min_recall: float = Field(default=0.6, description="best model's held-out recall accuracy (codes beyond the window)")
    min_memory_drop: float = Field(default=0.3, description="that model's recall drop with its memory read zeroed")
    min_skill_margin: float = Field(default=0.1, description="a model is a skill's specialist when it leads every other by this")
    mode: Literal["strict", "lenient"] | None = Field(
        default=None, description="Cognate's gates; empty: the pipeline's gates.mode")


class CognateSection(Strict):
    """Phase 1. Shapes come from ``model``; the architecture's other settings are here, then one block
    per step: ``train`` (the recipe of every Cognate model), ``eval`` and ``gates`` (read after training,
    so changing them never retrains)."""

    act_max_steps: int = Field(default=3, ge=1, description="TRM recursion bound T_max of the shared base")
    window_size: int = Field(default=64, ge=1, description="sliding attention window (tokens)")
    n_persistent: int = Field(default=8, ge=1, description="persistent memory tokens per layer")
    shard_length: int = Field(default=2048, ge=1, description="memory resets every this many tokens")
    specialist_act_steps: dict[SpecialistName, PositiveInt] = Field(default_factory=dict, description=(
        "a specialist's recursion bound T_max, by name, in place of its multiple of act_max_steps"))
    train: CognateTraining = Field(default_factory=CognateTraining)
    eval: CognateEvaluation = Field(default_factory=CognateEvaluation)
    diagnose: CognateDiagnostics = Field(default_factory=CognateDiagnostics)
    gates: CognateGates = Field(default_factory=CognateGates)

    def graph_steps(self) -> int:
        """Recursion steps that keep a graph for backward in training, at the base's T_max."""
        return min(self.act_max_steps, self.train.grad_steps or self.act_max_steps)


# T_max 3 gives the specialists 4 / 1 / 1 recursion steps (reasoning / memory / speed); tiny sets reasoning's to 1
TINY: dict[str, Any] = {
    "act_max_steps": 3, "window_size": 64,
    # a 1.2M-parameter model trains in ~120 MB: recomputing layer steps would cost 1.4x the step time for
    # memory it does not need. spike_threshold: the 16-row held-out batch of a specialist narrowing onto its
    # own skills (the memory one under a 16-token window) moves by more than 5% in its first 20 steps
    # without diverging
    # polarization_weight: at 0.2 the gate polarization loss halved how fast the tiny shape learned
    # arithmetic (20% exact after 350 steps against 50% at 0.05, T_max 1, 2-digit problems). stage_steps: the
    # 5-minute Cognate budget on 2 cores with the specialists in their own processes: at 60 the phase took 286 s
    # and 316 s in two fresh clones (and the whole tiny run 530 s and 583 s), too close to both limits
    # The foundation: one recursion step, no rotation, no polarization (the speed specialist's arithmetic after it,
    # seed 0: 78.5%, against 3% after a foundation at T_max 3 rotating the three regimes with the polarization
    # loss on, 4.5% rotating two regimes, 0.5% rotating without polarization, 5% at one step with it). 40 steps:
    # a shared start the specialists still learn from. After 120, seed 0, the speed specialist answered 2.5% of the
    # arithmetic test (5.5% at twice the steps; seeds 1 and 2: 87.5%, 71%) and the memory specialist 56% of the
    # recall test; after 40, 96% and 98%; from the untrained shared start, 43.5% and 93%
    # The reasoning specialist recurses once and takes 1.8 shares of the compute: column arithmetic and worked
    # word problems are learnt in a jump after 300-400 steps, and on this shape recursion costs more than it
    # buys. Seed 0, from the 40-step base, arithmetic and worked word problems, 100 test problems each: T_max 4
    # (its factor's bound) for 82 steps, 1% and 0.5%; T_max 2 for 300 steps, 10% and 11%; T_max 1 for 300
    # steps, 6% and 8%; T_max 1 for 600 steps (the compute of T_max 2's 300), 82% and 27%. The speed specialist
    # takes 2 shares: its arithmetic jump came by 660 steps (94% of the test; 64.5% at 1.5 shares)
    "specialist_act_steps": {"reasoning": 1},
    "train": {"foundation_steps": 40, "stage_steps": 55, "batch_size": 8, "activation_checkpointing": False,
              "spike_threshold": 0.15, "polarization_weight": 0.05, "rotate_regimes": False,
              "foundation_act_steps": 1, "foundation_polarization": False, "compute_shares": {"reasoning": 1.8, "speed": 2.0}},
}
SMALL: dict[str, Any] = {
    "act_max_steps": 6, "window_size": 256,
    "train": {"foundation_steps": 3000, "stage_steps": 2000, "eval_every": 100, "niah_every": 1000, "eval_rows": 64,
              "optim": {"adam_lr": 1e-3}},
    "eval": {"accuracy_per_skill": 300, "heldout_rows": 512},
}
