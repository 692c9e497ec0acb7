"""The cognate flow run for real (in-process Prefect API), on a micro configuration; and the
merge-readiness of what it produced."""

import asyncio
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import phases.cognate.modeling  # noqa: F401  (registers the Cognate Auto classes)
from phases.cognate import steps
from phases.cognate.data import pack_whole
from phases.common import measure
from phases.data import dataset_files
from phases.data import tokenizer as bpe
from storage import ArtifactStore


@pytest.fixture(scope="module")
def flow_run(cognate_micro):
    return cognate_micro


def _artifacts(keys):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))

    return asyncio.run(read())


def test_cognate_flow_stores_base_and_three_specialists_with_lineage(flow_run):
    config, home, result = flow_run
    store = ArtifactStore(home)
    assert set(result.models) == {"reasoning", "memory", "speed"}
    kinds = sorted(m["kind"] for m in store.list())
    assert kinds.count("cognate-base") == 1 and kinds.count("cognate-model") == 3
    for ref in result.models.values():
        manifest = store.manifest(ref)
        assert manifest["inputs"][0] == result.base.id  # each specialist's parent is the base
        stages = manifest["metrics"]["stages"]
        assert set(stages) == {"reasoning", "advanced"} and all(math.isfinite(s["eval_loss"]) for s in stages.values())
        path = store.load(ref)
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        tok = bpe.load(path)
        ids = torch.tensor([tok.encode("Question: What is 2 + 3?\nAnswer:")])
        out = model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
        assert out.shape[1] == ids.shape[1] + 5
        assert (path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # specialists really differ in their runtime settings, and in their weights
    runtimes = [store.manifest(r)["metrics"]["runtime"] for r in result.models.values()]
    assert len({json.dumps(r, sort_keys=True) for r in runtimes}) == 3


def test_gate_table_and_progress_reach_the_prefect_ui(flow_run):
    tables = _artifacts(["cognate-gates"])
    assert tables
    rows = tables[-1].data if isinstance(tables[-1].data, list) else json.loads(tables[-1].data)
    ids = {r["gate"] for r in rows}
    assert {"no_nan", "gate_polarization", "diversity_predictions", "resolution_cv", "accuracy_over_majority"} <= ids
    assert not ids & {"niah", "ppl_delta_visible", "rollbacks", "diversity_halting"}  # reported as facts
    # resolution is judged on each model's own skills, with the every-skill figures printed beside it
    resolution = next(r for r in rows if r["gate"] == "resolution_cv")
    assert "the skills it trains (on every skill's: " in resolution["criterion"] and "memory " in resolution["criterion"]
    assert all(r["measured"] != "not measured" for r in rows)
    facts = _artifacts(["cognate-facts"])
    fact_rows = facts[-1].data if isinstance(facts[-1].data, list) else json.loads(facts[-1].data)
    assert {r["fact"] for r in fact_rows} >= {"niah", "ppl_delta_visible", "rollbacks", "halting_spread"}
    progress = _artifacts(["cognate-base-progress", "cognate-reasoning-progress"])
    assert progress and max(float(a.data) for a in progress) == pytest.approx(100.0)
    assert {"state_health", "long_range_d4"} <= ids


def test_each_specialist_is_diagnosed_into_the_store_and_the_go_no_go_reaches_the_ui(flow_run):
    config, home, result = flow_run
    store = ArtifactStore(home)
    diagnoses = [m for m in store.list() if m["kind"] == "cognate-diagnosis"]
    assert sorted(m["inputs"][0] for m in diagnoses) == sorted(r.id for r in result.models.values())
    for m in diagnoses:
        path = store.load(m["id"])
        saved = json.loads((path / steps.DIAGNOSIS).read_text())
        assert saved["verdict"] == m["metrics"]["verdict"] and len(saved["rows"]) == 6
        assert (path / steps.DIAGNOSIS_FIGURE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = _artifacts(["cognate-go-no-go"])[-1].data
    assert all(f"### {name}:" in report for name in result.models) and report.count("data:image/png;base64,") == 3


def _interpolate(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape for k in sa)
    a.load_state_dict({k: 0.5 * sa[k] + 0.5 * sb[k] for k in sa})
    return a


def test_specialists_are_merge_ready_where_independent_models_are_not(flow_run, tmp_path):
    config, home, result = flow_run
    store = ArtifactStore(home)
    paths = {n: store.load(r) for n, r in result.models.items()}
    cur = next(m for m in store.list() if m["kind"] == "curriculum")
    cur_path = store.load(cur["id"])
    tok = bpe.load(paths["reasoning"])
    # the loss the models train on: what a model writes, not the prompts
    test_rows, labels = pack_whole(dataset_files.load_splits(cur_path)["test"], tok, config.model.seq_len)

    def heldout_loss(model, rows):
        return measure.heldout_loss(model, rows, labels=labels)

    def load(p):
        return AutoModelForCausalLM.from_pretrained(p).eval()

    ends = [heldout_loss(load(paths[n]), test_rows) for n in ("reasoning", "memory")]
    shared = heldout_loss(_interpolate(load(paths["reasoning"]), load(paths["memory"])), test_rows)

    # two models trained the same way from different random initialisations
    tok_path = store.load(next(m for m in store.list() if m["kind"] == "tokenizer")["id"])
    independent = []
    for seed in (1, 2):
        out = tmp_path / f"indep-{seed}"
        steps.train_foundation(config.model, config.cognate, cur_path, tok_path, 4, seed, tmp_path / f"w{seed}", out)
        independent.append(load(out))
    indep_ends = [heldout_loss(m, test_rows) for m in independent]
    indep = heldout_loss(_interpolate(*independent), test_rows)

    assert shared < max(ends) + 0.25, (shared, ends)  # the midpoint is as good as the endpoints
    assert indep > max(indep_ends) + 0.5, (indep, indep_ends)  # permutation symmetry breaks the midpoint
    assert shared < indep - 0.5, (shared, indep)


def test_specialists_get_compute_in_proportion_to_their_factor_not_equal_steps():
    from phases.cognate.specialists import runtime_for, specialists, stage_steps_for

    cost = {s.name: stage_steps_for(s, 3, 80) * runtime_for(s, 3)["act_max_steps"] / s.compute_factor
            for s in specialists()}
    assert max(cost.values()) / min(cost.values()) < 1.1, cost
    assert stage_steps_for(specialists()[1], 3, 80) == 240  # memory recurses once: three steps for one
    assert stage_steps_for(specialists()[2], 3, 80) == 360  # speed too, on 1.5 times the compute
    # a section sets a specialist's recursion bound and compute share outright (tiny's reasoning specialist)
    from phases.config import PipelineConfig

    sec = PipelineConfig.from_preset("tiny", cognate={"specialist_act_steps": {"reasoning": 2},
                                                      "train": {"compute_shares": {"reasoning": 2.0}}}).cognate
    reasoning = specialists(sec)[0]
    assert runtime_for(reasoning, 3)["act_max_steps"] == 2 and stage_steps_for(reasoning, 3, 80) == 240
    assert [runtime_for(s, 3)["act_max_steps"] for s in specialists(sec)[1:]] == [1, 1]
    with pytest.raises(ValueError, match="specialist_act_steps"):
        PipelineConfig.from_preset("tiny", cognate={"specialist_act_steps": {"thinker": 2}})


def test_set_gates_mode_strict_stops_the_flow_at_its_failing_gate_naming_it(cognate_micro):
    """The training is cached (gates are not in its recipe); only the evaluation and the gates run again."""
    from conftest import COGNATE_MICRO

    from flows.cognate import cognate
    from phases.common.gates import GateFailed
    from phases.config import PipelineConfig, deep_merge

    _, home, _ = cognate_micro
    strict = PipelineConfig.from_preset("tiny", **deep_merge(
        COGNATE_MICRO, {"gates": {"mode": "strict"}, "cognate": {"gates": {"mode": None}}}))
    with pytest.raises(GateFailed, match=r"cognate exit gates failed: .*arithmetic: measured 0(\.0)? not >= 0\.9"):
        cognate(strict, str(home))


def test_the_diagnose_flow_reports_on_the_newest_model_and_gates_its_verdict(flow_run):
    from flows.diagnose import DIAGNOSABLE, diagnose
    from phases.common.gates import GateFailed
    from tasks.runtime import latest_artifact

    config, home, result = flow_run
    store = ArtifactStore(home)
    newest = latest_artifact(str(home), DIAGNOSABLE, "a model")  # a Cognate specialist, or a later phase's output
    ref = diagnose(config, str(home))
    assert store.manifest(ref)["inputs"][0] == newest.id
    rows = _artifacts(["diagnose-gates"])[-1].data
    rows = rows if isinstance(rows, list) else json.loads(rows)
    assert {r["gate"] for r in rows} == {"go_no_go", "state_health", "long_range_d4"}
    # micro models trained for seconds recall nothing beyond the window: strict mode stops on it
    with pytest.raises(GateFailed, match="long_range_d4"):
        diagnose(config.model_copy(update={"gates": config.gates.model_copy(update={"mode": "strict"})}), str(home))
