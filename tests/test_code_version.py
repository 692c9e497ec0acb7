"""Artifact ids follow the code that builds them: a behaviour change re-keys the changed phase and its
descendants, a comment never does, and a rerun after a change rebuilds exactly what changed."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from phases.config import PipelineConfig
from storage import ArtifactRef
from tasks import cognate as cognate_tasks
from tasks import data as data_tasks
from tasks.code_version import SourceTree
from tasks.runtime import read_journal

REPO = Path(__file__).resolve().parents[1]
PHASES = ["phases.data", "phases.cognate", "phases.evomerge", "phases.quietstar", "phases.bitnet"]


@pytest.fixture
def tree(tmp_path) -> SourceTree:
    for package in ("phases", "storage"):
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    return SourceTree(tmp_path)


def _versions(tree: SourceTree) -> dict[str, str]:
    return {p: tree.version(p) for p in PHASES}


def _append(tree: SourceTree, module: str, text: str) -> None:
    path = tree.file(module)
    path.write_text(path.read_text() + text)


def test_comments_whitespace_and_docstrings_keep_every_version(tree):
    before = _versions(tree)
    _append(tree, "phases.cognate.modeling", "\n\n# a comment about nothing\n\n")
    path = tree.file("phases.bitnet.quantizer")
    source = path.read_text()
    path.write_text(source.replace('"""', '"""Reworded. ', 1).replace("\n\n\n", "\n\n\n\n"))
    assert path.read_text() != source
    assert _versions(tree) == before


def test_a_behaviour_change_rekeys_its_phase_and_the_phases_built_on_it_only(tree):
    before = _versions(tree)
    _append(tree, "phases.cognate.modeling", "\n_CHANGED = 1\n")
    after = _versions(tree)
    changed = {p for p in PHASES if after[p] != before[p]}
    # EvoMerge merges, Quiet-STaR thinks with and BitNet quantizes Cognate models: their code runs Cognate's
    assert changed == {"phases.cognate", "phases.evomerge", "phases.quietstar", "phases.bitnet"}

    before = after
    _append(tree, "phases.bitnet.quantizer", "\n_CHANGED = 2\n")
    after = _versions(tree)
    assert {p for p in PHASES if after[p] != before[p]} == {"phases.bitnet"}  # ancestors untouched


def test_no_phase_depends_on_a_later_one_or_on_the_pipeline_config():
    tree = SourceTree(REPO)
    order = ["phases.data", "phases.cognate", "phases.evomerge", "phases.quietstar", "phases.bitnet"]
    for i, phase in enumerate(order):
        modules = tree.closure(phase)
        later = [m for m in modules if any(m == p or m.startswith(p + ".") for p in order[i + 1:])]
        assert not later, f"{phase} executes code of a later phase: {later}"
        assert "phases.config" not in modules


def test_recipes_carry_the_code_version(monkeypatch):
    config = PipelineConfig()
    ref = ArtifactRef(kind="curriculum", id="c" * 16, path="/x", manifest_sha256="0" * 64)
    tok = ArtifactRef(kind="tokenizer", id="t" * 16, path="/y", manifest_sha256="0" * 64)
    base = cognate_tasks.foundation_recipe(config, ref, tok, 8)
    curriculum = data_tasks.curriculum_recipe(config.data)
    monkeypatch.setattr(cognate_tasks, "code_version", lambda package: "changed")
    assert cognate_tasks.foundation_recipe(config, ref, tok, 8).key != base.key
    assert data_tasks.curriculum_recipe(config.data).key == curriculum.key


def _cli(repo: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    args = ["run", "prepare", "--preset", "tiny", "--set", "data.train_per_stage=120", "--set", "tokenizer.vocab_size=512"]
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=300)


def test_a_rerun_after_a_code_change_rebuilds_the_changed_phase_and_a_comment_rebuilds_nothing(stack, tmp_path):
    repo = tmp_path / "repo"
    for package in ("flows", "tasks", "phases", "storage"):
        shutil.copytree(REPO / package, repo / package, ignore=shutil.ignore_patterns("__pycache__"))
    home = tmp_path / "home"
    # the session's Prefect server (tests/prefect_stack.py): a run that starts its own pays 6 s more
    env = {**os.environ, "AGENT_FORGE_HOME": str(home), "PREFECT_HOME": str(tmp_path / "prefect"), "WANDB_MODE": "disabled",
           "PYTHONPATH": str(repo), "PREFECT_API_URL": stack.api}
    (tmp_path / "prefect").mkdir()

    def run() -> list[str]:
        done = _cli(repo, env)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return [e["task"] for e in read_journal(str(home))]

    first = run()
    assert first.count("build-curriculum") == 1 and first.count("train-tokenizer") == 1

    curriculum = repo / "phases" / "data" / "curriculum.py"
    curriculum.write_text(curriculum.read_text() + "\n# only a comment\n")
    assert run().count("build-curriculum") == 1  # Cached: same code version, same ids

    curriculum.write_text(curriculum.read_text() + "\n_BEHAVIOUR_CHANGED = True\n")
    third = run()
    assert third.count("build-curriculum") == 2 and third.count("train-tokenizer") == 2
    assert third.count("preflight") == 3  # never served from cache
