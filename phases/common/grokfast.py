"""Grokfast-EMA (Lee et al., 2024): amplify the slow component of the gradient.

Between backward() and optimizer.step():  ema ← α·ema + (1−α)·g,  then  g ← g + λ·ema.
The filter adds λ·ema to the gradient; it does not replace g by g − ema (a high-pass filter would
do the opposite of what grokking acceleration needs).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class GrokfastEMA:
    def __init__(self, params: Iterable[torch.nn.Parameter], alpha: float = 0.98, lamb: float = 2.0):
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"Grokfast alpha must be in [0, 1), got {alpha}")
        self.params = [p for p in params if p.requires_grad]
        self.alpha, self.lamb = alpha, lamb
        self.ema: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def apply(self) -> None:
        for p in self.params:
            if p.grad is None:
                continue
            ema = self.ema.get(id(p))
            if ema is None:
                ema = self.ema[id(p)] = p.grad.detach().clone()
            else:
                ema.mul_(self.alpha).add_(p.grad, alpha=1 - self.alpha)
            p.grad.add_(ema, alpha=self.lamb)

    def state_dict(self) -> dict[str, torch.Tensor]:
        index = {id(p): i for i, p in enumerate(self.params)}
        return {str(index[k]): v for k, v in self.ema.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.ema = {id(self.params[int(i)]): v.clone() for i, v in state.items()}
