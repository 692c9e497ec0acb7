"""The state diagnostics D1-D4 and the go/no-go verdict: each diagnostic fails on the case built to fail it, through
the model's real forward on tokens."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from phases.cognate import diagnostics, steps
from phases.cognate.configuration import CognateConfig
from phases.cognate.gates import diagnosis_gates
from phases.cognate.modeling import CognateForCausalLM
from phases.cognate.settings import CognateDiagnostics, CognateSection
from phases.common.hf_io import save_pretrained
from phases.data import curriculum
from phases.data import tokenizer as bpe

SETTINGS = CognateDiagnostics(shards=2, inputs=2, span=32, early_tokens=64, coupling_tokens=64, trials=8, beyond=[16])


@pytest.fixture(scope="module")
def tokenizer():
    rows = curriculum.generate_stage("advanced", "train", 150, 0, set())
    return bpe.train_bpe((r["text"] for r in rows), 400)


def _model(tokenizer, seed: int = 0, **kw) -> CognateForCausalLM:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=len(tokenizer), hidden_size=48, num_hidden_layers=2, num_attention_heads=2, act_max_steps=2,
               window_size=64, mem_chunk_size=8, shard_length=256, gate_init=0.0,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return CognateForCausalLM(CognateConfig(**(cfg | kw))).eval()


def _states(model, tokenizer):
    ids = diagnostics._batch(tokenizer, 2, 512, seed=3)
    return diagnostics.trace_states(model, ids, span=32, early_tokens=64)


def test_needle_problems_put_the_question_exactly_the_asked_distance_after_the_code(tokenizer):
    for distance in (30, 60):
        for prompt, answer in diagnostics.needle_problems(tokenizer, distance, 4, seed=1):
            text = tokenizer.decode(prompt + answer)
            code = text.split("is ")[1][:3]
            assert tokenizer.decode(answer).strip() == code and text.rstrip().endswith(f"Answer: {code}")
            # the code's last token: where the statement (without its period) ends
            statement = text[: text.index(code) + 3]
            code_end = len(tokenizer.encode(statement, add_special_tokens=False)) - 1
            assert len(prompt) - 1 - code_end == distance
    with pytest.raises(ValueError, match="shorter than the question"):
        diagnostics.needle_problems(tokenizer, 3, 1, seed=1)


def test_d1_fails_a_memory_whose_forgetting_amplifies_and_passes_an_untrained_one(tokenizer):
    healthy = _model(tokenizer)
    d1, _ = _states(healthy, tokenizer)
    assert d1["worst_growth"] <= diagnostics.MAX_GROWTH
    # decay turned around: W ← (1 − α) W + S with α = −0.2, so every chunk multiplies the state by 1.2
    amplifying = _model(tokenizer, mem_decay_scale=-0.2)
    with torch.no_grad():
        for layer in amplifying.model.layers:
            layer.memory.alpha_logit.fill_(12.0)
    d1, d2 = _states(amplifying, tokenizer)
    assert d1["worst_growth"] > diagnostics.MAX_GROWTH
    assert diagnostics.health_score(d1, d2) == 0.0


def test_d2_fails_a_memory_that_stores_nothing_and_passes_an_untrained_one(tokenizer):
    d1, d2 = _states(_model(tokenizer), tokenizer)
    assert d2["min_read_rank"] >= diagnostics.HEALTHY_RANK and d2["min_state_dispersion"] >= diagnostics.HEALTHY_DISPERSION
    assert diagnostics.health_score(d1, d2) > diagnostics.MIN_HEALTH
    blank = _model(tokenizer)
    with torch.no_grad():
        for layer in blank.model.layers:  # values of zero: every write is zero, every state and read the same
            layer.v_proj.weight.zero_()
    d1, d2 = _states(blank, tokenizer)
    assert d2["min_read_rank"] < diagnostics.MIN_RANK and d2["min_state_dispersion"] < diagnostics.MIN_DISPERSION
    assert diagnostics.health_score(d1, d2) == 0.0


def test_d3_fails_either_path_shut_and_passes_a_balanced_mix(tokenizer):
    ids = diagnostics._batch(tokenizer, 2, 64, seed=3)
    # untrained, the RMS-normed memory read outweighs attention's two small projections: a gate bias evens them
    shares = {b: diagnostics.component_interaction(_model(tokenizer, gate_bias=float(b)), ids) for b in range(0, 7)}
    assert any(d3["smallest_share"] > diagnostics.FLOW[0] for d3 in shares.values())
    for bias in (-9.0, 12.0):  # σ(−9): memory takes the mix; σ(12): attention does
        shut = _model(tokenizer, gate_bias=bias)
        before = {n: p.clone() for n, p in shut.named_parameters()}
        d3 = diagnostics.component_interaction(shut, ids)
        assert d3["smallest_share"] < diagnostics.FLOW[1] and d3["worst_coupling"] > diagnostics.COUPLING[1], bias
        assert all(torch.equal(before[n], p) and p.grad is None for n, p in shut.named_parameters())  # not changed


def test_d4_fails_an_untrained_model_and_a_model_whose_memory_read_is_zeroed(tokenizer):
    for model in (_model(tokenizer), _model(tokenizer, mem_read_scale=0.0)):
        d4 = diagnostics.long_range(model, tokenizer, trials=8, beyond=[16, 48], seed=0)
        assert d4["beyond_n"] == 16 and [r["distance"] for r in d4["by_distance"]] == [32, 56, 80, 112]
        assert not (d4["difference"] > 0 and d4["mcnemar_p"] < diagnostics.SIGNIFICANCE)
        assert model.config.mem_read_scale in (1.0, 0.0)  # the control restores the model's own setting


def _passing() -> diagnostics.Diagnosis:
    """Figures that meet every PASS criterion: the verdict's GO side."""
    d = diagnostics.Diagnosis(name="m", window=64)
    d.d1 = {"worst_growth": 2.0, "growth": [2.0], "early_tokens": 256}
    d.d2 = {"min_read_rank": 0.3, "min_state_dispersion": 0.5, "read_rank": [0.3], "state_dispersion": [0.5]}
    d.health = diagnostics.health_score(d.d1, d.d2)
    d.d3 = {"worst_coupling": 1.5, "smallest_share": 0.4, "coupling": [1.5], "memory_share": [0.4]}
    d.d4 = {"beyond_accuracy": 0.6, "beyond_ablated": 0.05, "beyond_n": 144, "difference": 0.55,
            "interval": (0.45, 0.65), "mcnemar_p": 1e-9, "by_distance": []}
    return d


