"""Cognate: a TRM × Titans-MAG causal language model with the transformers interface.

    x ─ embed ─┬─▶ [ core ]──▶ h_1 ─▶ [ core ]──▶ h_2 … h_T      T ≤ act_max_steps (TRM recursion)
               └── e is injected again before every step: core(h_{t-1} + e)
    core = N × MAG layer:
        a = sliding-window causal attention over [persistent tokens ; last `window` tokens]
        m = neural long-term memory read (memory.py), written per chunk
        g = σ(W_g x)                     the MAG gate, per channel
        x ← x + g ⊙ a + (1 − g) ⊙ m ;  x ← x + SwiGLU(x)
    ACT (Graves 2016), per position: p_t = σ(w·h_t); a position halts at the first step where the
    cumulative p reaches act_threshold (or at T); its output is Σ_t w_t h_t with w_t = p_t before the
    halting step and the remainder R = 1 − Σ p at it. The ponder cost N + R joins the loss, so the
    halting head learns through both the output mixture and the cost.
``layer_scales`` (set by EvoMerge's data-flow-space merges) multiplies each layer's input by a constant.
Every step is computed for every position (halting decides each position's output, not the compute),
so a position's state never depends on whether a later position halted, and the decode cache is one
(keys, values, memory state) per recursion step and layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import ModelOutput

from phases.cognate.configuration import RUNTIME_KEYS, CognateConfig
from phases.cognate.memory import MemoryState, NeuralMemory


def _rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary position embedding on (B, H, T, hd), rotate-half convention."""
    hd = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, device=x.device, dtype=torch.float32) / hd)
    ang = positions.to(torch.float32)[:, None] * inv[None]  # (T, hd/2)
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1).to(x.dtype), torch.cat([ang.sin(), ang.sin()], -1).to(x.dtype)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class CognateCache:
    """Decode state: per (recursion step, layer) the last `window` keys/values and the memory state."""

    def __init__(self):
        self.layers: dict[tuple[int, int], dict] = {}
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def slot(self, step: int, layer: int) -> dict:
        return self.layers.setdefault((step, layer), {})


@dataclass
class LayerStats:
    gate: torch.Tensor  # (B, T) MAG gate (weight of attention), mean over channels
    polarization_loss: torch.Tensor  # mean 4·g·(1 − g): 1 at g = 0.5, 0 at either pole
    polarized: torch.Tensor  # fraction of gate values below 0.1 or above 0.9
    mem_writes: int
    mem_chunks: int


