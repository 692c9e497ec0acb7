"""Verify before reuse: a stored artifact that was damaged after it was made is never handed on, whether
Prefect's cache still holds a ref to it (hot) or not (cold). It is moved to quarantine with a note, named
in one log line, and built again from its recipe."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from storage import ArtifactStore
from tasks.runtime import read_journal

REPO = Path(__file__).resolve().parents[1]
ARGS = ["run", "prepare", "--preset", "tiny", "--set", "data.train_per_stage=120", "--set", "tokenizer.vocab_size=512"]


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def _only(store: ArtifactStore, kind: str) -> Path:
    [m] = store.list(kind)
    return store.artifact_dir(kind, m["id"])


def test_damaged_artifacts_are_quarantined_and_rebuilt_with_a_hot_and_a_cold_prefect_cache(stack, tmp_path):
    home = tmp_path / "home"
    # the session's Prefect server (tests/prefect_stack.py): a run that starts its own pays 6 s more
    env = {**os.environ, "AGENT_FORGE_HOME": str(home), "PREFECT_HOME": str(tmp_path / "prefect"), "WANDB_MODE": "disabled",
           "PREFECT_API_URL": stack.api}
    (tmp_path / "prefect").mkdir()
    assert _cli(*ARGS, env=env).returncode == 0
    store = ArtifactStore(home)
    tokenizer, curriculum = _only(store, "tokenizer"), _only(store, "curriculum")
    good_tokenizer = (tokenizer / "tokenizer.json").read_bytes()

    # hot: Prefect's cache holds the tokenizer task's ref; the file behind it is cut in half
    (tokenizer / "tokenizer.json").write_bytes(good_tokenizer[: len(good_tokenizer) // 2])
    hot = _cli(*ARGS, env=env)
    assert hot.returncode == 0, hot.stdout[-3000:] + hot.stderr[-3000:]
    lines = [x for x in (hot.stdout + hot.stderr).splitlines() if "quarantine" in x and "tokenizer.json" in x]
    assert lines and "size" in lines[0]
    assert (tokenizer / "tokenizer.json").read_bytes() == good_tokenizer  # built again, the same bytes
    ran = [e["task"] for e in read_journal(str(home))]
    assert ran.count("train-tokenizer") == 2 and ran.count("build-curriculum") == 1

    # cold: Prefect's results are gone; one byte of the curriculum is flipped
    shutil.rmtree(home / "prefect-results")
    data_file = next(p for p in sorted(curriculum.rglob("*")) if p.is_file() and p.name != "manifest.json")
    raw = bytearray(data_file.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data_file.write_bytes(bytes(raw))
    cold = _cli(*ARGS, env=env)
    assert cold.returncode == 0, cold.stdout[-3000:] + cold.stderr[-3000:]
    ran = [e["task"] for e in read_journal(str(home))]
    assert ran.count("build-curriculum") == 2 and ran.count("train-tokenizer") == 2  # same curriculum id: no retrain
    assert sorted(p.name.rsplit("-", 1)[0] for p in (home / "quarantine").iterdir()) == ["curriculum", "tokenizer"]
    assert all((p / "NOTE.txt").exists() for p in (home / "quarantine").iterdir())
    assert _cli("artifacts", "verify", env=env).returncode == 0

    # on demand: verify --repair moves a damaged artifact aside and exits 0; the next run rebuilds it
    (tokenizer / "tokenizer.json").write_bytes(b"{}")
    assert _cli("artifacts", "verify", env=env).returncode == 1
    repaired = _cli("artifacts", "verify", "--repair", env=env)
    assert repaired.returncode == 0 and "1 quarantined" in repaired.stdout
    assert not tokenizer.exists() and _cli(*ARGS, env=env).returncode == 0
    assert (tokenizer / "tokenizer.json").read_bytes() == good_tokenizer
