"""Cognate's exit gates, from measured evaluation and telemetry only."""

from __future__ import annotations

import math
from typing import Any

from phases.cognate.settings import CognateSection
from phases.common.gates import GateReport


def cognate_gates(evaluation: dict[str, Any], training: dict[str, dict[str, Any]], sec: CognateSection,
                  mode: str) -> GateReport:
    """``training``: per model, the manifest metrics plus its telemetry summary."""
    models = evaluation["models"]
    r = GateReport(phase="cognate", mode=mode)
    r.add("no_nan", "models with a non-finite held-out loss, weight, or training step",
          sum(not math.isfinite(m["heldout_loss"]) for m in models.values())
          + sum(t["non_finite_tensors"] + t["telemetry"]["non_finite_steps"] for t in training.values()), "==", 0)
    r.add("niah", "lowest NIAH cosine (needle under 100 random keys) over the models",
          min(m["niah"] for m in models.values()), ">=", 0.8)
    r.add("ppl_delta_visible", "fraction of training steps whose telemetry line carries a PPL delta",
          min(t["telemetry"]["steps_with_ppl_delta"] / max(1, t["telemetry"]["steps_logged"]) for t in training.values()),
          ">=", 1.0)
    r.add("rollbacks", "most auto-rollbacks in any training stage",
          max(s["rollbacks"] for t in training.values() for s in t["stages"].values()), "<=", 3)
    r.add("gate_polarization", "lowest share of MAG gate values < 0.1 or > 0.9 at the end of training",
          min(s["gate_polarized"] for t in training.values() for s in t["stages"].values()), ">=", 0.2)
    r.add("diversity_halting", "spread (max - min) of mean ACT halting steps", evaluation["diversity"]["halting_steps"],
          ">", sec.gates.min_halting_spread)
    r.add("diversity_ltm", "spread of LTM usage (1 - mean MAG gate)", evaluation["diversity"]["ltm_usage"],
          ">", sec.gates.min_ltm_spread)
    r.add("diversity_latency", "spread of 16-token generation latency (ms)", evaluation["diversity"]["latency_ms"],
          ">", sec.gates.min_latency_spread_ms)
    r.add("resolution_cv", "largest CV of held-out PPL across memory chunk sizes 4..64",
          max(m["resolution"]["cv"] for m in models.values()), "<", 0.10)
    r.add("accuracy_over_majority", "lowest held-out accuracy minus the majority-answer baseline",
          min(m["accuracy"] for m in models.values()) - evaluation["majority_baseline"], ">", 0.0)
    return r
