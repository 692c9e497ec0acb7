"""Phase 4 exit gates, from measured figures only (targets: the size-adaptive strategy table, phases.common.sizing)."""

from __future__ import annotations

import math
from typing import Any

from phases.bitnet.settings import BitNetGates
from phases.common.gates import GateReport
from phases.common.measure import relative_drop


def bitnet_gates(report: dict[str, Any], sec: BitNetGates, mode: str) -> GateReport:
    """``report``: the evaluation (steps.evaluate) with the targets it was measured against."""
    targets, comp, acc = report["targets"], report["compression"], report["accuracy"]
    r = GateReport(phase="bitnet", mode=mode)
    r.add("compression", f"FP32 input weights / packed weights (target for a {targets['category']} model)",
          comp["ratio_vs_fp32"], ">=", targets["compression"])
    r.add("accuracy_drop", "relative drop in held-out task accuracy, FP32 input -> packed model (undefined, so "
          "failed, when the input answers none)",
          acc["task_accuracy_drop"], "<", sec.max_accuracy_drop)
    # the pooled figure can hide a skill lost behind another gained: each skill the input answers is held to it too
    before, after = acc.get("skills_before", {}), acc.get("skills_packed", {})
    drops = {k: relative_drop(h / n, after[k][0] / after[k][1]) for k, (h, n) in before.items() if h > 0 and k in after}
    shown = ", ".join(f"{k} {before[k][0]}/{before[k][1]} -> {after[k][0]}/{after[k][1]}" for k in drops)
    r.add("skill_drop", "largest relative drop of one skill's held-out accuracy, FP32 input -> packed model, over the "
          f"skills the input answers ({shown or 'none answered: failed'})",
          max(drops.values()) if drops else None, "<", sec.max_accuracy_drop)
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
