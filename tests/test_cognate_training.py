"""The Cognate training loop under failure: forced spikes, NaN, SIGKILL."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_worker import setup as _setup

from phases.cognate.settings import CognateTraining
from phases.cognate.trainer import train
from phases.common.checkpoints import CheckpointManager, RollbackLimitExceeded
from phases.common.optim import MuonGrokfastConfig

HERE = Path(__file__).parent

def _settings(**kw) -> CognateTraining:
    """The trainer settings these tests were tuned with: a light polarization warm-up and the
    optimizer block's class defaults."""
    return CognateTraining(**({"polarization_weight": 0.02, "optim": MuonGrokfastConfig().model_dump()} | kw))



def _nan_on_calls(calls: set[int]):
    count = {"n": 0}

    def hook(step, loss):
        count["n"] += 1
        return loss * float("nan") if count["n"] in calls else loss

    return hook


def test_forced_spikes_roll_back_and_the_fourth_fails_clearly(tmp_path):
    model, batches, ev = _setup()
    result = train(model, batches, ev, _settings(eval_every=3), tmp_path / "ok", 24,
                   loss_hook=_nan_on_calls({5, 12, 20}))
    assert result.rollbacks == 3 and result.spikes == 3 and result.final_step == 24
    events = [json.loads(x) for x in Path(result.telemetry).read_text().splitlines()]
    assert sum(e.get("event") == "non-finite loss" for e in events) == 3

    model, batches, ev = _setup()
    with pytest.raises(RollbackLimitExceeded, match="3 rollbacks"):
        train(model, batches, ev, _settings(eval_every=3), tmp_path / "bad", 40,
              loss_hook=_nan_on_calls({5, 12, 20, 28}))


def test_nan_never_reaches_a_checkpoint_and_is_never_stepped(tmp_path):
    model, batches, ev = _setup()
    train(model, batches, ev, _settings(eval_every=3), tmp_path, 15, loss_hook=_nan_on_calls({4, 9}))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    ckpts = CheckpointManager(tmp_path / "checkpoints")
    assert ckpts.steps()
    for step in ckpts.steps():
        probe, _, _ = _setup()
        _, meta = ckpts.load(step, probe)
        assert math.isfinite(meta["loss"])
        assert all(torch.isfinite(p).all() for p in probe.parameters())


def test_sigkilled_training_resumes_from_its_checkpoint_and_ends_where_an_unbroken_run_ends(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    worker = [sys.executable, str(HERE / "train_worker.py")]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*worker, str(killed), "30", "0.05"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "ckpt-000000010" / "meta.json").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "no checkpoint at step 10 within 120 s"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    resumed = subprocess.run([*worker, str(killed), "30", "0"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    r = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert r["resumed_from"] >= 10 and r["final_step"] == 30

    unbroken = subprocess.run([*worker, str(tmp_path / "unbroken"), "30", "0"], env=env, capture_output=True,
                              text=True, timeout=300)
    u = json.loads(unbroken.stdout.strip().splitlines()[-1])
    assert u["resumed_from"] is None and u["steps_run"] == 30
    # batches, optimizer, Grokfast EMA, clipper and detector all come back: the same end point
    assert r["weight_sum"] == pytest.approx(u["weight_sum"], rel=1e-5)
    assert r["eval_loss"] == pytest.approx(u["eval_loss"], rel=1e-4)
    # and the same record: one telemetry line per step, the probes, the counts
    assert (killed / "telemetry.jsonl").read_text() == (tmp_path / "unbroken" / "telemetry.jsonl").read_text()
    for key in ("steps_run", "spikes", "rollbacks", "niah", "first_lm_loss", "last_lm_loss"):
        assert r[key] == u[key], key


def test_a_run_resumed_after_its_last_checkpoint_ends_with_the_unbroken_runs_model(tmp_path):
    """Killed after the last step's checkpoint, before the model was saved: the rerun runs no step, and must
    still hand on the model (weights and config) an unbroken run hands on."""
    model, batches, ev = _setup()
    first = train(model, batches, ev, _settings(eval_every=3), tmp_path, 9)
    again_model, batches, ev = _setup()
    again = train(again_model, batches, ev, _settings(eval_every=3), tmp_path, 9)
    assert again.resumed_from == 9 and first.resumed_from is None
    assert again_model.config.mem_chunk_size == model.config.mem_chunk_size != 4  # 4: what setup() builds
    assert again_model.config.to_dict() == model.config.to_dict()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again_model.state_dict().values()))
    timing = {"train_seconds", "niah_seconds", "resumed_from", "telemetry"}
    assert {k: v for k, v in again.as_dict().items() if k not in timing} == {
        k: v for k, v in first.as_dict().items() if k not in timing}


