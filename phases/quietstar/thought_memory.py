"""Titans memory inside Quiet-STaR's extensions: every position's thought reads and writes its own copy.

A thought after position i sees the memory as of position i. Reads use the memory written before the
token's chunk; the Q-K projection is cumulative over base keys ≤ i of the same shard plus the extension's
own keys; a chunk that completes inside the extension is written (surprise, momentum, forgetting) from
base keys [chunk start, i] plus extension keys, and later extension tokens read the updated memory; a
shard boundary inside the extension resets it.

The memory is kept in factored form, so no (d × d) matrix is stored per position: a write changes W by a
rank-C term (G = 2·errᵀK/‖KKᵀ‖_F, C = chunk), so the state of position i's thought is

    W = a·W_b + β·S_b + Σ_e c_e^W · U_eᵀ K_e ,     S = γ·W_b + δ·S_b + Σ_e c_e^S · U_eᵀ K_e

with (W_b, S_b) the base state after position i and one (U_e, K_e) pair (C × d each) per write event.
A write maps (a, β) ← ((1−α)a + ηγ, (1−α)β + ηδ), (γ, δ) ← (ηγ, ηδ), the same for every (c^W, c^S), and
adds an event with c^W = c^S = −θ (Titans: S ← ηS − θ∇, W ← (1−α)W + S). Its cost is that of the
extension's key cache (E·d per position), not d² per position.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class Geometry:
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


@dataclass
class BaseMemory:
    """The base pass's memory at one (recursion step, layer), as the extensions read it."""

    kmem: torch.Tensor  # (B, S, d) L2-normalised keys
    vmem: torch.Tensor  # (B, S, d)
    W: torch.Tensor  # (B, G+1, d, d) memory state after each group (0: empty)
    Sm: torch.Tensor  # (B, G+1, d, d) momentum after each group
    m_persistent: torch.Tensor
    norm_persistent: torch.Tensor


@dataclass
class _Event:
    members: torch.Tensor  # (n,) positions i that wrote
    loc: torch.Tensor  # (S,) index into members, -1 for non-members
    U: torch.Tensor  # (B, K, n, C, d)  2·written·err / ‖KKᵀ‖_F
    Kf: torch.Tensor  # (B, K, n, C, d)  the chunk's keys
    cw: torch.Tensor  # (n,) coefficient in W
    cs: torch.Tensor  # (n,) coefficient in S


@dataclass
class ExtMemory:
    """The extensions' memory at one (recursion step, layer): their keys/values so far and the factored
    state (coefficients of the module docstring, per position; None until the first token)."""

    kmem: list[torch.Tensor] = field(default_factory=list)  # each (B, K, S, d)
    vmem: list[torch.Tensor] = field(default_factory=list)
    a: torch.Tensor | None = None  # (S,)
    beta: torch.Tensor | None = None
    gamma: torch.Tensor | None = None
    delta: torch.Tensor | None = None
    events: list[_Event] = field(default_factory=list)
    touched: bool = False  # any write or reset yet (until then W = W_b exactly)


