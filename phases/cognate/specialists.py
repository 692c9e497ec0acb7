"""The three Cognate specialists: one shape, one shared foundation checkpoint, different runtime
settings, skill mixes, compute shares and seeds for the reasoning and advanced stages. Where
``train.rotate_regimes`` is on, the foundation trains under all three runtime settings in turn, so a
specialist starts in a regime the base trained in.

Nothing here changes a parameter's shape, so the three stay mergeable in weight space (Phase 2).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from phases.cognate.settings import CognateSection


@dataclass(frozen=True)
class Specialist:
    name: str
    seed_offset: int
    mix: dict[str, float]  # skill weights for its stages (skills absent from a stage are skipped)
    runtime: dict = field(default_factory=dict)  # CognateConfig runtime settings
    act_steps_factor: float = 1.0  # T_max = max(1, round(factor · the preset's act_max_steps))
    compute_factor: float = 1.0  # its share of training compute, against the others' 1
    act_steps: int | None = None  # T_max set outright, in place of the factor (cognate.specialist_act_steps)


def specialists(sec: CognateSection | None = None) -> list[Specialist]:
    """The three, with ``sec``'s per-specialist recursion bounds and compute shares where it sets them."""
    own = [
        # thinks longer: more recursion, a halting head biased to go on, a cheap ponder cost
        Specialist(
            name="reasoning", seed_offset=101,
            mix={"arithmetic": 0.5, "word_problem": 0.4, "text": 0.1},
            runtime={"act_threshold": 0.99, "ponder_cost": 0.001, "halt_bias": -2.0},
            act_steps_factor=1.5,
        ),
        # leans on memory: a 16-token attention window, so at one recursion step attention reaches 2·15 tokens and a
        # code stated 66 or more tokens back is the memory's alone, and a gate bias of −3 that takes the mix from
        # attention's 0.95 to an even one, where the memory's read carries weight and learns. After the tiny
        # foundation (seed 0, 330 steps at 0.8 recall): 56% of the recall test, 0% with its memory read zeroed; with
        # the base's window and gate 1%, with −1.5 and half the steps 3.5%. Recall is a lookup, not a computation:
        # one recursion step buys three times the training steps
        # It also forgets 50 times faster than its learned rate (about 0.04 of the state a chunk on tiny): a code is
        # held for a few chunks, and trained on rows far shorter than a memory shard, nothing else bounds the state.
        # Tiny, seed 0, on 2048-token shards of the advanced rung's text: its ‖W‖ peaked at 11.3x its value at
        # token 256 (D1 fails past 10x) at the learned rate, 10.6x at 10x it, 3.1x at 50x; recall 95.5%, 96.5%, 98%
        Specialist(
            name="memory", seed_offset=202,
            mix={"kv_recall": 0.8, "text": 0.2},
            runtime={"window_size": 16, "gate_bias": -3.0, "ponder_cost": 0.01, "mem_decay_scale": 50.0},
            act_steps_factor=0.4,
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
    if sec is None:
        return own
    return [replace(s, act_steps=sec.specialist_act_steps.get(s.name),
                    compute_factor=sec.train.compute_shares.get(s.name, s.compute_factor)) for s in own]


def runtime_for(spec: Specialist, base_act_steps: int) -> dict:
    return {**spec.runtime, "act_max_steps": spec.act_steps or max(1, round(base_act_steps * spec.act_steps_factor))}


def stage_steps_for(spec: Specialist, base_act_steps: int, stage_steps: int) -> int:
    """Compute per specialist in proportion to its ``compute_factor``: ``stage_steps`` is counted at the base's
    T_max, and a step costs in proportion to the recursion steps it runs, so a specialist recursing less takes
    more steps."""
    steps = stage_steps * spec.compute_factor * base_act_steps / runtime_for(spec, base_act_steps)["act_max_steps"]
    return max(1, round(steps))
