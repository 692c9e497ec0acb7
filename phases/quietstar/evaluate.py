"""Held-out evaluation for Quiet-STaR: reasoning accuracy by generation, and latency per token.

- reasoning accuracy: the curriculum's test problems (never trained on: reasoning data and RL rows come
  from the training split); greedy generation after the prompt, up to EOS, ``max_new_tokens``, or
  ``answer_tokens`` tokens written outside a thinking block (by default the longest reference continuation
  plus two: a worked skill writes its columns before "So the answer is N", which a fixed 12 cut off; the answer
  check reads one line); the
  visible answer is the text after the last ``[/endthinking]`` (a baked model writes its thinking out;
  a Quiet-STaR model's internal thoughts never reach the text), first line, checked by
  ``curriculum.check_answer``.
- batching: prompts are decoded together, left-filled with EOS (``decoding.generate_batched``); a row's
  answer ends at its first EOS after the prompt.
- latency: median wall time of generating ``new_tokens`` tokens (forced) from a fixed prompt with the
  decode cache, batch 1, divided by ``new_tokens``: ms per token, with and without thoughts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from phases.cognate.modeling import CognateForCausalLM
from phases.common.measure import decode_ms
from phases.data.curriculum import check_answer
from phases.quietstar.decoding import generate_batched
from phases.quietstar.tokens import final_answer


def reasoning_accuracy(model: CognateForCausalLM, tokenizer: PreTrainedTokenizerBase, problems: Sequence[dict],
                       max_new_tokens: int, answer_tokens: int | None = None, **generate_kwargs) -> dict[str, Any]:
    prompts = [tokenizer.encode(p["prompt"], add_special_tokens=False) for p in problems]
    if answer_tokens is None:
        answer_tokens = 2 + max(len(tokenizer.encode(p["text"], add_special_tokens=False)) - len(ids)
                                for p, ids in zip(problems, prompts))
    texts = [tokenizer.decode(r, skip_special_tokens=False) for r in generate_batched(
        model, tokenizer, prompts, max_new_tokens, answer_tokens=answer_tokens, **generate_kwargs)]
    hits = [check_answer(p, final_answer(text).split("\n")[0]) for p, text in zip(problems, texts)]
    per_task: dict[str, list[bool]] = {}
    for p, ok in zip(problems, hits):
        per_task.setdefault(p["task"], []).append(ok)
    # ``hits`` in problem order: two models' hits on the same problems are paired (measure.mcnemar_p)
    return {"accuracy": sum(hits) / max(1, len(hits)), "n": len(hits), "hits": hits,
            "per_task": {t: sum(v) / len(v) for t, v in per_task.items()}, "samples": texts[:3]}


def latency_ms_per_token(model: CognateForCausalLM, prompt_ids: torch.Tensor, new_tokens: int = 16, repeats: int = 3,
                         **generate_kwargs) -> float:
    return decode_ms(model, prompt_ids, new_tokens, repeats, **generate_kwargs) / new_tokens