def test_a_specialist_stage_climbs_the_ladder_and_a_foundation_stage_does_not():
    from phases.cognate.steps import stage_rows

    splits = {"train": [{"stage": s, "i": i} for i, s in enumerate(["foundation", "reasoning", "advanced"] * 2)]}
    stages = lambda stage, climb: sorted({r["stage"] for r in stage_rows(splits, "train", stage, climb)})  # noqa: E731
    assert stages("reasoning", False) == ["reasoning"]
    assert stages("reasoning", True) == ["foundation", "reasoning"]
    assert stages("advanced", True) == ["advanced", "foundation", "reasoning"]
    assert stages("foundation", True) == ["foundation"]
    assert len(stage_rows(splits, "train", None)) == 6


def test_the_learning_rate_stays_then_falls_linearly_to_its_floor():
    from phases.common.optim import linear_decay

    factors = [linear_decay(s, 10, 0.5, 0.1) for s in range(1, 11)]
    assert factors[:5] == [1.0] * 5
    assert all(a > b for a, b in zip(factors[4:], factors[5:]))
    assert factors[-1] == pytest.approx(0.1)
    assert [linear_decay(s, 10, 0.0, 0.1) for s in (1, 10)] == [1.0, 1.0]


def test_a_specialists_stages_share_one_schedule_and_the_rate_ends_at_its_floor(tmp_path):
    model, batches, ev = _setup()
    s = _settings(lr_decay_fraction=0.5, lr_floor=0.1)
    first = train(model, batches, ev, s, tmp_path / "a", 6, step_offset=0, schedule_span=(1, 12))
    second = train(model, batches, ev, s, tmp_path / "b", 6, step_offset=6, schedule_span=(1, 12))
    lrs = [json.loads(x)["lr"] for r in (first, second) for x in Path(r.telemetry).read_text().splitlines()]
    base = s.optim.muon_lr
    assert lrs[:6] == [base] * 6  # the first stage is the stable part: no decay at its own end
    assert lrs[-1] == pytest.approx(0.1 * base)
    assert all(a > b for a, b in zip(lrs[6:], lrs[7:]))


def test_a_gate_shut_on_one_branch_fails_fast_and_the_attention_leaning_start_does_not(tmp_path):
    from phases.cognate import CognateConfig, CognateForCausalLM
    from phases.cognate.trainer import GateCollapse

    def run(gate_init: float, workdir: Path):
        torch.manual_seed(0)
        model = CognateForCausalLM(CognateConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                 window_size=8, mem_chunk_size=4, act_max_steps=1, gate_init=gate_init))
        data = torch.randint(0, 64, (32, 24), generator=torch.Generator().manual_seed(1))
        return train(model, lambda s: data[s % 28:s % 28 + 4], data[:4], _settings(gate_collapse_patience=3), workdir, 6)

    with pytest.raises(GateCollapse, match="memory branch is shut"):
        run(8.0, tmp_path / "shut")  # σ(8): the memory gets 0.03% of the mix
    assert run(3.0, tmp_path / "open").final_step == 6
