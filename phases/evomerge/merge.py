"""Materialise a recipe: read the parents' safetensors lazily, merge tensor by tensor, write a model.

Works on any same-architecture transformers causal LM whose blocks are named ``<prefix>.layers.<i>.``
(Cognate, Llama, Qwen, ...). Only the merged model is held whole; parents are read one tensor at a
time from memory-mapped files, and stage 1–2 results are computed per tensor on demand.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from phases.evomerge import techniques as tq
from phases.evomerge.genome import N_SOURCES, Genome, techniques

_LAYER = re.compile(r"^(?P<prefix>.*?\.?layers)\.(?P<idx>\d+)\.(?P<rest>.+)$")
# Runtime settings a merged Cognate model takes from its runtime donor (phases/cognate/configuration.py).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


class MergeError(ValueError):
    """Parents that cannot be merged: a missing tensor, a shape or vocabulary mismatch, a bad recipe."""


class Checkpoint:
    """One model directory's weights, opened lazily (single file or a sharded index)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif single.exists():
            files, weight_map = ["model.safetensors"], None
        else:
            raise MergeError(f"{self.path}: no model.safetensors (or index) to merge")
        self._handles = {f: safe_open(str(self.path / f), framework="pt") for f in files}
        self._where = weight_map or {k: "model.safetensors" for k in self._handles["model.safetensors"].keys()}
        self.config = json.loads((self.path / "config.json").read_text())

    def keys(self) -> list[str]:
        return sorted(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handles[self._where[key]].get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        return self._handles[self._where[key]].get_tensor(key)

    @property
    def n_layers(self) -> int:
        idx = [int(m["idx"]) for k in self._where if (m := _LAYER.match(k))]
        return max(idx) + 1 if idx else 0


def check_compatible(models: dict[str, Checkpoint]) -> None:
    """Same tensor names and shapes everywhere, or a MergeError naming the first difference."""
    (ref_name, ref), *others = models.items()
    ref_keys = ref.keys()
    for name, m in others:
        keys = m.keys()
        if keys != ref_keys:
            missing = sorted(set(ref_keys) ^ set(keys))[0]
            owner = ref_name if missing in ref_keys else name
            raise MergeError(f"architectures differ: tensor {missing!r} is in {owner} only ({ref_name} vs {name})")
        for k in ref_keys:
            if ref.shape(k) != m.shape(k):
                what = "vocabularies" if "embed" in k or "lm_head" in k else "architectures"
                raise MergeError(f"{what} differ: first differing tensor {k!r} has shape {ref.shape(k)} in "
                                 f"{ref_name} but {m.shape(k)} in {name}")


def layer_key(key: str) -> tuple[str, int, str] | None:
    m = _LAYER.match(key)
    return (m["prefix"], int(m["idx"]), m["rest"]) if m else None


@dataclass
class Merger:
    """Stage 1–2 of a recipe as a per-tensor function over (base, A, B, C)."""

    base: Checkpoint
    inputs: list[Checkpoint]
    genome: Genome
    _memo: dict[str, torch.Tensor] = field(default_factory=dict)

    def stage2(self, key: str) -> torch.Tensor:
        if key in self._memo:
            return self._memo[key]
        interp, task, _ = techniques(self.genome.combo)
        w = self.genome.weights
        xs = [m.get(key) for m in self.inputs]
        if interp == "linear":
            m1 = tq.linear(xs, w)
        else:  # three-way slerp as two pairwise ones, each t the newcomer's share of the weight
            ab = tq.slerp(w[1] / (w[0] + w[1]), xs[0], xs[1])
            m1 = tq.slerp(w[2] / sum(w), ab, xs[2])
        beta = self.genome.blend
        if beta == 0:
            out = m1
        else:
            base = self.base.get(key)
            if task == "ties":
                tm = tq.ties(base, xs, w, self.genome.density)
            else:
                gen = torch.Generator().manual_seed(tq.tensor_seed(self.genome.seed, key))
                tm = tq.dare(base, xs, w, self.genome.density, gen)
            out = tq.linear([m1, tm], [1 - beta, beta])
        self._memo[key] = out
        return out


def layer_plan(genome: Genome, n_layers: int) -> list[tq.LayerStep]:
    _, _, select = techniques(genome.combo)
    if select == "frankenmerge":
        if len(genome.pattern) != n_layers:
            raise MergeError(f"FrankenMerge pattern has {len(genome.pattern)} entries for {n_layers} layers")
        return tq.frankenmerge(genome.pattern)
    try:
        return tq.dfs(genome.path, n_layers, N_SOURCES)
    except ValueError as e:
        raise MergeError(str(e)) from e


def merge_genome(base: str | Path, inputs: Iterable[str | Path], genome: Genome
                 ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The merged state dict and config.json of ``genome`` applied to the three ``inputs`` over ``base``."""
    base_ck, input_cks = Checkpoint(base), [Checkpoint(p) for p in inputs]
    check_compatible({"base": base_ck, **{f"input {chr(65 + i)}": c for i, c in enumerate(input_cks)}})
    merger = Merger(base_ck, input_cks, genome)
    n_layers = base_ck.n_layers
    plan = layer_plan(genome, n_layers)
    state: dict[str, torch.Tensor] = {}
    per_layer: dict[int, list[tuple[str, str]]] = {}
    for key in base_ck.keys():
        parsed = layer_key(key)
        if parsed is None:
            state[key] = merger.stage2(key)
        else:
            per_layer.setdefault(parsed[1], []).append((parsed[0], parsed[2]))
    used: set[int] = set()
    for j, step in enumerate(plan):
        for prefix, rest in per_layer[step.layer]:
            src_key = f"{prefix}.{step.layer}.{rest}"
            t = merger.stage2(src_key) if step.source == 0 else input_cks[step.source - 1].get(src_key)
            state[f"{prefix}.{j}.{rest}"] = t.clone() if id(t) in used else t  # a DFS path may repeat a layer
            used.add(id(t))
    config = dict(input_cks[genome.runtime_from].config)
    config["num_hidden_layers"] = len(plan)
    scales = [s.scale for s in plan]
    if any(abs(s - 1.0) > 1e-9 for s in scales):
        if config.get("model_type") != "cognate":
            raise MergeError(f"DFS input scales need a model that applies them; {config.get('model_type')!r} does not")
        config["layer_scales"] = scales
    else:
        config.pop("layer_scales", None)
    config.pop("_name_or_path", None)
    return state, config


def save_merged(state: dict[str, torch.Tensor], config: dict[str, Any], out: str | Path,
                tokenizer_from: str | Path | None = None) -> Path:
    """A model directory that ``from_pretrained`` loads: config.json, model.safetensors, tokenizer files."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    if tokenizer_from is not None:
        for name in _TOKENIZER_FILES:
            if (Path(tokenizer_from) / name).exists():
                shutil.copy2(Path(tokenizer_from) / name, out / name)
    return out
