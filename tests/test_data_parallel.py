"""Data-parallel training over a real gloo group of spawned processes: two ranks, each on half of every global
batch, train as one process trains on the whole batch, and a run SIGKILLed mid-way resumes on every rank from
rank 0's checkpoint to the unbroken run's bytes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from phases.cognate import steps
from phases.config import PipelineConfig
from phases.data import curriculum, dataset_files
from phases.data import tokenizer as bpe

HERE = Path(__file__).parent
# float32 sums in another order (each rank's half, then the all-reduce): the figures agree to this relative error
TOLERANCE = 1e-4


def _losses(workdir: Path) -> list[float]:
    return [json.loads(line)["lm_loss"] for line in (workdir / "foundation" / "telemetry.jsonl").read_text().splitlines()]


def test_two_ranks_train_the_foundation_as_one_process_does_on_the_same_global_batch(tmp_path):
    splits = curriculum.generate(120, 10, seed=3)
    dataset_files.save_splits(splits, tmp_path / "curriculum")
    bpe.save(bpe.train_bpe([r["text"] for r in splits["train"]], vocab_size=400), tmp_path / "tokenizer")
    config = PipelineConfig.from_preset("tiny", model={"n_layers": 1, "d_model": 32, "n_heads": 2, "seq_len": 64},
                                        cognate={"train": {"foundation_steps": 6, "eval_every": 3, "eval_rows": 2}})
    runs, progress = {}, {1: [], 2: []}
    for ranks in (1, 2):
        sec = config.cognate.model_copy(deep=True)
        sec.train.data_parallel = ranks
        out = tmp_path / f"ranks-{ranks}"
        runs[ranks] = steps.train_foundation(config.model, sec, tmp_path / "curriculum", tmp_path / "tokenizer", 4, 0,
                                             out / "work", out / "model", on_progress=progress[ranks].append)
    one, two = _losses(tmp_path / "ranks-1" / "work"), _losses(tmp_path / "ranks-2" / "work")
    assert len(one) == len(two) == 6
    # the prompts' tokens carry no loss, so the halves hold different numbers of targets: each rank's loss is
    # weighted by its share, and the step's loss is the whole batch's
    assert two == pytest.approx(one, rel=TOLERANCE)
    eval_one = runs[1]["stages"]["foundation"]["eval_loss"]
    assert runs[2]["stages"]["foundation"]["eval_loss"] == pytest.approx(eval_one, rel=TOLERANCE)
    assert (tmp_path / "ranks-2" / "work" / "foundation" / "telemetry.rank1.jsonl").exists()  # rank 1 trained too
    # rank 0 speaks for the ranks: its progress reaches this process once per step, as one process's does
    assert [(r["step"], r["total_steps"], r["stage"]) for r in progress[2]] == [(s, 6, "foundation") for s in range(1, 7)]
    assert [r["lm_loss"] for r in progress[2]] == pytest.approx([r["lm_loss"] for r in progress[1]], rel=TOLERANCE)

    with pytest.raises(ValueError, match="data_parallel=3 does not divide the batch size 4"):
        sec.train.data_parallel = 3
        steps.train_foundation(config.model, sec, tmp_path / "curriculum", tmp_path / "tokenizer", 4, 0,
                               tmp_path / "w3", tmp_path / "m3")


def test_a_killed_data_parallel_run_resumes_every_rank_from_rank_0s_checkpoint_to_the_unbroken_bytes(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    worker = [sys.executable, str(HERE / "train_worker.py")]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*worker, str(killed), "20", "0.1", "2"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 180
    while not (killed / "checkpoints" / "ckpt-000000008" / "meta.json").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "no checkpoint at step 8 within 180 s"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
    proc.wait()

    resumed = subprocess.run([*worker, str(killed), "20", "0", "2"], env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    r = json.loads(resumed.stdout.strip().splitlines()[-1])
    unbroken = subprocess.run([*worker, str(tmp_path / "unbroken"), "20", "0", "2"], env=env, capture_output=True,
                              text=True, timeout=300)
    assert unbroken.returncode == 0, unbroken.stderr[-3000:]
    u = json.loads(unbroken.stdout.strip().splitlines()[-1])
    assert r["resumed_from"] >= 8 and u["resumed_from"] is None and r["steps_run"] == u["steps_run"] == 20
    assert (killed / "final.safetensors").read_bytes() == (tmp_path / "unbroken" / "final.safetensors").read_bytes()
    assert (killed / "telemetry.jsonl").read_text() == (tmp_path / "unbroken" / "telemetry.jsonl").read_text()