class CognateLayer(nn.Module):
    def __init__(self, cfg: CognateConfig):
        super().__init__()
        d, ff = cfg.hidden_size, cfg.intermediate_size
        self.n_heads, self.head_dim = cfg.num_attention_heads, d // cfg.num_attention_heads
        self.attn_norm = nn.RMSNorm(d, eps=cfg.rms_norm_eps)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.persistent_memory = nn.Parameter(torch.zeros(cfg.n_persistent, d))
        self.memory = NeuralMemory()
        self.mem_norm = nn.RMSNorm(d, eps=cfg.rms_norm_eps)
        self.mem_out = nn.Linear(d, d, bias=False)
        self.gate_proj = nn.Linear(d, d, bias=True)
        self.mlp_norm = nn.RMSNorm(d, eps=cfg.rms_norm_eps)
        self.up_proj = nn.Linear(d, 2 * ff, bias=False)
        self.down_proj = nn.Linear(ff, d, bias=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)

    def persistent_keys(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p = self.attn_norm(self.persistent_memory)
        return p, self.k_proj(p), self.v_proj(p)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cfg: CognateConfig, slot: dict | None
                ) -> tuple[torch.Tensor, LayerStats]:
        B, T, d = x.shape
        h = self.attn_norm(x)
        q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        _, kp, vp = self.persistent_keys()

        # --- sliding-window causal attention, persistent tokens always visible (no position)
        qh, kh, vh = self._heads(q), self._heads(k), self._heads(v)
        qh, kh = _rope(qh, positions, cfg.rope_theta), _rope(kh, positions, cfg.rope_theta)
        key_pos = positions
        if slot is not None and "k" in slot:
            kh, vh = torch.cat([slot["k"], kh], 2), torch.cat([slot["v"], vh], 2)
            key_pos = torch.cat([slot["pos"], positions])
        if slot is not None:  # keep only what a future token can still see
            cut = max(0, kh.shape[2] - (cfg.window_size - 1))
            slot["k"], slot["v"], slot["pos"] = kh[:, :, cut:], vh[:, :, cut:], key_pos[cut:]
        rel = positions[:, None] - key_pos[None, :]
        mask = (rel >= 0) & (rel < cfg.window_size)
        mask = torch.cat([torch.ones(T, kp.shape[0], dtype=torch.bool, device=x.device), mask], 1)
        kph = kp.view(1, -1, self.n_heads, self.head_dim).transpose(1, 2).expand(B, -1, -1, -1)
        vph = vp.view(1, -1, self.n_heads, self.head_dim).transpose(1, 2).expand(B, -1, -1, -1)
        attn = F.scaled_dot_product_attention(qh, torch.cat([kph, kh], 2), torch.cat([vph, vh], 2), attn_mask=mask)
        a = self.o_proj(attn.transpose(1, 2).reshape(B, T, d))

        # --- long-term memory, Q-K projection seeded by the persistent tokens' keys
        kpn = F.normalize(kp, dim=-1)
        m_persistent, norm_persistent = kpn.T @ kpn, kpn.pow(2).sum()
        state = slot.get("mem") if slot is not None else None
        if state is None:
            state = MemoryState.empty(B, d, x.device, x.dtype)
            state.pos = int(positions[0])
        y = self.memory(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, m_persistent, norm_persistent, state,
                        chunk=cfg.mem_chunk_size, shard=cfg.shard_length, lr_scale=cfg.mem_lr_scale,
                        decay_scale=cfg.mem_decay_scale, surprise_threshold=cfg.surprise_threshold)
        if slot is not None:
            slot["mem"] = state
        m = self.mem_out(self.mem_norm(y))

        g = torch.sigmoid(self.gate_proj(h) + cfg.gate_bias)
        x = x + g * a + (1 - g) * m
        up, gate = self.up_proj(self.mlp_norm(x)).chunk(2, dim=-1)
        x = x + self.down_proj(F.silu(gate) * up)
        stats = LayerStats(gate=g.mean(-1), polarization_loss=(4 * g * (1 - g)).mean(),
                           polarized=((g < 0.1) | (g > 0.9)).float().mean().detach(),
                           mem_writes=state.writes, mem_chunks=state.chunks)
        return x, stats


@dataclass
class CognateOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: CognateCache | None = None
    lm_loss: torch.Tensor | None = None
    ponder_loss: torch.Tensor | None = None
    halting_steps: torch.Tensor | None = None  # (B, T) N + R per position
    halt_steps_int: torch.Tensor | None = None  # (B, T) steps that contributed
    gate: torch.Tensor | None = None  # (B, T) mean MAG gate over layers, steps and channels
    polarization_loss: torch.Tensor | None = None
    gate_polarized: float | None = None
    mem_write_fraction: float | None = None


class CognatePreTrainedModel(PreTrainedModel):
    config_class = CognateConfig
    base_model_prefix = "model"
    _no_split_modules = ["CognateLayer"]

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model builds its own CognateCache (attention + memory state)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, CognateLayer):
            module.persistent_memory.normal_(0.0, 1.0)
        elif isinstance(module, NeuralMemory):
            module.theta_logit.fill_(torch.logit(torch.tensor(0.2)))
            module.eta_logit.fill_(torch.logit(torch.tensor(0.9)))
            module.alpha_logit.fill_(torch.logit(torch.tensor(0.001)))
        elif isinstance(module, nn.RMSNorm):
            module.weight.fill_(1.0)


