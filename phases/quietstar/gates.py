"""Quiet-STaR's exit gates, from measured baking, reinforcement and evaluation figures only."""

from __future__ import annotations

from typing import Any

from phases.common.gates import GateReport
from phases.quietstar.settings import QuietStarSection


def quietstar_gates(baking: dict[str, Any], reinforcement: dict[str, Any], evaluation: dict[str, Any],
                    sec: QuietStarSection, mode: str) -> GateReport:
    """``baking`` / ``reinforcement``: the manifests' metrics of the baked and reinforced models. The baking
    and anti-theater thresholds are the ones training stopped and rolled back on (``sec.bake``, ``sec.rl``)."""
    theater = reinforcement["reinforce"]["final_check"]
    r = GateReport(phase="quietstar", mode=mode)
    r.add("baking_convergence", "held-out thinking structure after baking: min(structure-token accuracy, "
          "well-formed greedy completions)", baking["baking"]["final"]["convergence"], ">=", sec.bake.target)
    interval = evaluation.get("accuracy_delta_interval")
    r.add("reasoning_accuracy_delta", f"curriculum test accuracy after RL (thoughts on) minus after baking, on the same "
          f"{evaluation.get('problems', '?')} problems (significant: interval and paired test)",
          evaluation["accuracy_delta"], ">=", sec.gates.min_accuracy_delta,
          interval=tuple(interval) if interval is not None else None, p_value=evaluation.get("accuracy_delta_mcnemar_p"))
    r.add("theater_divergence", "mean total variation between thought-mixed and direct predictions at answer "
          "positions (held-out)", theater["divergence"], ">", sec.rl.theater.min_divergence)
    r.add("theater_ablation", "teacher-forced answer accuracy with thoughts minus without (held-out)",
          theater["ablation"], ">", sec.rl.theater.min_ablation)
    # circular as a gate: after per-problem centring the thought's reward is its log-likelihood of the answer,
    # and "correct" is whether the mixed argmax equals those same tokens, so the two correlate for any mixing
    # weight above 0. Reported until a thought-quality signal independent of the answer replaces it.
    r.fact("theater_correlation", "within-problem correlation of thought reward and answer correctness (held-out; "
           "circular: the reward is the answer's own likelihood)", theater["correlation"])
    stopped = reinforcement["reinforce"].get("stopped")
    if stopped:
        f = stopped["failed"]
        r.fact("reinforcement_stopped", f"anti-theater failed at step {stopped['at_step']} with its retries used up "
               f"(divergence {f['divergence']:.3g}, ablation {f['ablation']:.3g}, correlation {f['correlation']:.3g}); "
               "the weights of the step kept, measured above, ship", stopped["kept_step"])
    r.add("latency_with_thoughts", "ms per generated token with a thought before each (batch 1, decode cache)",
          evaluation["latency_ms_per_token"]["with_thoughts"], "<", sec.gates.max_latency_ms_per_token)
    r.add("no_nan", "non-finite tensors in the baked and reinforced models",
          baking["non_finite_tensors"] + reinforcement["non_finite_tensors"], "==", 0)
    return r
