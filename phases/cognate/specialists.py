"""The three Cognate specialists: one shape, one shared foundation checkpoint, different runtime
settings, skill mixes, compute shares and seeds for the reasoning and advanced stages. Where
``train.rotate_regimes`` is on, the foundation trains under all three runtime settings in turn, so a
specialist starts in a regime the base trained in.

Nothing here changes a parameter's shape, so the three stay mergeable in weight space (Phase 2).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Specialist:
    name: str
    seed_offset: int
    mix: dict[str, float]  # skill weights for its stages (skills absent from a stage are skipped)
    runtime: dict = field(default_factory=dict)  # CognateConfig runtime settings
    act_steps_factor: float = 1.0  # T_max = max(1, round(factor · the preset's act_max_steps))
    compute_factor: float = 1.0  # its share of training compute, against the others' 1


def specialists() -> list[Specialist]:
    return [
        # thinks longer: more recursion, a halting head biased to go on, a cheap ponder cost
        Specialist(
            name="reasoning", seed_offset=101,
            mix={"arithmetic": 0.5, "word_problem": 0.4, "text": 0.1},
            runtime={"act_threshold": 0.99, "ponder_cost": 0.001, "halt_bias": -2.0},
            act_steps_factor=1.5,
        ),
        # leans on memory: stronger and longer-lived writes, on recall. It keeps the base's attention window and
        # gate: after the one-step foundation a 16-token window shocked it into 5 rollbacks (3 end a stage), and
        # a gate bias toward memory (−1.5, −3) into rollbacks too. Recall is a lookup, not a computation: one
        # recursion step buys three times the training steps. Half the others' compute: from the attention-
        # leaning gate its recall is 0% after 330 steps as after 165, and the 5-minute phase needs the time
        # for the speed specialist's arithmetic
        Specialist(
            name="memory", seed_offset=202,
            mix={"kv_recall": 0.8, "text": 0.2},
            runtime={"mem_lr_scale": 2.0, "mem_decay_scale": 0.25, "act_threshold": 0.95, "ponder_cost": 0.01},
            act_steps_factor=0.4, compute_factor=0.5,
        ),
        # answers fast, on short tasks: fewer recursion steps, halts early, writes memory only on surprise. 1.5×
        # the reasoning one's compute: column arithmetic learns in a jump, after some 200-400 steps of it (tiny,
        # seed 0: 78.5% of the test after 330 steps at 0.8 arithmetic, 96% after 660 at 0.9, its loss down to
        # 0.1 by step 200; seed 1: 0% and 2.5%). 660 steps made the Cognate phase 319 s, over its 5 minutes
        Specialist(
            name="speed", seed_offset=303,
            mix={"arithmetic": 0.9, "text": 0.1}, compute_factor=1.5,
            runtime={"act_threshold": 0.8, "ponder_cost": 0.05, "surprise_threshold": 0.5},
            act_steps_factor=0.4,
        ),
    ]


def runtime_for(spec: Specialist, base_act_steps: int) -> dict:
    return {**spec.runtime, "act_max_steps": max(1, round(base_act_steps * spec.act_steps_factor))}


def stage_steps_for(spec: Specialist, base_act_steps: int, stage_steps: int) -> int:
    """Compute per specialist in proportion to its ``compute_factor``: ``stage_steps`` is counted at the base's
    T_max, and a step costs in proportion to the recursion steps it runs, so a specialist recursing less takes
    more steps."""
    steps = stage_steps * spec.compute_factor * base_act_steps / runtime_for(spec, base_act_steps)["act_max_steps"]
    return max(1, round(steps))
