"""Training infrastructure that must not fail silently: Grokfast, Muon split, κ, telemetry, rollback."""

import math

import pytest
import torch

from phases.common.checkpoints import CheckpointError, CheckpointManager, RollbackLimitExceeded
from phases.common.grokfast import GrokfastEMA
from phases.common.optim import MuonGrokfast, MuonGrokfastConfig
from phases.common.stability import ProactiveClipper, chunk_size, kappa
from phases.common.telemetry import PPLDelta, TelemetryWriter


def test_grokfast_adds_lambda_times_ema_not_highpass():
    p = torch.nn.Parameter(torch.zeros(3))
    gf = GrokfastEMA([p], alpha=0.5, lamb=2.0)
    p.grad = torch.tensor([1.0, 2.0, 3.0])
    gf.apply()  # ema = g on the first step
    assert torch.equal(p.grad, torch.tensor([3.0, 6.0, 9.0]))  # g + 2·g
    p.grad = torch.tensor([3.0, 0.0, 1.0])
    gf.apply()  # ema = 0.5·[1,2,3] + 0.5·[3,0,1] = [2,1,2]
    assert torch.equal(p.grad, torch.tensor([3.0, 0.0, 1.0]) + 2.0 * torch.tensor([2.0, 1.0, 2.0]))


def test_muon_takes_hidden_matrices_adamw_the_rest():
    model = torch.nn.ModuleDict({
        "embed": torch.nn.Embedding(10, 8), "proj": torch.nn.Linear(8, 8), "norm": torch.nn.LayerNorm(8),
        "lm_head": torch.nn.Linear(8, 10, bias=False)})
    opt = MuonGrokfast(model, MuonGrokfastConfig())
    assert opt.n_muon == 64  # proj.weight only
    assert opt.n_adam == 80 + 8 + 16 + 80  # embedding, proj.bias, norm, head
    assert isinstance(opt.optimizers[0], torch.optim.Muon) and isinstance(opt.optimizers[1], torch.optim.AdamW)
    x = torch.randint(0, 10, (4,))
    before = model["proj"].weight.detach().clone()
    model["lm_head"](model["norm"](model["proj"](model["embed"](x)))).sum().backward()
    opt.step()
    assert not torch.equal(before, model["proj"].weight)


@pytest.mark.parametrize("c_l,expected", [(1, 0.5 * math.sqrt(32)), (8, 1.0), (32, 0.5)])
def test_kappa_formula_exact(c_l, expected):
    assert kappa(c_l) == pytest.approx(expected, rel=0, abs=1e-12)


def test_chunk_schedule():
    assert chunk_size(0) == 32
    assert chunk_size(1000) == math.floor(32 * 0.9993**1000) == 15  # the seed's table rounds this to 16
    assert chunk_size(10_000) == 1 and chunk_size(10**6) == 1
    sizes = [chunk_size(t) for t in range(0, 6000, 50)]
    assert sizes == sorted(sizes, reverse=True)


def test_clipper_halves_at_transitions_and_counts():
    p = torch.nn.Parameter(torch.zeros(4))
    clipper = ProactiveClipper(c_start=4, gamma=0.5)  # sizes 4, 2, 1, 1
    records = []
    for step in range(4):
        p.grad = torch.full((4,), 10.0)
        records.append(clipper.clip([p], step))
    assert [r["is_transition"] for r in records] == [False, True, True, False]
    assert records[1]["clip_threshold"] == pytest.approx(0.5 * kappa(2))
    assert records[3]["clip_threshold"] == pytest.approx(kappa(1))
    assert clipper.transition_count == 2 and clipper.clip_count == 4
    assert float(p.grad.norm()) == pytest.approx(kappa(1), rel=1e-5)


def test_ppl_delta_spikes_and_nan_is_always_a_spike(tmp_path):
    tracker = PPLDelta(threshold=0.05)
    assert tracker.update(2.0) == (0.0, False)
    delta, spike = tracker.update(2.01)
    assert 0 < delta < 0.05 and not spike
    delta, spike = tracker.update(2.2)  # ppl up ~21%
    assert spike and delta > 0.05
    assert tracker.update(float("nan"))[1] and tracker.update(float("inf"))[1]
    w = TelemetryWriter(tmp_path / "telemetry.jsonl")
    w.write(step=0, lm_loss=2.0, ppl_delta=0.0)
    w.write(step=1, lm_loss=float("nan"), ppl_delta=math.inf, is_spike=True)
    rows = w.read()
    assert rows[0]["niah_accuracy"] is None and rows[1]["lm_loss"] == "nan" and rows[1]["is_spike"] is True
    assert set(TelemetryWriter.FIELDS) <= set(rows[0])


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))


def test_rollback_to_second_most_recent_then_fail_on_the_fourth(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=5, max_rollbacks=3)
    model = _model(0)
    for step in range(7):
        with torch.no_grad():
            model[0].weight.fill_(float(step))
        mgr.save(step, model, {"step": torch.tensor(step)}, loss=1.0)
    assert mgr.steps() == [2, 3, 4, 5, 6]  # last 5 kept
    opt_state, meta = mgr.rollback(model, "ppl spike")
    assert meta["step"] == 5 and model[0].weight[0, 0].item() == 5.0 and int(opt_state["step"]) == 5
    assert mgr.steps() == [2, 3, 4, 5]  # the suspect newest is gone
    assert mgr.rollback(model, "spike")[1]["step"] == 4
    assert mgr.rollback(model, "spike")[1]["step"] == 3
    with pytest.raises(RollbackLimitExceeded, match="after 3 rollbacks.*Lower the learning rate"):
        mgr.rollback(model, "spike")
    assert CheckpointManager(tmp_path).rollback_count == 3  # persisted for resume


def test_nan_never_reaches_a_checkpoint(tmp_path):
    mgr = CheckpointManager(tmp_path)
    model = _model(0)
    with pytest.raises(CheckpointError, match="loss is nan"):
        mgr.save(1, model, {}, loss=float("nan"))
    with torch.no_grad():
        model[1].bias[0] = float("inf")
    with pytest.raises(CheckpointError, match="non-finite values"):
        mgr.save(2, model, {}, loss=1.0)
    assert mgr.steps() == []


def test_corrupt_checkpoint_is_named(tmp_path):
    mgr = CheckpointManager(tmp_path)
    model = _model(0)
    path = mgr.save(3, model, {}, loss=1.0)
    (path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=str(path)):
        mgr.latest(model)


def test_shared_measures():
    from phases.common.measure import relative_drop, value_range, wilson_interval

    assert relative_drop(0.5, 0.4) == pytest.approx(0.2) and math.isnan(relative_drop(0.0, 0.0))
    assert value_range([0.2, 0.9, 0.5]) == pytest.approx(0.7) and math.isnan(value_range([]))
    lo, hi = wilson_interval(0, 20)
    assert lo == 0.0 and 0.13 < hi < 0.17  # 0/20 is not "0%, certainly": up to ~16% stays plausible
    lo, hi = wilson_interval(180, 200)
    assert lo < 0.9 < hi and hi < 0.94
