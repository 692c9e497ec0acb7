"""Training checkpoints with auto-rollback, the failsafe when perplexity spikes (proactive gradient clipping,
phases.common.stability, is the first defence).

- The last ``keep_last`` (5) checkpoints are kept: weights as safetensors, optimizer state as a
  tensor-only torch file loaded with ``weights_only=True``, metadata as JSON.
- A checkpoint is written to a temp dir and renamed, so a kill never leaves a half checkpoint.
- Non-finite loss or weights never reach a checkpoint.
- ``rollback`` goes to the second-most-recent checkpoint (the latest may already hold the damage)
  and discards the newer ones; more than ``max_rollbacks`` raises RollbackLimitExceeded.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from phases.common.telemetry import perplexity


class CheckpointError(RuntimeError):
    pass


class RollbackLimitExceeded(CheckpointError):
    pass


class CheckpointManager:
    def __init__(self, directory: Path, keep_last: int = 5, max_rollbacks: int = 3):
        if keep_last < 2:
            raise ValueError("keep_last must be >= 2: rollback needs a second-most-recent checkpoint")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.keep_last, self.max_rollbacks = keep_last, max_rollbacks
        self._state_file = self.dir / "rollbacks.json"

    # ------------------------------------------------------------------ listing
    def steps(self) -> list[int]:
        return sorted(int(p.name.split("-")[1]) for p in self.dir.glob("ckpt-*") if (p / "meta.json").exists())

    def _path(self, step: int) -> Path:
        return self.dir / f"ckpt-{step:09d}"

    def _rollback_state(self) -> dict[str, Any]:
        return json.loads(self._state_file.read_text()) if self._state_file.exists() else {"count": 0, "history": []}

    @property
    def rollback_count(self) -> int:
        return self._rollback_state()["count"]

    # ------------------------------------------------------------------ save / load
    def save(self, step: int, model: torch.nn.Module, optimizer_state: dict, loss: float,
             extra: dict[str, Any] | None = None) -> Path:
        if not math.isfinite(loss):
            raise CheckpointError(f"refusing to checkpoint step {step}: loss is {loss}")
        bad = [n for n, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:
            raise CheckpointError(f"refusing to checkpoint step {step}: non-finite values in {bad[:3]}")
        final = self._path(step)
        tmp = self.dir / f".tmp-{step:09d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_model(model, str(tmp / "model.safetensors"))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        meta = {"step": step, "loss": loss, "perplexity": perplexity(loss), "timestamp": time.time(),
                **(extra or {})}
        (tmp / "meta.json").write_text(json.dumps(meta))
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        for old in self.steps()[: -self.keep_last]:
            shutil.rmtree(self._path(old), ignore_errors=True)
        return final

    def load(self, step: int, model: torch.nn.Module) -> tuple[dict, dict[str, Any]]:
        """Restore weights in place; return (optimizer state, metadata)."""
        path = self._path(step)
        try:
            load_model(model, str(path / "model.safetensors"))
            optimizer_state = torch.load(path / "optimizer.pt", weights_only=True)
            meta = json.loads((path / "meta.json").read_text())
        except Exception as e:
            raise CheckpointError(f"checkpoint {path} cannot be loaded: {type(e).__name__}: {e}") from e
        return optimizer_state, meta

    def latest(self, model: torch.nn.Module) -> tuple[dict, dict[str, Any]] | None:
        steps = self.steps()
        return self.load(steps[-1], model) if steps else None

    def rollback(self, model: torch.nn.Module, reason: str) -> tuple[dict, dict[str, Any]]:
        state = self._rollback_state()
        count = state["count"] + 1
        steps = self.steps()
        if count > self.max_rollbacks:
            raise RollbackLimitExceeded(
                f"training diverged again after {self.max_rollbacks} rollbacks (latest: {reason}); "
                f"checkpoints kept at steps {steps} in {self.dir}. Lower the learning rate or the Grokfast λ, "
                "or tighten gradient clipping, then resume."
            )
        if not steps:
            raise CheckpointError(f"cannot roll back ({reason}): no checkpoint in {self.dir}")
        target = steps[-2] if len(steps) >= 2 else steps[-1]
        for newer in steps[steps.index(target) + 1:]:
            shutil.rmtree(self._path(newer), ignore_errors=True)
        history = [*state["history"], {"to_step": target, "reason": reason, "at": time.time()}]
        self._state_file.write_text(json.dumps({"count": count, "history": history}))
        return self.load(target, model)
