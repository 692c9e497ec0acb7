"""The BitLinear layer to train through: latent weights, fake quantization, STE. (The layer that runs on the
packed 2-bit weights, PackedBitLinear, is part of the packed format: packed_format.py.)

``BitLinear`` keeps the full-precision latent weight that the optimiser updates and quantizes it on every forward
pass (BitNet's "online" mode): y = Q_a(x) · Q_w(W)ᵀ + b, both with the straight-through estimator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from phases.bitnet.quantizer import fake_quant_activations, fake_quant_weight, ternarize


class BitLinear(nn.Linear):
    """nn.Linear with BitNet b1.58 fake quantization of weights and activations (training and staged checks)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.register_buffer("out_scale", torch.ones((), dtype=torch.float32, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> BitLinear:
        new = cls(linear.in_features, linear.out_features, linear.bias is not None,
                  device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(linear.weight)
            if linear.bias is not None:
                new.bias.copy_(linear.bias)
        new.train(linear.training)
        return new

    def to_linear(self) -> nn.Linear:
        """Back to a plain nn.Linear holding the latent weights (the staged fallback; saving latents)."""
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.weight)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        lin.train(self.training)
        return lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(fake_quant_activations(x), fake_quant_weight(self.weight, self.out_scale), self.bias)

    def ternary(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_q int8, γ) of the current latent weights."""
        return ternarize(self.weight)
