"""Hub datasets that matter: read from a local mirror in the Hub's layout through ``datasets``, they join the
tokenizer, each Cognate stage's training mix and the forging report, where each is scored the way its kind is
(choices by log-likelihood, answers exactly). A failed read names the dataset, its source and the cause."""

import json
from pathlib import Path

import evomerge_fixtures
import hub_fixtures
import pytest
import torch

from phases import forging_report as fr
from phases.cognate import steps
from phases.cognate.data import with_hub_share
from phases.common import hub_scoring
from phases.config import PipelineConfig
from phases.data import dataset_files, hub_download, hub_registry
from phases.data import tokenizer as bpe
from storage import ArtifactStore

MICRO = {"data": {"train_per_stage": 120, "eval_per_stage": 20, "hub_max_examples": 40, "hub_eval_examples": 12},
         "tokenizer": {"vocab_size": 512}, "model": {"n_layers": 1, "d_model": 32, "n_heads": 2, "seq_len": 64},
         "cognate": {"train": {"foundation_steps": 3, "batch_size": 2, "eval_every": 3, "niah_every": 3,
                               "eval_rows": 2}}}


@pytest.fixture(scope="module")
def mirror(tmp_path_factory) -> Path:
    return hub_fixtures.write_mirror(tmp_path_factory.mktemp("hub-mirror"))


def test_a_mirror_reads_like_the_hub_training_rows_from_train_held_out_rows_from_the_datasets_own_split(mirror):
    for name in hub_fixtures.NAMES:
        ds = hub_registry.lookup(name)
        splits, revision = hub_download.fetch(ds, 40, 12, str(mirror))
        assert revision == f"mirror:{mirror / ds.hub_id}"
        assert len(splits["train"]) + len(splits["validation"]) == 40 and len(splits["test"]) == 12
        train_ids = {r["id"] for s in ("train", "validation") for r in splits[s]}
        assert not train_ids & {r["id"] for r in splits["test"]}
        assert all(r["source"] == f"hub:{ds.hub_id}" and r["stage"] == ds.stage for r in splits["test"])
        if ds.scorer == "choice":  # what the log-likelihood scorer reads: the bare question and the choices
            program = json.loads(splits["test"][0]["program"])
            assert program["stem"].endswith("Answer:") and 0 <= program["label"] < len(program["choices"])


def test_a_dataset_the_mirror_lacks_fails_naming_it_its_source_and_the_cause(mirror):
    with pytest.raises(hub_download.DatasetUnavailable,
                       match=rf"'svamp' \({mirror}/ChilleD/SVAMP, .*could not be read: \w+"):
        hub_download.fetch(hub_registry.lookup("svamp"), 10, 10, str(mirror))


def test_the_hub_share_replaces_that_share_of_a_stages_examples_and_nothing_without_hub_rows():
    examples = [{"id": f"c{i}"} for i in range(200)]
    hub = [{"id": f"h{i}"} for i in range(7)]
    mixed = with_hub_share(examples, hub, 0.25, seed=3)
    assert len(mixed) == 200 and sum(r["id"].startswith("h") for r in mixed) == 50
    assert mixed == with_hub_share(examples, hub, 0.25, seed=3)  # a pure function of its seed
    assert with_hub_share(examples, [], 0.25, seed=3) is examples and with_hub_share(examples, hub, 0.0, 3) is examples


def test_prepare_reads_the_mirror_falls_back_only_when_allowed_and_the_foundation_trains_on_hub_rows(
        prefect_harness, home, mirror, tmp_path):
    from flows.prepare import prepare

    cfg = PipelineConfig.from_preset("tiny", **MICRO)
    cfg.data.hub_datasets, cfg.data.hub_mirror = [*hub_fixtures.NAMES, "svamp"], str(mirror)
    with pytest.raises(Exception, match=r"'svamp' \(.*ChilleD/SVAMP"):  # offline_fallback is off by default
        prepare(cfg, str(home))

    cfg.data.offline_fallback = True
    out = prepare(cfg, str(home))
    st = ArtifactStore(home)
    assert sorted(st.manifest(r)["config"]["name"] for r in out.hub_datasets) == sorted(hub_fixtures.NAMES)
    tokenizer = st.manifest(out.tokenizer)
    assert set(tokenizer["inputs"]) == {out.curriculum.id, *(r.id for r in out.hub_datasets)}
    fact = next(f for f in _newest_table("prepare-facts") if f["fact"] == "hub_datasets")
    assert fact["value"] == "3" and "went on without svamp: hub dataset 'svamp'" in fact["what"]

    # the foundation's training mix: a quarter of its examples are the hub's foundation-stage rows (ARC, BoolQ)
    hub_dirs = [st.load(r) for r in out.hub_datasets]
    trained = {}
    for label, dirs, share in (("curriculum", [], 0.25), ("hub", hub_dirs, 0.25), ("share 0", hub_dirs, 0.0)):
        sec = cfg.cognate.model_copy(deep=True)
        sec.train.hub_share = share
        steps.train_foundation(cfg.model, sec, st.load(out.curriculum), st.load(out.tokenizer), 2, 0,
                               tmp_path / label / "work", tmp_path / label / "out", hub_dirs=dirs)
        trained[label] = (tmp_path / label / "out" / "model.safetensors").read_bytes()
    assert trained["hub"] != trained["curriculum"]  # the hub rows changed what it learned
    assert trained["share 0"] == trained["curriculum"]  # and nothing else did


