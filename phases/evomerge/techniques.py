"""The six merge techniques, tensor by tensor, in three pairs.

Interpolation (pair 1): ``linear``, ``slerp``. Task arithmetic on deltas from a shared base (pair 2):
``ties``, ``dare`` (``task_arithmetic`` is their common ground). Selection (pair 3): ``frankenmerge``
and ``dfs`` build a *layer plan* (which parent's layer goes where, with what input scale) that
``merge.py`` applies to whole layers.

Linear, slerp, task arithmetic and TIES follow mergekit's definitions for the same parameters
(mergekit 0.1.5: ``linear_merge``, ``slerp``, ``GeneralizedTaskArithmeticMerge``); bench/evomerge.py
measures the max abs difference against mergekit itself. Arithmetic runs in float32 (float64 inputs
stay float64), like mergekit, and the result takes the first input's dtype.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

Tensor = torch.Tensor


def _work(t: Tensor) -> Tensor:
    return t.to(torch.float64 if t.dtype == torch.float64 else torch.float32)


def linear(tensors: Sequence[Tensor], weights: Sequence[float], normalize: bool = True) -> Tensor:
    """Weighted mean (Wortsman et al. 2022, model soups): Σ_i w_i θ_i / Σ_i w_i (without the division
    when ``normalize`` is False)."""
    if len(tensors) != len(weights):
        raise ValueError(f"{len(tensors)} tensors but {len(weights)} weights")
    out = _work(tensors[0]) * float(weights[0])  # the first term of the sum, without a zeroed tensor to add it to
    for t, w in zip(tensors[1:], weights[1:]):
        out.add_(_work(t), alpha=float(w))
    if normalize:
        total = float(sum(weights))
        if abs(total) < 1e-12:
            raise ValueError(f"linear merge weights sum to {total}: cannot normalize")
        out.div_(total)
    return out.to(tensors[0].dtype)


def slerp(t: float, v0: Tensor, v1: Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8) -> Tensor:
    """Spherical interpolation of the whole tensor (Shoemake 1985), t = 0 gives v0, t = 1 gives v1:

        cos Ω = (v0/‖v0‖)·(v1/‖v1‖),   slerp = sin((1−t)Ω)/sin Ω · v0 + sin(tΩ)/sin Ω · v1

    The raw (unnormalized) tensors are combined; norms ≤ eps count as 1. When |cos Ω| > dot_threshold
    the vectors are (anti)parallel and sin Ω → 0, so it falls back to lerp (1−t)·v0 + t·v1."""
    if v0.shape != v1.shape:
        raise ValueError(f"slerp needs equal shapes, got {tuple(v0.shape)} and {tuple(v1.shape)}")
    a, b = _work(v0).reshape(-1), _work(v1).reshape(-1)
    # Norms and the dot product summed in float64: float32 vector_norm drifts ~1e-4 relative on a 4M-element
    # embedding, which moves cos Ω by 2e-4 and the result by 5e-6 (bench/evomerge.py measured it). The products
    # stay float32 (one rounding each, ~1e-12 of the sum); only the sums need the range, and summing with
    # dtype=float64 does not copy both tensors to float64 first.
    na, nb = (math.sqrt(float((x * x).sum(dtype=torch.float64))) for x in (a, b))
    na, nb = na if na > eps else 1.0, nb if nb > eps else 1.0
    dot = max(-1.0, min(1.0, float((a * b).sum(dtype=torch.float64)) / (na * nb)))
    if abs(dot) > dot_threshold:
        ca, cb = 1.0 - t, t
    else:
        theta = math.acos(dot)
        ca, cb = math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
    return (a * ca).add_(b, alpha=cb).reshape(v0.shape).to(v0.dtype)


def magnitude_prune(delta: Tensor, density: float) -> Tensor:
    """TIES 'trim': keep the k = max(1, ⌊density·n⌋) entries of largest |δ|, zero the rest.

    The cut is the k-th largest magnitude (``kthvalue``, linear time; a full argsort, as mergekit does, was 7×
    slower on a 2048² delta and made TIES slower than mergekit). Exactly k entries are kept: of the entries
    tied at the cut, the first by position, which is what a stable descending sort keeps. Ties are common
    here: a delta of float32 weights is rounded to the base's ulp."""
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    magnitude = delta.abs().reshape(-1).float()
    cut = torch.kthvalue(magnitude, delta.numel() - k + 1).values
    keep = magnitude > cut
    short = k - int(keep.sum())
    if short > 0:
        keep[(magnitude == cut).nonzero().squeeze(1)[:short]] = True
    return torch.where(keep.reshape(delta.shape), delta, torch.zeros_like(delta))


