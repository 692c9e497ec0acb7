"""The evomerge flow run for real (in-process Prefect API) on the micro Cognate run's three specialists."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import COGNATE_MICRO  # noqa: E402
from safetensors.torch import load_file

from phases.config import PipelineConfig
from storage import ArtifactStore

EVOMERGE_MICRO = {"search": {"generations": 3}, "fitness": {"eval_rows": 3, "accuracy_problems": 6, "probe_rows": 1},
                  "gates": {"mode": "lenient"}}


@pytest.fixture(scope="module")
def evo_run(cognate_micro):
    from flows.evomerge import evomerge

    _, home, cognate = cognate_micro
    config = PipelineConfig.from_preset("tiny", **COGNATE_MICRO, evomerge=EVOMERGE_MICRO)
    return config, home, cognate, evomerge(config, str(home))  # models default to the newest Cognate outputs


def test_champion_is_stored_with_lineage_history_plot_and_yaml(evo_run):
    config, home, cognate, result = evo_run
    st = ArtifactStore(home)
    manifest = st.manifest(result.champion)
    assert manifest["inputs"][:4] == [cognate.base.id, *(cognate.models[n].id for n in ("reasoning", "memory", "speed"))]
    assert result.inputs == cognate.models and result.generations == 3
    files = set(manifest["files"])
    assert {"model.safetensors", "config.json", "tokenizer.json", "history.jsonl", "generations.jsonl",
            "fitness.png", "mergekit.yaml", "recipe.json"} <= files
    history = [json.loads(x) for x in st.file(result.champion, "history.jsonl").read_text().splitlines()]
    assert len({h["key"] for h in history}) == len(history) >= 8 + 8  # gen 0 + at least one new generation
    assert {h["generation"] for h in history} == {0, 1, 2}
    assert all({"perplexity", "accuracy", "flops_per_token", "memory_bytes"} <= set(h["raw"]) for h in history)
    assert st.file(result.champion, "fitness.png").read_bytes()[:4] == b"\x89PNG"
    assert [h["generation"] for h in history] == sorted(h["generation"] for h in history)  # a fixed order

    # the exported YAML names its inputs relative to the artifact, so it runs as stored, in any home
    yaml_path = st.file(result.champion, "mergekit.yaml")
    assert str(home) not in yaml_path.read_text()
    out = home.parent / "merged-from-yaml"
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "merge", str(yaml_path), str(out)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    merged, stored = load_file(str(out / "model.safetensors")), load_file(str(st.file(result.champion, "model.safetensors")))
    assert merged.keys() == stored.keys() and all(torch.equal(merged[k], stored[k]) for k in stored)


def test_gate_table_holds_measured_values(evo_run):
    config, home, cognate, result = evo_run
    metrics = ArtifactStore(home).manifest(result.champion)["metrics"]
    final, run = metrics["final"], metrics["run"]
    assert set(final["inputs"]) == {"reasoning", "memory", "speed"}
    # the test-split reference is the inputs' mean, so their fitness averages to ~1 but is not all 1 (two micro
    # inputs that answer alike and share a structure score alike)
    fits = [m["fitness"] for m in final["inputs"].values()]
    assert len({round(f, 9) for f in fits}) >= 2 and abs(sum(fits) / len(fits) - 1) < 0.05
    assert run["combos_evaluated"] == 8 and 0 <= run["min_diversity"] <= 1
    from phases.evomerge.gates import evomerge_gates

    report = evomerge_gates(final, run, config.evomerge.gates, "lenient")
    assert {g.id for g in report.gates} == {"fitness_gain", "diversity", "accuracy_kept", "accuracy_gain"}
    assert [f.id for f in report.facts] == ["combos_evaluated"] and report.facts[0].value == 8
    gates = {g.id: g for g in report.gates}
    assert gates["fitness_gain"].measured is not None and gates["diversity"].measured is not None
    best = max(m["accuracy"] for m in final["inputs"].values())
    # accuracy_kept is measured only when some input answers something; else it fails, never 0 >= 0
    assert (gates["accuracy_kept"].measured is None) == (best == 0)
    assert gates["accuracy_kept"].passed == (best > 0 and final["champion"]["accuracy"] >= best)
    # the gain is paired on the same test problems: a p-value, 1 when the champion answers no more than the best input
    most = max(final["inputs"].values(), key=lambda m: m["accuracy"])
    assert len(final["champion"]["hits"]) == len(most["hits"]) > 0
    assert gates["accuracy_gain"].measured == 1.0 or sum(final["champion"]["hits"]) > sum(most["hits"])


def test_champion_loads_and_generates(evo_run):
    from transformers import AutoModelForCausalLM

    config, home, cognate, result = evo_run
    model = AutoModelForCausalLM.from_pretrained(ArtifactStore(home).load(result.champion)).eval()
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 8)


def test_second_run_reuses_the_stored_champion(evo_run):
    from flows.evomerge import evomerge
    from tasks.runtime import read_journal

    config, home, cognate, result = evo_run
    ran = len(read_journal(str(home)))
    again = evomerge(config, str(home), models=cognate.models, base=cognate.base)
    assert again.champion == result.champion
    # preflight is never cached (it looks at the machine each run), and the second run prepares again
    assert [e["task"] for e in read_journal(str(home))[ran:] if e["task"] != "preflight"] in ([], ["wandb:evomerge"])


def test_strict_mode_stops_the_flow_naming_the_gate_that_failed(evo_run):
    """Micro specialists answer no test problem, so accuracy_kept is not measured: lenient reports it, strict stops."""
    from flows.evomerge import evomerge
    from phases.common.gates import GateFailed

    config, home, cognate, result = evo_run
    strict = PipelineConfig.from_preset("tiny", **COGNATE_MICRO, evomerge=EVOMERGE_MICRO | {"gates": {"mode": "strict"}})
    with pytest.raises(GateFailed, match=r"evomerge exit gates failed: .*accuracy_kept: measured None"):
        evomerge(strict, str(home), models=cognate.models, base=cognate.base)
