"""EvoMerge's six techniques on hand-checkable tensors, and whole-model merges on models that share a base."""

import itertools
import json
import math
import subprocess
import sys

import evomerge_fixtures
import pytest
import torch
from safetensors.torch import load_file

from phases.evomerge import techniques as tq
from phases.evomerge.genome import Genome, generation_zero, techniques
from phases.evomerge.merge import Checkpoint, MergeError, merge_genome, save_merged
from phases.evomerge.mergekit_yaml import export
from phases.evomerge.steps import build_model, load_model


# ----------------------------------------------------------------------------- techniques
def test_linear_is_the_normalised_weighted_mean():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])
    assert torch.equal(tq.linear([a, b], [1, 3]), torch.tensor([2.5, 5.0]))
    assert torch.equal(tq.linear([a, b], [1, 3], normalize=False), torch.tensor([10.0, 20.0]))


def test_slerp_endpoints_and_quarter_circle():
    v0, v1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    assert torch.allclose(tq.slerp(0.0, v0, v1), v0) and torch.allclose(tq.slerp(1.0, v0, v1), v1)
    mid = tq.slerp(0.5, v0, v1)  # Ω = 90°: both coefficients are sin 45° / sin 90°
    assert torch.allclose(mid, torch.tensor([math.sqrt(0.5), 2 * math.sqrt(0.5)]), atol=1e-6)
    # interpolating unit vectors stays on the circle, which lerp does not
    assert abs(float(tq.slerp(0.3, v0, v1 / 2).norm()) - 1.0) < 1e-6


def test_slerp_falls_back_to_lerp_for_parallel_vectors():
    v0 = torch.tensor([1.0, 2.0, 3.0])
    assert torch.allclose(tq.slerp(0.25, v0, 3 * v0), 0.75 * v0 + 0.25 * 3 * v0)


def test_ties_trims_elects_sign_by_mass_and_takes_the_disjoint_mean():
    base = torch.zeros(4)
    x1 = torch.tensor([3.0, -1.0, 0.1, 2.0])
    x2 = torch.tensor([-1.0, -2.0, 0.2, 4.0])
    # density 0.75 keeps 3 of 4 entries of each delta: x1 drops 0.1, x2 drops 0.2
    out = tq.ties(base, [x1, x2], [1.0, 1.0], density=0.75)
    # entry 0: mass 3 − 1 > 0 → sign +, only x1 agrees → 3; entry 1: both negative → mean −1.5;
    # entry 2: both trimmed → 0; entry 3: both positive → 3
    assert torch.allclose(out, torch.tensor([3.0, -1.5, 0.0, 3.0]))


@pytest.mark.parametrize("density", [0.01, 0.1, 0.4, 0.75, 0.999])
def test_trim_keeps_exactly_the_top_k_magnitudes_that_a_full_sort_keeps(density):
    delta = torch.randn(64, 96, generator=torch.Generator().manual_seed(3))  # no two magnitudes equal
    k = max(1, int(density * delta.numel()))
    by_sort = torch.zeros(delta.numel())
    by_sort[torch.argsort(delta.abs().reshape(-1), descending=True)[:k]] = 1
    trimmed = tq.magnitude_prune(delta, density)
    assert torch.equal(trimmed, delta * by_sort.reshape(delta.shape)) and int((trimmed != 0).sum()) == k


def test_trim_breaks_ties_at_the_cut_by_position_as_a_stable_sort_does():
    delta = torch.tensor([1.0, 2.0, 5.0, -2.0, 2.0, 2.0])
    # k = 3: 5 and then the first two of the four entries tied at magnitude 2
    assert torch.equal(tq.magnitude_prune(delta, 0.5), torch.tensor([0.0, 2.0, 5.0, -2.0, 0.0, 0.0]))
    stable = torch.sort(delta.abs(), descending=True, stable=True).indices[:3]
    assert set(stable.tolist()) == set(tq.magnitude_prune(delta, 0.5).nonzero().squeeze(1).tolist())


def test_task_arithmetic_adds_scaled_deltas():
    base = torch.tensor([1.0, 1.0])
    out = tq.task_arithmetic(base, [torch.tensor([2.0, 1.0]), torch.tensor([1.0, 3.0])], [1.0, 0.5], lam=2.0)
    assert torch.allclose(out, torch.tensor([1 + 2 * 1.0, 1 + 2 * 1.0]))


