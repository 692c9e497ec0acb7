"""Cognate: a TRM × Titans-MAG causal language model with the transformers interface.

    x ─ embed ─┬─▶ [ core ]──▶ h_1 ─▶ [ core ]──▶ h_2 … h_T      T ≤ act_max_steps (TRM recursion)
               └── e is injected again before every step: core(h_{t-1} + e)
    core = N × MAG layer (CognateLayer.forward: project, attend, remember, mix):
        a = sliding-window causal attention over [persistent tokens ; last `window` tokens]
        m = neural long-term memory read with the query (memory.py), written per chunk
        g = σ(W_g x)                     the MAG gate, per channel
        x ← x + g ⊙ a + (1 − g) ⊙ m ;  x ← x + SwiGLU(x)
    ACT (Graves 2016), per position: p_t = σ(w·h_t); a position halts at the first step where the
    cumulative p reaches act_threshold (or at T); its output is Σ_t w_t h_t with w_t = p_t before the
    halting step and the remainder R = 1 − Σ p at it. The ponder cost N + R joins the loss, so the
    halting head learns through both the output mixture and the cost.
``layer_scales`` (set by EvoMerge's data-flow-space merges) multiplies each layer's input by a constant.
Every step is computed for every position (halting decides each position's output, not the compute),
so a position's state never depends on whether a later position halted, and the decode cache is one
(keys, values, memory state) per recursion step and layer. The recursion and halting are
CognateModel.recurse, which takes the layer step as a function: Quiet-STaR's thoughts run it with
their own attention and memory (phases/quietstar/thoughts.py).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import ModelOutput

from phases.cognate.configuration import RUNTIME_KEYS, CognateConfig
from phases.cognate.memory import MemoryState, NeuralMemory, persistent_qk


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary position embedding on (..., T, hd), rotate-half convention."""
    hd = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, device=x.device, dtype=torch.float32) / hd)
    ang = positions.to(torch.float32)[:, None] * inv[None]  # (T, hd/2)
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1).to(x.dtype), torch.cat([ang.sin(), ang.sin()], -1).to(x.dtype)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(..., T, d) -> (..., H, T, d / H)."""
    return x.unflatten(-1, (n_heads, x.shape[-1] // n_heads)).transpose(-3, -2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(..., H, T, hd) -> (..., T, H·hd)."""
    return x.transpose(-3, -2).flatten(-2)


def window_mask(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int, n_persistent: int) -> torch.Tensor:
    """(T_q, P + T_k) bool: the persistent tokens always, a key at most ``window − 1`` positions back."""
    rel = query_pos[:, None] - key_pos[None, :]
    persistent = torch.ones(len(query_pos), n_persistent, dtype=torch.bool, device=query_pos.device)
    return torch.cat([persistent, (rel >= 0) & (rel < window)], 1)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q (B, H, T, hd), k and v (B, H, P + T_k, hd), boolean mask (T, P + T_k) -> (B, H, T, hd)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


AttentionFunction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class CognateCache:
    """Decode state: per (recursion step, layer) the last `window` keys/values and the memory state."""

    def __init__(self):
        self.layers: dict[tuple[int, int], dict] = {}
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def slot(self, step: int, layer: int) -> dict:
        return self.layers.setdefault((step, layer), {})


# A MAG gate value is polarized, committed to one branch, below the first or above the second. The upper pole
# lies beyond where the gate starts (σ(gate_init) = σ(3) = 0.95), so an untrained model counts none.
POLES = (0.1, 0.99)


@dataclass
class LayerStats:
    gate: torch.Tensor  # (B, T) MAG gate (weight of attention), mean over channels
    polarization_loss: torch.Tensor  # mean 4·g·(1 − g): 1 at g = 0.5, 0 at either pole
    polarized: torch.Tensor  # fraction of gate values below 0.1 or above 0.9
    mem_writes: int
    mem_chunks: int


