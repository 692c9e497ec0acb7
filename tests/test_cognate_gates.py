"""The skill gates read measured per-skill hits: each fails on the case built to fail it."""

from __future__ import annotations

import pytest

from phases.cognate.gates import cognate_gates, skill_leaders
from phases.cognate.settings import CognateSection
from phases.common.measure import difference_interval


def _row(hits: int, n: int = 200) -> dict:
    return {"accuracy": hits / n, "hits": hits, "n": n}


def _evaluation(arith: dict[str, int], recall: dict[str, int], ablated_recall: int, n: int = 200) -> dict:
    models = {}
    for name in arith:
        models[name] = {
            "heldout_loss": 1.0, "niah": 0.9, "resolution": {"cv": 0.01}, "accuracy": 0.5, "n": 2 * n,
            "per_skill": {"arithmetic": _row(arith[name], n), "kv_recall": _row(recall[name], n)},
            "kv_recall_memory_ablated": _row(ablated_recall, n),
        }
    return {"models": models, "majority_baseline": 0.0,
            "diversity": {"halting_steps": 3.0, "ltm_usage": 0.5, "latency_ms": 20.0,
                          "prediction_disagreement": {"pairs": {"a/b": 0.3}, "mean": 0.3}}}


def _training(names) -> dict:
    return {n: {"non_finite_tensors": 0, "telemetry": {"non_finite_steps": 0, "steps_with_ppl_delta": 1, "steps_logged": 1},
                "stages": {"s": {"rollbacks": 0, "gate_polarized": 0.5, "final_step": 10}}} for n in names}


def _gates(ev) -> dict:
    report = cognate_gates(ev, _training(ev["models"]), CognateSection(), "strict")
    return {g.id: g for g in report.gates}


def test_skilled_specialists_with_a_used_memory_pass():
    g = _gates(_evaluation({"speed": 190, "memory": 20}, {"speed": 10, "memory": 150}, ablated_recall=8))
    for gate in ("arithmetic", "recall_beyond_window", "memory_used", "specialists_differ"):
        assert g[gate].passed, g[gate]
    assert g["memory_used"].interval[0] > 0


@pytest.mark.parametrize("case,arith,recall,ablated,failing", [
    ("untrained: nothing right", {"a": 2, "b": 1}, {"a": 1, "b": 0}, 0,
     {"arithmetic", "recall_beyond_window", "memory_used", "specialists_differ"}),
    ("memory read zeroed costs nothing: the answers came from elsewhere", {"a": 190, "b": 20}, {"a": 10, "b": 150}, 150,
     {"memory_used"}),
    ("one model best at everything", {"a": 190, "b": 20}, {"a": 150, "b": 10}, 5, {"specialists_differ"}),
])
def test_each_skill_gate_fails_on_its_failing_case(case, arith, recall, ablated, failing):
    g = _gates(_evaluation(arith, recall, ablated))
    assert {k for k in ("arithmetic", "recall_beyond_window", "memory_used", "specialists_differ")
            if not g[k].passed} == failing, case


def test_gate_polarization_is_read_where_each_model_ends_training():
    ev = _evaluation({"speed": 190, "memory": 20}, {"speed": 10, "memory": 150}, ablated_recall=8)
    tr = _training(ev["models"])
    # a first stage whose gates had not parted yet does not count against the model it became ...
    tr["memory"]["stages"] = {"reasoning": {"rollbacks": 0, "gate_polarized": 0.05, "final_step": 10},
                              "advanced": {"rollbacks": 0, "gate_polarized": 0.4, "final_step": 20}}
    gate = {g.id: g for g in cognate_gates(ev, tr, CognateSection(), "strict").gates}["gate_polarization"]
    assert gate.passed and gate.measured == pytest.approx(0.4)
    # ... and a last stage that lost its polarization fails, however polarized it was before
    tr["memory"]["stages"]["reasoning"]["gate_polarized"], tr["memory"]["stages"]["advanced"]["gate_polarized"] = 0.4, 0.05
    gate = {g.id: g for g in cognate_gates(ev, tr, CognateSection(), "strict").gates}["gate_polarization"]
    assert not gate.passed and gate.measured == pytest.approx(0.05)


