"""A failing control for every gate the phase tests do not fail elsewhere: each phase's gate function gets the
figures of a run that passes every gate, then the figure a broken run measures for one of them, and exactly that
gate fails. (Gates failed by real models and flows live beside their phases: test_cognate_gates,
test_cognate_diagnostics, test_cognate_flow, test_evomerge_flow, test_quietstar_flow, test_bitnet_flow,
test_flows, test_data.)"""

from __future__ import annotations

import copy
import math

import pytest

from phases.bitnet.gates import bitnet_gates
from phases.bitnet.settings import BitNetGates
from phases.cognate.gates import cognate_gates
from phases.cognate.settings import CognateSection
from phases.common.gates import GateReport
from phases.data.gates import prepare_gates
from phases.evomerge.gates import evomerge_gates
from phases.evomerge.settings import EvoMergeGates
from phases.quietstar.gates import quietstar_gates
from phases.quietstar.settings import QuietStarSection


def _failing(report: GateReport) -> set[str]:
    return {g.id for g in report.gates if not g.passed}


# ----------------------------------------------------------------------------- prepare
PREPARE = ({"verified_fraction": 1.0, "train_heldout_overlap": 0, "rows": {"train": 900, "validation": 90, "test": 90}},
           {"roundtrip_rate": 1.0, "chars_per_token": 3.1})


@pytest.mark.parametrize("gate, broken", [
    ("all_splits_nonempty", lambda cur, tok: cur["rows"].update(test=0)),  # a stage with no held-out rows
    ("tokenizer_roundtrip", lambda cur, tok: tok.update(roundtrip_rate=0.98)),  # bytes lost by a normaliser
])
def test_prepare_gate_fails_alone(gate, broken):
    cur, tok = copy.deepcopy(PREPARE)
    assert not _failing(prepare_gates(cur, tok, 0, 0, {}))
    broken(cur, tok)
    assert _failing(prepare_gates(cur, tok, 0, 0, {})) == {gate}


# ----------------------------------------------------------------------------- cognate
def _cognate_inputs():
    def model(arith: int, recall: int, cv: float = 0.02) -> dict:
        row = lambda h: {"accuracy": h / 200, "hits": h, "n": 200}  # noqa: E731
        return {"heldout_loss": 1.0, "niah": 0.9, "resolution": {"cv": cv}, "accuracy": (arith + recall) / 400, "n": 400,
                "per_skill": {"arithmetic": row(arith), "kv_recall": row(recall)},
                "kv_recall_memory_ablated": {**row(0), "mcnemar_p": 1e-30}}

    evaluation = {"models": {"speed": model(190, 2), "memory": model(4, 190)}, "majority_baseline": 0.01,
                  "diversity": {"halting_steps": 1.0, "ltm_usage": 0.4, "latency_ms": 10.0,
                                "prediction_disagreement": {"pairs": {"memory/speed": 0.6}, "mean": 0.6}}}
    training = {n: {"non_finite_tensors": 0, "telemetry": {"non_finite_steps": 0, "steps_with_ppl_delta": 1,
                                                           "steps_logged": 1},
                    "stages": {"advanced": {"rollbacks": 0, "gate_polarized": 0.4, "final_step": 10}}}
                for n in evaluation["models"]}
    d4 = {"beyond_accuracy": 1.0, "beyond_ablated": 0.0, "beyond_n": 144, "difference": 1.0, "interval": (0.96, 1.0),
          "mcnemar_p": 1e-40}
    diagnoses = {n: {"health": 0.85, "d4": d4} for n in evaluation["models"]}
    return evaluation, training, diagnoses


def _break_nan_step(ev, tr, dg):
    tr["speed"]["telemetry"]["non_finite_steps"] = 1  # a NaN loss met in training


def _break_nan_loss(ev, tr, dg):
    ev["models"]["memory"]["heldout_loss"] = math.nan  # a model whose held-out loss is NaN


def _break_polarization(ev, tr, dg):
    tr["memory"]["stages"]["advanced"]["gate_polarized"] = 0.006  # gates left at their start (the tiny run's)


def _break_resolution(ev, tr, dg):
    ev["models"]["memory"]["resolution"]["cv"] = 0.27  # PPL that moves with the chunk size (the tiny run's)


def _break_majority(ev, tr, dg):
    ev["models"]["speed"]["accuracy"] = 0.005  # a model no better than always giving the commonest answer


