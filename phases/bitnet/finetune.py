"""Quantization-aware fine-tuning: the latent weights of the BitLinear layers learn through the quantizer (STE).

Only the BitLinear layers train; everything kept in FP16 (embeddings, LM head, norms, heads, memory gates, groups
the staged check restored) is frozen, so it leaves this phase byte for byte as it came in. Optimiser: Muon × Grokfast
(phases/common/optim.py) with the Phase 4 settings (settings.py, ``finetune.optim``).

What it learns from (``finetune.objective``): the training split's problems with the loss on their answer tokens
("answers"), packed curriculum text with the loss on every token ("text"), or the two in alternate steps
("both", the default). Tiny, from the ternary Quiet-STaR model (held-out recall 2%, next-token accuracy 0.19):
- text, 300 steps: the loss fell from 5.5 to 1.2 and recall stayed at 0%. Next-token loss on text is dominated
  by the random keys and values recall problems are made of; the answer tokens, where the skill shows, are a
  small share of it;
- answers, 100 steps: recall back to 62-66% (the FP input: 66-70%), next-token accuracy 0.21-0.26 (the input:
  0.28), which fails the 10% token-accuracy budget;
- both, 100 steps: recall 64-70% and next-token accuracy 0.57-0.62, past the input's.

Every ``eval_every`` steps the validation skill accuracy (next-token accuracy breaks ties) is measured and the
best state is kept, so fine-tuning cannot end worse than it started. A non-finite loss stops the run with an error
that names the step.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from phases.bitnet.convert import bitlinears
from phases.bitnet.settings import BitNetFinetune
from phases.common.optim import MuonGrokfast
from phases.common.telemetry import TelemetryWriter, perplexity


def _rank(stats: dict[str, Any]) -> tuple[float, float]:
    return stats["skill_accuracy"], stats["token_accuracy"]


def finetune(model: nn.Module, batches: Callable[[int], torch.Tensor | tuple[torch.Tensor, torch.Tensor]],
             score: Callable[[nn.Module], dict[str, Any]], settings: BitNetFinetune,
             telemetry: Path | None = None) -> dict[str, Any]:
    """Train ``model``'s BitLinear layers for ``settings.steps`` steps on ``batches(step)`` (ids, or (ids,
    labels)); ``score(model)`` -> held-out stats with ``skill_accuracy`` and ``token_accuracy`` (higher is
    better, in that order). Leaves the best-scoring state in ``model``."""
    steps, optim = settings.steps, settings.optim
    layers = bitlinears(model)
    if not layers:
        raise ValueError("finetune: the model has no BitLinear layer to train")
    trainable = {id(p) for layer in layers.values() for p in layer.parameters()}
    frozen = {}
    for p in model.parameters():
        frozen[id(p)] = p.requires_grad
        p.requires_grad_(id(p) in trainable)
    writer = TelemetryWriter(telemetry) if telemetry else None
    opt = MuonGrokfast(model, optim)
    params = [p for p in model.parameters() if p.requires_grad]
    start = score(model)
    best = {"step": 0, **start}
    best_state = copy.deepcopy(model.state_dict())
    history = [{"step": 0, **start}]
    t0 = time.perf_counter()
    model.train()
    try:
        for step in range(1, steps + 1):
            batch = batches(step)
            x, labels = batch if isinstance(batch, tuple) else (batch, batch)
            out = model(x, labels=labels)
            loss = out.loss
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"quantization-aware fine-tuning: non-finite loss {loss.item()} at step {step}; lower "
                    f"bitnet.finetune.optim.muon_lr ({optim.muon_lr}) or bitnet.finetune.optim.adam_lr ({optim.adam_lr})")
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, settings.grad_clip))
            opt.step()
            opt.zero_grad()
            record = {"step": step, "lm_loss": out.lm_loss.item(), "perplexity": perplexity(out.lm_loss.item()),
                      "grad_norm": grad_norm, "lr": optim.muon_lr}
            if step % settings.eval_every == 0 or step == steps:
                held = score(model)
                model.train()
                record |= {f"eval_{k}": v for k, v in held.items() if isinstance(v, float)}
                history.append({"step": step, **held})
                if _rank(held) > _rank(best):
                    best = {"step": step, **held}
                    best_state = copy.deepcopy(model.state_dict())
            if writer:
                writer.write(**record)
    finally:
        for p in model.parameters():
            p.requires_grad_(frozen.get(id(p), True))
    model.load_state_dict(best_state)
    model.eval()
    return {"steps": steps, "seconds": time.perf_counter() - t0, "start": start, "best": best, "history": history,
            "trainable_params": sum(p.numel() for p in params), "muon_params": opt.n_muon, "adam_params": opt.n_adam}
