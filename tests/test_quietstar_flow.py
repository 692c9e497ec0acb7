"""The quietstar flow run for real (in-process Prefect API) on a micro configuration with the local
generator: a micro Cognate model in the store → data → baking → reinforcement → evaluation → gates."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import phases.quietstar.model  # noqa: F401  (registers the Quiet-STaR model with the Auto classes)
from phases.cognate import CognateConfig, CognateForCausalLM
from phases.cognate.data import Batches
from phases.common.hf_io import save_pretrained
from phases.config import PipelineConfig
from phases.data import dataset_files
from phases.data import tokenizer as bpe
from phases.data.encoding import pack
from phases.quietstar.model import QuietStarForCausalLM
from storage import ArtifactStore, Recipe

MICRO = {
    "model": {"n_layers": 1, "d_model": 32, "n_heads": 2, "seq_len": 64},
    "data": {"train_per_stage": 100, "eval_per_stage": 10},
    "tokenizer": {"vocab_size": 400},
    "quietstar": {"data": {"examples_per_pair": 6},
                  "bake": {"max_steps": 6, "batch_size": 4, "eval_every": 3, "heldout_examples": 3,
                           "heldout_fraction": 0.2},
                  "rl": {"thought_count_cap": 2, "thought_length_cap": 2, "n_true": 2, "steps": 2, "batch_size": 2,
                         "seq_len": 16,
                         "theater": {"check_every": 1, "max_retries": 1, "problems": 2, "eval_thoughts": 2}},
                  "eval": {"problems": 3, "max_new_tokens": 16}},
}


def _micro_cognate(store: ArtifactStore, prepared) -> None:
    """A 1-layer Cognate model trained for a few steps on the prepared curriculum, stored as a
    cognate-model artifact (what the flow picks by default)."""
    splits = dataset_files.load_splits(store.load(prepared.curriculum))
    tok = bpe.load(store.load(prepared.tokenizer))
    torch.manual_seed(0)
    model = CognateForCausalLM(CognateConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, window_size=16, mem_chunk_size=8, act_max_steps=1,
                                             n_persistent=2, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    batches = Batches(pack([r["text"] for r in splits["train"]], tok, 32), 8, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(20):
        loss = model(batches(step), labels=batches(step)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()

    def build(out):
        save_pretrained(model, out)
        tok.save_pretrained(str(out))
        return {"micro": True}

    store.get_or_create(Recipe(kind="cognate-model", inputs=(prepared.curriculum.id, prepared.tokenizer.id),
                               config={"micro": 1}, code_version="test"), build)


@pytest.fixture(scope="module")
def flow_run(prefect_harness, tmp_path_factory):
    from flows.prepare import prepare
    from flows.quietstar import quietstar

    torch.set_num_threads(1)
    home = tmp_path_factory.mktemp("quietstar-home")
    config = PipelineConfig.from_preset("tiny", **MICRO)
    prepared = prepare(config, str(home))
    _micro_cognate(ArtifactStore(home), prepared)
    return config, home, quietstar(config, str(home), prepared=prepared)


def _artifacts(keys):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))

    return asyncio.run(read())


def test_flow_stores_baked_and_reinforced_models_with_lineage(flow_run):
    config, home, result = flow_run
    st = ArtifactStore(home)
    assert result.input.kind == "cognate-model" and result.data.kind == "reasoning-data"
    baked, model = st.manifest(result.baked), st.manifest(result.model)
    # the curriculum too: baking replays its training problems (reinforcement reads it as well)
    assert baked["kind"] == "quietstar-baked" and baked["inputs"] == [result.input.id, result.data.id, model["inputs"][1]]
    assert model["kind"] == "quietstar-model" and model["inputs"][0] == result.baked.id
    b = baked["metrics"]
    assert b["baking"]["replay_rows"] > 0 and b["examples"]["heldout_select"] >= 1 and b["examples"]["heldout_gate"] >= 1
    assert b["baking"]["selected"] in b["baking"]["evals"]  # the stopping rule's set chose the state...
    assert b["baking"]["final"]["examples"] == b["examples"]["heldout_gate"]  # ...the gate's set measures it
    assert baked["metrics"]["embedding_init"]["method"].startswith("mean of the token text")
    assert model["metrics"]["thought_budget"] == {"strategy_count": 8, "strategy_length": 20, "count": 2, "length": 2}
    # the micro run fails its anti-theater check: one rollback with KL doubled, then the gate fails
    rl = model["metrics"]["reinforce"]
    assert len(rl["rollbacks"]) == 1 and rl["kl_weight_final"] == pytest.approx(2 * config.quietstar.rl.kl_weight)
    # out of retries, it ships the start: thoughts weighted 0 everywhere, so they ship switched off
    assert rl["stopped"]["kept_step"] == 0 and model["metrics"]["thoughts_enabled"] is False

    path = st.load(result.model)
    loaded = AutoModelForCausalLM.from_pretrained(path).eval()
    assert isinstance(loaded, QuietStarForCausalLM) and loaded.config.thoughts_enabled is False
    loaded.config.thoughts_enabled = True  # forced on, as the forging report's "+ thoughts" row scores it
    tok = bpe.load(path)
    ids = torch.tensor([tok.encode("Question: What is 2 + 3?\nAnswer:")])
    out = loaded.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id,
                          bad_words_ids=[[loaded.config.thought_start_id]])
    assert out.shape == (1, ids.shape[1] + 4)
    assert not (out == loaded.config.thought_end_id).any()


def test_gate_table_has_real_figures(flow_run):
    tables = _artifacts(["quietstar-gates"])
    assert tables
    rows = tables[-1].data if isinstance(tables[-1].data, list) else json.loads(tables[-1].data)
    by_id = {r["gate"]: r for r in rows}
    assert set(by_id) == {"baking_convergence", "reasoning_accuracy_delta", "theater_divergence", "theater_ablation",
                          "latency_with_thoughts", "no_nan"}
    facts = _artifacts(["quietstar-facts"])
    assert [r["fact"] for r in (facts[-1].data if isinstance(facts[-1].data, list) else json.loads(facts[-1].data))] == [
        "theater_correlation", "reinforcement_stopped"]
    assert all(r["measured"] != "not measured" for r in rows)
    assert by_id["no_nan"]["passed"] == "PASS"
    assert float(by_id["latency_with_thoughts"]["measured"]) > 0
    _, _, result = flow_run
    assert result.gates_passed is False  # a micro model is no reasoner: lenient mode shows it, FAIL rows and all



def test_strict_stops_the_flow_at_its_failing_gate_naming_it(flow_run):
    """Baking and reinforcement are cached (gates are not in their recipes); the evaluation runs again. The
    phase's own mode, so that prepare's micro tokenizer (which fails its compression gate) does not stop the
    run first."""
    from flows.quietstar import quietstar
    from phases.common.gates import GateFailed

    _, home, _ = flow_run
    qs = MICRO["quietstar"]
    strict = PipelineConfig.from_preset("tiny", **{**MICRO, "quietstar": {**qs, "gates": {"mode": "strict"}}})
    with pytest.raises(GateFailed, match=r"quietstar exit gates failed: .*theater_"):
        quietstar(strict, str(home))