def _break_d4(ev, tr, dg):
    for d in dg.values():  # memory read zeroed and nothing lost: no model recalls beyond the window
        d["d4"] = d["d4"] | {"beyond_accuracy": 0.0, "difference": 0.0, "interval": (-0.03, 0.03), "mcnemar_p": 1.0}


def _break_health(ev, tr, dg):
    dg["speed"]["health"] = 0.4  # a state that diverged or collapsed in one of the models


@pytest.mark.parametrize("gate, broken", [
    ("long_range_d4", _break_d4), ("state_health", _break_health),
    ("no_nan", _break_nan_step), ("no_nan", _break_nan_loss), ("gate_polarization", _break_polarization),
    ("resolution_cv", _break_resolution), ("accuracy_over_majority", _break_majority),
])
def test_cognate_gate_fails_alone(gate, broken):
    ev, tr, dg = _cognate_inputs()
    sec = CognateSection()
    assert not _failing(cognate_gates(ev, tr, sec, "strict", dg))
    broken(ev, tr, dg)
    assert _failing(cognate_gates(ev, tr, sec, "strict", dg)) == {gate}


# ----------------------------------------------------------------------------- evomerge
def _evomerge_inputs():
    # 60 paired test problems: the champion answers 36, the memory specialist 29 of them (the same 29 and 7 more)
    memory_hits = [1] * 29 + [0] * 31
    final = {"champion": {"fitness": 1.5, "accuracy": 0.6, "hits": [1] * 36 + [0] * 24},
             "inputs": {"speed": {"fitness": 1.1, "accuracy": 0.48, "hits": [0] * 31 + [1] * 29},
                        "memory": {"fitness": 1.0, "accuracy": 0.49, "hits": memory_hits}}}
    return final, {"min_diversity": 0.4, "combos_evaluated": 8}


@pytest.mark.parametrize("gate, broken", [
    # the best input came back as the champion: no merge beat it
    ("fitness_gain", lambda final, run: final.update(champion=dict(final["inputs"]["speed"]))),
    # a population of copies of one genome (evolution.diversity of identical models is 0)
    ("diversity", lambda final, run: run.update(min_diversity=0.0)),
    # two more problems than the best input is within chance (McNemar p = 0.5)
    ("accuracy_gain", lambda final, run: final["champion"].update(hits=[1] * 31 + [0] * 29)),
    # a merge that drops a skill: it answers the memory specialist's recall problems and none of the arithmetic
    ("accuracy_gain", lambda final, run: final["champion"].update(hits=list(final["inputs"]["memory"]["hits"]),
                                                                  accuracy=0.49)),
])
def test_evomerge_gate_fails_alone(gate, broken):
    final, run = _evomerge_inputs()
    assert not _failing(evomerge_gates(final, run, EvoMergeGates(), "strict"))
    broken(final, run)
    assert gate in _failing(evomerge_gates(final, run, EvoMergeGates(), "strict"))


# ----------------------------------------------------------------------------- quietstar
def _quietstar_inputs():
    baking = {"baking": {"final": {"convergence": 0.9}}, "non_finite_tensors": 0}
    reinforcement = {"reinforce": {"final_check": {"divergence": 0.4, "ablation": 0.05, "correlation": 0.2}},
                     "non_finite_tensors": 0}
    evaluation = {"accuracy_delta": 0.1, "accuracy_delta_interval": (0.04, 0.16), "accuracy_delta_mcnemar_p": 0.001,
                  "problems": 200, "latency_ms_per_token": {"with_thoughts": 40.0}}
    return baking, reinforcement, evaluation


@pytest.mark.parametrize("gate, broken", [
    ("baking_convergence", lambda b, r, e: b["baking"]["final"].update(convergence=0.17)),  # the tiny run's
    ("theater_divergence", lambda b, r, e: r["reinforce"]["final_check"].update(divergence=0.0)),  # thoughts ignored
    ("theater_ablation", lambda b, r, e: r["reinforce"]["final_check"].update(ablation=0.0)),  # thoughts as noise
    ("latency_with_thoughts", lambda b, r, e: e["latency_ms_per_token"].update(with_thoughts=450.0)),
    ("no_nan", lambda b, r, e: r.update(non_finite_tensors=2)),
])
def test_quietstar_gate_fails_alone(gate, broken):
    b, r, e = _quietstar_inputs()
    sec = QuietStarSection()
    assert not _failing(quietstar_gates(b, r, e, sec, "strict"))
    broken(b, r, e)
    assert _failing(quietstar_gates(b, r, e, sec, "strict")) == {gate}


