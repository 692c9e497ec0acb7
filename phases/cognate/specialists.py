"""The three Cognate specialists: one shape, one shared foundation checkpoint, different runtime
settings, skill mixes and seeds for the reasoning and advanced stages. The foundation trains under all
three runtime settings in turn (``train.rotate_regimes``), so a specialist starts where the base ended.

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


def specialists() -> list[Specialist]:
    return [
        # thinks longer: more recursion, a halting head biased to go on, a cheap ponder cost
        Specialist(
            name="reasoning", seed_offset=101,
            mix={"arithmetic": 0.5, "word_problem": 0.4, "text": 0.1},
            runtime={"act_threshold": 0.99, "ponder_cost": 0.001, "halt_bias": -2.0},
            act_steps_factor=1.5,
        ),
        # leans on memory: a narrow attention window, a gate biased to memory, stronger and longer-lived writes.
        # Recall is a lookup, not a computation: one recursion step buys three times the training steps (recall
        # alone, T_max 1, 600 steps: 85% of 1-code problems, 0% with the memory read zeroed; in the tiny flow,
        # T_max 2: 0% of the recall test, T_max 1: 6.0%, 0% with the memory read zeroed)
        Specialist(
            name="memory", seed_offset=202,
            mix={"kv_recall": 0.8, "text": 0.2},
            runtime={"window_size": 16, "mem_lr_scale": 2.0, "mem_decay_scale": 0.25, "act_threshold": 0.95,
                     "ponder_cost": 0.01, "gate_bias": -1.5},
            act_steps_factor=0.4,
        ),
        # answers fast, on short tasks: fewer recursion steps, halts early, leans on attention, writes memory
        # only on surprise
        Specialist(
            name="speed", seed_offset=303,
            mix={"arithmetic": 0.8, "text": 0.2},
            runtime={"act_threshold": 0.8, "ponder_cost": 0.05, "surprise_threshold": 0.5, "gate_bias": 1.0},
            act_steps_factor=0.4,
        ),
    ]


def runtime_for(spec: Specialist, base_act_steps: int) -> dict:
    return {**spec.runtime, "act_max_steps": max(1, round(base_act_steps * spec.act_steps_factor))}


def stage_steps_for(spec: Specialist, base_act_steps: int, stage_steps: int) -> int:
    """Equal compute per specialist: ``stage_steps`` is counted at the base's T_max, and a step costs in
    proportion to the recursion steps it runs, so a specialist recursing less takes more steps."""
    return max(1, round(stage_steps * base_act_steps / runtime_for(spec, base_act_steps)["act_max_steps"]))
