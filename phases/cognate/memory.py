"""Titans long-term memory for the MAG block: a Q-K projection with persistent memory, and a neural
memory written per chunk with surprise, momentum and forgetting.

Q-K projection (off by default: CognateConfig.qk_projection), with persistent memory in the numerator and the
denominator (M_persistent alone is either
drowned by new keys or drowns them), causal and reset at every shard boundary:
    M_t = M_persistent + Σ_{i≤t} k_i k_iᵀ,   norm_t = norm_persistent + Σ_{i≤t} ‖k_i‖²,   q'_t = M_t q_t / norm_t
M_persistent = Σ_p k_p k_pᵀ and norm_persistent = Σ_p ‖k_p‖² come from the persistent memory tokens' keys,
so right after a reset q' = M_persistent q / norm_persistent: the numerator and the denominator are
injected together and the projection has the same volume at the first token as at the thousandth.
M_t / norm_t is a trace-one PSD matrix: q' is q pulled toward the directions of the keys seen so far.

Neural memory (Titans, Behrouz et al. 2024), a linear associative map W (d×d) per sequence, chunk c:
    read      y_i = W_{c-1} q_i  (q'_i with the Q-K projection)   (tokens read the memory written before their chunk)
    loss      ℓ = Σ_{i∈c} ‖W_{c-1} k_i − v_i‖²          (the surprise)
    momentum  S_c = η S_{c-1} − θ ∇_W ℓ / ‖K_c K_cᵀ‖_F
    forget    W_c = (1 − α) W_{c-1} + S_c
The gradient is divided by the Frobenius norm of the chunk's key Gram matrix, an upper bound of its
largest eigenvalue, so a write is a contraction for any keys and any chunk size (θ ≤ 1): correlated
keys cannot blow the memory up. Chunks whose mean surprise is below ``surprise_threshold`` are not
written (momentum still carries). θ, η, α are learned per layer, scaled by runtime settings.
State is reset at shard boundaries, so no gradient crosses one: the gradient into M_t is zero there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class MemoryState:
    """Everything the memory carries from one span of tokens to the next (used by the decode cache)."""

    W: torch.Tensor  # (B, d, d) associative map
    S: torch.Tensor  # (B, d, d) momentum of the surprise
    A: torch.Tensor  # (B, d, d) Σ k kᵀ of this shard (Q-K projection)
    nsum: torch.Tensor  # (B,) Σ ‖k‖² of this shard
    buf_k: torch.Tensor  # (B, n, d) keys of the current, unfinished chunk
    buf_v: torch.Tensor
    pos: int = 0  # absolute position of the next token
    writes: int = 0
    chunks: int = 0

    @classmethod
    def empty(cls, batch: int, d: int, device, dtype, pos: int = 0) -> MemoryState:
        z = torch.zeros(batch, d, d, device=device, dtype=dtype)
        e = torch.zeros(batch, 0, d, device=device, dtype=dtype)
        return cls(W=z, S=z.clone(), A=z.clone(), nsum=torch.zeros(batch, device=device, dtype=dtype), buf_k=e, buf_v=e,
                   pos=pos)

    def reset(self) -> None:
        """Shard boundary: the memory starts again from the persistent values."""
        self.W, self.S, self.A = torch.zeros_like(self.W), torch.zeros_like(self.S), torch.zeros_like(self.A)
        self.nsum = torch.zeros_like(self.nsum)
        self.buf_k, self.buf_v = self.buf_k[:, :0], self.buf_v[:, :0]


def persistent_qk(persistent_keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M_persistent, norm_persistent) from the persistent tokens' keys (P, d), L2-normalised."""
    kpn = F.normalize(persistent_keys, dim=-1)
    return kpn.T @ kpn, kpn.pow(2).sum()


