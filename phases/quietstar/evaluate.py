"""Held-out evaluation for Quiet-STaR: reasoning accuracy by generation, and latency per token.

- reasoning accuracy: the curriculum's test problems (never trained on: reasoning data and RL rows come
  from the training split); greedy generation after the prompt, up to EOS, ``max_new_tokens``, or
  ``answer_tokens`` tokens written outside a thinking block (the answer check reads one line); the
  visible answer is the text after the last ``[/endthinking]`` (a baked model writes its thinking out;
  a Quiet-STaR model's internal thoughts never reach the text), first line, checked by
  ``curriculum.check_answer``.
- batching: Cognate takes no padding mask, so prompts of different lengths are left-filled with EOS (the
  document separator every training row contains) and decoded together; a row's answer ends at its
  first EOS after the prompt.
- latency: median wall time of generating ``new_tokens`` tokens (forced) from a fixed prompt with the
  decode cache, batch 1, divided by ``new_tokens``: ms per token, with and without thoughts.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from phases.cognate.modeling import CognateForCausalLM
from phases.data.curriculum import check_answer
from phases.quietstar.tokens import THINK_END, THINK_START, final_answer


class AnswerBudget(StoppingCriteria):
    """Stop a row once it has written ``budget`` tokens outside ``[thinking] … [/endthinking]``."""

    def __init__(self, prompt_len: int, start_id: int, end_id: int, budget: int):
        self.prompt_len, self.start_id, self.end_id, self.budget = prompt_len, start_id, end_id, budget

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        new = input_ids[:, self.prompt_len:]
        idx = torch.arange(new.shape[1], device=new.device).expand_as(new)
        last_start = torch.where(new == self.start_id, idx, -1).cummax(1).values
        last_end = torch.where(new == self.end_id, idx, -1).cummax(1).values
        visible = (last_start <= last_end) & (new != self.start_id) & (new != self.end_id)
        return visible.sum(1) >= self.budget


@torch.no_grad()
def generate_batched(model: CognateForCausalLM, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[list[int]],
                     max_new_tokens: int | Sequence[int], batch_size: int = 16, answer_tokens: int | None = None,
                     **generate_kwargs) -> list[list[int]]:
    """Greedy continuations of ``prompts`` (token lists), each cut at its first EOS; with
    ``answer_tokens``, a row also stops after that many tokens outside a thinking block."""
    model.eval()
    eos = tokenizer.eos_token_id
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[eos] * (width - len(p)) + list(p) for p in chunk])
        if answer_tokens is not None:
            marks = tokenizer.convert_tokens_to_ids([THINK_START, THINK_END])
            generate_kwargs["stopping_criteria"] = StoppingCriteriaList([AnswerBudget(width, *marks, answer_tokens)])
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max(limits[start:start + batch_size]),
                             do_sample=False, eos_token_id=eos, pad_token_id=eos, **generate_kwargs)
        pad = getattr(model.config, "pad_token_id", None)
        for k, row in enumerate(gen[:, width:].tolist()):
            row = row[: limits[start + k]]
            row = row[: row.index(eos)] if eos in row else row
            out.append([t for t in row if t != pad])  # rows a hidden thinking block shortened are right-padded
    return out


def reasoning_accuracy(model: CognateForCausalLM, tokenizer: PreTrainedTokenizerBase, problems: Sequence[dict],
                       max_new_tokens: int, answer_tokens: int = 12, **generate_kwargs) -> dict[str, Any]:
    prompts = [tokenizer.encode(p["prompt"], add_special_tokens=False) for p in problems]
    texts = [tokenizer.decode(r, skip_special_tokens=False) for r in generate_batched(
        model, tokenizer, prompts, max_new_tokens, answer_tokens=answer_tokens, **generate_kwargs)]
    per_task: dict[str, list[bool]] = {}
    for p, text in zip(problems, texts):
        per_task.setdefault(p["task"], []).append(check_answer(p, final_answer(text).split("\n")[0]))
    flat = [ok for oks in per_task.values() for ok in oks]
    return {"accuracy": sum(flat) / max(1, len(flat)), "n": len(flat),
            "per_task": {t: sum(v) / len(v) for t, v in per_task.items()}, "samples": texts[:3]}


@torch.no_grad()
def latency_ms_per_token(model: CognateForCausalLM, prompt_ids: torch.Tensor, new_tokens: int = 16, repeats: int = 3,
                         **generate_kwargs) -> float:
    model.eval()
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        model.generate(prompt_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=0, **generate_kwargs)
        times.append((time.perf_counter() - t0) * 1000 / new_tokens)
    return statistics.median(times[1:])  # the first call warms up
