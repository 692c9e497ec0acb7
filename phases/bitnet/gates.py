"""Phase 4 exit gates, from measured figures only (targets: the size-adaptive strategy table, phases.common.sizing)."""

from __future__ import annotations

import math
from typing import Any

from phases.bitnet.settings import BitNetGates
from phases.common.gates import GateReport
from phases.common.measure import difference_interval, relative_drop


def bitnet_gates(report: dict[str, Any], sec: BitNetGates, mode: str) -> GateReport:
    """``report``: the evaluation (steps.evaluate) with the targets it was measured against."""
    targets, comp, acc = report["targets"], report["compression"], report["accuracy"]
    r = GateReport(phase="bitnet", mode=mode)
    r.add("compression", f"FP32 input weights / packed weights (target for a {targets['category']} model)",
          comp["ratio_vs_fp32"], ">=", targets["compression"])
    r.add("accuracy_drop", "relative drop in held-out task accuracy, FP32 input -> packed model (undefined, so "
          "failed, when the input answers none)",
          acc["task_accuracy_drop"], "<", sec.max_accuracy_drop)
    # the pooled figure can hide a skill lost behind another gained: each skill the input answers is held to it too.
    # "Answers": significantly above the skill's majority-answer baseline on the same problems (the interval of the
    # difference excludes 0), as Cognate's accuracy_over_majority reads it; a skill at chance has nothing to lose
    # (tiny: recall 3/50 in the input, against 0/50 for the commonest answer, is within noise of it: -0.02 to 0.14)
    before, after = acc.get("skills_before", {}), acc.get("skills_packed", {})
    chance = acc.get("skills_majority", {})
    held, at_chance = {}, []
    for k, (h, n) in before.items():
        if k not in after or h == 0:
            continue
        base = chance.get(k, [0, n])
        if difference_interval(h, n, base[0], base[1])[0] > 0:
            held[k] = relative_drop(h / n, after[k][0] / after[k][1])
        else:
            at_chance.append(f"{k} {h}/{n}, baseline {base[0]}/{base[1]}")
    shown = ", ".join(f"{k} {before[k][0]}/{before[k][1]} -> {after[k][0]}/{after[k][1]}" for k in held)
    if at_chance:
        shown += ("; " if shown else "") + "not above its baseline: " + ", ".join(at_chance)
    r.add("skill_drop", "largest relative drop of one skill's held-out accuracy, FP32 input -> packed model, over the "
          "skills the input answers significantly above their majority-answer baseline "
          f"({shown or 'none answered: failed'})", max(held.values()) if held else None, "<", sec.max_accuracy_drop)
    r.add("token_accuracy_drop", "relative drop in held-out next-token accuracy, FP32 input -> packed model",
          acc["token_accuracy_drop"], "<", sec.max_accuracy_drop)
    sparsity, free = report["sparsity"]["overall"], report["sparsity"].get("input_free")
    if free is not None and targets["sparsity"] <= free:
        # absmean ternarization zeroes this share of the input's own weights before any training: a gate at or
        # below it would pass by construction, so the figure is reported, not gated
        r.fact("sparsity", f"fraction of zero ternary weights (target for a {targets['category']} model "
               f"{targets['sparsity']:g}, below the {free:.3f} the quantizer gives for free)", sparsity)
    else:
        r.add("sparsity", f"fraction of zero ternary weights over the quantized layers (target for a "
              f"{targets['category']} model, above the {free if free is not None else float('nan'):.3f} that "
              "absmean ternarization of the input gives for free)", sparsity, ">=", targets["sparsity"])
    if free is not None:
        r.fact("sparsity_free", "fraction absmean ternarization zeroes on the FP32 input's weights (|w| < mean|w|/2)",
               free)
    speed = report["speed"]
    where = f"{speed.get('device', 'cpu')}, {speed.get('threads', '?')} threads, {speed.get('shape', 'shape not recorded')}"
    r.add("speedup", f"packed / FP32 greedy decode tokens/s, same prompts, batch 1 ({where})",
          speed["speedup"], ">=", sec.min_speedup)
    r.add("no_nan", "non-finite held-out losses of the packed model",
          float(not math.isfinite(report["packed"]["loss"])), "==", 0)
    return r
