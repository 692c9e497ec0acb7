"""The packed artifact: save a fake-quantized model as 2-bit weights + FP16 rest, and load it back for inference.

Importing this module registers the ``bitnet_ternary`` quantization method with transformers (hf_quant.py), so
``AutoModelForCausalLM.from_pretrained(packed_dir)`` works after ``import phases.bitnet.packed``. (``phases.bitnet``
itself stays light: PipelineConfig imports its settings.)
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

import phases.cognate  # noqa: F401  (registers Cognate with the Auto classes)
import phases.quietstar.model  # noqa: F401  (and Quiet-STaR's Cognate, the pipeline's usual input)
from phases.bitnet.bitlinear import BitLinear, PackedBitLinear
from phases.bitnet.convert import LM_HEAD_REASON, lm_heads, quantizable
from phases.bitnet.hf_quant import TernaryConfig, register
from phases.common.hf_io import load_pretrained, save_pretrained

register()


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


def packed_layers(model: nn.Module) -> dict[str, PackedBitLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, PackedBitLinear)}
