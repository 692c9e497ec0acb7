"""Training telemetry: a JSONL line per step (append-only, readable by any tool, a field may be null when not
measured) and PPL-delta spike detection against the EMA, so the threshold scales with the training stage.

  delta = (ppl − ema_ppl) / ema_ppl,  spike when delta > 5%  (2% gives false alarms, 10% misses real spikes)
A NaN or infinite loss is always a spike: it must never pass as an ordinary step.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def perplexity(loss: float) -> float:
    """exp(loss), capped so a diverged loss reads as huge rather than overflowing."""
    return math.exp(min(loss, 50.0))


class PPLDelta:
    def __init__(self, threshold: float = 0.05, ema_decay: float = 0.9):
        self.threshold, self.decay = threshold, ema_decay
        self.ema: float | None = None

    def update(self, loss: float) -> tuple[float, bool]:
        """(delta, is_spike) for this step's loss. Spikes do not move the EMA."""
        if not math.isfinite(loss):
            return math.inf, True
        ppl = perplexity(loss)
        if self.ema is None:
            self.ema = ppl
            return 0.0, False
        delta = (ppl - self.ema) / self.ema
        spike = delta > self.threshold
        if not spike:
            self.ema = self.decay * self.ema + (1 - self.decay) * ppl
        return delta, spike

    def state_dict(self) -> dict:
        return {"ema": self.ema}

    def load_state_dict(self, s: dict) -> None:
        self.ema = s["ema"]


class TelemetryWriter:
    """Append-only JSONL; optional fields (e.g. niah_accuracy between probes) are null."""

    FIELDS = ("step", "lm_loss", "perplexity", "ppl_delta", "is_spike", "niah_accuracy", "grad_norm",
              "chunk_size", "clip_threshold", "transition_count", "clip_count", "rollback_count", "lr")

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # lines in the file, kept as it grows so a checkpoint can record it without reading the file back
        self.lines = len(self.path.read_text().splitlines()) if self.path.exists() else 0

    def write(self, **record: Any) -> dict[str, Any]:
        row = {f: record.pop(f, None) for f in self.FIELDS} | record
        for k, v in row.items():
            if isinstance(v, float) and not math.isfinite(v):
                row[k] = str(v)  # JSON has no NaN/inf; keep them visible as strings
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.lines += 1
        return row

    def truncate(self, lines: int) -> None:
        """Keep the first ``lines`` lines (a resume drops what it will write again), atomically."""
        if not self.path.exists():
            return
        kept = self.path.read_text().splitlines(keepends=True)[:lines]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(kept))
        tmp.replace(self.path)
        self.lines = len(kept)

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