@pytest.mark.parametrize("broken, status", [
    ({"d1": {"worst_growth": 12.0}}, "FAIL"), ({"d3": {"worst_coupling": 3.0}}, "WARN"),
    ({"d3": {"worst_coupling": 6.0}}, "FAIL"), ({"d3": {"smallest_share": 0.03}}, "FAIL"),
    ({"d4": {"difference": 0.02, "mcnemar_p": 0.4}}, "FAIL"), ({"d2": {"min_read_rank": 0.01}}, "FAIL"),
])
def test_go_needs_every_diagnostic_to_pass(broken, status):
    d = _passing()
    diagnostics.go_no_go(d)
    assert d.verdict == "GO" and d.health == 1.0
    for part, values in broken.items():
        getattr(d, part).update(values)
    diagnostics.go_no_go(d)
    assert d.verdict == "NO-GO" and status in {r["status"] for r in d.rows}


def test_the_diagnose_flow_gates_fail_without_long_range_recall_and_pass_with_it():
    d = _passing()
    diagnostics.go_no_go(d)
    ok = steps.headline(d.as_dict())
    gates = {g.id: g for g in diagnosis_gates(ok, CognateSection(), "strict").gates}
    assert all(g.passed for g in gates.values()) and set(gates) == {"go_no_go", "state_health", "long_range_d4"}
    flat = ok | {"health": 0.5, "d4": ok["d4"] | {"difference": 0.0, "interval": (-0.02, 0.02), "mcnemar_p": 1.0}}
    gates = {g.id: g for g in diagnosis_gates(flat, CognateSection(), "strict").gates}
    assert not gates["long_range_d4"].passed and not gates["state_health"].passed
    d.d3["smallest_share"] = 0.1  # WARN: not a GO
    diagnostics.go_no_go(d)
    assert not diagnosis_gates(steps.headline(d.as_dict()), CognateSection(), "strict").passed


def test_the_command_diagnoses_a_model_directory_and_refuses_what_is_not_a_cognate(tokenizer, tmp_path):
    model = _model(tokenizer)
    save_pretrained(model, tmp_path / "m")
    tokenizer.save_pretrained(str(tmp_path / "m"))
    sets = [f"--set={k}={json.dumps(v)}" for k, v in SETTINGS.model_dump().items()]
    run = subprocess.run([sys.executable, "-m", "flows.cli", "diagnose", str(tmp_path / "m"), "--out",
                          str(tmp_path / "report"), *sets], capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stderr  # an untrained model: NO-GO
    assert "NO-GO" in run.stdout and "| D4 long-range dependency |" in run.stdout
    saved = json.loads((tmp_path / "report" / steps.DIAGNOSIS).read_text())
    assert saved["verdict"] == "NO-GO" and math.isfinite(saved["health"])
    assert (tmp_path / "report" / steps.DIAGNOSIS_FIGURE).stat().st_size > 10_000
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "bitnet"}))
    run = subprocess.run([sys.executable, "-m", "flows.cli", "diagnose", str(tmp_path / "other")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "not a Cognate-family model" in run.stderr


def test_the_figure_draws_a_perfect_recall_whose_interval_ends_a_hair_below_it(tmp_path):
    from phases.cognate.plots import diagnosis_figure
    from phases.common.measure import wilson_interval

    d = _passing()
    d.d1.update(positions=[64, 128], norms=[[1.0, 2.0]], shard_length=128, tokens=128)
    d.d2["spectrum"] = [[1.0, 0.1]]
    d.d4["by_distance"] = [{"distance": 80, "inside_window": False, "n": 48, "accuracy": 1.0,
                            "wilson_95": wilson_interval(48, 48), "ablated": 0.0, "ablated_wilson_95": wilson_interval(0, 48)}]
    diagnostics.go_no_go(d)
    assert wilson_interval(48, 48)[1] < 1.0  # the case this guards
    assert diagnosis_figure(d.as_dict(), tmp_path / "d.png").stat().st_size > 10_000
