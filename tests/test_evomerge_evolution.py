"""EvoMerge's fitness is measured and moves with the model; the genetic algorithm keeps elites,
merges losers, re-seeds on low diversity, stops early with a reason, and resumes after a kill."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import evomerge_fixtures
import pytest

from phases.evomerge import fitness as fit
from phases.evomerge import steps
from phases.evomerge.evolution import Evolution
from phases.evomerge.genome import Genome, generation_zero
from phases.evomerge.settings import EvoMergeFitness, EvoMergeSearch

WEIGHTS = {"accuracy": 0.7, "speed": 0.2, "memory": 0.1}
HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return evomerge_fixtures.build(tmp_path_factory.mktemp("evomerge-models"))


@pytest.fixture(scope="module")
def validation(models):
    return steps.eval_set(models["curriculum"], models["base"], EvoMergeFitness(eval_rows=4, accuracy_problems=8),
                             48, "validation")


def test_fitness_is_measured_on_validation_and_moves_with_the_model(models, validation):
    test = steps.eval_set(models["curriculum"], models["base"], EvoMergeFitness(eval_rows=4, accuracy_problems=8),
                             48, "test")
    assert validation.split == "validation" and not (validation.rows[:1] == test.rows[:1]).all()
    memo = {}
    raws = {n: steps.measure_model(steps.load_model(models[n]), validation, validation.rows[:1], memo)
            for n in ("base", "a", "c")}
    ref = fit.reference([raws["a"], raws["c"]])
    scores = {n: fit.score(r, ref, WEIGHTS) for n, r in raws.items()}
    # measured, not constant: the structures differ in fitness; the weights alone (base vs a, same structure,
    # both answering nothing here) in the perplexity the guard reads
    assert scores["a"][0] != scores["c"][0]
    assert scores["a"][1]["perplexity"] != scores["base"][1]["perplexity"]
    assert raws["a"]["perplexity"] != raws["base"]["perplexity"]
    # the reference itself scores exactly 1; a model as accurate as the best input and twice as slow as the
    # reference loses 0.1 of the 0.2 speed weight
    assert fit.score(ref | {"non_finite": 0}, ref | {"best_accuracy": ref["accuracy"]}, WEIGHTS)[0] == pytest.approx(1.0)
    slow = dict(ref, flops_per_token=ref["flops_per_token"] * 2, non_finite=0)
    assert fit.score(slow, ref | {"best_accuracy": ref["accuracy"]}, WEIGHTS)[0] == pytest.approx(0.9)
    assert set(raws["a"]["skill_hits"]) == set(validation.skills) and len(set(validation.skills)) >= 2
    assert sum(n for _, n in raws["a"]["skill_hits"].values()) == len(validation.problems)
    # a much faster model that forgot its language is infeasible, not fit
    limited = fit.reference([raws["a"], raws["c"]], max_perplexity_increase=0.05)
    worst = max(raws["a"]["perplexity"], raws["c"]["perplexity"])
    fast_but_bad = dict(ref, perplexity=worst * 1.06, flops_per_token=ref["flops_per_token"] / 10, non_finite=0,
                        accuracy=ref["best_accuracy"])
    assert fit.score(fast_but_bad, ref, WEIGHTS)[0] > 2 and fit.score(fast_but_bad, limited, WEIGHTS)[0] == 0.0
    assert fit.score(dict(fast_but_bad, perplexity=worst * 1.04), limited, WEIGHTS)[0] > 2
    # c runs one recursion step, a two: c costs fewer FLOPs per token, and a/base share a structure (one count)
    assert raws["c"]["flops_per_token"] < raws["a"]["flops_per_token"]
    assert raws["a"]["flops_per_token"] == raws["base"]["flops_per_token"] and len(memo) == 2


def test_diversity_is_measured_not_constant():
    same = [[1, 2, 3, 4]] * 3
    assert fit.diversity(same) == 0.0
    assert fit.diversity([[1, 2, 3, 4], [1, 2, 3, 5], [0, 2, 3, 4]]) == pytest.approx((0.25 + 0.25 + 0.5) / 3)


def _synthetic(predict_alike: bool = False):
    """A fast stand-in for merged models: perplexity is a smooth function of the recipe, so the search
    has something to find; predictions follow the recipe (or are all alike)."""
    calls = []

    def evaluate(genomes):
        for g in genomes:
            calls.append(g.key())
            w = g.weights
            acc = 0.9 - 2 * (w[0] - 0.6) ** 2 - 0.5 * (g.density - 0.8) ** 2 - 0.3 * g.blend - 0.05 * g.combo
            rng = random.Random(g.key())
            preds = [0] * 64 if predict_alike else [rng.randrange(4) for _ in range(64)]
            yield g, {"perplexity": 12.0, "accuracy": acc, "flops_per_token": 1e6, "memory_bytes": 1e6,
                      "non_finite": 0.0, "predictions": preds}

    return evaluate, calls


REF = {"perplexity": 12.0, "accuracy": 0.5, "flops_per_token": 1e6, "memory_bytes": 1e6}


def test_generations_keep_elites_mutate_them_and_merge_losers(tmp_path):
    evaluate, calls = _synthetic()
    result = Evolution(EvoMergeSearch(generations=4, patience=100), 3, 2, 0, REF, WEIGHTS, tmp_path, evaluate,
                       log=lambda m: None).run()
    history = result["history"]
    assert [len(h["population"]) for h in history] == [11, 10, 10, 10]  # the 8 combinations and the 3 inputs
    assert {r["genome"]["combo"] for r in history[0]["population"]} == set(range(8))
    assert len(calls) == len(set(calls))  # nothing evaluated twice
    for prev, cur in zip(history, history[1:]):
        keys = {r["key"] for r in cur["population"]}
        assert {r["key"] for r in prev["population"][:2]} <= keys  # elites survive
        origins = [r["origin"] for r in cur["population"] if r["origin"].startswith(f"g{cur['generation']}:")]
        assert sum("mutant-of" in o for o in origins) == 6 and sum("merged-losers" in o for o in origins) == 2
        assert cur["best"] >= prev["best"]  # elitism: the best never gets worse
    assert history[-1]["best"] > history[0]["best"]  # the search found something
    assert 0 < history[-1]["diversity"] <= 1


def test_low_diversity_reseeds_the_weakest(tmp_path):
    evaluate, _ = _synthetic(predict_alike=True)
    logs = []
    result = Evolution(EvoMergeSearch(generations=2, patience=100), 3, 2, 0, REF, WEIGHTS, tmp_path, evaluate,
                       log=logs.append).run()
    assert result["history"][1]["reseeded"] == 3 and any("re-seeding" in line for line in logs)
    assert sum("reseeded" in r["origin"] for r in result["history"][1]["population"]) == 3


def test_stalled_search_stops_early_with_the_reason(tmp_path):
    def flat(genomes):
        for g in genomes:
            yield g, {"perplexity": 12.0, "accuracy": 0.1, "flops_per_token": 1e6, "memory_bytes": 1e6,
                      "non_finite": 0.0, "predictions": [random.Random(g.key()).randrange(4) for _ in range(16)]}

    result = Evolution(EvoMergeSearch(generations=50, patience=5), 1, 2, 0, REF, WEIGHTS, tmp_path, flat,
                       log=lambda m: None).run()
    assert result["generations_run"] == 6 and result["stop_reason"].startswith("early stop after generation 5")


def test_recipe_is_the_identity():
    g = generation_zero(2, 0, seed=1)[0]
    same = Genome.model_validate(g.model_dump() | {"origin": "elsewhere", "path": ((0, 0, 0.5),)})  # path unused by combo 0
    assert same.key() == g.key()
    assert Genome.model_validate(g.model_dump() | {"density": 0.6}).key() != g.key()
    assert Genome.model_validate(g.model_dump() | {"weights": (2.0, 2.0, 2.0)}).key() == g.key()  # normalised


def test_killed_evolution_resumes_without_reevaluating(models, tmp_path):
    state = tmp_path / "state"
    root = models["base"].parent
    cmd = [sys.executable, str(HERE / "evomerge_worker.py"), str(root), str(state), "3", "0.15"]
    env = dict(os.environ, PYTHONPATH=f"{HERE.parent}:{HERE}")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    evals = state / "evaluations.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:  # kill inside generation 1, after generation 0 is recorded
        if (state / "generations.jsonl").exists() and evals.exists() and len(evals.read_text().splitlines()) >= 11:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = [json.loads(x)["key"] for x in evals.read_text().splitlines()]
    assert 11 <= len(before) < 8 + 8 + 8, "the kill did not land inside generation 1"
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    after = [json.loads(x)["key"] for x in evals.read_text().splitlines()]
    assert len(after) == len(set(after)), "a finished candidate was evaluated again"
    assert summary["evaluated_now"] == len(after) - len(before) and summary["generations_run"] == 3
    assert "resuming after generation 0" in out.stdout

    # the same search unbroken, in another process: the same champion, and every candidate both runs
    # evaluated measured alike (fitness counts, it never times), so one recipe id names one champion
    fresh = tmp_path / "unbroken"
    unbroken = subprocess.run([*cmd[:3], str(fresh), "3", "0"], capture_output=True, text=True, env=env, timeout=300)
    assert unbroken.returncode == 0, unbroken.stderr
    assert json.loads(unbroken.stdout.strip().splitlines()[-1])["champion"] == summary["champion"]

    def raw_by_key(path):
        rows = [json.loads(x) for x in path.read_text().splitlines()]
        return {r["key"]: {k: v for k, v in r["raw"].items() if k != "predictions"} for r in rows}

    killed, clean = raw_by_key(evals), raw_by_key(fresh / "evaluations.jsonl")
    assert killed.keys() == clean.keys() and all(killed[k] == clean[k] for k in clean)


def test_accuracy_kept_fails_when_nothing_answers_and_when_the_champion_loses_accuracy():
    from phases.evomerge.gates import evomerge_gates
    from phases.evomerge.settings import EvoMergeGates

    def kept(champion: float, inputs: list[float]):
        final = {"champion": {"fitness": 1.5, "accuracy": champion},
                 "inputs": {f"m{i}": {"fitness": 1.0, "accuracy": a} for i, a in enumerate(inputs)}}
        run = {"min_diversity": 0.5, "combos_evaluated": 8}
        return {g.id: g for g in evomerge_gates(final, run, EvoMergeGates(), "lenient").gates}["accuracy_kept"]

    assert kept(0.0, [0.0, 0.0, 0.0]).measured is None and not kept(0.0, [0.0, 0.0, 0.0]).passed  # never 0 >= 0
    assert not kept(0.10, [0.20, 0.05, 0.0]).passed
    assert kept(0.25, [0.20, 0.05, 0.0]).passed


def test_the_combination_count_is_checked_where_it_is_produced():
    from phases.evomerge.genome import Genome
    from phases.evomerge.steps import run_summary

    population = [{"genome": Genome(combo=c, weights=(0.4, 0.3, 0.3), density=0.5, blend=0.5, pattern=(0, 1),
                                    path=(), runtime_from=0).model_dump(mode="json")} for c in range(7)]
    with pytest.raises(RuntimeError, match="generation 0 evaluated 7 of the 8 technique combinations"):
        run_summary({"history": [{"population": population, "diversity": 0.5, "best": 1.0}], "generations_run": 1,
                     "stop_reason": "x", "evaluated": 7}, 1.0)


def _raw(acc: float, flops: float = 1e6, memory: float = 1e6, ppl: float = 10.0) -> dict:
    return {"accuracy": acc, "perplexity": ppl, "flops_per_token": flops, "memory_bytes": memory, "non_finite": 0.0}


def test_fitness_rewards_combined_skills_and_speed_never_buys_back_lost_accuracy():
    # two specialists, one skill each (mean over 2 skills: 0.45 each), and a slower generalist that answers nothing
    inputs = {"arith": _raw(0.45), "recall": _raw(0.47, memory=2e6), "slow": _raw(0.0, flops=4e6)}
    ref = fit.reference(list(inputs.values()), max_perplexity_increase=0.05)
    best = max(fit.score(r, ref, WEIGHTS)[0] for r in inputs.values())
    # a merge keeping most of both skills beats every input by far more than the gate's 20%
    assert fit.score(_raw(0.85), ref, WEIGHTS)[0] / best > 1.2
    # one ten times faster and smaller, but a little less accurate than the best input, scores below it
    quick = _raw(0.46, flops=1e5, memory=1e5)
    assert fit.score(quick, ref, WEIGHTS)[0] < fit.score(inputs["recall"], ref, WEIGHTS)[0]
    # as accurate as the best input, the speed counts in full: it wins
    assert fit.score(dict(quick, accuracy=0.47), ref, WEIGHTS)[0] > best
    # perplexity is a guard only: better perplexity alone earns nothing, past the limit the score is 0
    recall = fit.score(inputs["recall"], ref, WEIGHTS)[0]
    assert fit.score(_raw(0.47, memory=2e6, ppl=5.0), ref, WEIGHTS)[0] == pytest.approx(recall)
    assert fit.score(_raw(0.85, ppl=10.6), ref, WEIGHTS)[0] == 0.0


def test_the_skills_table_gives_each_models_accuracy_with_its_interval():
    final = {"champion": {"skill_hits": {"arithmetic": [18, 20], "kv_recall": [19, 20]}, "accuracy": 0.925, "fitness": 2.1},
             "inputs": {"speed": {"skill_hits": {"arithmetic": [19, 20], "kv_recall": [0, 20]}, "accuracy": 0.475,
                                  "fitness": 1.0}}}
    table = steps.skills_table(final).splitlines()
    assert table[0] == "| model | arithmetic (n=20) | kv_recall (n=20) | mean | fitness |"
    assert table[2].startswith("| champion | 90.0% [69.9%, 97.2%] | 95.0% [76.4%, 99.1%] | 92.5% | 2.100 |")
    assert "0.0% [0.0%, 16.1%]" in table[3]


def test_fitness_is_measured_on_the_device_preflight_checks_and_the_champion_recipe_names_it(models, validation):
    import torch

    from phases.common.resources import PreflightError
    from phases.config import PipelineConfig
    from tasks.evomerge import eval_device, search_config

    cpu = PipelineConfig.from_preset("tiny", preflight={"device": "cpu"})
    assert eval_device(cpu) == "cpu" and search_config(cpu)["eval_device"] == "cpu"
    auto = PipelineConfig.from_preset("tiny")
    assert eval_device(auto) == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():  # asked for a GPU there is none of: the preflight's own error
        with pytest.raises(PreflightError, match="no CUDA GPU"):
            eval_device(PipelineConfig.from_preset("tiny", preflight={"device": "cuda"}))
    model = steps.load_model(models["a"])
    raw = steps.measure_model(model, validation, validation.rows[:1], {}, eval_device(auto))
    assert next(model.parameters()).device.type == eval_device(auto)
    on_cpu = steps.measure_model(steps.load_model(models["a"]), validation, validation.rows[:1], {}, "cpu")
    # the same measurement wherever it runs: counts exactly, sums to float tolerance
    assert raw["hits"] == on_cpu["hits"] and raw["flops_per_token"] == on_cpu["flops_per_token"]
    assert raw["loss"] == pytest.approx(on_cpu["loss"], rel=1e-4)
