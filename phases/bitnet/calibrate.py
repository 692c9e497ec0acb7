"""Scale calibration on held-out curriculum data.

The ternary pattern W_q comes from γ = mean|W|, but γ is not the scale that best reproduces the layer's output: for
Gaussian weights the least-squares scale of a fixed pattern is about 1.3 γ. For each BitLinear, calibration runs the
model on held-out rows and fits the output scale c that minimises the layer's output error on them,
    c* = ⟨T, Q⟩ / ⟨Q, Q⟩,   T = x W_fpᵀ (the full-precision output),  Q = x̂ (W_q γ)ᵀ (the quantized one,
    x̂ = Q_a(x)),
so the layer computes c* · Q. The activations' scale needs no calibration: it is per token, computed on the fly.
Reported per layer: the relative output error ‖T − cQ‖ / ‖T‖ at c = 1 and at c*.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from phases.bitnet.bitlinear import BitLinear
from phases.bitnet.quantizer import fake_quant_activations, ternarize


@torch.no_grad()
def calibrate(model: nn.Module, layers: dict[str, BitLinear], rows: torch.Tensor,
              batch_size: int = 8) -> dict[str, dict]:
    """Set each layer's ``out_scale`` to its least-squares value on ``rows``; returns per-layer statistics."""
    sums = {name: {"tq": 0.0, "qq": 0.0, "tt": 0.0} for name in layers}

    def hook(name: str):
        def accumulate(module: BitLinear, inputs, _output):
            x = inputs[0].float()
            t = F.linear(x, module.weight.float())
            w_q, gamma = ternarize(module.weight)
            q = F.linear(fake_quant_activations(x), w_q.float() * gamma)
            s = sums[name]
            s["tq"] += float((t * q).sum())
            s["qq"] += float((q * q).sum())
            s["tt"] += float((t * t).sum())
        return accumulate

    handles = [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(rows), batch_size):
            model(rows[i:i + batch_size])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    report = {}
    for name, layer in layers.items():
        s = sums[name]
        c = s["tq"] / s["qq"] if s["qq"] > 0 and s["tt"] > 0 else 0.0
        if not c > 0:  # the ternary layer outputs nothing, or the reverse, on these rows: no scale can mend that
            layer.out_scale.fill_(1.0)
            why = "zero quantized output" if s["qq"] <= 0 or s["tt"] <= 0 else f"best scale {c:.3g} <= 0"
            report[name] = {"out_scale": 1.0, "fitted": False, "why": why}
            continue

        def rel_err(scale: float, s: dict = s) -> float:
            return max(0.0, s["tt"] - 2 * scale * s["tq"] + scale * scale * s["qq"]) ** 0.5 / s["tt"] ** 0.5

        layer.out_scale.fill_(c)
        report[name] = {"out_scale": c, "fitted": True, "rel_error_absmean": rel_err(1.0),
                        "rel_error_calibrated": rel_err(c)}
    return report


def reset(layers: Iterable[BitLinear]) -> None:
    for layer in layers:
        layer.out_scale.fill_(1.0)
