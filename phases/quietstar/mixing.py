"""The mixing head: how much of the post-thought prediction reaches the output.

Quiet-STaR (Zelikman et al., 2024, §4.3): a small MLP reads the base hidden state of the position and the
hidden state after the thought and outputs a weight w; the output logits are

    logits = base + w · (post_thought − base)

Its last layer starts at zero, so z = 0 and w = 0: at initialisation the output IS the baked model's,
bit for bit (base + 0·diff = base), and thoughts gain influence only as far as training finds them useful.

w = clamp(z, 0, 1) in the forward pass with a straight-through gradient (Bengio et al., 2013): the
backward pass is the identity, so a head pushed below 0 (w stuck at 0 under a plain clamp, like a dead
ReLU) still gets the gradient that can bring it back.
"""

from __future__ import annotations

import torch
from torch import nn


class MixingHead(nn.Module):
    def __init__(self, hidden_size: int, inner: int | None = None):
        super().__init__()
        inner = inner or hidden_size
        self.net = nn.Sequential(nn.Linear(2 * hidden_size, inner), nn.ReLU(), nn.Linear(inner, 1))
        self.reset_output()

    @torch.no_grad()
    def reset_output(self) -> None:
        """Zero the last layer: w = 0 everywhere, the model equals the one it wraps."""
        self.net[-1].weight.zero_()
        self.net[-1].bias.zero_()

    def weights_nothing(self) -> bool:
        """True while the last layer is all zeros (as ``reset_output`` leaves it): w = 0 for every input."""
        return not any(bool(p.any()) for p in self.net[-1].parameters())

    def forward(self, base_hidden: torch.Tensor, thought_hidden: torch.Tensor) -> torch.Tensor:
        """(…, d), (…, d) -> w (…,) in [0, 1]."""
        base_hidden = base_hidden.expand_as(thought_hidden)
        z = self.net(torch.cat([base_hidden, thought_hidden], -1)).squeeze(-1)
        return z + (z.clamp(0.0, 1.0) - z).detach()


def mix(base_logits: torch.Tensor, thought_logits: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """base + w·(thought − base); exactly ``base`` where w == 0."""
    return base_logits + w.unsqueeze(-1) * (thought_logits - base_logits)