class CognateModel(CognatePreTrainedModel):
    def __init__(self, config: CognateConfig):
        super().__init__(config)
        d = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, d)
        self.layers = nn.ModuleList(CognateLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.RMSNorm(d, eps=config.rms_norm_eps)
        self.halt_head = nn.Linear(d, 1)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(self, input_ids: torch.LongTensor, cache: CognateCache | None = None):
        cfg = self.config
        B, T = input_ids.shape
        start = cache.seen_tokens if cache is not None else 0
        positions = torch.arange(start, start + T, device=input_ids.device)
        e = self.embed_tokens(input_ids)
        h = torch.zeros_like(e)
        out = torch.zeros_like(e)
        cum = torch.zeros(B, T, device=e.device, dtype=e.dtype)
        running = torch.ones(B, T, dtype=torch.bool, device=e.device)
        ponder = torch.zeros_like(cum)
        steps = torch.zeros_like(cum)
        gate_sum, pol_loss, polarized, n_stats, writes, chunks = 0.0, 0.0, 0.0, 0, 0, 0
        for t in range(cfg.act_max_steps):
            h = h + e
            for li, layer in enumerate(self.layers):
                if cfg.layer_scales is not None:
                    h = h * cfg.layer_scales[li]
                h, stats = layer(h, positions, cfg, cache.slot(t, li) if cache is not None else None)
                gate_sum = gate_sum + stats.gate
                pol_loss, polarized = pol_loss + stats.polarization_loss, polarized + stats.polarized
                n_stats += 1
                writes, chunks = writes + stats.mem_writes, chunks + stats.mem_chunks
            hn = self.norm(h)
            p = torch.sigmoid(self.halt_head(hn) + cfg.halt_bias).squeeze(-1)
            last = t == cfg.act_max_steps - 1
            halt_now = running & ((cum + p >= cfg.act_threshold) | last)
            w = torch.where(halt_now, 1 - cum, torch.where(running, p, torch.zeros_like(p)))
            out = out + w.unsqueeze(-1) * hn
            steps = steps + running.to(e.dtype)
            ponder = torch.where(halt_now, steps + (1 - cum), ponder)  # N + R (Graves)
            cum = cum + torch.where(running & ~halt_now, p, torch.zeros_like(p))
            running = running & ~halt_now
        if cache is not None:
            cache.seen_tokens += T
        gate_stats = (gate_sum / n_stats, pol_loss / n_stats, float(polarized / n_stats))
        return out, ponder, steps, gate_stats, (writes, chunks)


class CognateForCausalLM(CognatePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: CognateConfig):
        super().__init__(config)
        self.model = CognateModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def set_runtime(self, **settings) -> None:
        """Change runtime settings (never shapes) in place, e.g. the trainer's chunk-size schedule."""
        unknown = set(settings) - set(RUNTIME_KEYS)
        if unknown:
            raise ValueError(f"not runtime settings: {sorted(unknown)}; allowed: {RUNTIME_KEYS}")
        for k, v in settings.items():
            setattr(self.config, k, v)

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, cache: CognateCache | None = None,
                use_cache: bool | None = None, **kwargs) -> CognateOutput:
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("Cognate does not take padded batches: pack sequences or pass them one at a time")
        if use_cache and cache is None:
            cache = CognateCache()
        hidden, ponder, steps, (gate, pol_loss, polarized), (writes, chunks) = self.model(
            input_ids, cache if use_cache or cache is not None else None)
        logits = self.lm_head(hidden)
        loss = lm_loss = ponder_loss = None
        if labels is not None:
            shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
            lm_loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                                      ignore_index=-100)
            valid = (labels != -100).to(ponder.dtype)
            ponder_loss = (ponder * valid).sum() / valid.sum().clamp_min(1)
            loss = lm_loss + self.config.ponder_cost * ponder_loss
        return CognateOutput(
            loss=loss, logits=logits, cache=cache if use_cache else None, lm_loss=lm_loss,
            ponder_loss=ponder_loss, halting_steps=ponder, halt_steps_int=steps, gate=gate,
            polarization_loss=pol_loss, gate_polarized=polarized,
            mem_write_fraction=(writes / chunks) if chunks else None,
        )
