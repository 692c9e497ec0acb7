"""The packed artifact's format, in one place: 2-bit ternary weights in transformers' BitNet layout, the layer that
runs on them, the ``bitnet_ternary`` quantization method that lets ``from_pretrained`` load them, and save/load.

Bits. A (rows, cols) ternary matrix becomes a (R, cols) uint8 matrix with R = ceil(rows / 4). Row r of block i (the
rows i·R ... i·R + R − 1) sits in bits 2i and 2i+1 of packed row r, stored as W_q + 1 ∈ {0, 1, 2}. So
``transformers.integrations.bitnet.unpack_weights`` gives back our tensor, and a transformers ``BitLinear`` takes
the packed buffer as it is. When rows is not a multiple of 4 the last block is padded with zero bits (which
unpack to −1, as in transformers); ``unpack`` cuts them off by the row count it is given.

Layer. ``PackedBitLinear`` holds only what inference needs: ``weight`` (the packed uint8 above) and
``weight_scale`` s_w = 1 / (γ · c) so that
    y = (W_q · x_q) / (s_w · s_x) + b,
the same formula (and buffers) as ``transformers.integrations.bitnet.BitLinear``. ``c`` is the calibrated output
scale (calibrate.py; 1 without calibration). x_q and W_q are int8. On CPU, W_q · x_q is ``torch._int_mm`` (int32
accumulation, exact) on W_q unpacked once to int8: decode reads a quarter of FP32's weight bytes per token. Elsewhere
it is a float32 matmul, exact for any in_features below 2²⁴ / 127 ≈ 132k.

Loading. The model is constructed on the meta device, the quantizer swaps the listed linear layers for
PackedBitLinear, and only then are the stored tensors (uint8 packed weights, scales, FP16 rest) loaded: no
full-precision copy of a quantized layer exists at any point. transformers' own "bitnet" method needs accelerate and
converts every nn.Linear but the LM head; ours names the quantized modules explicitly, because the staged check may
keep whole layer groups in FP16 and Cognate's halting head stays FP16 too (convert.py).

Importing this module registers ``bitnet_ternary`` with transformers, so ``AutoModelForCausalLM.from_pretrained
(packed_dir)`` works after ``import phases.bitnet.packed_format``. (``phases.bitnet`` itself stays light:
PipelineConfig imports its settings.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

import phases.cognate.modeling  # noqa: F401  (registers the Cognate Auto classes)
import phases.quietstar.model  # noqa: F401  (and Quiet-STaR's Cognate, the pipeline's usual input)
from phases.bitnet.bitlinear import BitLinear
from phases.bitnet.convert import LM_HEAD_REASON, lm_heads, quantizable
from phases.bitnet.quantizer import quantize_activations
from phases.common.hf_io import load_pretrained, save_pretrained

VALUES_PER_BYTE = 4
QUANT_METHOD = "bitnet_ternary"


# ----------------------------------------------------------------------------- bits
def packed_rows(rows: int) -> int:
    return (rows + VALUES_PER_BYTE - 1) // VALUES_PER_BYTE


def pack(w_q: torch.Tensor) -> torch.Tensor:
    """Ternary int tensor (rows, ...) in {−1, 0, 1} -> uint8 (ceil(rows/4), ...)."""
    if w_q.is_floating_point():
        raise TypeError(f"pack() takes integer ternary weights, got {w_q.dtype}")
    if w_q.numel() and (int(w_q.min()) < -1 or int(w_q.max()) > 1):
        raise ValueError(f"pack() takes values in {{-1, 0, 1}}, got range [{int(w_q.min())}, {int(w_q.max())}]")
    rows = w_q.shape[0]
    R = packed_rows(rows)
    codes = (w_q.to(torch.int16) + 1).to(torch.uint8)
    padded = torch.zeros((R * VALUES_PER_BYTE, *w_q.shape[1:]), dtype=torch.uint8, device=w_q.device)
    padded[:rows] = codes
    blocks = padded.view(VALUES_PER_BYTE, R, *w_q.shape[1:])
    out = torch.zeros((R, *w_q.shape[1:]), dtype=torch.uint8, device=w_q.device)
    for i in range(VALUES_PER_BYTE):
        out |= blocks[i] << (2 * i)
    return out


def unpack(packed: torch.Tensor, rows: int, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """uint8 (R, ...) -> ternary (rows, ...) in ``dtype``; the inverse of ``pack``."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack() takes uint8, got {packed.dtype}")
    if not (packed.shape[0] - 1) * VALUES_PER_BYTE < rows <= packed.shape[0] * VALUES_PER_BYTE:
        raise ValueError(f"{packed.shape[0]} packed rows cannot hold {rows} rows")
    codes = torch.cat([(packed >> (2 * i)) & 3 for i in range(VALUES_PER_BYTE)])[:rows]
    return codes.to(dtype) - 1


