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
- Titans memory: the state as of position i. Reads use the memory written before the token's chunk;
  the Q-K projection is cumulative over base keys ≤ i of the same shard plus the extension's own keys;
  a chunk that completes inside the extension is written (surprise, momentum, forgetting) from base keys
  [chunk start, i] plus extension keys, and later extension tokens read the updated memory; a shard
  boundary inside the extension resets it.

Memory inside an extension is kept in factored form, so no (d × d) matrix is stored per position: a write
changes W by a rank-C term (G = 2·errᵀK/‖KKᵀ‖_F, C = chunk), so the state of position i's thought is

    W = a·W_b + β·S_b + Σ_e c_e^W · U_eᵀ K_e ,     S = γ·W_b + δ·S_b + Σ_e c_e^S · U_eᵀ K_e

with (W_b, S_b) the base state after position i and one (U_e, K_e) pair (C × d each) per write event.
A write maps (a, β) ← ((1−α)a + ηγ, (1−α)β + ηδ), (γ, δ) ← (ηγ, ηδ), the same for every (c^W, c^S), and
adds an event with c^W = c^S = −θ (Titans: S ← ηS − θ∇, W ← (1−α)W + S). Its cost is that of the
extension's key cache (E·d per position), not d² per position.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from phases.cognate.memory import MemoryState
from phases.cognate.modeling import CognateCache, CognateForCausalLM, _rope


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


# ------------------------------------------------------------------ geometry of chunks and shards
class _Geometry:
    """Where memory groups end, what state each position leaves behind, and the events each extension
    step meets. Pure integer bookkeeping, identical to NeuralMemory.forward's grouping."""

    def __init__(self, S: int, E: int, chunk: int, shard: int):
        self.S, self.E, self.chunk, self.shard = S, E, chunk, shard
        self._events: dict[int, tuple[list[int], list[int]]] = {}
        self.groups: list[tuple[int, int]] = []
        t = 0
        while t < S:
            in_shard = t % shard
            n = min(chunk - in_shard % chunk, shard - in_shard, S - t)
            self.groups.append((t, t + n))
            t += n
        state_after, self.buffer_start = [], []
        for g, (lo, hi) in enumerate(self.groups):
            for i in range(lo, hi):
                closed = self.closes(i) is not None
                state_after.append(g + 1 if closed else g)  # state 0 = empty, g+1 = after group g
                self.buffer_start.append(i + 1 if closed else lo)
        self.state_after = torch.tensor(state_after, dtype=torch.long)
        # contiguous runs of equal state index: applying base states is one matmul per run
        vals, counts = torch.unique_consecutive(self.state_after, return_counts=True)
        bounds = [0, *torch.cumsum(counts, 0).tolist()]
        self.runs = [(int(v), bounds[k], bounds[k + 1]) for k, v in enumerate(vals.tolist())]

    def closes(self, p: int) -> str | None:
        """What happens after position p: "reset" (shard end), "write" (chunk end) or None."""
        if (p + 1) % self.shard == 0:
            return "reset"
        if ((p % self.shard) + 1) % self.chunk == 0:
            return "write"
        return None

    def events(self, j: int) -> tuple[list[int], list[int]]:
        """Positions i whose extension token j (at i + 1 + j) ends a chunk (write) or a shard (reset)."""
        if j in self._events:
            return self._events[j]
        writes, resets = [], []
        for i in range(self.S):
            kind = self.closes(i + 1 + j)
            if kind == "write":
                writes.append(i)
            elif kind == "reset":
                resets.append(i)
        self._events[j] = (writes, resets)
        return writes, resets


# ------------------------------------------------------------------ the ACT recursion, for any token shape
def _recurse(model: CognateForCausalLM, e: torch.Tensor, layer_fn) -> torch.Tensor:
    """CognateModel.forward's recursion and ACT halting (elementwise per token), over tokens of any
    leading shape; ``layer_fn(t, li, layer, h) -> h`` computes one MAG layer at recursion step t."""
    cfg, core = model.config, model.model
    scales = getattr(cfg, "layer_scales", None)
    h, out = torch.zeros_like(e), torch.zeros_like(e)
    cum = torch.zeros(e.shape[:-1], device=e.device, dtype=e.dtype)
    running = torch.ones(e.shape[:-1], dtype=torch.bool, device=e.device)
    for t in range(cfg.act_max_steps):
        h = h + e
        for li, layer in enumerate(core.layers):
            if scales is not None:
                h = h * scales[li]
            h = layer_fn(t, li, layer, h)
        hn = core.norm(h)
        p = torch.sigmoid(core.halt_head(hn) + cfg.halt_bias).squeeze(-1)
        halt_now = running & ((cum + p >= cfg.act_threshold) | (t == cfg.act_max_steps - 1))
        w = torch.where(halt_now, 1 - cum, torch.where(running, p, torch.zeros_like(p)))
        out = out + w.unsqueeze(-1) * hn
        cum = cum + torch.where(running & ~halt_now, p, torch.zeros_like(p))
        running = running & ~halt_now
    return out