def _newest_table(key: str) -> list[dict]:
    """The rows of the newest table artifact under ``key``, as the UI shows them."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                               sort=ArtifactSort.CREATED_DESC, limit=1)

    data = asyncio.run(read())[0].data
    return json.loads(data) if isinstance(data, str) else data


@pytest.fixture(scope="module")
def scored(tmp_path_factory, mirror):
    """evomerge_fixtures' models and the three mirrored datasets stored as prepare stores them."""
    root = tmp_path_factory.mktemp("hub-scored")
    paths = evomerge_fixtures.build(root / "models")
    sets = []
    for name in hub_fixtures.NAMES:
        ds = hub_registry.lookup(name)
        splits, _ = hub_download.fetch(ds, 40, 12, str(mirror))
        dataset_files.save_splits(splits, root / name)
        sets.append(fr.HubSet(name, root / name, ds.scorer))
    return paths, sets


def test_log_likelihoods_are_each_continuations_tokens_summed_from_one_forward(scored):
    paths, _ = scored
    model = _load(paths["a"])
    g = torch.Generator().manual_seed(0)
    pairs = [(torch.randint(5, 300, (n,), generator=g).tolist(), torch.randint(5, 300, (k,), generator=g).tolist())
             for n, k in ((5, 3), (7, 1), (5, 3), (2, 6))]
    got = hub_scoring.loglikelihoods(model, pairs)
    for (ctx, cont), value in zip(pairs, got):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].float(), -1)
        expected = sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))
        assert value == pytest.approx(expected, abs=1e-4)


def test_the_choice_scorer_picks_what_the_model_prefers_and_fails_a_wrong_label(scored):
    paths, _ = scored
    model, tok = _load(paths["a"]), bpe.load(paths["a"])
    stem = "Question: 12+7\nAnswer:"
    ids = torch.tensor([tok.encode(stem, add_special_tokens=False)])
    greedy = tok.decode(model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)[0, ids.shape[1]:])
    choices = [greedy.strip(), "zebra walks", "qqq"]
    row = {"program": json.dumps({"stem": stem, "choices": choices, "label": 0})}
    assert hub_scoring.choice_hits(model, tok, [row], 64) == [True]
    wrong = {"program": json.dumps({"stem": stem, "choices": choices, "label": 1})}
    assert hub_scoring.choice_hits(model, tok, [wrong], 64) == [False]


def test_the_forging_report_scores_every_stage_on_the_hub_sets_beside_chance(scored):
    paths, sets = scored
    rows = fr.measure([fr.Stage("a", paths["a"]), fr.Stage("c", paths["c"])], paths["curriculum"],
                      evomerge_fixtures.SEQ, per_skill=4, hub=sets, hub_problems=10)
    assert [r["stage"] for r in rows] == ["a", "c", "chance"]
    for r in rows[:2]:
        assert set(r["hub"]) == set(hub_fixtures.NAMES) and all(n == 10 for _, n in r["hub"].values())
    chance = rows[2]["hub"]
    assert chance["arc_easy"][0] == pytest.approx(0.25) and chance["boolq"][0] == pytest.approx(0.5)
    assert chance["gsm8k"][0] == 0.0
    text = fr.markdown(rows, [])
    assert "| stage | arc_easy | boolq | gsm8k |" in text and "| chance | 25.0% | 50.0% | 0.0% |" in text


def _load(path: Path):
    from phases.cognate.modeling import CognateForCausalLM

    return CognateForCausalLM.from_pretrained(path).eval()
