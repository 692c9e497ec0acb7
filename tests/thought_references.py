"""Per-position references for Quiet-STaR's batched thoughts (phases/quietstar/thoughts.py): the tests
compare the batched pass with them and bench/quietstar.py times it against them."""

from __future__ import annotations

import torch

from phases.cognate.modeling import CognateCache, CognateForCausalLM
from phases.quietstar.thoughts import clone_cache


@torch.no_grad()
def sliced_reference(model: CognateForCausalLM, input_ids: torch.Tensor, extension: torch.Tensor) -> torch.Tensor:
    """The definition a thought must meet: for every (b, k, i), run the unmodified model on
    ``x[b, :i+1] + extension[b, k, i]`` and keep the extension's logits. (B, K, S, E, V)."""
    B, K, S, E = extension.shape
    out = []
    for b in range(B):
        for k in range(K):
            for i in range(S):
                seq = torch.cat([input_ids[b, :i + 1], extension[b, k, i]])[None]
                out.append(model(seq).logits[0, -E:])
    return torch.stack(out).view(B, K, S, E, -1)


@torch.no_grad()
def cached_sequential(model: CognateForCausalLM, input_ids: torch.Tensor, extension: torch.Tensor) -> torch.Tensor:
    """The fastest per-position loop: one decode cache walks the sequence; at every position i a copy of
    it takes the extension of each thought token by token. Same outputs as ``parallel_thoughts``.
    (B, K, S, E, V) logits; B is processed together."""
    B, K, S, E = extension.shape
    cache = CognateCache()
    out = torch.empty(B, K, S, E, model.config.vocab_size)
    for i in range(S):
        model(input_ids[:, i:i + 1], cache=cache, use_cache=True)
        for k in range(K):
            c = clone_cache(cache)
            for j in range(E):
                out[:, k, i, j] = model(extension[:, k, i, j:j + 1], cache=c, use_cache=True).logits[:, 0]
    return out