def _mix_branches(layer, cfg, x: torch.Tensor, h: torch.Tensor, a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The MAG gate and the MLP, as CognateLayer.forward does them (elementwise per token)."""
    m = layer.mem_out(layer.mem_norm(y))
    g = torch.sigmoid(layer.gate_proj(h) + cfg.gate_bias)
    x = x + g * a + (1 - g) * m
    up, gate = layer.up_proj(layer.mlp_norm(x)).chunk(2, dim=-1)
    return x + layer.down_proj(F.silu(gate) * up)


@dataclass
class _BaseRecord:
    """What the extension steps need from one (recursion step, layer) of the base pass."""

    kh: torch.Tensor  # (B, H, S, hd) post-RoPE keys
    vh: torch.Tensor
    kmem: torch.Tensor  # (B, S, d) L2-normalised keys (memory)
    vmem: torch.Tensor  # (B, S, d)
    W: torch.Tensor  # (B, G+1, d, d) memory state after each group (0: empty)
    Sm: torch.Tensor  # (B, G+1, d, d) momentum after each group
    m_persistent: torch.Tensor
    norm_persistent: torch.Tensor
    kp: torch.Tensor  # (P, d) persistent keys / values
    vp: torch.Tensor


def _base_layer(layer, x, positions, cfg, geo: _Geometry) -> tuple[torch.Tensor, _BaseRecord]:
    """CognateLayer.forward (no cache), also returning what later thoughts read."""
    B, S, d = x.shape
    h = layer.attn_norm(x)
    q, k, v = layer.q_proj(h), layer.k_proj(h), layer.v_proj(h)
    _, kp, vp = layer.persistent_keys()
    qh, kh, vh = layer._heads(q), layer._heads(k), layer._heads(v)
    qh, kh = _rope(qh, positions, cfg.rope_theta), _rope(kh, positions, cfg.rope_theta)
    rel = positions[:, None] - positions[None, :]
    mask = torch.cat([torch.ones(S, kp.shape[0], dtype=torch.bool, device=x.device),
                      (rel >= 0) & (rel < cfg.window_size)], 1)
    kph = kp.view(1, -1, layer.n_heads, layer.head_dim).transpose(1, 2).expand(B, -1, -1, -1)
    vph = vp.view(1, -1, layer.n_heads, layer.head_dim).transpose(1, 2).expand(B, -1, -1, -1)
    attn = F.scaled_dot_product_attention(qh, torch.cat([kph, kh], 2), torch.cat([vph, vh], 2), attn_mask=mask)
    a = layer.o_proj(attn.transpose(1, 2).reshape(B, S, d))

    kpn = F.normalize(kp, dim=-1)
    m_p, norm_p = kpn.T @ kpn, kpn.pow(2).sum()
    qn, kn = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    state = MemoryState.empty(B, d, x.device, x.dtype)
    ys, Ws, Ss = [], [state.W], [state.S]
    for lo, hi in geo.groups:  # one call per group: the same arithmetic as one call over the whole span
        ys.append(layer.memory(qn[:, lo:hi], kn[:, lo:hi], v[:, lo:hi], m_p, norm_p, state,
                               chunk=cfg.mem_chunk_size, shard=cfg.shard_length, lr_scale=cfg.mem_lr_scale,
                               decay_scale=cfg.mem_decay_scale, surprise_threshold=cfg.surprise_threshold))
        Ws.append(state.W)
        Ss.append(state.S)
    x = _mix_branches(layer, cfg, x, h, a, torch.cat(ys, 1))
    return x, _BaseRecord(kh=kh, vh=vh, kmem=kn, vmem=v, W=torch.stack(Ws, 1), Sm=torch.stack(Ss, 1),
                          m_persistent=m_p, norm_persistent=norm_p, kp=kp, vp=vp)


# ------------------------------------------------------------------ memory of the extensions, factored
@dataclass
class _Event:
    members: torch.Tensor  # (n,) positions i that wrote
    loc: torch.Tensor  # (S,) index into members, -1 for non-members
    U: torch.Tensor  # (B, K, n, C, d)  2·written·err / ‖KKᵀ‖_F
    Kf: torch.Tensor  # (B, K, n, C, d)  the chunk's keys
    cw: torch.Tensor  # (n,) coefficient in W
    cs: torch.Tensor  # (n,) coefficient in S


@dataclass
class _ExtMemory:
    a: torch.Tensor  # (S,) coefficients of the base state, see the module docstring
    beta: torch.Tensor
    gamma: torch.Tensor
    delta: torch.Tensor
    events: list[_Event] = field(default_factory=list)
    touched: bool = False  # any write or reset yet (until then W = W_b exactly)


def _apply_states(states: torch.Tensor, geo: _Geometry, sub: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """states[idx(i)] @ x_i for every position i of ``sub`` (all positions when None); x: (B, K, n, m, d)."""
    idx = geo.state_after if sub is None else geo.state_after[sub.cpu()]
    if sub is None:
        runs = geo.runs
    else:
        vals, counts = torch.unique_consecutive(idx, return_counts=True)
        bounds = [0, *torch.cumsum(counts, 0).tolist()]
        runs = [(int(v), bounds[k], bounds[k + 1]) for k, v in enumerate(vals.tolist())]
    parts = [torch.einsum("bkimd,bed->bkime", x[:, :, lo:hi], states[:, s]) for s, lo, hi in runs]
    return torch.cat(parts, 2)


def _apply_W(mem: _ExtMemory, rec: _BaseRecord, geo: _Geometry, sub: torch.Tensor | None,
             x: torch.Tensor) -> torch.Tensor:
    """The current memory map of each extension (positions ``sub``) applied to x (B, K, n, m, d)."""
    S = geo.S
    pos = torch.arange(S, device=x.device) if sub is None else sub
    coef = lambda c: c[pos][None, None, :, None, None]  # noqa: E731
    y = coef(mem.a) * _apply_states(rec.W, geo, sub, x)
    if mem.touched:
        y = y + coef(mem.beta) * _apply_states(rec.Sm, geo, sub, x)
    for ev in mem.events:
        loc = ev.loc[pos]
        inside = (loc >= 0).nonzero().squeeze(-1)
        if inside.numel() == 0:
            continue
        li = loc[inside]
        U, Kf = ev.U[:, :, li], ev.Kf[:, :, li]
        proj = torch.einsum("bkncd,bknmd->bknmc", Kf, x[:, :, inside])
        contrib = torch.einsum("bkncd,bknmc->bknmd", U, proj) * ev.cw[li][None, None, :, None, None]
        y = y.index_add(2, inside, contrib)
    return y


def _memory_events(mem: _ExtMemory, rec: _BaseRecord, geo: _Geometry, j: int, ext_k: list[torch.Tensor],
                   ext_v: list[torch.Tensor], layer, cfg) -> None:
    """After extension token j: write the chunks it completes, reset the shards it ends."""
    writes, resets = geo.events(j)
    device = rec.kmem.device
    if writes:
        theta, eta, alpha = layer.memory.gates(cfg.mem_lr_scale, cfg.mem_decay_scale)
        iw = torch.tensor(writes, dtype=torch.long, device=device)
        C = geo.chunk
        # the chunk's positions: base keys up to i, then this extension's own keys
        chunk_pos = (iw + 1 + j - (C - 1))[:, None] + torch.arange(C, device=device)[None]  # (n, C)
        from_base = chunk_pos <= iw[:, None]
        kx, vx = torch.stack(ext_k, 3), torch.stack(ext_v, 3)  # (B, K, S, j+1, d)
        ext_idx = (chunk_pos - iw[:, None] - 1).clamp(min=0)
        B, K = kx.shape[:2]
        d = kx.shape[-1]
        gidx = ext_idx[None, None, :, :, None].expand(B, K, -1, -1, d)
        k_ext = torch.gather(kx[:, :, iw], 3, gidx)
        v_ext = torch.gather(vx[:, :, iw], 3, gidx)
        bpos = chunk_pos.clamp(min=0, max=geo.S - 1)
        k_base = rec.kmem[:, bpos][:, None].expand(B, K, -1, -1, -1)
        v_base = rec.vmem[:, bpos][:, None].expand(B, K, -1, -1, -1)
        sel = from_base[None, None, :, :, None]
        Kc, Vc = torch.where(sel, k_base, k_ext), torch.where(sel, v_base, v_ext)
        err = _apply_W(mem, rec, geo, iw, Kc) - Vc  # W k_c − v_c
        surprise = err.pow(2).sum(-1).mean(-1)
        gram = torch.linalg.matrix_norm(Kc @ Kc.transpose(-1, -2)).clamp_min(1.0)
        written = (surprise > cfg.surprise_threshold).to(err.dtype)
        U = 2 * err * (written / gram)[..., None, None]
        # every older term of these positions decays: (c^W, c^S) <- ((1-α)c^W + η c^S, η c^S)
        a, beta, gamma, delta = mem.a, mem.beta, mem.gamma, mem.delta
        mem.a = a.index_copy(0, iw, (1 - alpha) * a[iw] + eta * gamma[iw])
        mem.beta = beta.index_copy(0, iw, (1 - alpha) * beta[iw] + eta * delta[iw])
        mem.gamma = gamma.index_copy(0, iw, eta * gamma[iw])
        mem.delta = delta.index_copy(0, iw, eta * delta[iw])
        for ev in mem.events:
            li = ev.loc[iw]
            li = li[li >= 0]
            if li.numel():
                cw, cs = ev.cw, ev.cs
                ev.cw = cw.index_copy(0, li, (1 - alpha) * cw[li] + eta * cs[li])
                ev.cs = cs.index_copy(0, li, eta * cs[li])
        loc = torch.full((geo.S,), -1, dtype=torch.long, device=device)
        loc[iw] = torch.arange(len(writes), device=device)
        coef = (-theta).expand(len(writes))
        mem.events.append(_Event(members=iw, loc=loc, U=U, Kf=Kc, cw=coef, cs=coef))
        mem.touched = True
    if resets:
        ir = torch.tensor(resets, dtype=torch.long, device=device)
        zero = lambda c, idx: c.index_fill(0, idx, 0.0)  # noqa: E731
        mem.a, mem.beta, mem.gamma, mem.delta = (zero(c, ir) for c in (mem.a, mem.beta, mem.gamma, mem.delta))
        for ev in mem.events:
            li = ev.loc[ir]
            li = li[li >= 0]
            if li.numel():
                ev.cw, ev.cs = zero(ev.cw, li), zero(ev.cs, li)
        mem.touched = True


@dataclass
class _ExtCache:
    """Per (recursion step, layer): the extensions' keys/values so far and their memory."""

    kh: list[torch.Tensor] = field(default_factory=list)  # each (B, K, H, S, hd)
    vh: list[torch.Tensor] = field(default_factory=list)
    kmem: list[torch.Tensor] = field(default_factory=list)  # each (B, K, S, d)
    vmem: list[torch.Tensor] = field(default_factory=list)
    memory: _ExtMemory | None = None


def _ext_layer(layer, x, j: int, cfg, rec: _BaseRecord, cache: _ExtCache, geo: _Geometry) -> torch.Tensor:
    """One MAG layer for extension token j of every (b, k, i): x (B, K, S, d)."""
    B, K, S, d = x.shape
    H, hd = layer.n_heads, layer.head_dim
    device = x.device
    i = torch.arange(S, device=device)
    p = i + 1 + j  # absolute positions of these tokens
    h = layer.attn_norm(x)
    q, k, v = layer.q_proj(h), layer.k_proj(h), layer.v_proj(h)

    # --- attention: persistent tokens, base keys m ≤ i in the window, own extension keys in the window
    heads = lambda t: t.view(B, K, S, H, hd).transpose(2, 3)  # noqa: E731  (B, K, H, S, hd)
    qh = _rope(heads(q), p, cfg.rope_theta)
    kh = _rope(heads(k), p, cfg.rope_theta)
    vh = heads(v)
    cache.kh.append(kh)
    cache.vh.append(vh)
    scale = 1.0 / math.sqrt(hd)
    kph = rec.kp.view(-1, H, hd).transpose(0, 1)  # (H, P, hd)
    vph = rec.vp.view(-1, H, hd).transpose(0, 1)
    s_p = torch.einsum("bkhid,hpd->bkhip", qh, kph) * scale
    s_b = torch.einsum("bkhid,bhmd->bkhim", qh, rec.kh) * scale
    m = torch.arange(S, device=device)
    base_visible = (m[None] <= i[:, None]) & (p[:, None] - m[None] < cfg.window_size)  # (S_i, S_m)
    s_b = s_b.masked_fill(~base_visible, float("-inf"))
    kx, vx = torch.stack(cache.kh, 4), torch.stack(cache.vh, 4)  # (B, K, H, S, j+1, hd)
    s_x = torch.einsum("bkhid,bkhijd->bkhij", qh, kx) * scale
    ext_visible = (j - torch.arange(j + 1, device=device)) < cfg.window_size
    s_x = s_x.masked_fill(~ext_visible, float("-inf"))
    P = kph.shape[1]
    att = torch.softmax(torch.cat([s_p, s_b, s_x], -1), -1)
    out = (torch.einsum("bkhip,hpd->bkhid", att[..., :P], vph)
           + torch.einsum("bkhim,bhmd->bkhid", att[..., P:P + S], rec.vh)
           + torch.einsum("bkhij,bkhijd->bkhid", att[..., P + S:], vx))
    a = layer.o_proj(out.transpose(2, 3).reshape(B, K, S, d))

    # --- memory: Q-K projection over base keys ≤ i and own keys of the same shard, then a read
    qn, kn = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    cache.kmem.append(kn)
    cache.vmem.append(v)
    shard = cfg.shard_length
    same_shard_b = ((m[None] <= i[:, None]) & (m[None] // shard == p[:, None] // shard)).to(x.dtype)
    sc_b = torch.einsum("bkid,bmd->bkim", qn, rec.kmem) * same_shard_b
    num = qn @ rec.m_persistent + torch.einsum("bkim,bmd->bkid", sc_b, rec.kmem)
    den = rec.norm_persistent + torch.einsum("bm,im->bi", rec.kmem.pow(2).sum(-1), same_shard_b)[:, None]
    pj = i[:, None] + 1 + torch.arange(j + 1, device=device)[None]  # (S, j+1) positions of own tokens
    same_shard_x = (pj // shard == p[:, None] // shard).to(x.dtype)
    kmx = torch.stack(cache.kmem, 3)  # (B, K, S, j+1, d)
    sc_x = torch.einsum("bkid,bkijd->bkij", qn, kmx) * same_shard_x
    num = num + torch.einsum("bkij,bkijd->bkid", sc_x, kmx)
    den = den + (kmx.pow(2).sum(-1) * same_shard_x).sum(-1)
    qp = num / den.clamp_min(1e-6)[..., None]
    if cache.memory is None:
        ones = torch.ones(S, device=device, dtype=x.dtype)
        cache.memory = _ExtMemory(a=ones, beta=ones * 0, gamma=ones * 0, delta=ones.clone())
    y = _apply_W(cache.memory, rec, geo, None, qp[:, :, :, None])[:, :, :, 0]
    _memory_events(cache.memory, rec, geo, j, cache.kmem, cache.vmem, layer, cfg)
    return _mix_branches(layer, cfg, x, h, a, y)


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
    geo = _Geometry(S, E, cfg.mem_chunk_size, cfg.shard_length)
    positions = torch.arange(S, device=device)
    records: dict[tuple[int, int], _BaseRecord] = {}

    def base_fn(t, li, layer, h):
        h, records[(t, li)] = _base_layer(layer, h, positions, cfg, geo)
        return h

    embed = model.model.embed_tokens
    base_hidden = _recurse(model, embed(input_ids), base_fn)
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
        hidden = _recurse(model, embed(tok), ext_fn(j))
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


# ------------------------------------------------------------------ sequential references
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


def clone_cache(cache: CognateCache) -> CognateCache:
    """An independent copy of a decode cache: a thought runs on the copy. Shallow on tensors, which the
    model replaces and never updates in place (CognateLayer.forward, NeuralMemory.forward)."""
    c = CognateCache()
    c.seen_tokens = cache.seen_tokens
    for key, slot in cache.layers.items():
        c.layers[key] = {k: dataclasses.replace(v) if isinstance(v, MemoryState) else v for k, v in slot.items()}
    return c


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
