"""The packed format as a transformers quantization method, so ``from_pretrained`` on a packed directory builds the
inference model directly: the model is constructed on the meta device, the quantizer swaps the listed linear layers
for PackedBitLinear, and only then are the stored tensors (uint8 packed weights, scales, FP16 rest) loaded. No
full-precision copy of a quantized layer exists at any point.

transformers' own "bitnet" method needs accelerate and converts every nn.Linear but the LM head; ours names the
quantized modules explicitly, because the staged check may keep whole layer groups in FP16 and Cognate's halting
head stays FP16 too (convert.py). The tensors follow transformers' BitLinear format (packing.py, bitlinear.py).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from phases.bitnet.bitlinear import PackedBitLinear

QUANT_METHOD = "bitnet_ternary"


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
