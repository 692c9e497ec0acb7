"""Cognate's exit gates, from measured evaluation and telemetry only."""

from __future__ import annotations

import math
from typing import Any

from phases.cognate.diagnostics import MIN_HEALTH
from phases.cognate.modeling import POLES
from phases.cognate.settings import CognateSection
from phases.common.gates import GateReport
from phases.common.measure import difference_interval


def skill_leaders(models: dict[str, Any], margin: float) -> dict[str, dict[str, Any]]:
    """Per skill, the model that leads every other by at least ``margin``, significantly (the 95% interval
    of its lead over the runner-up excludes 0); skills with no such leader are left out."""
    leaders = {}
    skills = sorted({s for m in models.values() for s in m["per_skill"]})
    for skill in skills:
        rows = sorted(((m["per_skill"][skill], name) for name, m in models.items() if skill in m["per_skill"]),
                      key=lambda r: -r[0]["accuracy"])
        if len(rows) < 2:
            continue
        (best, name), (second, _) = rows[0], rows[1]
        lead = best["accuracy"] - second["accuracy"]
        lo, hi = difference_interval(best["hits"], best["n"], second["hits"], second["n"])
        if lead >= margin and lo > 0:
            leaders[skill] = {"model": name, "lead": lead, "interval": (lo, hi)}
    return leaders


def cognate_gates(evaluation: dict[str, Any], training: dict[str, dict[str, Any]], sec: CognateSection,
                  mode: str, diagnoses: dict[str, dict[str, Any]] | None = None) -> GateReport:
    """``training``: per model, the manifest metrics plus its telemetry summary. ``diagnoses``: per model, the
    state diagnostics' headline (steps.headline); none where they did not run (their gates then read "not
    measured" and fail)."""
    models = evaluation["models"]
    r = GateReport(phase="cognate", mode=mode)
    r.add("no_nan", "models with a non-finite held-out loss, weight, or training step",
          sum(not math.isfinite(m["heldout_loss"]) for m in models.values())
          + sum(t["non_finite_tensors"] + t["telemetry"]["non_finite_steps"] for t in training.values()), "==", 0)
    r.add("gate_polarization", f"lowest share of MAG gate values < {POLES[0]} or > {POLES[1]} at the end of "
          "training (the gate starts at 0.95)",
          min(max(t["stages"].values(), key=lambda s: s["final_step"])["gate_polarized"] for t in training.values()),
          ">=", 0.2)
    disagreement = evaluation["diversity"]["prediction_disagreement"]
    r.add("diversity_predictions", "mean share of held-out positions where two models' greedy next tokens differ "
          "(" + ", ".join(f"{k} {v:.3f}" for k, v in disagreement["pairs"].items()) + ")",
          disagreement["mean"], ">=", sec.gates.min_disagreement)
    # decided by the configuration or the code, so reported, never gated: the probe writes random keys with the
    # layer's gate scalars alone (the token-level test is recall_beyond_window with memory_used); the trainer
    # writes a PPL delta on every step and raises on the rollback past its limit; halting, LTM usage and latency
    # follow each specialist's hand-set step cap, gate bias and window
    r.fact("niah", "lowest NIAH cosine over the models (the memory's write rule on 100 random keys, no tokens)",
           min(m["niah"] for m in models.values()))
    r.fact("ppl_delta_visible", "fraction of training steps whose telemetry line carries a PPL delta",
           min(t["telemetry"]["steps_with_ppl_delta"] / max(1, t["telemetry"]["steps_logged"]) for t in training.values()))
    r.fact("rollbacks", "most auto-rollbacks in any training stage (past train.max_rollbacks training stops)",
           max(s["rollbacks"] for t in training.values() for s in t["stages"].values()))
    r.fact("halting_spread", "max - min of mean ACT steps over the models", evaluation["diversity"]["halting_steps"])
    r.fact("ltm_spread", "max - min of LTM usage (1 - mean MAG gate)", evaluation["diversity"]["ltm_usage"])
    r.fact("latency_spread_ms", "max - min of 16-token generation latency", evaluation["diversity"]["latency_ms"])
    on_all = ", ".join(f"{n} {m['resolution_all_skills']:.3f}" for n, m in models.items() if "resolution_all_skills" in m)
    r.add("resolution_cv", "largest CV of held-out PPL across memory chunk sizes 4..64, each model on the test rows "
          "of the skills it trains" + (f" (on every skill's: {on_all})" if on_all else ""),
          max(m["resolution"]["cv"] for m in models.values()), "<", 0.10)
    skill = {name: m["per_skill"] for name, m in models.items()}

    def best(task: str) -> tuple[str | None, float | None]:
        scored = [(rows[task]["accuracy"], name) for name, rows in skill.items() if task in rows]
        return (max(scored)[1], max(scored)[0]) if scored else (None, None)

    _, arithmetic = best("arithmetic")
    r.add("arithmetic", "best model's held-out arithmetic accuracy (generate, 2-3 digits)", arithmetic, ">=",
          sec.gates.min_arithmetic)
    recall_model, recall = best("kv_recall")
    r.add("recall_beyond_window", "best model's held-out accuracy recalling a code stated beyond the attention window",
          recall, ">=", sec.gates.min_recall)
    ablated = models[recall_model].get("kv_recall_memory_ablated") if recall_model else None
    if ablated is None:
        r.add("memory_used", "recall drop of that model with its memory read zeroed", None, ">=", sec.gates.min_memory_drop)
    else:
        own = skill[recall_model]["kv_recall"]
        r.add("memory_used", f"recall drop of that model ({recall_model}) with its memory read zeroed (the same "
              "problems: paired)", own["accuracy"] - ablated["accuracy"], ">=", sec.gates.min_memory_drop,
              interval=difference_interval(own["hits"], own["n"], ablated["hits"], ablated["n"]),
              p_value=ablated.get("mcnemar_p"))
    leaders = skill_leaders(models, sec.gates.min_skill_margin)
    named = ", ".join(f"{v['model']}: {k}" for k, v in leaders.items()) or "none"
    r.add("specialists_differ", f"models that lead some skill by >= {sec.gates.min_skill_margin:g}, significantly "
          f"({named})",
          len({v["model"] for v in leaders.values()}), ">=", 2)
    add_diagnosis_gates(r, diagnoses or {}, sec)
    lowest = min(models, key=lambda n: models[n]["accuracy"])
    low, n = models[lowest]["accuracy"], models[lowest]["n"]
    majority = evaluation["majority_baseline"]  # on the same problems: always the commonest training answer
    r.add("accuracy_over_majority", f"lowest held-out accuracy ({lowest}) minus the majority-answer baseline, on the "
          f"same {n} problems (significant: the interval excludes 0)", low - majority, ">", 0.0,
          interval=difference_interval(round(low * n), n, round(majority * n), n))
    return r