def _apply_states(states: torch.Tensor, geo: Geometry, sub: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
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


def _apply_W(mem: ExtMemory, base: BaseMemory, geo: Geometry, sub: torch.Tensor | None,
             x: torch.Tensor) -> torch.Tensor:
    """The current memory map of each extension (positions ``sub``) applied to x (B, K, n, m, d)."""
    S = geo.S
    pos = torch.arange(S, device=x.device) if sub is None else sub
    coef = lambda c: c[pos][None, None, :, None, None]  # noqa: E731
    y = coef(mem.a) * _apply_states(base.W, geo, sub, x)
    if mem.touched:
        y = y + coef(mem.beta) * _apply_states(base.Sm, geo, sub, x)
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


def read_and_write(mem: ExtMemory, qn: torch.Tensor, kn: torch.Tensor, v: torch.Tensor, j: int, base: BaseMemory,
                   geo: Geometry, layer, cfg) -> torch.Tensor:
    """Extension token j of every (b, k, i), qn/kn/v (B, K, S, d): the memory read (with the query, or through the
    Q-K projection where the model uses it); then the writes and resets it completes."""
    S = geo.S
    device, dtype = qn.device, qn.dtype
    mem.kmem.append(kn)
    mem.vmem.append(v)
    if cfg.qk_projection:
        qp = _qk_projected(mem, qn, base, j, cfg.shard_length)
    else:  # the memory reads with the query itself (CognateConfig.qk_projection)
        qp = qn
    if mem.a is None:
        ones = torch.ones(S, device=device, dtype=dtype)
        mem.a, mem.beta, mem.gamma, mem.delta = ones, ones * 0, ones * 0, ones.clone()
    y = _apply_W(mem, base, geo, None, qp[:, :, :, None])[:, :, :, 0]
    memory_events(mem, base, geo, j, layer, cfg)
    return y


def memory_events(mem: ExtMemory, base: BaseMemory, geo: Geometry, j: int, layer, cfg) -> None:
    """After extension token j: write the chunks it completes, reset the shards it ends."""
    writes, resets = geo.events(j)
    device = base.kmem.device
    if writes:
        theta, eta, alpha = layer.memory.gates(cfg.mem_lr_scale, cfg.mem_decay_scale)
        iw = torch.tensor(writes, dtype=torch.long, device=device)
        C = geo.chunk
        # the chunk's positions: base keys up to i, then this extension's own keys
        chunk_pos = (iw + 1 + j - (C - 1))[:, None] + torch.arange(C, device=device)[None]  # (n, C)
        from_base = chunk_pos <= iw[:, None]
        kx, vx = torch.stack(mem.kmem, 3), torch.stack(mem.vmem, 3)  # (B, K, S, j+1, d)
        ext_idx = (chunk_pos - iw[:, None] - 1).clamp(min=0)
        B, K = kx.shape[:2]
        d = kx.shape[-1]
        gidx = ext_idx[None, None, :, :, None].expand(B, K, -1, -1, d)
        k_ext = torch.gather(kx[:, :, iw], 3, gidx)
        v_ext = torch.gather(vx[:, :, iw], 3, gidx)
        bpos = chunk_pos.clamp(min=0, max=geo.S - 1)
        k_base = base.kmem[:, bpos][:, None].expand(B, K, -1, -1, -1)
        v_base = base.vmem[:, bpos][:, None].expand(B, K, -1, -1, -1)
        sel = from_base[None, None, :, :, None]
        Kc, Vc = torch.where(sel, k_base, k_ext), torch.where(sel, v_base, v_ext)
        err = _apply_W(mem, base, geo, iw, Kc) - Vc  # W k_c − v_c
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


def _qk_projected(mem: ExtMemory, qn: torch.Tensor, base: BaseMemory, j: int, shard: int) -> torch.Tensor:
    """The Q-K projection of extension token j's queries over base keys ≤ i and own keys of the same shard."""
    device, dtype = qn.device, qn.dtype
    i = m = torch.arange(qn.shape[2], device=device)
    p = i + 1 + j  # absolute positions of these tokens
    same_shard_b = ((m[None] <= i[:, None]) & (m[None] // shard == p[:, None] // shard)).to(dtype)
    sc_b = torch.einsum("bkid,bmd->bkim", qn, base.kmem) * same_shard_b
    num = qn @ base.m_persistent + torch.einsum("bkim,bmd->bkid", sc_b, base.kmem)
    den = base.norm_persistent + torch.einsum("bm,im->bi", base.kmem.pow(2).sum(-1), same_shard_b)[:, None]
    pj = i[:, None] + 1 + torch.arange(j + 1, device=device)[None]  # (S, j+1) positions of own tokens
    same_shard_x = (pj // shard == p[:, None] // shard).to(dtype)
    kmx = torch.stack(mem.kmem, 3)  # (B, K, S, j+1, d)
    sc_x = torch.einsum("bkid,bkijd->bkij", qn, kmx) * same_shard_x
    num = num + torch.einsum("bkij,bkijd->bkid", sc_x, kmx)
    den = den + (kmx.pow(2).sum(-1) * same_shard_x).sum(-1)
    return num / den.clamp_min(1e-6)[..., None]
