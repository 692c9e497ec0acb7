"""The two BitLinear layers: one to train through (latent weights, fake quantization, STE), one to run (packed).

``BitLinear`` keeps the full-precision latent weight that the optimiser updates and quantizes it on every forward
pass (BitNet's "online" mode): y = Q_a(x) · Q_w(W)ᵀ + b, both with the straight-through estimator.

``PackedBitLinear`` holds only what inference needs, in transformers' BitNet format: ``weight`` as uint8, four
ternary values per byte (packing.py), and ``weight_scale`` s_w = 1 / (γ · c) so that
    y = (W_q · x_q) / (s_w · s_x) + b,
the same formula (and buffers) as ``transformers.integrations.bitnet.BitLinear``. ``c`` is the calibrated output
scale (calibrate.py; 1 without calibration). x_q and W_q are small integers, so W_q · x_q is exact in float32 for
any in_features below 2²⁴ / 127 ≈ 132k: the float matmul is an integer matmul here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from phases.bitnet import packing
from phases.bitnet.quantizer import fake_quant_activations, fake_quant_weight, quantize_activations, ternarize


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


class PackedBitLinear(nn.Module):
    """Inference-only BitLinear on packed 2-bit weights; nothing in it is full precision but the scale and bias."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        dtype = dtype or torch.get_default_dtype()
        self.register_buffer("weight", torch.zeros(packing.packed_rows(out_features), in_features, dtype=torch.uint8,
                                                   device=device))
        self.register_buffer("weight_scale", torch.ones(1, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_bitlinear(cls, layer: BitLinear) -> PackedBitLinear:
        w_q, gamma = layer.ternary()
        new = cls(layer.in_features, layer.out_features, layer.bias is not None, device=layer.weight.device,
                  dtype=layer.weight.dtype)
        new.weight.copy_(packing.pack(w_q))
        new.weight_scale.fill_(float(1.0 / (gamma * layer.out_scale)))
        if layer.bias is not None:
            new.bias.copy_(layer.bias.detach())
        return new

    def ternary(self) -> torch.Tensor:
        return packing.unpack(self.weight, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_q = packing.unpack(self.weight, self.out_features, torch.float32)
        x_q, s_x = quantize_activations(x)
        y = F.linear(x_q.to(torch.float32), w_q) / (s_x * self.weight_scale.float())
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                "2-bit packed")
