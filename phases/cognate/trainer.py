"""The Cognate training loop: one stage of the curriculum on one model, built so it cannot fail silently.

Per step: chunk size from the schedule → forward → loss = LM + ponder + annealed gate polarization →
a non-finite loss is a spike (rollback, never a step) → backward → proactive clip → Muon × Grokfast
step → gate fast-fail check → telemetry line. Every ``eval_every`` steps the loss on a fixed held-out
batch goes through the PPL-delta detector: a spike rolls back to the second-most-recent checkpoint,
otherwise the state is checkpointed. Every ``niah_every`` steps the NIAH probe runs.

Why the rollback listens to held-out PPL, not to each training batch: a batch's perplexity swings by
more than 5% from one step to the next on small batches (it is in the telemetry as ``ppl_delta``), so
a per-batch trigger would roll back healthy training. The fixed held-out batch moves only with the
weights. Per-batch deltas stay in the telemetry for visibility.

A run resumes from its latest checkpoint (model, optimizer, Grokfast EMA, clipper, detector, step).

Data-parallel (``rank``, phases/common/data_parallel.py): each rank runs this same loop on its share of every
global batch. Its language-model loss is weighted by its share of the batch's target tokens, so the averaged
gradient is the single-process gradient of the whole batch; the figures the loop decides on (the loss, the gate
mean) are reduced over the ranks, so every rank takes the same branch. Rank 0 writes the checkpoints; a rollback
or a resume reads them on every rank.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from phases.cognate.memory import niah_probe
from phases.cognate.modeling import CognateForCausalLM
from phases.cognate.settings import CognateTraining
from phases.common.checkpoints import CheckpointManager
from phases.common.data_parallel import SINGLE, Rank
from phases.common.measure import heldout_loss, heldout_means
from phases.common.optim import MuonGrokfast, linear_decay
from phases.common.resources import return_freed_memory
from phases.common.stability import ProactiveClipper
from phases.common.telemetry import PPLDelta, TelemetryWriter, perplexity


class GateCollapse(RuntimeError):
    """The MAG gate shut one branch for good: training would go on with half a model."""


@dataclass
class TrainResult:
    steps_run: int
    final_step: int
    resumed_from: int | None
    rollbacks: int
    spikes: int
    eval_loss: float
    niah: list[float]
    niah_seconds: float
    train_seconds: float
    gate_polarized: float
    ltm_usage: float
    telemetry: str
    first_lm_loss: float  # the stage's first training step: a jump over the last stage's end is a regime shock
    last_lm_loss: float  # mean over the stage's last steps (one per regime when they rotate)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def heldout_stats(model: CognateForCausalLM, rows: torch.Tensor, batch_size: int = 8,
                  labels: torch.Tensor | None = None) -> dict[str, float]:
    """One held-out pass: the mean next-token loss (on ``labels`` where given), mean ACT steps that
    contributed to each token, and LTM usage (1 − mean MAG gate)."""
    return heldout_means(model, rows, batch_size, labels=labels, extra=lambda out, _x: {
        "halting_steps": out.halt_steps_int.mean().item(), "ltm_usage": (1 - out.gate.mean()).item()})


def niah(model: CognateForCausalLM, chunk: int, seed: int = 0) -> float:
    """The probe on every layer's memory with its learned gates and runtime scales; the mean."""
    cfg = model.config
    scores = [niah_probe(layer.memory, cfg.hidden_size, chunk, lr_scale=cfg.mem_lr_scale,
                         decay_scale=cfg.mem_decay_scale, seed=seed + i)
              for i, layer in enumerate(model.model.layers)]
    return sum(scores) / len(scores)


