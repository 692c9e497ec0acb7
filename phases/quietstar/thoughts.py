"""Quiet-STaR thoughts after every position of a Cognate sequence, in one batched pass.

Quiet-STaR (Zelikman et al., 2024, §4.2 "parallel generation"): for a sequence x_0..x_{S-1}, a thought
follows EVERY position i at once. The extension fed after position i is

    [thinking] t_1 … t_L [/endthinking] x_{i+1} … x_{i+n-1}        (E = L + n + 1 tokens)

t_j sampled from the model, the true tokens teacher-forced so the post-thought predictions of
x_{i+1} … x_{i+n} can be scored. Extension token j of position i sits at absolute position i + 1 + j.
The loop below runs over the E extension steps (never over positions): step j computes token j of all
B·K·S extensions together.

What a thought may see, exactly as if the model ran on ``x[:i+1] + extension`` alone (the sequential
reference; ``tests/test_quietstar_model.py`` checks equality):
- attention: the base keys at positions m ≤ i inside the sliding window, the persistent tokens, and its
  own earlier extension tokens (a "diagonal" mask: no other position's thought);
- Titans memory: the state as of position i, then the extension's own writes and resets, kept per
  position in factored form (thought_memory.py).

Each extension token runs the same layer steps as the model (CognateLayer.project, rotary_heads, mix) and
the same ACT recursion (CognateModel.recurse); what is its own is the attention over [persistent ; base
keys m ≤ i ; own extension keys] and the memory of thought_memory.py.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from phases.cognate.memory import MemoryState, persistent_qk
from phases.cognate.modeling import CognateCache, CognateForCausalLM, merge_heads, split_heads
from phases.quietstar.thought_memory import BaseMemory, ExtMemory, Geometry, read_and_write


@dataclass(frozen=True)
class ThoughtSpec:
    count: int  # K thoughts per position
    length: int  # L sampled tokens between the start and end markers
    n_true: int  # n true tokens scored after each thought
    start_id: int
    end_id: int
    temperature: float = 1.0
    greedy: bool = False
    banned: tuple[int, ...] = ()  # never sampled inside a thought (the markers, EOS)

    def __post_init__(self):
        if self.count < 1 or self.length < 0 or self.n_true < 1:
            raise ValueError(f"thought count {self.count} must be >= 1, length {self.length} >= 0, "
                             f"n_true {self.n_true} >= 1")
        if not self.greedy and self.temperature <= 0:
            raise ValueError(f"sampling temperature must be > 0, got {self.temperature}")

    @property
    def extension(self) -> int:
        return self.length + self.n_true + 1


@dataclass
class ThoughtPass:
    base_logits: torch.Tensor  # (B, S, V) direct predictions (no thought)
    base_hidden: torch.Tensor  # (B, S, d) the LM head's input
    thoughts: torch.Tensor  # (B, K, S, L) sampled thought tokens
    thought_logprobs: torch.Tensor  # (B, K, S, L) log π(t_j | …) of the sampled tokens
    talk_logits: torch.Tensor  # (B, K, S, n, V) prediction of x_{i+1+s} after the thought
    talk_hidden: torch.Tensor  # (B, K, S, n, d)
    targets: torch.Tensor  # (B, S, n) x_{i+1+s}; -100 past the end of the sequence
    extension: torch.Tensor  # (B, K, S, E) every token fed after each position
    ext_logits: torch.Tensor | None = None  # (B, K, S, E, V) when asked for (tests, bench)

    def base_at_talk(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, …) -> (B, S, n, …): the base value at position i + s, the direct prediction of the same
        token as talk step s (clamped past the end; those targets are -100)."""
        S, n = x.shape[1], self.targets.shape[-1]
        idx = (torch.arange(S, device=x.device)[:, None] + torch.arange(n, device=x.device)[None]).clamp(max=S - 1)
        return x[:, idx]


# ------------------------------------------------------------------ the base pass, recorded
@dataclass
class _BaseRecord:
    """What the extension steps need from one (recursion step, layer) of the base pass."""

    kh: torch.Tensor  # (B, H, S, hd) post-RoPE keys
    vh: torch.Tensor
    kp: torch.Tensor  # (P, d) persistent keys / values
    vp: torch.Tensor
    memory: BaseMemory


