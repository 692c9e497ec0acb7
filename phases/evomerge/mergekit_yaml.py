"""mergekit-style YAML: export a recipe as one, and run one (`agent-forge merge CONFIG.yaml OUT_DIR`).

Supported methods: linear, slerp, task_arithmetic, ties, dare_ties, dare_linear, passthrough, with
mergekit's parameter names and defaults (normalize: true for linear and ties, false otherwise;
lambda 1; density 1). A file may hold several documents separated by ``---``, each with a ``name``
(mergekit-multi's convention): a later document uses an earlier one's name as a model. The last
document is the output.

Two extensions carry what mergekit has no word for, and make ``exact`` false in ``export``:
- ``input_scale`` on a passthrough slice: DFS's scale on that layer's input (Cognate's layer_scales);
- ``config_from``: which model's config.json (runtime settings) the output takes; default base_model.
DARE's drops are seeded per tensor by the document's ``seed`` parameter, so a run reproduces.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from phases.evomerge import techniques as tq
from phases.evomerge.genome import Genome, techniques
from phases.evomerge.merge import Checkpoint, MergeError, check_compatible, layer_key, save_merged

METHODS = ("linear", "slerp", "task_arithmetic", "ties", "dare_ties", "dare_linear", "passthrough")
_NORMALIZE_DEFAULT = {"linear": True, "ties": True}


class InMemory:
    """An intermediate result with Checkpoint's interface."""

    def __init__(self, state: dict[str, torch.Tensor], config: dict[str, Any]):
        self.state, self.config = state, config

    def keys(self) -> list[str]:
        return sorted(self.state)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.state[key].shape)

    def get(self, key: str) -> torch.Tensor:
        return self.state[key]

    @property
    def n_layers(self) -> int:
        return self.config.get("num_hidden_layers", 0)


def _models(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(m["model"], m.get("parameters") or {}) for m in doc.get("models") or []]


def _run_doc(doc: dict[str, Any], resolve) -> InMemory:
    method = doc.get("merge_method")
    if method not in METHODS:
        raise MergeError(f"merge_method {method!r} is not supported; use one of {', '.join(METHODS)}")
    params = doc.get("parameters") or {}
    if method == "passthrough":
        return _passthrough(doc, resolve)
    base_name = doc.get("base_model")
    entries = _models(doc)
    if method != "linear" and base_name is None:
        raise MergeError(f"{method} needs a base_model")
    if method in ("task_arithmetic", "ties", "dare_ties", "dare_linear", "linear"):
        entries = [(n, p) for n, p in entries if n != base_name] if method != "linear" else entries
    models = {n: resolve(n) for n, _ in entries}
    every = dict(models)
    if base_name is not None:
        every[base_name] = resolve(base_name)
    check_compatible(every)
    ref = every[base_name] if base_name is not None else next(iter(models.values()))
    state = {}
    if method == "slerp":
        others = [n for n, _ in entries if n != base_name]
        if len(others) != 1:
            raise MergeError(f"slerp takes a base_model and exactly one other model, got {others}")
        t = float(params["t"])
        for k in ref.keys():
            state[k] = tq.slerp(t, every[base_name].get(k), every[others[0]].get(k))
    elif method == "linear":
        weights = [float(p.get("weight", 1.0)) for _, p in entries]
        normalize = params.get("normalize", True)
        for k in ref.keys():
            state[k] = tq.linear([models[n].get(k) for n, _ in entries], weights, normalize=normalize)
    else:
        weights = [float(p.get("weight", 1.0)) for _, p in entries]
        densities = {float(p.get("density", 1.0)) for _, p in entries}
        if len(densities) > 1:
            raise MergeError(f"{method}: per-model densities {sorted(densities)} are not supported; use one density")
        density = densities.pop() if densities else 1.0
        kw = {"lam": float(params.get("lambda", 1.0)),
              "normalize": params.get("normalize", _NORMALIZE_DEFAULT.get(method, False))}
        base = every[base_name]
        for k in ref.keys():
            xs = [models[n].get(k) for n, _ in entries]
            if method == "task_arithmetic":
                state[k] = tq.task_arithmetic(base.get(k), xs, weights, **kw)
            elif method == "ties":
                state[k] = tq.ties(base.get(k), xs, weights, density, **kw)
            else:
                gen = torch.Generator().manual_seed(tq.tensor_seed(int(params.get("seed", 0)), k))
                state[k] = tq.dare(base.get(k), xs, weights, density, gen, consensus=method == "dare_ties", **kw)
    config_from = resolve(doc.get("config_from") or base_name or entries[0][0])
    return InMemory(state, dict(config_from.config))