class CognateLayer(nn.Module):
    """One MAG layer: ``forward`` is project -> attend -> remember -> mix. Each step is public, so a
    caller that sees tokens differently (Quiet-STaR's thoughts) reuses the arithmetic and swaps the part
    that differs."""

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

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(h, q, k, v): the normed input and its projections, shared by attention, memory and gate."""
        h = self.attn_norm(x)
        return h, self.q_proj(h), self.k_proj(h), self.v_proj(h)

    def persistent_keys(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) of the persistent tokens, (P, d) each."""
        p = self.attn_norm(self.persistent_memory)
        return self.k_proj(p), self.v_proj(p)

    def rotary_heads(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                     theta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Split into heads; RoPE on queries and keys at ``positions`` (the last token axis)."""
        qh, kh, vh = (split_heads(t, self.n_heads) for t in (q, k, v))
        return rope(qh, positions, theta), rope(kh, positions, theta), vh

    def attend(self, qh: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor, kp: torch.Tensor, vp: torch.Tensor,
               positions: torch.Tensor, cfg: CognateConfig, slot: dict | None = None,
               attention: AttentionFunction = sdpa_attention) -> torch.Tensor:
        """Sliding-window causal attention over [persistent tokens ; last ``window_size`` tokens]. The
        persistent tokens carry no position. ``slot`` holds the window between decode calls."""
        key_pos = positions
        if slot is not None and "k" in slot:
            kh, vh = torch.cat([slot["k"], kh], 2), torch.cat([slot["v"], vh], 2)
            key_pos = torch.cat([slot["pos"], positions])
        if slot is not None:  # keep only what a future token can still see
            cut = max(0, kh.shape[2] - (cfg.window_size - 1))
            slot["k"], slot["v"], slot["pos"] = kh[:, :, cut:], vh[:, :, cut:], key_pos[cut:]
        B = qh.shape[0]
        kph, vph = (split_heads(t, self.n_heads).expand(B, -1, -1, -1) for t in (kp, vp))
        mask = window_mask(positions, key_pos, cfg.window_size, kp.shape[0])
        out = attention(qh, torch.cat([kph, kh], 2), torch.cat([vph, vh], 2), mask)
        return self.o_proj(merge_heads(out))

    def remember(self, qn: torch.Tensor, kn: torch.Tensor, v: torch.Tensor,
                 seed: tuple[torch.Tensor, torch.Tensor] | tuple[None, None], cfg: CognateConfig,
                 state: MemoryState) -> torch.Tensor:
        """Read the long-term memory and write this span into it (``state`` is updated in place). qn, kn
        L2-normalised; ``seed`` = persistent_qk(persistent keys), which the Q-K projection starts from
        ((None, None) without it)."""
        return self.memory(qn, kn, v, *seed, state, chunk=cfg.mem_chunk_size, shard=cfg.shard_length,
                           lr_scale=cfg.mem_lr_scale, decay_scale=cfg.mem_decay_scale,
                           surprise_threshold=cfg.surprise_threshold, qk_projection=cfg.qk_projection)

    def mix(self, x: torch.Tensor, h: torch.Tensor, a: torch.Tensor, y: torch.Tensor,
            gate_bias: float) -> tuple[torch.Tensor, torch.Tensor]:
        """x + g ⊙ a + (1 − g) ⊙ mem_out(y), then the SwiGLU MLP; returns (x, g). Elementwise per token."""
        m = self.mem_out(self.mem_norm(y))
        g = torch.sigmoid(self.gate_proj(h) + gate_bias)
        x = x + g * a + (1 - g) * m
        up, gate = self.up_proj(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.down_proj(F.silu(gate) * up), g

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cfg: CognateConfig, slot: dict | None = None
                ) -> tuple[torch.Tensor, LayerStats]:
        h, q, k, v = self.project(x)
        kp, vp = self.persistent_keys()
        a = self.attend(*self.rotary_heads(q, k, v, positions, cfg.rope_theta), kp, vp, positions, cfg, slot)
        if slot is not None and "mem" in slot:
            state = slot["mem"]
        else:
            state = MemoryState.empty(x.shape[0], x.shape[-1], x.device, x.dtype, pos=int(positions[0]))
        # only the Q-K projection reads the seed: a d×d product per layer and recursion step, 15% of a small-shape
        # decode token when it was computed regardless
        seed = persistent_qk(kp) if cfg.qk_projection else (None, None)
        y = self.remember(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, seed, cfg, state)
        if cfg.mem_read_scale != 1.0:
            y = y * cfg.mem_read_scale
        if slot is not None:
            slot["mem"] = state
        x, g = self.mix(x, h, a, y, cfg.gate_bias)
        stats = LayerStats(gate=g.mean(-1), polarization_loss=(4 * g * (1 - g)).mean(),
                           polarized=((g < POLES[0]) | (g > POLES[1])).float().mean().detach(),
                           mem_writes=state.writes, mem_chunks=state.chunks)
        return x, stats


LayerStep = Callable[[int, int, CognateLayer, torch.Tensor], torch.Tensor]


class Pondered(NamedTuple):
    hidden: torch.Tensor  # (..., d) Σ_t w_t norm(h_t), the ACT mixture
    ponder: torch.Tensor  # (...) N + R per token
    steps: torch.Tensor  # (...) steps that contributed


@dataclass
class CognateModelOutput(ModelOutput):
    last_hidden_state: torch.Tensor | None = None  # (B, T, d) the ACT mixture, the LM head's input
    ponder: torch.Tensor | None = None  # (B, T) N + R per position
    steps: torch.Tensor | None = None  # (B, T) steps that contributed
    gate: torch.Tensor | None = None  # (B, T) mean MAG gate over layers, steps and channels
    polarization_loss: torch.Tensor | None = None
    gate_polarized: float | None = None
    mem_writes: int | None = None  # chunks written, over layers and steps
    mem_chunks: int | None = None  # chunks completed


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
    # Each (recursion step, layer) is checkpointed: the memory's per-chunk d×d states, saved for backward,
    # are the bulk of training memory, and T_max·L of them alive at once is what does not fit.
    supports_gradient_checkpointing = True

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
            module.gate_proj.bias.fill_(self.config.gate_init)
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
        self.gradient_checkpointing = False  # model.activation_checkpointing_enable() turns it on
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def recurse(self, e: torch.Tensor, layer_step: LayerStep) -> Pondered:
        """The TRM recursion and Graves ACT halting over tokens of any leading shape: e (..., d) is the
        embedded input; ``layer_step(t, li, layer, h) -> h`` runs layer ``li`` at recursion step ``t``."""
        cfg = self.config
        h, out = torch.zeros_like(e), torch.zeros_like(e)
        cum = torch.zeros(e.shape[:-1], device=e.device, dtype=e.dtype)
        running = torch.ones(e.shape[:-1], dtype=torch.bool, device=e.device)
        ponder, steps = torch.zeros_like(cum), torch.zeros_like(cum)
        # TRM's one-step gradient: the first T − grad_steps steps run without a graph, and only the last ones
        # back-propagate (their input h a constant); the halting head still learns at every step, from hn detached.
        # Under the approximation's own assumption (the recursion sits at its fixed point, so every step's state
        # moves with the parameters as the first graph step's does) the weight an earlier step has in the ACT
        # mixture back-propagates through that step: a position that halts early still teaches the layers.
        no_graph = cfg.act_max_steps - cfg.grad_steps if cfg.grad_steps and torch.is_grad_enabled() else 0
        early = torch.zeros_like(cum)  # ACT weight of the steps without a graph
        for t in range(cfg.act_max_steps):
            with torch.no_grad() if t < no_graph else nullcontext():
                h = h + e
                for li, layer in enumerate(self.layers):
                    if cfg.layer_scales is not None:
                        h = h * cfg.layer_scales[li]
                    h = layer_step(t, li, layer, h)
                hn = self.norm(h)
            p = torch.sigmoid(self.halt_head(hn) + cfg.halt_bias).squeeze(-1)
            last = t == cfg.act_max_steps - 1
            halt_now = running & ((cum + p >= cfg.act_threshold) | last)
            w = torch.where(halt_now, 1 - cum, torch.where(running, p, torch.zeros_like(p)))
            out = out + w.unsqueeze(-1) * hn
            if t < no_graph:
                early = early + w.detach()
            elif t == no_graph > 0:  # adds 0, and early's share of the gradient
                out = out + early.unsqueeze(-1) * (hn - hn.detach())
            steps = steps + running.to(e.dtype)
            ponder = torch.where(halt_now, steps + (1 - cum), ponder)  # N + R (Graves)
            cum = cum + torch.where(running & ~halt_now, p, torch.zeros_like(p))
            running = running & ~halt_now
        return Pondered(hidden=out, ponder=ponder, steps=steps)

    def forward(self, input_ids: torch.LongTensor, cache: CognateCache | None = None) -> CognateModelOutput:
        T = input_ids.shape[1]
        start = cache.seen_tokens if cache is not None else 0
        positions = torch.arange(start, start + T, device=input_ids.device)
        stats: list[LayerStats] = []

        checkpointed = self.gradient_checkpointing and self.training and cache is None and torch.is_grad_enabled()

        def layer_step(t: int, li: int, layer: CognateLayer, h: torch.Tensor) -> torch.Tensor:
            # checkpointed: keeps h only; backward reruns the layer (a fresh memory state, no cache: same values)
            if checkpointed and torch.is_grad_enabled():
                h, layer_stats = self._gradient_checkpointing_func(layer.__call__, h, positions, self.config, None)
            else:
                h, layer_stats = layer(h, positions, self.config, cache.slot(t, li) if cache is not None else None)
            stats.append(layer_stats)
            return h

        act = self.recurse(self.embed_tokens(input_ids), layer_step)
        if cache is not None:
            cache.seen_tokens += T
        n = len(stats)
        return CognateModelOutput(
            last_hidden_state=act.hidden, ponder=act.ponder, steps=act.steps,
            gate=sum(s.gate for s in stats) / n, polarization_loss=sum(s.polarization_loss for s in stats) / n,
            gate_polarized=float(sum(s.polarized for s in stats) / n),
            mem_writes=sum(s.mem_writes for s in stats), mem_chunks=sum(s.mem_chunks for s in stats))


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
        out = self.model(input_ids, cache if use_cache or cache is not None else None)
        logits = self.lm_head(out.last_hidden_state)
        loss = lm_loss = ponder_loss = None
        if labels is not None:
            shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
            # summed, then divided by at least 1: a batch whose labels are all ignored has loss 0, not NaN
            lm_loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                                      ignore_index=-100, reduction="sum") / (shift_labels != -100).sum().clamp_min(1)
            valid = (labels != -100).to(out.ponder.dtype)
            ponder_loss = (out.ponder * valid).sum() / valid.sum().clamp_min(1)
            loss = lm_loss + self.config.ponder_cost * ponder_loss
        return CognateOutput(
            loss=loss, logits=logits, cache=cache if use_cache else None, lm_loss=lm_loss,
            ponder_loss=ponder_loss, halting_steps=out.ponder, halt_steps_int=out.steps, gate=out.gate,
            polarization_loss=out.polarization_loss, gate_polarized=out.gate_polarized,
            mem_write_fraction=(out.mem_writes / out.mem_chunks) if out.mem_chunks else None,
        )


def _register() -> None:
    """Let ``AutoConfig`` / ``AutoModelForCausalLM.from_pretrained`` read a Cognate directory."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-shard bars flood task logs; tasks report their own progress
    AutoConfig.register("cognate", CognateConfig, exist_ok=True)
    AutoModelForCausalLM.register(CognateConfig, CognateForCausalLM, exist_ok=True)


_register()
