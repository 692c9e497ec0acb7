"""The bitnet flow run for real (in-process Prefect API) on a micro configuration: it finds the newest model in
the store, stores the packed artifact with lineage, and shows its gate table and report in the UI."""

import asyncio
import json

import pytest
import torch
from test_bitnet import train_micro
from transformers import AutoModelForCausalLM

from phases.bitnet.packed_format import PackedBitLinear  # importing it registers the packed format with transformers
from phases.config import PipelineConfig
from phases.data import tokenizer as bpe
from storage import ArtifactNotFound, ArtifactStore, Recipe

MICRO = {
    "model": {"n_layers": 2, "d_model": 48, "n_heads": 4, "seq_len": 48},
    "data": {"train_per_stage": 300, "eval_per_stage": 16},
    "tokenizer": {"vocab_size": 360},
    # tiny's preset excuses the learning phases; this micro data also fails prepare's compression gate
    "gates": {"mode": "lenient", "reasons": {"prepare": "a 360-token BPE of 300 examples a stage barely compresses"}},
    "cognate": {"window_size": 16, "act_max_steps": 1,
                "diagnose": {"shards": 1, "inputs": 2, "span": 32, "trials": 8, "beyond": [16], "coupling_tokens": 32}},
    "bitnet": {"heldout": {"eval_rows": 6, "problems_per_skill": 4}, "quantize": {"calibration_rows": 4},
               "finetune": {"steps": 2, "eval_every": 1, "batch_size": 4},
               "evaluate": {"speed_tokens": 4, "speed_repeats": 1}},
}


@pytest.fixture(scope="module")
def flow_run(prefect_harness, tmp_path_factory):
    from flows.bitnet import bitnet
    from flows.prepare import prepare

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in test_bitnet.py: a micro model gains nothing from a second, spin-waiting thread
    home = tmp_path_factory.mktemp("bitnet-home")
    config = PipelineConfig.from_preset("tiny", **MICRO)
    prepared = prepare(config, str(home))
    st = ArtifactStore(home)
    recipe = Recipe(kind="cognate-model", inputs=(prepared.curriculum.id, prepared.tokenizer.id), config={"micro": 1})
    model = st.get_or_create(recipe, lambda out: train_micro(config, st.load(prepared.curriculum),
                                                             st.load(prepared.tokenizer), out))
    result = bitnet(config, str(home))  # no model given: the newest cognate-model; no prepared: prepare's cache
    yield config, home, model, result
    torch.set_num_threads(threads)


def _artifacts(keys):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))

    return asyncio.run(read())


def test_bitnet_flow_stores_a_packed_model_with_lineage_that_loads_and_generates(flow_run):
    config, home, model, result = flow_run
    st = ArtifactStore(home)
    assert result.source == model and result.packed.kind == "bitnet-model" and result.report.kind == "bitnet-report"
    manifest = st.manifest(result.packed)
    assert model.id in manifest["inputs"]  # lineage to the model it compresses
    kinds = {node["kind"] for node in st.lineage(result.packed.id)["inputs"]}
    assert {"bitnet-staged", "cognate-model", "curriculum"} <= kinds
    path = st.load(result.packed)
    packed = AutoModelForCausalLM.from_pretrained(path).eval()
    assert any(isinstance(m, PackedBitLinear) for m in packed.modules())
    tok = bpe.load(path)
    ids = torch.tensor([tok.encode("Question: What is 2 + 3?\nAnswer:")])
    out = packed.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == ids.shape[1] + 4
    report = st.read_json(result.report, "report.json")
    assert report["compression"]["ratio_vs_fp32"] > 3 and report["compression"]["packed_bytes"] == \
        (path / "model.safetensors").stat().st_size


def test_gate_table_and_report_reach_the_prefect_ui(flow_run):
    config, home, model, result = flow_run
    tables = _artifacts(["bitnet-gates"])
    assert tables
    rows = tables[-1].data if isinstance(tables[-1].data, list) else json.loads(tables[-1].data)
    ids = {r["gate"] for r in rows}
    # tiny's sparsity target (25%) is below what absmean ternarization gives the input for free: reported, not gated
    assert ids == {"compression", "accuracy_drop", "skill_drop", "token_accuracy_drop", "speedup", "no_nan"}
    measured = {r["gate"]: r["measured"] for r in rows}
    assert all(measured[g] != "not measured" for g in ("compression", "speedup", "token_accuracy_drop"))
    facts = _artifacts(["bitnet-facts"])
    assert {r["fact"] for r in (facts[-1].data if isinstance(facts[-1].data, list) else json.loads(facts[-1].data))} == {
        "sparsity", "sparsity_free"}
    report = _artifacts(["bitnet-report"])
    assert report and "data:image/png;base64," in report[-1].data and "layer group" in report[-1].data
    assert isinstance(result.gates_passed, bool)


def test_a_second_run_reuses_every_artifact(flow_run):
    from flows.bitnet import bitnet

    config, home, model, result = flow_run
    from tasks.runtime import read_journal

    def bitnet_bodies() -> list[str]:
        return [e["task"] for e in read_journal(str(home)) if e["task"].startswith("bitnet-")]

    ran = bitnet_bodies()
    again = bitnet(config, str(home), model=model)
    assert again.packed == result.packed and again.report == result.report
    assert bitnet_bodies() == ran == ["bitnet-quantize", "bitnet-finetune", "bitnet-evaluate"]


def test_input_selection_prefers_the_latest_phase_and_fails_clearly_without_one(tmp_path):
    from flows.bitnet import latest_model

    with pytest.raises(ArtifactNotFound, match="agent-forge run cognate"):
        latest_model(str(tmp_path))
    st = ArtifactStore(tmp_path)
    made = {}
    for kind in ("cognate-model", "evomerge-champion", "cognate-model", "quietstar-model"):
        made.setdefault(kind, []).append(st.get_or_create(
            Recipe(kind=kind, config={"n": len(made.get(kind, []))}), lambda out: (out / "f").write_text("x") and {}))
        expected = (made.get("quietstar-model") or made.get("evomerge-champion") or made["cognate-model"])[-1]
        assert latest_model(str(tmp_path)) == expected


def test_strict_stops_the_flow_at_its_failing_gate_naming_it(flow_run):
    """Quantization, fine-tuning and the report are cached (gates are not in their recipes). The phase's own
    mode, so that prepare's micro tokenizer (which fails its compression gate) does not stop the run first."""
    from flows.bitnet import bitnet
    from phases.common.gates import GateFailed

    config, home, _, _ = flow_run
    strict = PipelineConfig.from_preset("tiny", **{**MICRO, "bitnet": {**MICRO["bitnet"], "gates": {"mode": "strict"}}})
    with pytest.raises(GateFailed, match=r"bitnet exit gates failed: .*accuracy_drop: measured"):
        bitnet(strict, str(home))
