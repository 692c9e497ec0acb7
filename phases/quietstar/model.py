"""QuietStarForCausalLM: a Cognate model that thinks before every token it predicts.

The transformers interface (``from_pretrained``, ``save_pretrained``, ``generate``) with one addition, the
mixing head (mixing.py). With thoughts on (``config.thoughts_enabled``, or ``thoughts=`` per call):

- decoding (a cache is passed, as ``generate`` does): after the new tokens, a copy of the cache takes
  ``[thinking]`` + L greedy thought tokens + ``[/endthinking]``; the last position's logits become
  ``base + w·(post_thought − base)``. Earlier positions of a prefill keep their direct logits (generation
  reads only the last). The thought never enters the returned sequence or the real cache.
- a full sequence without a cache: the same thought after EVERY position, by the batched pass
  (thoughts.py), so ``model(x).logits[:, i]`` is what decoding would give at i.

Inside a ``[thinking] … [/endthinking]`` block the model writes out (what baking taught it), it is
already thinking in the open: those positions get no internal thought (w = 0), in every path. That
keeps decoding a written block at plain speed.

Thinking where it is needed (``config.thought_entropy``, nats; 0, the default, thinks at every position): a
position whose direct next-token distribution has entropy at or below the threshold gets no thought (w = 0),
in every path, so decoding skips the L + 2 decoder steps of a thought wherever every row of the batch is
that sure. A thought changes a prediction only through w, and a confident position is where the direct
prediction is most likely already the one the thought would give.

``generate`` hides thoughts by default: internal thoughts never enter the sequence, and a
``[thinking] … [/endthinking]`` span the model writes in its visible output is cut out (rows right-padded).
``generate(..., show_thoughts=True)`` returns the internal thought before each generated token and keeps
written spans.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from phases.cognate.configuration import CognateConfig
from phases.cognate.modeling import CognateCache, CognateForCausalLM, CognateOutput
from phases.quietstar.mixing import MixingHead, mix
from phases.quietstar.thoughts import ThoughtSpec, clone_cache, parallel_thoughts


class QuietStarConfig(CognateConfig):
    model_type = "cognate-quietstar"

    def __init__(self, thought_length: int = 4, thought_start_id: int | None = None,
                 thought_end_id: int | None = None, thought_banned: list[int] | None = None,
                 mixing_inner: int | None = None, thoughts_enabled: bool = True, thought_entropy: float = 0.0,
                 **kwargs):
        if thought_length < 0:
            raise ValueError(f"thought_length must be >= 0, got {thought_length}")
        if not thought_entropy >= 0:  # NaN too
            raise ValueError(f"thought_entropy must be a number >= 0 (nats), got {thought_entropy}")
        self.thought_entropy = float(thought_entropy)
        self.thought_length = thought_length
        self.thought_start_id = thought_start_id
        self.thought_end_id = thought_end_id
        self.thought_banned = list(thought_banned or [])
        self.mixing_inner = mixing_inner
        self.thoughts_enabled = thoughts_enabled
        super().__init__(**kwargs)

    def inference_spec(self) -> ThoughtSpec:
        if self.thought_start_id is None or self.thought_end_id is None:
            raise ValueError("QuietStarConfig has no thought_start_id / thought_end_id: build it with quietstar_config()")
        return ThoughtSpec(count=1, length=self.thought_length, n_true=1, start_id=self.thought_start_id,
                           end_id=self.thought_end_id, greedy=True, banned=tuple(self.thought_banned))


class QuietStarForCausalLM(CognateForCausalLM):
    config_class = QuietStarConfig

    def __init__(self, config: QuietStarConfig):
        super().__init__(config)
        self.mixing = MixingHead(config.hidden_size, config.mixing_inner)
        self._thought_log: list | None = None  # (thought ids, rows that used it) per step, while showing

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, cache: CognateCache | None = None,
                use_cache: bool | None = None, thoughts: bool | None = None, **kwargs) -> CognateOutput:
        if not (self.config.thoughts_enabled if thoughts is None else thoughts):
            return super().forward(input_ids, attention_mask=attention_mask, labels=labels,
                                   cache=cache, use_cache=use_cache, **kwargs)
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("Cognate does not take padded batches: pack sequences or pass them one at a time")
        spec = self.config.inference_spec()
        if use_cache or cache is not None:
            if cache is None:
                cache = CognateCache()
            was_open = getattr(cache, "thought_open", None)
            outside = outside_thinking(input_ids, spec.start_id, spec.end_id, was_open)[:, -1]
            cache.thought_open = ~outside
            hidden = self.model(input_ids, cache).last_hidden_state
            logits = self.lm_head(hidden)
            think = outside & self._unsure(logits[:, -1])
            if bool(think.any()):
                thought_hidden, thought_logits = self._think(cache, spec, input_ids.shape[0], think)
                w = self.mixing(hidden[:, -1:], thought_hidden) * think[:, None].to(hidden.dtype)
                logits = torch.cat([logits[:, :-1], mix(logits[:, -1:], thought_logits, w)], 1)
            elif self._thought_log is not None:
                self._thought_log.append(None)
        else:
            tp = parallel_thoughts(self, input_ids, spec)
            think = outside_thinking(input_ids, spec.start_id, spec.end_id) & self._unsure(tp.base_logits)
            w = self.mixing(tp.base_hidden, tp.talk_hidden[:, 0, :, 0]) * think.to(tp.base_hidden.dtype)
            logits = mix(tp.base_logits, tp.talk_logits[:, 0, :, 0], w)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CognateOutput(loss=loss, lm_loss=loss, logits=logits, cache=cache if use_cache else None)

    def _unsure(self, logits: torch.Tensor) -> torch.Tensor:
        """(…,) True where the direct next-token entropy is above ``config.thought_entropy`` (always at 0)."""
        threshold = getattr(self.config, "thought_entropy", 0.0)
        if threshold <= 0:
            return torch.ones(logits.shape[:-1], dtype=torch.bool, device=logits.device)
        logp = torch.log_softmax(logits.float(), -1)
        return -(logp.exp() * logp).sum(-1) > threshold

    def _think(self, cache: CognateCache, spec: ThoughtSpec, batch: int,
               used: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A greedy thought after the cache's last position, on a copy of the cache: (hidden, logits)
        after ``[/endthinking]``, each (B, 1, ·)."""
        c = clone_cache(cache)
        device = self.lm_head.weight.device
        tok = torch.full((batch, 1), spec.start_id, dtype=torch.long, device=device)
        seen = [tok]
        banned = torch.tensor(spec.banned, dtype=torch.long, device=device) if spec.banned else None
        hidden = self.model(tok, c).last_hidden_state
        for _ in range(spec.length):
            logits = self.lm_head(hidden)
            if banned is not None:
                logits = logits.index_fill(-1, banned, float("-inf"))
            tok = logits.argmax(-1)
            seen.append(tok)
            hidden = self.model(tok, c).last_hidden_state
        tok = torch.full((batch, 1), spec.end_id, dtype=torch.long, device=device)
        seen.append(tok)
        hidden = self.model(tok, c).last_hidden_state
        if self._thought_log is not None:
            self._thought_log.append((torch.cat(seen, 1), used))
        return hidden, self.lm_head(hidden)

    @torch.no_grad()
    def generate(self, inputs: torch.Tensor | None = None, show_thoughts: bool = False, **kwargs):
        """transformers' generate; thoughts hidden unless ``show_thoughts`` (see the module docstring)."""
        prompt = inputs if inputs is not None else kwargs.get("input_ids")
        self._thought_log = [] if show_thoughts else None
        try:
            out = super().generate(inputs, **kwargs)
            log, self._thought_log = self._thought_log, None
        finally:
            self._thought_log = None
        if not isinstance(out, torch.Tensor):
            return out  # return_dict_in_generate: left as transformers builds it
        n_prompt = prompt.shape[1]
        new = out[:, n_prompt:]
        if show_thoughts and self.config.thoughts_enabled and log:
            rows = []
            for b in range(out.shape[0]):
                row = out[b, :n_prompt].tolist()
                for s in range(new.shape[1]):
                    if s < len(log) and log[s] is not None and bool(log[s][1][b]):
                        row += log[s][0][b].tolist()
                    row.append(int(new[b, s]))
                rows.append(row)
            return _right_pad(rows, self._pad_id(), out)
        if show_thoughts:
            return out
        return torch.cat([out[:, :n_prompt], self.hide_written_thoughts(new)], 1)

    def _pad_id(self) -> int:
        return self.config.pad_token_id if getattr(self.config, "pad_token_id", None) is not None else 0

    def hide_written_thoughts(self, ids: torch.Tensor) -> torch.Tensor:
        """Cut every ``[thinking] … [/endthinking]`` span (an unclosed one to the end) out of each row."""
        start, end = self.config.thought_start_id, self.config.thought_end_id
        rows = []
        for row in ids.tolist():
            keep, inside = [], False
            for t in row:
                if t == start:
                    inside = True
                elif t == end and inside:
                    inside = False
                elif t != end and not inside:
                    keep.append(t)
            rows.append(keep)
        return _right_pad(rows, self._pad_id(), ids)