def add_diagnosis_gates(r: GateReport, diagnoses: dict[str, dict[str, Any]], sec: CognateSection) -> None:
    """The state diagnostics' gates over ``diagnoses`` (per model, steps.headline): the lowest state health, and
    D4's paired difference for the model whose memory carries the most beyond the window."""
    r.add("state_health", "lowest state health over the models (D1 divergence, D2 collapse; diagnostics)",
          min((d["health"] for d in diagnoses.values()), default=None), ">", MIN_HEALTH)
    if not diagnoses:
        r.add("long_range_d4", "recall beyond the window, memory on minus its read zeroed (D4)", None, ">", 0.0)
        return
    name, d4 = max(((n, d["d4"]) for n, d in diagnoses.items()), key=lambda x: (x[1]["difference"], -x[1]["mcnemar_p"]))
    r.add("long_range_d4", f"recall beyond the window, memory on minus its read zeroed, best model ({name}; D4 over "
          f"{d4['beyond_n']} problems at {len(sec.diagnose.beyond)} distances: paired)", d4["difference"], ">", 0.0,
          interval=tuple(d4["interval"]), p_value=d4["mcnemar_p"])


def diagnosis_gates(diagnosis: dict[str, Any], sec: CognateSection, mode: str) -> GateReport:
    """One model's go/no-go as a gate table: every diagnostic at PASS (WARN is not a GO), and the two gates the
    Cognate phase applies to it."""
    r = GateReport(phase="diagnose", mode=mode)
    statuses = diagnosis["statuses"]
    r.add("go_no_go", "diagnostics at PASS (" + ", ".join(f"{k}: {v}" for k, v in statuses.items()) + ")",
          sum(v == "PASS" for v in statuses.values()), "==", len(statuses))
    add_diagnosis_gates(r, {diagnosis["name"]: diagnosis}, sec)
    return r