def bernoulli_drop(delta: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """DARE (Yu et al. 2023, 'Language Models are Super Mario'): drop each delta entry with
    probability p = 1 − density and rescale the survivors by 1/(1 − p), so E[δ̃] = δ."""
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    keep = torch.bernoulli(torch.full(delta.shape, density, dtype=torch.float32), generator=generator)
    return delta * keep.to(delta.dtype) / density


def task_arithmetic(base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float], *, lam: float = 1.0,
                    normalize: bool = False, density: float = 1.0, sparsify: str | None = None,
                    consensus: bool = False, generator: torch.Generator | None = None) -> Tensor:
    """Task arithmetic (Ilharco et al. 2023) and its generalisations, mergekit's formulation:

        δ_i = sparsify(θ_i − θ_base) · w_i
        m   = [sign(δ_i) = s] with s = sign(Σ_i δ_i) (≥ 0 counts as +)        only with ``consensus``
        Δ   = Σ_i m_i δ_i  /  Σ_i m_i w_i  (divisor 1 where it is 0)            division only with ``normalize``
        θ   = θ_base + λ Δ

    ``sparsify``: None, 'magnitude' (TIES trim) or 'bernoulli' (DARE)."""
    if len(tensors) != len(weights):
        raise ValueError(f"{len(tensors)} tensors but {len(weights)} weights")
    b = _work(base)
    deltas = []
    for t in tensors:
        d = _work(t) - b
        if sparsify == "magnitude":
            d = magnitude_prune(d, density)
        elif sparsify == "bernoulli":
            if generator is None:
                raise ValueError("DARE needs a seeded torch.Generator so that merges reproduce")
            d = bernoulli_drop(d, density, generator)
        elif sparsify is not None:
            raise ValueError(f"unknown sparsification {sparsify!r}")
        deltas.append(d)
    if not consensus:
        # Σ_i w_i δ_i accumulated in place, in input order: the same roundings as summing the stacked products
        # (mergekit's way) without a stack of every delta or a divisor per entry
        mixed = deltas[0].mul_(float(weights[0]))
        for d, w_i in zip(deltas[1:], weights[1:]):
            mixed.add_(d.mul_(float(w_i)))
        if normalize:
            total = sum(float(x) for x in weights)
            mixed.div_(total if abs(total) >= 1e-8 else 1.0)
        return mixed.mul_(lam).add_(b).to(base.dtype)
    d = torch.stack(deltas)
    w = torch.tensor([float(x) for x in weights], dtype=d.dtype).reshape(-1, *([1] * b.dim()))
    d = d * w
    majority = torch.where(d.sum(0) >= 0, 1.0, -1.0).to(d.dtype)
    mask = (d.sign() == majority).to(d.dtype)
    mixed = (d * mask).sum(0)
    divisor = (w * mask).sum(0)
    divisor[divisor == 0] = 1
    if normalize:
        mixed = mixed / divisor
    return (b + lam * mixed).to(base.dtype)


def ties(base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float], density: float, lam: float = 1.0,
         normalize: bool = True) -> Tensor:
    """TIES-Merging (Yadav et al. 2023): trim each delta to its top-``density`` magnitudes, elect the
    sign with the larger summed mass per entry, average the deltas that agree (disjoint mean)."""
    return task_arithmetic(base, tensors, weights, lam=lam, normalize=normalize, density=density,
                           sparsify="magnitude", consensus=True)


def dare(base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float], density: float,
         generator: torch.Generator, lam: float = 1.0, consensus: bool = True, normalize: bool = False) -> Tensor:
    """DARE: Bernoulli drop with 1/density rescaling, then TIES sign election (``consensus``, mergekit's
    dare_ties) or a plain weighted sum (dare_linear). At density 1 this is task arithmetic."""
    return task_arithmetic(base, tensors, weights, lam=lam, normalize=normalize, density=density,
                           sparsify="bernoulli", consensus=consensus, generator=generator)


@dataclass(frozen=True)
class LayerStep:
    """One layer of a merged stack: layer ``layer`` of source ``source``, input multiplied by ``scale``."""

    source: int
    layer: int
    scale: float = 1.0


def frankenmerge(pattern: Sequence[int]) -> list[LayerStep]:
    """FrankenMerge (layer-wise selection, as in mergekit's passthrough slices): layer i of the result
    is layer i of parent ``pattern[i]``. Depth is unchanged."""
    return [LayerStep(int(src), i) for i, src in enumerate(pattern)]


def dfs(path: Sequence[tuple[int, int, float]], n_layers: int, n_sources: int) -> list[LayerStep]:
    """Data-flow-space merging (Akiba et al. 2024, 'Evolutionary Optimization of Model Merging Recipes'):
    the inference path is an evolved sequence of layers drawn from any parent, each with a scale W on
    its input (the paper's scaling matrix, which keeps a layer's input distribution in range when it
    follows a layer from another model). The depth is len(path)."""
    steps = []
    for src, layer, scale in path:
        if not (0 <= src < n_sources and 0 <= layer < n_layers):
            raise ValueError(f"DFS step ({src}, {layer}) outside {n_sources} sources × {n_layers} layers")
        steps.append(LayerStep(int(src), int(layer), float(scale)))
    if not steps:
        raise ValueError("a DFS path needs at least one layer")
    return steps


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed, so DARE's drops reproduce whatever order tensors are merged in."""
    return random.Random(f"{seed}:{name}").getrandbits(63)