def _passthrough(doc: dict[str, Any], resolve) -> InMemory:
    slices = doc.get("slices")
    if not slices:
        entries = _models(doc)
        if len(entries) != 1:
            raise MergeError("passthrough without slices takes exactly one model")
        m = resolve(entries[0][0])
        return InMemory({k: m.get(k) for k in m.keys()}, dict(m.config))
    steps = []  # (model name, layer, scale)
    for sl in slices:
        (src,) = sl["sources"]
        lo, hi = src["layer_range"]
        steps += [(src["model"], i, float(src.get("input_scale", 1.0))) for i in range(lo, hi)]
    names = {n for n, _, _ in steps}
    head_name = doc.get("base_model") or steps[0][0]
    models = {n: resolve(n) for n in names | {head_name}}
    check_compatible(models)
    head = models[head_name]
    state, per_layer = {}, {}
    for k in head.keys():
        parsed = layer_key(k)
        if parsed is None:
            state[k] = head.get(k)
        else:
            per_layer.setdefault(parsed[1], []).append((parsed[0], parsed[2]))
    for j, (name, layer, _) in enumerate(steps):
        if layer not in per_layer:
            raise MergeError(f"passthrough slice asks for layer {layer} of {name}, which has {len(per_layer)} layers")
        for prefix, rest in per_layer[layer]:
            state[f"{prefix}.{j}.{rest}"] = models[name].get(f"{prefix}.{layer}.{rest}").clone()
    config = dict(resolve(doc.get("config_from") or head_name).config)
    config["num_hidden_layers"] = len(steps)
    scales = [s for _, _, s in steps]
    if any(abs(s - 1.0) > 1e-9 for s in scales):
        config["layer_scales"] = scales
    else:
        config.pop("layer_scales", None)
    return InMemory(state, config)


def run(config_path: str | Path, out_dir: str | Path) -> Path:
    """Run every document of a mergekit-style YAML; write the last one's model to ``out_dir``."""
    config_path = Path(config_path)
    try:
        docs = [d for d in yaml.safe_load_all(config_path.read_text()) if d]
    except yaml.YAMLError as e:
        raise MergeError(f"{config_path}: not valid YAML: {e}") from e
    if not docs:
        raise MergeError(f"{config_path}: no merge document")
    done: dict[str, InMemory] = {}
    first_dir: list[Path] = []

    def resolve(name: str):
        if name in done:
            return done[name]
        path = Path(name) if Path(name).is_absolute() else config_path.parent / name
        if not path.is_dir():
            raise MergeError(f"model {name!r}: neither an earlier document's name nor a directory ({path})")
        if not first_dir:
            first_dir.append(path)
        return Checkpoint(path)

    result = None
    for i, doc in enumerate(docs):
        result = _run_doc(doc, resolve)
        done[doc.get("name") or f"doc{i}"] = result
    result.config.pop("_name_or_path", None)
    return save_merged(result.state, result.config, out_dir, tokenizer_from=first_dir[0] if first_dir else None)


def export(genome: Genome, base_name: str, input_names: list[str]) -> tuple[str, bool]:
    """The recipe as mergekit-style YAML, and whether mergekit itself could run it unchanged."""
    interp, task, select = techniques(genome.combo)
    w = list(genome.weights)
    a, b, c = input_names
    docs: list[dict[str, Any]] = []
    if interp == "linear":
        docs.append({"name": "stage1", "merge_method": "linear", "dtype": "float32",
                     "models": [{"model": n, "parameters": {"weight": x}} for n, x in zip(input_names, w)]})
    else:
        docs.append({"name": "stage1_ab", "merge_method": "slerp", "base_model": a, "dtype": "float32",
                     "models": [{"model": a}, {"model": b}], "parameters": {"t": w[1] / (w[0] + w[1])}})
        docs.append({"name": "stage1", "merge_method": "slerp", "base_model": "stage1_ab", "dtype": "float32",
                     "models": [{"model": "stage1_ab"}, {"model": c}], "parameters": {"t": w[2] / sum(w)}})
    stage2 = "stage1"
    if genome.blend > 0:
        method = "ties" if task == "ties" else "dare_ties"
        params: dict[str, Any] = {} if task == "ties" else {"seed": genome.seed}
        docs.append({"name": "stage2_task", "merge_method": method, "base_model": base_name, "dtype": "float32",
                     "models": [{"model": n, "parameters": {"weight": x, "density": genome.density}}
                                for n, x in zip(input_names, w)], **({"parameters": params} if params else {})})
        docs.append({"name": "stage2", "merge_method": "linear", "dtype": "float32",
                     "models": [{"model": "stage1", "parameters": {"weight": 1 - genome.blend}},
                                {"model": "stage2_task", "parameters": {"weight": genome.blend}}]})
        stage2 = "stage2"
    sources = [stage2, a, b, c]
    if select == "frankenmerge":
        steps = [(s, i, 1.0) for i, s in enumerate(genome.pattern)]
    else:
        steps = list(genome.path)
    slices = []
    for s, layer, scale in steps:
        src: dict[str, Any] = {"model": sources[s], "layer_range": [layer, layer + 1]}
        if abs(scale - 1.0) > 1e-9:
            src["input_scale"] = scale
        slices.append({"sources": [src]})
    docs.append({"name": "champion", "merge_method": "passthrough", "base_model": stage2, "dtype": "float32",
                 "config_from": input_names[genome.runtime_from], "slices": slices})
    exact = task == "ties" and not any(abs(s - 1.0) > 1e-9 for _, _, s in steps)
    header = ("# EvoMerge champion: " + genome.describe() + "\n"
              + ("" if exact else "# uses agent-forge extensions (DARE seed, input_scale or config_from): "
                 "run it with `agent-forge merge`\n"))
    return header + yaml.safe_dump_all(docs, sort_keys=False), exact
