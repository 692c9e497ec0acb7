"""Proactive gradient clipping on a shrinking chunk-size schedule: clipping before trouble is cheap, a rollback
(checkpoint I/O, lost steps) is the last resort, and more than 3 of them mean training is unstable.

  chunk size   C_L(t) = max(C_min, ⌊C_start · γ^t⌋),  γ = 0.9993
  clip norm    κ(C_L) = κ_base · √(32 / C_L),      κ_base = 0.5 at the reference C_L = 32
  transition   the step where C_L changes clips at 50% of κ
Smaller chunks give noisier gradients, hence the looser κ; the change of chunk size itself is the
moment training is most likely to blow up, hence the tighter clip there.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

GAMMA, KAPPA_BASE, REFERENCE_CHUNK, TRANSITION_FACTOR = 0.9993, 0.5, 32, 0.5


def chunk_size(step: int, c_start: int = 32, gamma: float = GAMMA, c_min: int = 1) -> int:
    return max(c_min, 1, math.floor(c_start * gamma**step))


def kappa(c_l: int, kappa_base: float = KAPPA_BASE) -> float:
    return kappa_base * math.sqrt(REFERENCE_CHUNK / c_l)


class ProactiveClipper:
    def __init__(self, c_start: int = 32, gamma: float = GAMMA, kappa_base: float = KAPPA_BASE, c_min: int = 1):
        self.c_start, self.gamma, self.kappa_base, self.c_min = c_start, gamma, kappa_base, c_min
        self.transition_count = 0
        self.clip_count = 0
        self._last_chunk: int | None = None

    def chunk_size(self, step: int) -> int:
        return chunk_size(step, self.c_start, self.gamma, self.c_min)

    def clip(self, params: Iterable[torch.nn.Parameter], step: int) -> dict[str, float]:
        """Clip gradients in place for this step; returns what telemetry records."""
        c_l = self.chunk_size(step)
        transition = self._last_chunk is not None and c_l != self._last_chunk
        self._last_chunk = c_l
        max_norm = kappa(c_l, self.kappa_base) * (TRANSITION_FACTOR if transition else 1.0)
        norm = float(torch.nn.utils.clip_grad_norm_(list(params), max_norm))
        self.transition_count += transition
        self.clip_count += norm > max_norm
        return {"chunk_size": c_l, "clip_threshold": max_norm, "grad_norm": norm, "is_transition": transition,
                "transition_count": self.transition_count, "clip_count": self.clip_count}

    def state_dict(self) -> dict:
        return {"transition_count": self.transition_count, "clip_count": self.clip_count, "last_chunk": self._last_chunk}

    def load_state_dict(self, s: dict) -> None:
        self.transition_count, self.clip_count, self._last_chunk = s["transition_count"], s["clip_count"], s["last_chunk"]