def test_accuracy_over_majority_needs_a_significant_margin():
    ev = _evaluation({"speed": 190, "memory": 20}, {"speed": 10, "memory": 150}, ablated_recall=8)
    tr = _training(ev["models"])

    def gate():
        return {g.id: g for g in cognate_gates(ev, tr, CognateSection(), "strict").gates}["accuracy_over_majority"]

    assert gate().passed and gate().interval[0] > 0
    # 3 of 400 problems above a baseline of 1 of 400: ahead by half a point, but not significantly
    ev["models"]["memory"]["accuracy"], ev["majority_baseline"] = 3 / 400, 1 / 400
    assert gate().measured == pytest.approx(0.005) and not gate().passed and gate().interval[0] < 0
    assert "(memory)" in gate().criterion


def test_a_large_drop_on_few_problems_is_not_significant_and_fails():
    # 2 of 4 right, 0 of 4 with the memory zeroed: a 50-point drop, but 4 problems cannot show it
    g = _gates(_evaluation({"a": 4, "b": 0}, {"a": 0, "b": 2}, ablated_recall=0, n=4))
    assert g["memory_used"].measured == pytest.approx(0.5) and not g["memory_used"].passed
    assert difference_interval(2, 4, 0, 4)[0] < 0


def test_mcnemar_counts_only_the_problems_that_changed():
    from phases.common.measure import mcnemar_p

    assert mcnemar_p([True] * 10 + [False] * 90, [False] * 100) == pytest.approx(2 / 2**10)
    assert mcnemar_p([True, False] * 50, [True, False] * 50) == 1.0  # nothing changed
    assert mcnemar_p([True] * 5 + [False] * 5, [False] * 5 + [True] * 5) == 1.0  # as many gained as lost
    with pytest.raises(ValueError, match="different lengths"):
        mcnemar_p([True], [True, False])


def test_the_ablation_gate_needs_the_paired_test_too():
    """3 of 5 recalled, 0 of 5 with the memory zeroed: a 60-point drop whose unpaired interval excludes 0, but
    three discordant problems give McNemar p = 0.25: FAIL. The same pattern on 200 problems: PASS."""
    from phases.common.measure import mcnemar_p

    for n, own_hits, verdict in ((5, 3, False), (200, 120, True)):
        own = [True] * own_hits + [False] * (n - own_hits)
        ev = _evaluation({"a": n, "b": 0}, {"a": 0, "b": own_hits}, ablated_recall=0, n=n)
        ev["models"]["b"]["kv_recall_memory_ablated"]["mcnemar_p"] = mcnemar_p(own, [False] * n)
        g = _gates(ev)["memory_used"]
        assert g.interval[0] > 0 and g.measured >= 0.3 and g.passed is verdict, (n, g)
        assert f"McNemar p = {g.p_value:.3g}" in cognate_gates(ev, _training(ev["models"]), CognateSection(),
                                                               "strict").markdown()
    assert mcnemar_p([True] * 3 + [False] * 2, [False] * 5) == pytest.approx(0.25)


def test_a_lead_must_clear_the_margin_and_be_significant():
    near = {"a": {"per_skill": {"x": _row(120)}}, "b": {"per_skill": {"x": _row(110)}}}
    assert skill_leaders(near, 0.1) == {}  # 5 points: under the margin
    small = {"a": {"per_skill": {"x": _row(6, 10)}}, "b": {"per_skill": {"x": _row(4, 10)}}}
    assert skill_leaders(small, 0.1) == {}  # 20 points on 10 problems: not significant
    clear = {"a": {"per_skill": {"x": _row(150)}}, "b": {"per_skill": {"x": _row(100)}}}
    assert skill_leaders(clear, 0.1)["x"]["model"] == "a"


def _tiny_model(seed: int):
    import torch

    from phases.cognate.configuration import CognateConfig
    from phases.cognate.modeling import CognateForCausalLM

    torch.manual_seed(seed)
    return CognateForCausalLM(CognateConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                            act_max_steps=1, window_size=8, mem_chunk_size=8,
                                            # an even gate: from the attention-leaning start, untrained models of any
                                            # seed predict their input token again, so they would all agree
                                            gate_init=0.0)).eval()


