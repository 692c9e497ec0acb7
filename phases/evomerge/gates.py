"""EvoMerge's exit gates, from the champion's and the inputs' measurements on the test split."""

from __future__ import annotations

from typing import Any

from phases.common.gates import GateReport
from phases.common.measure import mcnemar_p
from phases.evomerge.settings import EvoMergeGates


def evomerge_gates(final: dict[str, Any], run: dict[str, Any], sec: EvoMergeGates, mode: str) -> GateReport:
    """``final``: test-split fitness and accuracy of the champion and each input; ``run``: the evolution's
    diversity figures and the combinations it evaluated."""
    report = GateReport(phase="evomerge", mode=mode)
    best_input = max(final["inputs"].values(), key=lambda m: m["fitness"])
    report.add("fitness_gain", "champion fitness / best input's (test split, same reference)",
               final["champion"]["fitness"] / best_input["fitness"] if best_input["fitness"] > 0 else None,
               ">=", sec.min_fitness_ratio)
    report.add("diversity", "lowest population diversity over the run (prediction disagreement)",
               run["min_diversity"], ">=", sec.min_diversity)
    best_accuracy = max(m["accuracy"] for m in final["inputs"].values())
    # when no input answers a single test problem there is nothing to keep: not measured, so FAIL (0 >= 0 would
    # pass on a run that learned nothing)
    report.add("accuracy_kept", "champion accuracy − best input accuracy (test split; not measured when no input "
               "answers any problem)", final["champion"]["accuracy"] - best_accuracy if best_accuracy > 0 else None,
               ">=", 0)
    # A merge is for skills: the champion must answer significantly more of the same test problems than the
    # most accurate input (paired, exact McNemar), not just score higher on a weighted sum
    most_accurate = max(final["inputs"].values(), key=lambda m: m["accuracy"])
    champion_hits, input_hits = final["champion"].get("hits", []), most_accurate.get("hits", [])
    p = None
    if champion_hits and len(champion_hits) == len(input_hits):
        p = mcnemar_p(champion_hits, input_hits) if sum(champion_hits) > sum(input_hits) else 1.0
    report.add("accuracy_gain", "champion answers more test problems than the most accurate input: exact McNemar "
               "p-value (1 when it answers no more)", p, "<", sec.max_gain_p)
    # generation 0 seeds one genome per combination, so the count is checked where it is produced (steps.run_summary)
    report.fact("combos_evaluated", "binary technique combinations evaluated", run["combos_evaluated"])
    return report
