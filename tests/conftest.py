import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

# Tests never reach a hub or W&B's servers, and Prefect never phones home.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("DO_NOT_TRACK", "1")


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """An in-process Prefect API on a throwaway database, for flow tests that need no worker."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def home(tmp_path) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    return h


# A micro Cognate run (d=64) shared by the flow tests of Cognate and the phases after it.
COGNATE_MICRO = {
    "model": {"n_layers": 2, "d_model": 64, "n_heads": 4, "seq_len": 64},
    "data": {"train_per_stage": 400, "eval_per_stage": 20},
    "tokenizer": {"vocab_size": 400},
    "gates": {"mode": "lenient"},
    "cognate": {"window_size": 16,
                "train": {"foundation_steps": 40, "stage_steps": 8, "batch_size": 4, "eval_every": 5, "niah_every": 5,
                          "eval_rows": 4},
                "eval": {"accuracy_per_skill": 2, "heldout_rows": 16}, "gates": {"mode": "lenient"},
                "diagnose": {"shards": 1, "inputs": 2, "span": 32, "early_tokens": 64, "coupling_tokens": 64,
                             "trials": 8, "beyond": [16]}},
}


@pytest.fixture(scope="session")
def cognate_micro(prefect_harness, tmp_path_factory):
    """(config, home, Cognate result) of the cognate flow run once, for real, on COGNATE_MICRO."""
    from flows.cognate import cognate
    from phases.config import PipelineConfig

    home = tmp_path_factory.mktemp("cognate-home")
    config = PipelineConfig.from_preset("tiny", **COGNATE_MICRO)
    return config, home, cognate(config, str(home))


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """A real Prefect server and process worker with the project's deployments (tests/prefect_stack.py)."""
    from prefect_stack import Stack

    s = Stack(tmp_path_factory.mktemp("deploy"))
    try:
        s.start()
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="session")
def deployed(stack) -> dict:
    """`agent-forge/full` run once on the micro config, unbroken, into ``stack.home``: its finished flow run."""
    first = stack.wait(stack.run_deployment())
    assert first["state"]["type"] == "COMPLETED", stack.log("worker")
    return first