def test_a_stopped_reinforcement_ships_its_last_passing_weights_and_fails_on_them():
    """Out of retries, the kept model is the start (thoughts weighted 0): the gates read that model, which thoughts
    do not change, and the figures of the check that stopped training stay in the table as a fact."""
    b, r, e = _quietstar_inputs()
    r["reinforce"]["final_check"] = {"divergence": 0.0, "ablation": 0.0, "correlation": 0.0, "kept_step": 0}
    r["reinforce"]["stopped"] = {"at_step": 6, "kept_step": 0,
                                 "failed": {"divergence": 0.065, "ablation": -0.167, "correlation": 0.07}}
    report = quietstar_gates(b, r, e, QuietStarSection(), "strict")
    assert _failing(report) == {"theater_divergence", "theater_ablation"}
    fact = {f.id: f for f in report.facts}["reinforcement_stopped"]
    assert fact.value == 0 and "step 6" in fact.description and "-0.167" in fact.description


# ----------------------------------------------------------------------------- bitnet
def _bitnet_report():
    return {"targets": {"category": "tiny", "compression": 6.0, "sparsity": 0.25},
            "compression": {"ratio_vs_fp32": 7.1},
            "accuracy": {"task_accuracy_drop": 0.05, "token_accuracy_drop": 0.03,
                         "skills_before": {"arithmetic": [40, 50], "kv_recall": [45, 50], "word_problem": [0, 50]},
                         "skills_packed": {"arithmetic": [39, 50], "kv_recall": [44, 50], "word_problem": [0, 50]}},
            "sparsity": {"overall": 0.35, "input_free": 0.2}, "speed": {"speedup": 2.5}, "packed": {"loss": 1.2}}


@pytest.mark.parametrize("gate, broken", [
    ("compression", lambda r: r["compression"].update(ratio_vs_fp32=3.12)),  # a layer kept in FP16 (a tiny run's)
    ("accuracy_drop", lambda r: r["accuracy"].update(task_accuracy_drop=0.4)),  # quantization without QAT
    # one skill lost while the pooled figure holds (tiny: word problems 10/50 -> 6/50, the pooled drop -4%)
    ("skill_drop", lambda r: r["accuracy"]["skills_packed"].update(kv_recall=[20, 50])),
    ("token_accuracy_drop", lambda r: r["accuracy"].update(token_accuracy_drop=0.3)),
    ("speedup", lambda r: r["speed"].update(speedup=0.29)),  # unpacking on every call (the tiny run's)
    ("no_nan", lambda r: r["packed"].update(loss=math.nan)),
])
def test_bitnet_gate_fails_alone(gate, broken):
    report = _bitnet_report()
    assert not _failing(bitnet_gates(report, BitNetGates(), "strict"))
    broken(report)
    assert _failing(bitnet_gates(report, BitNetGates(), "strict")) == {gate}


def test_skill_drop_holds_the_skills_the_input_answers_above_chance():
    """Recall at 3/50 where the commonest answer scores 0/50 is within noise of chance: losing 2 of those 3 is
    not a skill lost, and the criterion says why. A drop of 16/50 to 11/50 on a skill answered significantly
    above chance fails."""
    report = _bitnet_report()
    acc = report["accuracy"]
    acc["skills_before"].update(kv_recall=[3, 50], word_problem=[16, 50])
    acc["skills_packed"].update(kv_recall=[1, 50], word_problem=[16, 50])
    acc["skills_majority"] = {"arithmetic": [1, 50], "kv_recall": [0, 50], "word_problem": [0, 50]}
    gate = {g.id: g for g in bitnet_gates(report, BitNetGates(), "strict").gates}["skill_drop"]
    assert gate.passed and gate.measured == pytest.approx(1 - 39 / 40)
    assert "not above its baseline: kv_recall 3/50, baseline 0/50" in gate.criterion
    acc["skills_packed"].update(word_problem=[11, 50])  # 16 -> 11: 31% of a real skill
    gate = {g.id: g for g in bitnet_gates(report, BitNetGates(), "strict").gates}["skill_drop"]
    assert not gate.passed and gate.measured == pytest.approx(5 / 16)
    # a skill the commonest answer already scores as well as the input is not held either
    acc["skills_majority"]["word_problem"] = [14, 50]
    gate = {g.id: g for g in bitnet_gates(report, BitNetGates(), "strict").gates}["skill_drop"]
    assert gate.passed and "word_problem 16/50, baseline 14/50" in gate.criterion
