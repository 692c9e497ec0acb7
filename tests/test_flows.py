"""The prepare flow, run for real against a throwaway Prefect API (no worker needed)."""

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import wandb_records

from phases.common.gates import GateFailed
from phases.config import PipelineConfig
from storage import ArtifactStore
from tasks.runtime import read_journal

REPO = Path(__file__).resolve().parents[1]
TINY = {"data": {"train_per_stage": 120, "eval_per_stage": 20}, "tokenizer": {"vocab_size": 512}}


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def test_cli_prepare_twice_builds_once_and_logs_wandb_offline(tmp_path):
    home = tmp_path / "home"
    env = {**os.environ, "AGENT_FORGE_HOME": str(home), "PREFECT_HOME": str(tmp_path / "prefect"),
           "WANDB_MODE": "offline"}
    Path(env["PREFECT_HOME"]).mkdir()
    args = ["run", "prepare", "--preset", "tiny", "--set", "data.train_per_stage=120", "--set", "tokenizer.vocab_size=512"]
    first = _cli(*args, env=env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    store = ArtifactStore(home)
    after_first = sorted((m["kind"], m["id"]) for m in store.list())
    assert [k for k, _ in after_first] == ["curriculum", "tokenizer"]

    second = _cli(*args, env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert sorted((m["kind"], m["id"]) for m in store.list()) == after_first
    assert "Cached" in second.stdout + second.stderr
    ran = [e["task"] for e in read_journal(str(home))]
    assert ran.count("build-curriculum") == 1 and ran.count("train-tokenizer") == 1 and ran.count("wandb:prepare") == 1

    # W&B wrote its own record of the boundary: group, job_type, summary and the gate verdicts.
    [log] = glob.glob(str(home / "wandb" / "wandb" / "offline-run-*" / "run-*.wandb"))
    info, summary = wandb_records.run_info(Path(log)), wandb_records.summary(Path(log))
    assert info["job_type"] == "prepare" and info["group"]
    assert summary["gates/passed"] is True and summary["tokenizer/roundtrip_rate"] == 1.0
    assert summary["curriculum/rows/train"] == 360
    tables = glob.glob(str(home / "wandb" / "wandb" / "offline-run-*" / "files" / "media" / "table" / "gates_*.json"))
    assert tables and "tokenizer_roundtrip" in Path(tables[0]).read_text()

    verify = _cli("artifacts", "verify", env=env)
    assert verify.returncode == 0 and "2 ok, 0 corrupt" in verify.stdout


def test_cli_artifacts_commands_and_verify_failure(tmp_path):
    from storage import Recipe

    st = ArtifactStore(tmp_path)
    parent = st.get_or_create(Recipe(kind="curriculum"), lambda d: (d / "a.txt").write_text("abc") and None)
    child = st.get_or_create(Recipe(kind="tokenizer", inputs=(parent.id,)),
                             lambda d: (d / "tokenizer.json").write_text("{}") and None)
    env = {**os.environ, "AGENT_FORGE_HOME": str(tmp_path)}
    listing = _cli("artifacts", "list", env=env)
    assert listing.returncode == 0 and parent.id in listing.stdout and child.id in listing.stdout
    shown = _cli("artifacts", "show", child.id[:8], env=env)
    assert json.loads(shown.stdout)["inputs"] == [parent.id]
    lineage = _cli("artifacts", "lineage", child.id, env=env)
    assert f"tokenizer/{child.id}" in lineage.stdout and f"└─ curriculum/{parent.id}" in lineage.stdout

    f = Path(parent.path) / "a.txt"
    f.write_bytes(b"abd")
    bad = _cli("artifacts", "verify", env=env)
    assert bad.returncode == 1 and f"curriculum/{parent.id}" in bad.stdout and "a.txt: sha256 mismatch" in bad.stdout
    one = _cli("artifacts", "verify", child.id, env=env)
    assert one.returncode == 0
    missing = _cli("artifacts", "show", "ffffffff", env=env)
    assert missing.returncode == 1 and "not found" in missing.stderr


def test_cli_rejects_bad_config(tmp_path):
    env = {**os.environ, "AGENT_FORGE_HOME": str(tmp_path)}
    bad = _cli("run", "prepare", "--set", "data.train_per_stage=-5", env=env)
    assert bad.returncode == 2 and "data.train_per_stage" in bad.stderr


def test_gates_can_fail_strict_and_warn_lenient(prefect_harness, home):
    from flows.prepare import prepare

    # 300 tokens leaves ~40 merges: the tokenizer barely compresses, and the gate says so.
    starved = {**TINY, "tokenizer": {"vocab_size": 300}}
    with pytest.raises(GateFailed, match="prepare exit gates failed: tokenizer_compression"):  # --set gates.mode=strict
        prepare(PipelineConfig.from_preset("tiny", **starved, gates={"mode": "strict"}), str(home))
    with pytest.raises(GateFailed, match="tokenizer_compression"):  # tiny excuses the learning phases, not prepare
        prepare(PipelineConfig.from_preset("tiny", **starved), str(home))
    excused = {"mode": "lenient", "reasons": {"prepare": "a tokenizer starved on purpose"}}
    lenient = prepare(PipelineConfig.from_preset("tiny", **starved, gates=excused), str(home))
    assert lenient.tokenizer.kind == "tokenizer"

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["prepare-gates"])))

    import asyncio

    tables = asyncio.run(read())
    assert tables and any("FAIL" in json.dumps(a.data) for a in tables)


def test_unreachable_hub_dataset_falls_back_or_fails(prefect_harness, home):
    from flows.prepare import prepare

    cfg = PipelineConfig.from_preset("tiny", **{**TINY, "data": {**TINY["data"], "hub_datasets": ["gsm8k"],
                                                              "offline_fallback": True}})
    out = prepare(cfg, str(home))
    assert out.hub_datasets == [] and out.curriculum.kind == "curriculum"
    # conftest sets WANDB_MODE=disabled, which beats the config's "offline": nothing is logged
    assert cfg.tracking.wandb_mode == "offline" and not (home / "wandb").exists()
    assert "wandb:prepare" not in [e["task"] for e in read_journal(str(home))]

    strict = cfg.model_copy(update={"data": cfg.data.model_copy(update={"offline_fallback": False})})
    with pytest.raises(Exception, match="gsm8k"):
        prepare(strict, str(home))


def test_preflight_shortfall_stops_the_flow_before_work(prefect_harness, home):
    from flows.prepare import prepare
    from phases.common.resources import PreflightError

    cfg = PipelineConfig.from_preset("tiny", preflight={"disk_headroom_gb": 1e7}, **TINY)
    with pytest.raises(PreflightError, match="need .* free"):
        prepare(cfg, str(home))
    assert ArtifactStore(home).list() == [] and [e["task"] for e in read_journal(str(home))] == ["preflight"]
