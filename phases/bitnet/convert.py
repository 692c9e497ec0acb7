"""Which layers of a Cognate model become ternary, and staged quantization, layer group by layer group.

The seeds quantize the attention and FFN layers and keep the embeddings, the LM head and the layer norms in FP16.
So the linear layers inside the decoder layers (``layers.N.*``) become ternary, and every linear outside them is a
head and stays FP16 with the LM head:
- ``embed_tokens`` / ``lm_head`` (tied) and every RMSNorm: FP16, untouched.
- ``halt_head`` (d → 1): the ACT halting head: one logit per position whose sigmoid decides how many recursion
  steps run. Ternary would shift every halting decision to save 0.02% of the weights.
- Quiet-STaR's mixing head (2d → d → 1), which weighs the post-thought prediction: an output head too.
- ``persistent_memory`` (n_persistent × d): learned tokens, read like embeddings (keys and values are projected
  from them): FP16.
- The neural memory (memory.py). Its W, S, A matrices are state, not stored weights: they are written at test time
  from the current keys and values, start at zero on every shard and never reach the checkpoint, so there is
  nothing to pack; they run in the compute dtype. Its learned parameters are three scalar gate logits per layer
  (θ, η, α): a ternary scalar would pin a gate to 0 or ±γ, so they stay FP16. The memory's projections are
  linear layers and are quantized: its keys, values and queries come from the attention's k/v/q projections, and
  its read goes out through ``mem_out``; the MAG gate ``gate_proj`` mixes the two branches. Both go in the layer's
  "memory" group, so the staged check can keep them in FP16 if the memory path suffers.
The other linear layers of a decoder layer (attention q/k/v/o, SwiGLU up/down) become BitLinear.

Staged quantization (the seeds' mitigation for an accuracy drop > 10%): groups are quantized one after another,
each checked on held-out data against the model before it; a group that costs more than its budget goes back to
full precision (FP16 in the packed artifact) and the report says which and by how much.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass

from torch import nn

from phases.bitnet.bitlinear import BitLinear

HEAD_REASON = "outside the decoder layers: an output head, kept in FP16 like the LM head"
_IN_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")
_GROUP_OF = (("attention", ("q_proj", "k_proj", "v_proj", "o_proj")), ("memory", ("mem_out", "gate_proj")),
             ("mlp", ("up_proj", "down_proj")))


def quantizable(model: nn.Module) -> list[str]:
    """Names of the linear layers that become ternary (nn.Linear, or already BitLinear): those of the decoder layers."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and _IN_LAYER.search(name)]


def kept_heads(model: nn.Module) -> list[str]:
    """The linear layers outside the decoder layers (LM head, halting head, mixing head)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and not _IN_LAYER.search(name)]


def group_of(name: str) -> str:
    """'model.layers.1.q_proj' -> 'layers.1.attention'; a layer's linear that is none of Cognate's goes to
    'layers.1.other'."""
    match = _IN_LAYER.search(name)
    if match is None:
        raise ValueError(f"{name} is not inside a decoder layer")
    layer, leaf = match.group(1), match.group(2).rsplit(".", 1)[-1]
    return f"layers.{layer}." + next((g for g, members in _GROUP_OF if leaf in members), "other")


def layer_groups(model: nn.Module) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for name in quantizable(model):
        groups.setdefault(group_of(name), []).append(name)
    return groups


def to_bitlinear(model: nn.Module, names: list[str]) -> None:
    for name in names:
        m = model.get_submodule(name)
        if not isinstance(m, BitLinear):
            model.set_submodule(name, BitLinear.from_linear(m))


def to_linear(model: nn.Module, names: list[str]) -> None:
    for name in names:
        m = model.get_submodule(name)
        if isinstance(m, BitLinear):
            model.set_submodule(name, m.to_linear())


def bitlinears(model: nn.Module) -> dict[str, BitLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, BitLinear)}


@dataclass
class StageRecord:
    group: str
    modules: list[str]
    params: int
    metric_before: float
    metric_after: float
    drop: float  # relative: (before - after) / before
    kept_fp16: bool
    reason: str
    calibration: dict


def relative_drop(before: float, after: float) -> float:
    return (before - after) / before if before > 0 else float(after < before)


def staged_quantize(model: nn.Module, check: Callable[[nn.Module], float], budget: float,
                    groups: dict[str, list[str]] | None = None,
                    calibrate: Callable[[list[str]], tuple[dict, float]] | None = None,
                    on_stage: Callable[[StageRecord], None] | None = None) -> list[dict]:
    """Quantize group by group; ``check(model)`` is a held-out score (higher is better). A group whose quantization
    lowers it by more than ``budget`` (relative, against the model just before that group) is restored.
    ``calibrate(names)`` runs on a freshly quantized group instead of the plain check and returns (what it did, the
    check's score of the state it leaves)."""
    groups = groups if groups is not None else layer_groups(model)
    records = []
    current = check(model)
    for group, names in groups.items():
        before = current
        to_bitlinear(model, names)
        info, after = calibrate(names) if calibrate is not None else ({}, check(model))
        drop = relative_drop(before, after)
        kept = drop > budget
        if kept:
            to_linear(model, names)
        else:
            current = after
        rec = StageRecord(group=group, modules=names, params=sum(model.get_submodule(n).weight.numel() for n in names),
                          metric_before=before, metric_after=after, drop=drop, kept_fp16=kept,
                          reason=f"held-out score {before:.4f} -> {after:.4f} ({drop:+.1%} drop) "
                                 f"{'exceeds' if kept else 'within'} the group budget {budget:.1%}", calibration=info)
        records.append(asdict(rec))
        if on_stage is not None:
            on_stage(rec)
    return records