def _right_pad(rows: list[list[int]], pad: int, like: torch.Tensor) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=like.dtype,
                        device=like.device).view(len(rows), width)


def outside_thinking(input_ids: torch.Tensor, start_id: int, end_id: int,
                     open_before: torch.Tensor | None = None) -> torch.Tensor:
    """(B, S) True where the text up to and including the position has no unclosed ``[thinking]``;
    ``open_before`` (B,) says whether a block was open before these tokens (decoding)."""
    idx = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    last_start = torch.where(input_ids == start_id, idx, -1).cummax(1).values
    last_end = torch.where(input_ids == end_id, idx, -1).cummax(1).values
    inside = last_start > last_end
    if open_before is not None:
        inside = inside | (open_before[:, None] & (last_start < 0) & (last_end < 0))
    return ~inside


def quietstar_config(base: CognateConfig, thought_length: int, start_id: int, end_id: int,
                     banned: list[int], mixing_inner: int | None = None) -> QuietStarConfig:
    """The Cognate model's config plus the thought settings."""
    fields = {k: v for k, v in base.to_dict().items() if k not in ("model_type", "architectures", "transformers_version")}
    return QuietStarConfig(thought_length=thought_length, thought_start_id=start_id, thought_end_id=end_id,
                           thought_banned=banned, mixing_inner=mixing_inner, **fields)


AutoConfig.register("cognate-quietstar", QuietStarConfig, exist_ok=True)
AutoModelForCausalLM.register(QuietStarConfig, QuietStarForCausalLM, exist_ok=True)