# ----------------------------------------------------------------------------- layer
class PackedBitLinear(nn.Module):
    """Inference-only BitLinear on packed 2-bit weights; nothing in it is full precision but the scale and bias."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        dtype = dtype or torch.get_default_dtype()
        self.register_buffer("weight", torch.zeros(packed_rows(out_features), in_features, dtype=torch.uint8,
                                                   device=device))
        self.register_buffer("weight_scale", torch.ones(1, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        # int8_weight()'s cache, a buffer so that .to() moves it and memory counts see it: 4x the packed bytes,
        # a quarter of FP32's
        self.register_buffer("weight_int8", None, persistent=False)
        self._int8_key: tuple[int, int] | None = None

    @classmethod
    def from_bitlinear(cls, layer: BitLinear) -> PackedBitLinear:
        w_q, gamma = layer.ternary()
        new = cls(layer.in_features, layer.out_features, layer.bias is not None, device=layer.weight.device,
                  dtype=layer.weight.dtype)
        new.weight.copy_(pack(w_q))
        new.weight_scale.fill_(float(1.0 / (gamma * layer.out_scale)))
        if layer.bias is not None:
            new.bias.copy_(layer.bias.detach())
        return new

    def ternary(self) -> torch.Tensor:
        return unpack(self.weight, self.out_features)

    def int8_weight(self) -> torch.Tensor:
        """W_q as an (out, in) int8 matrix, unpacked once and kept until ``weight`` changes."""
        key = (self.weight.data_ptr(), self.weight._version)
        if self.weight_int8 is None or self._int8_key != key:
            self.weight_int8, self._int8_key = unpack(self.weight, self.out_features), key
        return self.weight_int8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_q = self.int8_weight()
        x_q, s_x = quantize_activations(x)
        rows = x_q.reshape(-1, self.in_features)
        if rows.device.type == "cpu":
            # int8 x int8 -> int32: exact, and it reads a quarter of FP32's weight bytes, which is what decode
            # (one row at a time, memory-bound) waits on
            acc = torch._int_mm(rows, w_q.t()).reshape(*x_q.shape[:-1], self.out_features)
        else:  # torch._int_mm on CUDA wants more than 16 rows; the float product of small integers is as exact
            acc = F.linear(x_q.to(torch.float32), w_q.to(torch.float32))
        y = acc.to(torch.float32) / (s_x * self.weight_scale.float())
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                "2-bit packed")


def packed_layers(model: nn.Module) -> dict[str, PackedBitLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, PackedBitLinear)}


# ----------------------------------------------------------------------------- transformers quantization method
class TernaryConfig(QuantizationConfigMixin):
    """What ``config.json`` records under ``quantization_config``.

    quantized_modules: linear layers stored as 2-bit ternary (PackedBitLinear).
    fp16_modules: {linear layer: why it stayed in FP16} (heads; groups the staged check restored).
    compute_dtype: dtype the FP16-stored tensors are loaded in (float32: CPU has no fast float16 kernels).
    """

    def __init__(self, quantized_modules: list[str] | None = None, fp16_modules: dict[str, str] | None = None,
                 weight_bits: float = 1.58, activation_bits: int = 8,
                 packing: str = "2-bit, 4 per byte (transformers BitNet)",
                 weight_scale: str = "s_w = 1 / (mean|W| * calibrated output scale); y = W_q x_q / (s_w s_x)",
                 storage_dtype: str = "float16", compute_dtype: str = "float32", **kwargs: Any):
        self.quant_method = QUANT_METHOD
        self.quantized_modules = list(quantized_modules or [])
        self.fp16_modules = dict(fp16_modules or {})
        self.weight_bits = weight_bits
        self.activation_bits = activation_bits
        self.packing = packing
        self.weight_scale = weight_scale
        self.storage_dtype = storage_dtype
        self.compute_dtype = compute_dtype


class TernaryQuantizer(HfQuantizer):
    requires_calibration = True  # a packed checkpoint is loaded, never produced, by from_pretrained

    def validate_environment(self, *args, **kwargs) -> None:
        if not self.pre_quantized:
            raise ValueError(f"{QUANT_METHOD}: quantize with phases.bitnet (staged, calibrated), then load the packed "
                             "directory; from_pretrained cannot quantize a full-precision checkpoint")

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return getattr(torch, self.quantization_config.compute_dtype)

    def _process_model_before_weight_loading(self, model, **kwargs):
        swap_to_packed(model, self.quantization_config.quantized_modules)
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def swap_to_packed(model: torch.nn.Module, names: list[str]) -> None:
    """Replace each named nn.Linear by an empty PackedBitLinear of its shape (on the linear's device, meta included)."""
    for name in names:
        lin = model.get_submodule(name)
        if isinstance(lin, PackedBitLinear):
            continue
        if not isinstance(lin, torch.nn.Linear):
            raise ValueError(f"{QUANT_METHOD}: {name} is a {type(lin).__name__}, not a linear layer to unpack into")
        model.set_submodule(name, PackedBitLinear(lin.in_features, lin.out_features, lin.bias is not None,
                                                  device=lin.weight.device, dtype=lin.weight.dtype))


def register() -> None:
    """Make ``quant_method: bitnet_ternary`` known to transformers (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(TernaryConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(TernaryQuantizer)


register()


# ----------------------------------------------------------------------------- save and load
def pack_model(model: PreTrainedModel, fp16_reasons: dict[str, str] | None = None) -> PreTrainedModel:
    """In place: every BitLinear becomes a PackedBitLinear, every other floating tensor FP16 (the storage dtype),
    and ``config.quantization_config`` records which layers are ternary and why the others are not."""
    fp16_reasons = dict(fp16_reasons or {})
    quantized = []
    for name in quantizable(model):
        m = model.get_submodule(name)
        if isinstance(m, BitLinear):
            model.set_submodule(name, PackedBitLinear.from_bitlinear(m))
            quantized.append(name)
        else:
            fp16_reasons.setdefault(name, "not quantized")
    for name in lm_heads(model):
        fp16_reasons.setdefault(name, LM_HEAD_REASON)
    if not quantized:
        raise ValueError("pack_model: the model has no BitLinear layer; quantize it first (convert.to_bitlinear)")
    _to_storage_dtype(model)
    model.config.quantization_config = TernaryConfig(quantized_modules=quantized, fp16_modules=fp16_reasons)
    return model


def _to_storage_dtype(model: nn.Module) -> None:
    """FP16 for every floating parameter and buffer but the scales (fp32 scalars: exact and negligible in size)."""
    with torch.no_grad():
        for module in model.modules():
            for key, p in list(module._parameters.items()):
                if p is not None and p.is_floating_point():
                    module._parameters[key] = nn.Parameter(p.detach().half(), requires_grad=False)
            for key, b in list(module._buffers.items()):
                if b is not None and b.is_floating_point() and key != "weight_scale":
                    module._buffers[key] = b.half()
    model.config.dtype = torch.float16


def save_packed(model: PreTrainedModel, out: Path, fp16_reasons: dict[str, str] | None = None) -> Path:
    """Pack ``model`` (consumed: it is converted in place) and save it with ``save_pretrained``."""
    pack_model(model, fp16_reasons)
    if model.config.tie_word_embeddings:  # the tied LM head is stored once, as transformers does
        model.tie_weights()
    save_pretrained(model, out)
    return Path(out)


def load_packed(path: str | Path) -> PreTrainedModel:
    """The inference model of a packed directory (``from_pretrained``: meta init, swap, load packed tensors)."""
    model = load_pretrained(AutoModelForCausalLM, path)
    qc = getattr(model.config, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    if method != "bitnet_ternary":
        raise ValueError(f"{path} is not a packed BitNet artifact: config.json has no bitnet_ternary "
                         "quantization_config")
    return model.eval()
