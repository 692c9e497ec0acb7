"""Which layers of a Cognate model become ternary, and staged quantization, layer group by layer group.

BitLinear replaces every linear layer but the LM head; the embeddings, the LM head and the norms stay FP16, which keeps
5-15% of the parameters at full precision. In a Cognate (or a Quiet-STaR Cognate) that means:
- ``embed_tokens`` / ``lm_head`` (tied) and every RMSNorm: FP16, untouched.
- ``persistent_memory`` (n_persistent × d): learned tokens, read like embeddings (keys and values are projected
  from them): FP16.
- The neural memory (memory.py). Its W, S, A matrices are state, not stored weights: they are written at test time
  from the current keys and values, start at zero on every shard and never reach the checkpoint, so there is
  nothing to pack; they run in the compute dtype. Its learned parameters are three scalar gate logits per layer
  (θ, η, α): a ternary scalar would pin a gate to 0 or ±γ, so they stay FP16. The memory's projections are
  linear layers and are quantized: its keys, values and queries come from the attention's k/v/q projections, and
  its read goes out through ``mem_out``; the MAG gate ``gate_proj`` mixes the two branches. Both go in the layer's
  "memory" group, so the staged check can keep them in FP16 if the memory path suffers.
- In each decoder layer, attention q/k/v/o ("attention"), mem_out/gate_proj ("memory") and SwiGLU up/down ("mlp")
  are the groups.
- The heads outside the layers are quantized too, each its own group, so the staged check keeps one in FP16 when
  ternary costs too much: ``halt_head`` (d → 1, the ACT halting logit) and Quiet-STaR's mixing head (2d → d → 1,
  the weight of the post-thought prediction; at 7% of a tiny model's weights, keeping it FP16 would cost the 6x).

Staged quantization (so that the accuracy drop stays under 10%): groups are quantized one after another,
each checked on held-out data against the model before it; a group that costs more than its budget goes back to
full precision (FP16 in the packed artifact) and the report says which and by how much.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass

from torch import nn

from phases.bitnet.bitlinear import BitLinear
from phases.common.measure import relative_drop

LM_HEAD_REASON = "the LM head (tied to the embeddings): kept FP16, as BitNet b1.58 keeps embeddings and head"
_IN_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")
_GROUP_OF = (("attention", ("q_proj", "k_proj", "v_proj", "o_proj")), ("memory", ("mem_out", "gate_proj")),
             ("mlp", ("up_proj", "down_proj")))


def lm_heads(model: nn.Module) -> list[str]:
    """The output embedding module, and any linear sharing its weight or the input embedding's."""
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    tied = {id(m.weight) for m in (out, inp) if m is not None}
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and (m is out or id(m.weight) in tied)]


def quantizable(model: nn.Module) -> list[str]:
    """Names of the linear layers that become ternary (nn.Linear, or already BitLinear): all but the LM head."""
    keep = set(lm_heads(model))
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name not in keep]


def group_of(name: str) -> str:
    """'model.layers.1.q_proj' -> 'layers.1.attention' (a layer's linear that is none of Cognate's goes to
    'layers.1.other'); outside the layers: 'model.halt_head' -> 'head.halt_head', 'mixing.net.0' -> 'head.mixing'."""
    match = _IN_LAYER.search(name)
    if match is None:
        return "head." + name.removeprefix("model.").split(".", 1)[0]
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
