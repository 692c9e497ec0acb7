"""What Phase 4 measures: held-out quality, compression from the bytes on disk, sparsity, decode speed and memory.

Definitions:
- held-out loss / perplexity / next-token accuracy: one teacher-forced pass over packed test-split rows; next-token
  accuracy is the share of positions whose arg-max logit is the next token.
- accuracy: exact answers to held-out problems, per skill, read off one teacher-forced pass (what greedy
  decoding writes), the forging report's measure.
- relative drop: (before − after) / before.
- compression: bytes of the input's weights file (FP32, as trained) over bytes of the packed weights file; the FP16
  figure saves the input model in FP16 and measures that file. Quantized layers alone: their FP32 bytes over the
  bytes their packed tensors take in the packed file (uint8 weights + scale + bias); bits per weight = 8 · packed
  bytes / weights, against log2(3) ≈ 1.585 for ternary and 2 for 2-bit packing.
- decode tokens/s: greedy generation of ``new_tokens`` tokens (forced, no early stop) with the decode cache, batch 1,
  median over repeats after a warm-up, over the same prompts for both models, the models taking turns; also per
  CPU-second of the process, which a busy shared machine disturbs less.
- resident memory: bytes of every tensor the model holds (parameters and buffers, shared ones once).
"""

from __future__ import annotations

import copy
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from phases.common.hf_io import save_pretrained
from phases.common.measure import heldout_means, teacher_forced_hits
from phases.common.telemetry import perplexity
from phases.data.encoding import EvalSet

WEIGHTS = "model.safetensors"
TERNARY_BITS = math.log2(3)


def token_stats(model: nn.Module, rows: torch.Tensor, batch_size: int = 8) -> dict[str, float]:
    """Held-out next-token loss, perplexity and next-token accuracy, in one pass."""
    stats = heldout_means(model, rows, batch_size, extra=lambda out, x: {
        "token_accuracy": float((out.logits[:, :-1].argmax(-1) == x[:, 1:]).float().mean())})
    return {"loss": stats["loss"], "ppl": perplexity(stats["loss"]), "token_accuracy": stats["token_accuracy"]}


@torch.no_grad()
def skill_accuracy(model: nn.Module, problems: EvalSet) -> dict[str, Any]:
    """Exact-answer accuracy over ``problems`` (pooled: the mean over skills, which have equal counts), each
    skill's [hits, n], and the per-problem hits (for a paired test)."""
    was_training = model.training
    model.eval()
    try:
        hits = teacher_forced_hits(model, problems.problems)
    finally:
        model.train(was_training)
    return {"accuracy": sum(hits) / len(hits), "accuracy_n": len(hits), "skills": problems.skill_hits(hits),
            "hits": hits}


def resident_bytes(model: nn.Module) -> int:
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "U8": 1, "I8": 1, "I64": 8, "I32": 4, "BOOL": 1}


def tensor_sizes(weights_file: Path) -> dict[str, tuple[int, int]]:
    """(elements, bytes) of each tensor in a safetensors file, from its header."""
    out = {}
    with safe_open(str(weights_file), "pt") as f:
        for key in f.keys():
            sl = f.get_slice(key)
            n = math.prod(sl.get_shape())
            out[key] = (n, n * _DTYPE_BYTES[sl.get_dtype()])
    return out


def saved_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    """Save a copy of ``model`` in ``dtype`` and measure its weights file."""
    copy_ = copy.deepcopy(model).to(dtype)
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(copy_, d)
        return (Path(d) / WEIGHTS).stat().st_size


def input_fp32_bytes(input_dir: Path, model: nn.Module) -> int:
    """The input artifact's weights file when it is FP32 (as trained); otherwise an FP32 save of the same model."""
    with safe_open(str(Path(input_dir) / WEIGHTS), "pt") as f:
        all_fp32 = all(f.get_slice(k).get_dtype() in ("F32", "U8", "I64", "I32", "BOOL") for k in f.keys())
    return (Path(input_dir) / WEIGHTS).stat().st_size if all_fp32 else saved_bytes(model, torch.float32)


def compression(input_dir: Path, packed_dir: Path, quantized: Sequence[str], fp32_file: int, fp16_bytes: int,
                quantized_weights: int) -> dict[str, Any]:
    """Compression figures from the weights files; ``quantized`` names the packed layers (module paths)."""
    packed_file = (Path(packed_dir) / WEIGHTS).stat().st_size
    quantized = set(quantized)
    packed_sizes, input_sizes = tensor_sizes(Path(packed_dir) / WEIGHTS), tensor_sizes(Path(input_dir) / WEIGHTS)
    q_packed = sum(b for k, (_, b) in packed_sizes.items() if k.rsplit(".", 1)[0] in quantized)
    # the same layers' weights and biases at 4 bytes each, counted in the input's own file
    q_input = sum(4 * n for k, (n, _) in input_sizes.items() if k.rsplit(".", 1)[0] in quantized)
    return {
        "fp32_bytes": fp32_file,
        "fp16_bytes": fp16_bytes,
        "packed_bytes": packed_file,
        "ratio_vs_fp32": fp32_file / packed_file,
        "ratio_vs_fp16": fp16_bytes / packed_file,
        "quantized_weights": quantized_weights,
        "quantized_fp32_bytes": q_input,
        "quantized_packed_bytes": q_packed,
        "quantized_ratio_vs_fp32": q_input / q_packed if q_packed else None,
        "bits_per_weight": 8 * q_packed / quantized_weights if quantized_weights else None,
        "ternary_limit_bits": TERNARY_BITS,
        "kept_bytes": packed_file - q_packed,
    }


def sparsity_by_layer(ternary: dict[str, torch.Tensor]) -> dict[str, Any]:
    per_layer = {name: float((w == 0).float().mean()) for name, w in ternary.items()}
    zeros = sum(int((w == 0).sum()) for w in ternary.values())
    total = sum(w.numel() for w in ternary.values())
    return {"per_layer": per_layer, "overall": zeros / total if total else math.nan}