def qk_project(q: torch.Tensor, k: torch.Tensor, m_persistent: torch.Tensor, norm_persistent: torch.Tensor,
               A: torch.Tensor | None = None, nsum: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q' for a span inside one shard, causally (token t sees keys ≤ t), with carried (A, nsum).

    q, k: (B, T, d). Returns (q', A_after, nsum_after)."""
    B, T, d = q.shape
    scores = torch.tril(q @ k.transpose(1, 2))  # (B, T, T): k_j·q_i for j ≤ i
    num = q @ m_persistent + scores @ k
    csum = torch.cumsum(k.pow(2).sum(-1), dim=1)  # (B, T)
    den = norm_persistent + csum
    A_after = k.transpose(1, 2) @ k
    nsum_after = csum[:, -1]
    if A is not None:
        num = num + q @ A  # A is symmetric
        den = den + nsum[:, None]
        A_after = A_after + A
        nsum_after = nsum_after + nsum
    return num / den.clamp_min(1e-6)[..., None], A_after, nsum_after


class NeuralMemory(nn.Module):
    """The learned gates of one layer's memory, and its chunked write/read."""

    def __init__(self, theta: float = 0.3, eta: float = 0.8, alpha: float = 0.01):
        super().__init__()
        self.theta_logit = nn.Parameter(torch.logit(torch.tensor(theta)))
        self.eta_logit = nn.Parameter(torch.logit(torch.tensor(eta)))
        self.alpha_logit = nn.Parameter(torch.logit(torch.tensor(alpha)))

    def gates(self, lr_scale: float = 1.0, decay_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        theta = (torch.sigmoid(self.theta_logit) * lr_scale).clamp(max=1.0)
        eta = torch.sigmoid(self.eta_logit)
        alpha = (torch.sigmoid(self.alpha_logit) * decay_scale).clamp(max=1.0)
        return theta, eta, alpha

    @staticmethod
    def write(W, S, k, v, theta, eta, alpha, surprise_threshold: float = 0.0):
        """One chunk: returns (W, S, surprise per sequence, written mask)."""
        err = k @ W.transpose(1, 2) - v  # (B, C, d): W k_i − v_i
        surprise = err.pow(2).sum(-1).mean(-1)  # (B,)
        gram = torch.linalg.matrix_norm(k @ k.transpose(1, 2)).clamp_min(1.0)  # ‖K Kᵀ‖_F ≥ λ_max
        written = (surprise > surprise_threshold).to(k.dtype)
        # θ ∇_W ℓ / ‖K Kᵀ‖_F, with the per-sequence scalars folded into err (C×d) before the product: backward
        # then keeps err and k, not two more d×d matrices per chunk (it still keeps W, S and the Q-K sum A,
        # which the gradients of the inputs, η and α need).
        step = err * (2 * theta * written / gram)[:, None, None]
        S = eta * S - step.transpose(1, 2) @ k
        W = (1 - alpha) * W + S
        return W, S, surprise, written

    @staticmethod
    def read(W: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return q @ W.transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m_persistent: torch.Tensor | None,
                norm_persistent: torch.Tensor | None, state: MemoryState, chunk: int, shard: int,
                lr_scale: float = 1.0, decay_scale: float = 1.0, surprise_threshold: float = 0.0,
                qk_projection: bool = False) -> torch.Tensor:
        """Process a span of tokens starting at ``state.pos``; updates ``state`` in place.

        q, k: (B, T, d) L2-normalised; v: (B, T, d). Returns the memory read y: (B, T, d), read with q itself,
        or with the Q-K projection q' where ``qk_projection`` (CognateConfig.qk_projection says why not)."""
        theta, eta, alpha = self.gates(lr_scale, decay_scale)
        out, t, T = [], 0, q.shape[1]
        while t < T:
            in_shard = state.pos % shard
            # a group runs to the next chunk or shard boundary, whichever comes first
            n = min(chunk - in_shard % chunk, shard - in_shard, T - t)
            qg, kg, vg = q[:, t:t + n], k[:, t:t + n], v[:, t:t + n]
            if qk_projection:
                qp, state.A, state.nsum = qk_project(qg, kg, m_persistent, norm_persistent, state.A, state.nsum)
            else:
                qp = qg
            out.append(self.read(state.W, qp))
            state.buf_k = torch.cat([state.buf_k, kg], 1)
            state.buf_v = torch.cat([state.buf_v, vg], 1)
            state.pos += n
            t += n
            if state.pos % shard == 0:
                state.reset()  # shard boundary: nothing, and so no gradient, crosses it
            elif state.buf_k.shape[1] == chunk:
                state.W, state.S, _, written = self.write(
                    state.W, state.S, state.buf_k, state.buf_v, theta, eta, alpha, surprise_threshold)
                state.writes += int(written.sum())
                state.chunks += written.numel()
                state.buf_k, state.buf_v = state.buf_k[:, :0], state.buf_v[:, :0]
        return torch.cat(out, 1)


@torch.no_grad()
def niah_probe(memory: NeuralMemory, d: int, chunk: int, haystack: int = 100, trials: int = 16,
               lr_scale: float = 1.0, decay_scale: float = 1.0, seed: int = 0) -> float:
    """Needle in a haystack (100 keys by default: a real challenge at little probe cost; the memory
    works when the result is ≥ 0.8): one random (key, value) pair, then ``haystack``
    random pairs, all written in chunks of ``chunk`` with the layer's learned gates (the needle gets no
    special treatment and is the oldest, so forgetting hits it hardest); read with its key; the mean
    cosine similarity between what comes back and the needle's value (random baseline ≈ 0)."""
    g = torch.Generator().manual_seed(seed)
    device = memory.theta_logit.device
    theta, eta, alpha = (x.float() for x in memory.gates(lr_scale, decay_scale))
    keys = F.normalize(torch.randn(trials, 1 + haystack, d, generator=g), dim=-1).to(device)
    values = F.normalize(torch.randn(trials, 1 + haystack, d, generator=g), dim=-1).to(device)
    W = torch.zeros(trials, d, d, device=device)
    S = torch.zeros_like(W)
    for start in range(0, 1 + haystack, chunk):  # the needle is the oldest key, written like the rest
        W, S, _, _ = NeuralMemory.write(W, S, keys[:, start:start + chunk], values[:, start:start + chunk],
                                        theta, eta, alpha)
    retrieved = NeuralMemory.read(W, keys[:, :1])[:, 0]
    return float(F.cosine_similarity(retrieved, values[:, 0], dim=-1).mean())