def test_dare_at_density_one_is_task_arithmetic_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    base, xs = torch.randn(50, generator=g), [torch.randn(50, generator=g) for _ in range(3)]
    ta = tq.task_arithmetic(base, xs, [0.2, 0.3, 0.5])
    dense = tq.dare(base, xs, [0.2, 0.3, 0.5], 1.0, torch.Generator().manual_seed(1), consensus=False)
    assert torch.equal(ta, dense)
    one = tq.dare(base, xs, [0.2, 0.3, 0.5], 0.5, torch.Generator().manual_seed(7))
    two = tq.dare(base, xs, [0.2, 0.3, 0.5], 0.5, torch.Generator().manual_seed(7))
    assert torch.equal(one, two) and not torch.equal(one, tq.dare(base, xs, [0.2, 0.3, 0.5], 0.5,
                                                                  torch.Generator().manual_seed(8)))


def test_dare_rescales_survivors_by_one_over_density():
    delta = torch.ones(20000)
    dropped = tq.bernoulli_drop(delta, 0.25, torch.Generator().manual_seed(0))
    assert set(dropped.unique().tolist()) == {0.0, 4.0}
    assert abs(float(dropped.mean()) - 1.0) < 0.05  # unbiased


def test_selection_plans():
    assert [(s.source, s.layer) for s in tq.frankenmerge([1, 1, 1])] == [(1, 0), (1, 1), (1, 2)]
    assert len(tq.dfs([(0, 0, 1.0), (2, 1, 0.9), (0, 1, 1.0)], n_layers=2, n_sources=4)) == 3
    with pytest.raises(ValueError, match="outside"):
        tq.dfs([(0, 5, 1.0)], n_layers=2, n_sources=4)


# ----------------------------------------------------------------------------- whole models
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return evomerge_fixtures.build(tmp_path_factory.mktemp("evomerge-models"))


def _inputs(models):
    return [models["a"], models["b"], models["c"]]


def _genome(combo=0, **kw):
    g = generation_zero(2, 0, seed=3)[combo]
    return Genome.model_validate(g.model_dump() | kw)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_the_eight_combinations_give_eight_different_models(models):
    states = [merge_genome(models["base"], _inputs(models), g)[0] for g in generation_zero(2, 0, seed=3)]
    for i, j in itertools.combinations(range(8), 2):
        diff = max(float((states[i][k] - states[j][k]).abs().max()) for k in states[i] if k in states[j]
                   and states[i][k].shape == states[j][k].shape) if states[i].keys() == states[j].keys() else 1.0
        assert diff > 1e-4, f"combos {i} and {j} ({techniques(i)} vs {techniques(j)}) give the same weights"


def test_frankenmerge_all_a_equals_a(models):
    # stage 1–2 reduce to A (weight 1 on A, no task-arithmetic blend), every layer from source 1 = A
    g = _genome(0, pattern=(1, 1), weights=(1.0, 0.0, 0.0), blend=0.0)
    state, _ = merge_genome(models["base"], _inputs(models), g)
    a = load_file(str(models["a"] / "model.safetensors"))
    assert state.keys() == a.keys() and all(torch.equal(state[k], a[k]) for k in a)
    # with another stage-1 mix, the layers are still A's while the embeddings are not
    state, _ = merge_genome(models["base"], _inputs(models), _genome(0, pattern=(1, 1)))
    assert all(torch.equal(state[k], a[k]) for k in a if ".layers." in k)
    assert not torch.equal(state["model.embed_tokens.weight"], a["model.embed_tokens.weight"])