def _base_layer(layer, x, positions, cfg, geo: Geometry) -> tuple[torch.Tensor, _BaseRecord]:
    """CognateLayer.forward's steps (no cache), the memory written group by group so that the state after
    every group is kept: with the post-RoPE keys, that is what later thoughts read."""
    B, S, d = x.shape
    h, q, k, v = layer.project(x)
    kp, vp = layer.persistent_keys()
    qh, kh, vh = layer.rotary_heads(q, k, v, positions, cfg.rope_theta)
    a = layer.attend(qh, kh, vh, kp, vp, positions, cfg)
    seed = persistent_qk(kp)
    qn, kn = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    state = MemoryState.empty(B, d, x.device, x.dtype)
    ys, Ws, Ss = [], [state.W], [state.S]
    for lo, hi in geo.groups:  # one call per group: the same arithmetic as one call over the whole span
        ys.append(layer.remember(qn[:, lo:hi], kn[:, lo:hi], v[:, lo:hi], seed, cfg, state))
        Ws.append(state.W)
        Ss.append(state.S)
    x, _ = layer.mix(x, h, a, torch.cat(ys, 1), cfg.gate_bias)
    memory = BaseMemory(kmem=kn, vmem=v, W=torch.stack(Ws, 1), Sm=torch.stack(Ss, 1), m_persistent=seed[0],
                        norm_persistent=seed[1])
    return x, _BaseRecord(kh=kh, vh=vh, kp=kp, vp=vp, memory=memory)


# ------------------------------------------------------------------ the extension steps
@dataclass
class _ExtCache:
    """Per (recursion step, layer): the extensions' keys/values so far and their memory."""

    kh: list[torch.Tensor] = field(default_factory=list)  # each (B, K, H, S, hd)
    vh: list[torch.Tensor] = field(default_factory=list)
    memory: ExtMemory = field(default_factory=ExtMemory)


def _thought_attention(qh: torch.Tensor, j: int, cfg, rec: _BaseRecord, cache: _ExtCache) -> torch.Tensor:
    """Attention of extension token j of every (b, k, i), qh (B, K, H, S, hd): the persistent tokens, the
    base keys m ≤ i inside the window, and the extension's own keys inside the window."""
    H, S, hd = qh.shape[2:]
    device = qh.device
    i = m = torch.arange(S, device=device)  # query positions i, base key positions m
    p = i + 1 + j  # absolute positions of the queries
    scale = 1.0 / math.sqrt(hd)
    kph, vph = split_heads(rec.kp, H), split_heads(rec.vp, H)  # (H, P, hd)
    s_p = torch.einsum("bkhid,hpd->bkhip", qh, kph) * scale
    s_b = torch.einsum("bkhid,bhmd->bkhim", qh, rec.kh) * scale
    base_visible = (m[None] <= i[:, None]) & (p[:, None] - m[None] < cfg.window_size)  # (S_i, S_m)
    s_b = s_b.masked_fill(~base_visible, float("-inf"))
    kx, vx = torch.stack(cache.kh, 4), torch.stack(cache.vh, 4)  # (B, K, H, S, j+1, hd)
    s_x = torch.einsum("bkhid,bkhijd->bkhij", qh, kx) * scale
    ext_visible = (j - torch.arange(j + 1, device=device)) < cfg.window_size
    s_x = s_x.masked_fill(~ext_visible, float("-inf"))
    P = kph.shape[1]
    att = torch.softmax(torch.cat([s_p, s_b, s_x], -1), -1)
    return (torch.einsum("bkhip,hpd->bkhid", att[..., :P], vph)
            + torch.einsum("bkhim,bhmd->bkhid", att[..., P:P + S], rec.vh)
            + torch.einsum("bkhij,bkhijd->bkhid", att[..., P + S:], vx))


def _ext_layer(layer, x, j: int, cfg, rec: _BaseRecord, cache: _ExtCache, geo: Geometry) -> torch.Tensor:
    """One MAG layer for extension token j of every (b, k, i): x (B, K, S, d)."""
    p = torch.arange(x.shape[2], device=x.device) + 1 + j  # absolute positions of these tokens
    h, q, k, v = layer.project(x)
    qh, kh, vh = layer.rotary_heads(q, k, v, p, cfg.rope_theta)
    cache.kh.append(kh)
    cache.vh.append(vh)
    a = layer.o_proj(merge_heads(_thought_attention(qh, j, cfg, rec, cache)))
    qn, kn = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    y = read_and_write(cache.memory, qn, kn, v, j, rec.memory, geo, layer, cfg)
    return layer.mix(x, h, a, y, cfg.gate_bias)[0]