def test_three_copies_of_one_model_fail_the_diversity_gate_and_different_models_pass():
    import torch

    from phases.cognate import evaluate

    rows = torch.randint(0, 64, (6, 24), generator=torch.Generator().manual_seed(0))
    labels = rows.clone()
    labels[:, :8] = -100  # the prompt: not scored
    one = _tiny_model(0)
    copies = {n: evaluate.next_token_predictions(one, rows, labels) for n in ("a", "b", "c")}
    assert len(copies["a"]) == 6 * 16  # positions whose next token is scored (labels 8..23 of each row)
    same = evaluate.disagreement(copies)
    assert same["mean"] == 0.0 and set(same["pairs"]) == {"a/b", "a/c", "b/c"}
    distinct = evaluate.disagreement({n: evaluate.next_token_predictions(_tiny_model(seed), rows, labels)
                                      for n, seed in (("a", 0), ("b", 1), ("c", 2))})
    assert distinct["mean"] > 0.5  # untrained models of different seeds rarely agree on 64 tokens

    ev = _evaluation({"a": 100, "b": 10}, {"a": 10, "b": 150}, ablated_recall=5)
    for measured, verdict in ((same, False), (distinct, True)):
        ev["diversity"]["prediction_disagreement"] = measured
        assert _gates(ev)["diversity_predictions"].passed is verdict


def test_figures_the_settings_decide_are_reported_not_gated():
    ev = _evaluation({"a": 100, "b": 10}, {"a": 10, "b": 150}, ablated_recall=5)
    report = cognate_gates(ev, _training(ev["models"]), CognateSection(), "strict")
    facts = {f.id: f.value for f in report.facts}
    assert facts == {"niah": 0.9, "ppl_delta_visible": 1.0, "rollbacks": 0, "halting_spread": 3.0, "ltm_spread": 0.5,
                     "latency_spread_ms": 20.0}
    assert not set(facts) & {g.id for g in report.gates}
    assert "Reported, not gated" in report.markdown() and "| niah |" in report.markdown()


def test_the_accuracy_problems_cover_every_stage_of_each_skill():
    from phases.cognate.evaluate import by_skill

    rows = [{"task": t, "stage": s, "answer": "1"} for t in ("arithmetic", "kv_recall")
            for s in ("foundation", "reasoning", "advanced") for _ in range(100)]
    picked = by_skill(rows, 200)
    for task in ("arithmetic", "kv_recall"):
        mine = [r for r in picked if r["task"] == task]
        assert len(mine) == 200
        assert {s: sum(r["stage"] == s for r in mine) for s in ("foundation", "reasoning", "advanced")} == {
            "foundation": 67, "reasoning": 67, "advanced": 66}


def test_the_diagnostics_gates_read_not_measured_without_a_diagnosis_and_pass_on_merit():
    ev = _evaluation({"speed": 190, "memory": 20}, {"speed": 10, "memory": 150}, ablated_recall=8)
    g = _gates(ev)
    assert g["state_health"].measured is None and not g["state_health"].passed and not g["long_range_d4"].passed
    d4 = {"beyond_accuracy": 0.5, "beyond_ablated": 0.0, "beyond_n": 144, "difference": 0.5, "interval": (0.4, 0.6),
          "mcnemar_p": 1e-12}
    diagnosed = {"memory": {"health": 0.9, "d4": d4}, "speed": {"health": 0.8, "d4": d4 | {"difference": 0.0,
                                                                                         "mcnemar_p": 1.0}}}
    g = {x.id: x for x in cognate_gates(ev, _training(ev["models"]), CognateSection(), "strict", diagnosed).gates}
    assert g["state_health"].passed and g["long_range_d4"].passed and "(memory;" in g["long_range_d4"].criterion
    diagnosed["memory"]["health"] = 0.6
    g = {x.id: x for x in cognate_gates(ev, _training(ev["models"]), CognateSection(), "strict", diagnosed).gates}
    assert not g["state_health"].passed