def train(
    model: CognateForCausalLM,
    batches: Callable[[int], torch.Tensor | tuple[torch.Tensor, torch.Tensor]],
    eval_rows: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    settings: CognateTraining,
    workdir: Path,
    steps: int,
    step_offset: int = 0,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    loss_hook: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    regimes: Sequence[dict[str, Any]] = (),
    schedule_span: tuple[int, int] | None = None,
    rank: Rank = SINGLE,
) -> TrainResult:
    """Train ``model`` in place for ``steps`` steps; resumable from ``workdir``. ``step_offset`` is the global
    step this stage starts at: the chunk-size schedule runs across stages.

    ``loss_hook(step, loss) -> loss`` lets tests inject spikes (NaN, huge) into the real loop. ``regimes``:
    runtime settings the training batches rotate through (one per step); held-out checks run under the
    model's own settings, which are restored at the end. ``schedule_span``: the (first, last) global steps the
    learning-rate schedule runs over (a specialist's stages share one); by default this call's steps."""
    workdir = Path(workdir)
    # (rows, labels): the held-out loss is on the tokens the training loss is on
    eval_ids, eval_labels = eval_rows if isinstance(eval_rows, tuple) else (eval_rows, None)
    ckpts = CheckpointManager(workdir / "checkpoints", settings.keep_last, settings.max_rollbacks)
    # every rank writes the figures of its own shard; rank 0's file is the run's
    telemetry = TelemetryWriter(workdir / ("telemetry.jsonl" if rank.leader else f"telemetry.rank{rank.rank}.jsonl"))
    opt = MuonGrokfast(model, settings.optim)
    clipper = ProactiveClipper(settings.chunk_start, c_min=settings.chunk_floor)
    if settings.activation_checkpointing:
        model.activation_checkpointing_enable()
    model.set_runtime(grad_steps=settings.grad_steps)  # a training setting: _finish saves the model with 0
    return_freed_memory()  # what a step frees goes back, so the estimate preflight checked holds
    detector = PPLDelta(settings.spike_threshold, ema_decay=0.5)  # evals are sparse: track recent ones
    batch_ppl = PPLDelta(settings.spike_threshold)
    params = [p for p in model.parameters() if p.requires_grad]

    last = {"gate_polarized": math.nan, "ltm_usage": math.nan}  # survive a resume with no step left to run
    # The record a resumed run must end with, as an unbroken one does: kept in every checkpoint and restored
    # on a resume (not on a rollback, which goes back in the weights but not in what happened).
    history: dict[str, Any] = {"steps_run": 0, "niah": [], "niah_seconds": 0.0, "lm_losses": [], "last_eval": math.nan,
                               "telemetry_lines": 0}

    def restore(state: tuple[dict, dict[str, Any]]) -> int:
        opt_state, meta = state
        last.update(meta.get("last", {}))
        opt.load_state_dict(opt_state)
        clipper.load_state_dict(meta["clipper"])
        detector.load_state_dict(meta["detector"])
        batch_ppl.load_state_dict(meta["batch_ppl"])
        return int(meta["step"]) + 1

    def save(step: int, loss: float) -> None:
        history["telemetry_lines"] = telemetry.lines
        if rank.leader:
            ckpts.save(step, model, opt.state_dict(), loss, extra={
                "clipper": clipper.state_dict(), "detector": detector.state_dict(), "batch_ppl": batch_ppl.state_dict(),
                "last": dict(last), "history": history})
        rank.barrier()  # a rollback on any rank may read it next

    def roll_back(reason: str) -> int:
        state = ckpts.rollback(model, reason) if rank.leader else None
        rank.barrier()
        # rank 0 removed every checkpoint newer than the target: the latest is where it went
        return restore(state if rank.leader else ckpts.latest(model))

    own = {k: getattr(model.config, k) for r in regimes for k in r}
    first, last_step = schedule_span or (step_offset + 1, step_offset + steps)
    pad = getattr(model.config, "pad_token_id", None)  # a config made without a tokenizer has none

    model.train()
    resumed_from = None
    latest = ckpts.latest(model)
    rank.barrier()  # every rank has read the same checkpoints before rank 0 may write one
    if latest is not None:
        step = restore(latest)
        resumed_from = step - 1
        history.update(latest[1].get("history", {}))
        # the steps after the checkpoint run again: their lines from the killed process go
        telemetry.truncate(history["telemetry_lines"])
    else:
        loss0 = heldout_loss(model, eval_ids, labels=eval_labels)
        detector.update(loss0)
        save(0, loss0)  # the initial weights: the first rollback target
        step = 1

    niah_scores: list[float] = history["niah"]
    lm_losses: list[float] = history["lm_losses"]
    collapse_run = 0
    t_start = time.perf_counter()
    while step <= steps:
        g_step = step_offset + step
        chunk = clipper.chunk_size(g_step)
        model.set_runtime(mem_chunk_size=chunk)
        lr_factor = linear_decay(g_step - first + 1, last_step - first + 1, settings.lr_decay_fraction, settings.lr_floor)
        opt.scale_lr(lr_factor)
        # after a rollback, draw fresh batches: replaying the same ones would replay the same spike
        batch = batches(step + 7919 * ckpts.rollback_count)
        if isinstance(batch, tuple):
            x, labels = batch
        else:
            x, labels = batch, batch if pad is None else batch.masked_fill(batch == pad, -100)
        x, labels = rank.shard(x), rank.shard(labels)
        regime = step % len(regimes) if regimes else None
        if regime is not None:
            model.set_runtime(**regimes[regime])
        out = model(x, labels=labels)
        if regime is not None:
            model.set_runtime(**own)
        pol_w = settings.polarization_weight * min(1.0, step / max(1, steps // 2))
        loss = out.loss + pol_w * out.polarization_loss
        lm, gate_mean = out.lm_loss.item(), out.gate.mean().item()
        if rank.size > 1:  # this shard's share of the batch's target tokens weighs its language-model loss
            targets = float((labels[:, 1:] != -100).sum())
            total = rank.sum([targets])[0]
            loss = loss + (targets * rank.size / total - 1.0) * out.lm_loss
        if loss_hook is not None:
            loss = loss_hook(step, loss)
        loss_value = loss.item()
        if rank.size > 1:
            loss_sum, lm_sum, gate_sum = rank.sum([loss_value, lm * targets, gate_mean])
            loss_value, lm, gate_mean = loss_sum / rank.size, lm_sum / total, gate_sum / rank.size
        if not math.isfinite(loss_value):
            telemetry.write(step=step, global_step=g_step, lm_loss=loss_value, is_spike=True,
                            event="non-finite loss", rollback_count=ckpts.rollback_count + 1)
            step = roll_back(f"non-finite loss {loss_value} at step {step}")
            opt.zero_grad()
            continue
        loss.backward()
        rank.average_gradients(params)
        clip = clipper.clip(params, g_step)
        opt.step()
        opt.zero_grad()
        history["steps_run"] += 1
        lm_losses.append(lm)

        last.update(gate_polarized=out.gate_polarized, ltm_usage=1.0 - gate_mean)
        collapsed = min(gate_mean, 1 - gate_mean) < settings.gate_collapse_limit
        collapse_run = collapse_run + 1 if collapsed else 0
        if collapse_run >= settings.gate_collapse_patience:
            raise GateCollapse(
                f"MAG gate mean {gate_mean:.4f} for {collapse_run} steps: the "
                f"{'memory' if gate_mean > 0.5 else 'attention'} branch is shut. Lower the polarization weight "
                f"({settings.polarization_weight}) or the memory learning rate.")

        delta, _ = batch_ppl.update(lm)
        niah_score = None
        if step % settings.niah_every == 0:
            t0 = time.perf_counter()
            niah_score = niah(model, chunk, seed=step)
            history["niah_seconds"] += time.perf_counter() - t0
            niah_scores.append(niah_score)
        record = dict(step=step, global_step=g_step, lm_loss=lm, perplexity=perplexity(lm), ppl_delta=delta,
                      is_spike=False, niah_accuracy=niah_score, rollback_count=ckpts.rollback_count,
                      lr=settings.optim.muon_lr * lr_factor, ponder=out.ponder_loss.item(),
                      halting_steps=out.halting_steps.mean().item(),
                      gate_mean=gate_mean, gate_polarized=out.gate_polarized, mem_write_fraction=out.mem_write_fraction,
                      regime=regime, **clip)

        checkpoint = step % settings.eval_every == 0 or step == steps
        if checkpoint:
            history["last_eval"] = heldout_loss(model, eval_ids, labels=eval_labels)
            e_delta, spike = detector.update(history["last_eval"])
            record.update(eval_loss=history["last_eval"], eval_ppl_delta=e_delta, is_spike=spike)
            if spike:
                telemetry.write(**record, event="eval spike")
                step = roll_back(f"held-out PPL rose {e_delta:.1%} at step {step}")
                continue
        telemetry.write(**record)
        if checkpoint:  # after the step's line: the checkpoint counts the lines a resume keeps
            save(step, history["last_eval"])
        if on_progress is not None:
            on_progress(record | {"total_steps": steps})
        step += 1

    train_seconds = time.perf_counter() - t_start
    # the last step's chunk size, which a model saved after an unbroken run carries: a run resumed after its last
    # checkpoint runs no step and would keep the size it was loaded with
    model.set_runtime(mem_chunk_size=clipper.chunk_size(step_offset + steps))
    if math.isnan(history["last_eval"]):
        history["last_eval"] = heldout_loss(model, eval_ids, labels=eval_labels)
    return TrainResult(
        steps_run=history["steps_run"], final_step=steps, resumed_from=resumed_from, rollbacks=ckpts.rollback_count,
        # every spike rolls back (or ends the run), and the rollback count survives a kill
        spikes=ckpts.rollback_count, eval_loss=history["last_eval"], niah=niah_scores,
        niah_seconds=history["niah_seconds"],
        train_seconds=train_seconds, gate_polarized=last["gate_polarized"], ltm_usage=last["ltm_usage"],
        telemetry=str(telemetry.path),
        first_lm_loss=lm_losses[0] if lm_losses else math.nan,
        last_lm_loss=sum(lm_losses[-tail:]) / tail if (tail := min(len(lm_losses), max(3, len(regimes)))) else math.nan,
    )