def test_dfs_identity_path_reproduces_the_parent_exactly(models):
    g = _genome(4, path=((1, 0, 1.0), (1, 1, 1.0)), weights=(1.0, 0.0, 0.0), blend=0.0)
    state, config = merge_genome(models["base"], _inputs(models), g)
    a = load_model(models["a"])
    ids = torch.randint(0, a.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    assert torch.equal(_logits(build_model(state, config), ids), _logits(a, ids))


def test_dfs_changes_depth_and_scales_inputs(models):
    g = _genome(4, path=((0, 0, 1.0), (2, 1, 0.8), (0, 1, 1.0)))
    state, config = merge_genome(models["base"], _inputs(models), g)
    assert config["num_hidden_layers"] == 3 and config["layer_scales"] == [1.0, 0.8, 1.0]
    model = build_model(state, config)
    out = _logits(model, torch.randint(0, config["vocab_size"], (1, 10)))
    assert torch.isfinite(out).all()


def test_mismatched_vocabulary_names_the_first_differing_tensor(models, tmp_path):
    from phases.cognate import CognateForCausalLM

    other = CognateForCausalLM.from_pretrained(models["b"])
    other.resize_token_embeddings(other.config.vocab_size + 8)
    other.save_pretrained(tmp_path / "bigger")
    with pytest.raises(MergeError, match="vocabularies differ.*embed_tokens"):
        merge_genome(models["base"], [models["a"], tmp_path / "bigger", models["c"]], _genome(1))


def test_merge_cli_runs_the_exported_yaml_to_the_same_tensors(models, tmp_path):
    for combo in (3, 6):  # slerp+dare+franken, linear+dare+dfs
        g = _genome(combo)
        state, config = merge_genome(models["base"], _inputs(models), g)
        text, exact = export(g, str(models["base"]), [str(p) for p in _inputs(models)])
        assert exact is False  # DARE's seed is an extension
        (tmp_path / f"{combo}.yaml").write_text(text)
        out = tmp_path / f"out{combo}"
        proc = subprocess.run([sys.executable, "-m", "flows.cli", "merge", str(tmp_path / f"{combo}.yaml"), str(out)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        written = load_file(str(out / "model.safetensors"))
        assert written.keys() == state.keys()
        for k in state:
            assert torch.equal(written[k], state[k]), k
        assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == config["num_hidden_layers"]
        load_model(out)  # loads as a model


def test_merge_cli_reports_a_bad_yaml_clearly(models, tmp_path):
    (tmp_path / "bad.yaml").write_text("merge_method: frankenstein\nmodels: []\n")
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "merge", str(tmp_path / "bad.yaml"), str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "frankenstein" in proc.stderr and "Traceback" not in proc.stderr


def test_save_merged_round_trips_through_from_pretrained(models, tmp_path):
    g = _genome(2)
    state, config = merge_genome(models["base"], _inputs(models), g)
    save_merged(state, config, tmp_path / "m", tokenizer_from=models["a"])
    ids = torch.randint(0, config["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(2))
    assert torch.allclose(_logits(load_model(tmp_path / "m"), ids), _logits(build_model(state, config), ids))


def test_generation_zero_holds_each_input_bit_for_bit(models):
    inputs = _inputs(models)
    genomes = [g for g in generation_zero(2, 0, seed=3) if g.origin.startswith("input-")]
    assert [g.runtime_from for g in genomes] == [0, 1, 2]
    for i, g in enumerate(genomes):
        state, config = merge_genome(models["base"], inputs, g)
        own = Checkpoint(inputs[i])
        assert all(torch.equal(state[k], own.get(k)) for k in own.keys()), i
        assert config["act_max_steps"] == own.config["act_max_steps"]  # and its own runtime settings


def test_a_merge_that_drops_the_inputs_skills_fails_the_accuracy_gates(tmp_path):
    """The control on real models: two Cognates from one start, each answering its own 8 arithmetic problems
    exactly, and their plain average, which answers none. Measured as the phase measures a champion on test
    (`final_evaluation`), the average fails `accuracy_kept`, `accuracy_gain` and `fitness_gain`."""
    from learnt import learn, micro_cognate

    from phases.data import curriculum
    from phases.data import tokenizer as bpe
    from phases.data.encoding import EvalSet
    from phases.evomerge.gates import evomerge_gates
    from phases.evomerge.settings import EvoMergeGates
    from phases.evomerge.steps import final_evaluation

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        splits = curriculum.generate(60, 10, seed=3)
        tok = bpe.train_bpe([r["text"] for r in splits["train"]], vocab_size=300)
        problems = [r for r in splits["train"] if r["task"] == "arithmetic" and r["answer"]][:16]
        torch.manual_seed(0)
        start = micro_cognate(tok).state_dict()
        dirs = {}
        for name, own in (("A", problems[:8]), ("B", problems[8:])):
            model = micro_cognate(tok)
            model.load_state_dict(start)
            dirs[name] = tmp_path / name
            learn(model, own, tok).save_pretrained(dirs[name])
        both = [Checkpoint(dirs["A"]), Checkpoint(dirs["B"])]
        average = {k: tq.linear([c.get(k) for c in both], [1.0, 1.0]) for k in both[0].keys()}
        save_merged(average, dict(both[0].config), tmp_path / "average")
        data = EvalSet.build(problems, tok, 48, 4, 16, "test")
        final = final_evaluation({**dirs, "champion": tmp_path / "average"}, data,
                                 {"accuracy": 0.7, "speed": 0.15, "memory": 0.15}, 0.05)
    finally:
        torch.set_num_threads(threads)
    assert [final["inputs"][n]["skill_hits"]["arithmetic"] for n in ("A", "B")] == [[8, 16], [8, 16]]
    assert final["champion"]["skill_hits"]["arithmetic"][0] <= 2
    gates = {g.id: g for g in evomerge_gates(final, {"min_diversity": 0.5, "combos_evaluated": 8}, EvoMergeGates(),
                                             "strict").gates}
    assert {i for i, g in gates.items() if not g.passed} == {"accuracy_kept", "accuracy_gain", "fitness_gain"}
