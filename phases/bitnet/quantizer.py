"""The BitNet b1.58 quantizer (Ma et al. 2024, "The Era of 1-bit LLMs"), as transformers' BitNet integration uses it.

    weights      γ = mean|W| (per tensor);  W_q = clamp(round(W / γ), −1, 1) ∈ {−1, 0, +1};  s_w = 1 / γ
    activations  per token: s_x = 127 / max|x|;  x_q = clamp(round(x · s_x), −128, 127)  (int8)
    output       y = (W_q · x_q) / (s_w · s_x)
    training     straight-through estimator (Bengio et al. 2013): x + (q(x) − x).detach(), so the forward pass sees
                 the quantized value and the backward pass the identity
"""

from __future__ import annotations

import torch

EPS = 1e-5  # floor on γ and max|x|: an all-zero tensor quantizes to zeros instead of dividing by zero
QMIN, QMAX = -128, 127


def absmean_scale(weight: torch.Tensor) -> torch.Tensor:
    """γ = mean|W| over the whole tensor (a 0-d tensor, in float32)."""
    return weight.detach().float().abs().mean().clamp_min(EPS)


def ternarize(weight: torch.Tensor, gamma: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_q as int8 in {−1, 0, 1}, γ). ``gamma`` defaults to mean|W|."""
    gamma = absmean_scale(weight) if gamma is None else gamma
    return (weight.detach().float() / gamma).round().clamp(-1, 1).to(torch.int8), gamma


def fake_quant_weight(weight: torch.Tensor, out_scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    """W_q · γ · out_scale with the straight-through gradient (identity w.r.t. ``weight``).

    ``out_scale`` multiplies only the dequantization scale (calibration, calibrate.py): the ternary pattern always
    comes from γ = mean|W|."""
    w_q, gamma = ternarize(weight)
    dequant = (w_q.to(weight.dtype) * (gamma * out_scale).to(weight.dtype))
    return weight + (dequant - weight).detach()


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_q as int8, s_x) per token (last dimension), s_x = 127 / max|x|."""
    s_x = QMAX / x.detach().float().abs().amax(dim=-1, keepdim=True).clamp_min(EPS)
    return (x.detach().float() * s_x).round().clamp(QMIN, QMAX).to(torch.int8), s_x


def fake_quant_activations(x: torch.Tensor) -> torch.Tensor:
    """x_q / s_x with the straight-through gradient."""
    x_q, s_x = quantize_activations(x)
    return x + ((x_q.float() / s_x).to(x.dtype) - x).detach()


def sparsity(w_q: torch.Tensor) -> float:
    """Fraction of ternary weights that are 0."""
    return float((w_q == 0).float().mean())