# ------------------------------------------------------------------ the pass
def _sample(logits: torch.Tensor, spec: ThoughtSpec, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Next thought token and its log-probability under the sampling policy π (banned tokens removed)."""
    logits = logits.float()
    if spec.banned:
        logits = logits.index_fill(-1, torch.tensor(spec.banned, device=logits.device), float("-inf"))
    logp = torch.log_softmax(logits if spec.greedy else logits / spec.temperature, -1)
    if spec.greedy:
        tok = logp.argmax(-1)
    else:
        flat = logp.detach().exp().reshape(-1, logp.shape[-1])
        tok = torch.multinomial(flat, 1, generator=generator).view(logp.shape[:-1])
    return tok, logp.gather(-1, tok[..., None]).squeeze(-1)


def parallel_thoughts(model: CognateForCausalLM, input_ids: torch.Tensor, spec: ThoughtSpec,
                      generator: torch.Generator | None = None, forced: torch.Tensor | None = None,
                      keep_ext_logits: bool = False) -> ThoughtPass:
    """K thoughts after every position of ``input_ids`` (B, S) in one batched pass (loop over the E
    extension steps only). ``forced`` (B, K, S, L) replays given thoughts instead of sampling."""
    cfg = model.config
    B, S = input_ids.shape
    K, L, n, E = spec.count, spec.length, spec.n_true, spec.extension
    device = input_ids.device
    geo = Geometry(S, E, cfg.mem_chunk_size, cfg.shard_length)
    positions = torch.arange(S, device=device)
    records: dict[tuple[int, int], _BaseRecord] = {}

    def base_fn(t, li, layer, h):
        h, records[(t, li)] = _base_layer(layer, h, positions, cfg, geo)
        return h

    embed = model.model.embed_tokens
    base_hidden = model.model.recurse(embed(input_ids), base_fn).hidden
    base_logits = model.lm_head(base_hidden)

    # true continuation x_{i+1+s}, s = 0..n-1 (−100 past the end)
    idx = positions[:, None] + 1 + torch.arange(n, device=device)[None]
    ahead = input_ids[:, idx.clamp(max=S - 1)]
    targets = torch.where(idx < S, ahead, torch.full_like(ahead, -100))
    pad = getattr(cfg, "eos_token_id", None) or 0  # any real token: these targets are −100

    caches = {key: _ExtCache() for key in records}

    def ext_fn(j):
        def fn(t, li, layer, h):
            return _ext_layer(layer, h, j, cfg, records[(t, li)], caches[(t, li)], geo)
        return fn

    tok = torch.full((B, K, S), spec.start_id, dtype=torch.long, device=device)
    ext_tokens, thoughts, logps, talk_logits, talk_hidden, all_logits = [], [], [], [], [], []
    for j in range(E):
        ext_tokens.append(tok)
        hidden = model.model.recurse(embed(tok), ext_fn(j)).hidden
        logits = model.lm_head(hidden)
        if keep_ext_logits:
            all_logits.append(logits)
        if j < L:
            sampled, lp = _sample(logits, spec, generator)
            if forced is not None:
                sampled = forced[..., j]
                lp = torch.log_softmax(logits.float() if spec.greedy else logits.float() / spec.temperature, -1)
                lp = lp.gather(-1, sampled[..., None]).squeeze(-1)
            thoughts.append(sampled)
            logps.append(lp)
            tok = sampled.detach()
        else:
            if j >= L + 1:
                talk_logits.append(logits)
                talk_hidden.append(hidden)
            if j == L:
                tok = torch.full_like(tok, spec.end_id)
            else:  # teacher-force x_{i+1+s} after talk step s = j - L - 1
                s = j - L - 1
                tok = torch.where(targets[:, None, :, s] >= 0, targets[:, None, :, s], pad).expand(B, K, S)
    return ThoughtPass(
        base_logits=base_logits, base_hidden=base_hidden,
        thoughts=torch.stack(thoughts, -1) if thoughts else torch.zeros(B, K, S, 0, dtype=torch.long, device=device),
        thought_logprobs=torch.stack(logps, -1) if logps else torch.zeros(B, K, S, 0, device=device),
        talk_logits=torch.stack(talk_logits, 3), talk_hidden=torch.stack(talk_hidden, 3), targets=targets,
        extension=torch.stack(ext_tokens, -1),
        ext_logits=torch.stack(all_logits, 3) if keep_ext_logits else None,
    )


# ------------------------------------------------------------------ decoding a thought
def clone_cache(cache: CognateCache) -> CognateCache:
    """An independent copy of a decode cache: a thought runs on the copy. Shallow on tensors, which the
    model replaces and never updates in place (CognateLayer.attend, NeuralMemory.forward)."""
    c = CognateCache()
    c.seen_tokens = cache.seen_tokens
    for key, slot in cache.layers.items():
        c.layers[key] = {k: dataclasses.replace(v) if isinstance(v, MemoryState) else v for k, v in slot.items()}
    return c
