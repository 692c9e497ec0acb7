"""Held-out evaluation of Cognate models. Every number is measured here; none has a default value.

Definitions (also in the README):
- held-out loss / perplexity, mean halting steps, LTM usage: one pass over packed test-split rows
  (trainer.heldout_stats, through phases/common/measure.py).
- held-out loss / perplexity: mean next-token cross-entropy, and exp of it.
- accuracy: greedy decoding after each held-out problem's prompt; correct when the first number (or
  the trimmed text) of the continuation equals the recomputed answer (curriculum.check_answer).
- majority baseline: for each task, always answer the task's most frequent training answer.
- mean halting steps: ACT steps that contributed to each held-out token's output, averaged.
- LTM usage: 1 − mean MAG gate, i.e. the share of the mixed layer output taken from the memory branch.
- latency: median wall time of one greedy generation of ``latency_tokens`` tokens from a fixed
  prompt with the decode cache, batch 1, in ms.
- resolution sensitivity: coefficient of variation (population std / mean) of held-out perplexity
  across memory chunk sizes; under 10% the model is resolution-flat: its quality does not hang on the
  chunk size chosen at inference.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from phases.cognate.modeling import CognateForCausalLM
from phases.common.measure import decode_ms, heldout_loss
from phases.common.telemetry import perplexity
from phases.data.curriculum import check_answer, normalize_answer


@torch.no_grad()
def answer(model: CognateForCausalLM, tokenizer: PreTrainedTokenizerBase, prompt: str, max_new_tokens: int) -> str:
    ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split("\n")[0]


def accuracy(model: CognateForCausalLM, tokenizer: PreTrainedTokenizerBase, examples: Sequence[dict],
             max_new_tokens: int = 6) -> dict[str, Any]:
    model.eval()
    per_task: dict[str, list[bool]] = {}
    for ex in examples:
        per_task.setdefault(ex["task"], []).append(check_answer(ex, answer(model, tokenizer, ex["prompt"], max_new_tokens)))
    flat = [ok for oks in per_task.values() for ok in oks]
    return {"accuracy": sum(flat) / max(1, len(flat)), "n": len(flat),
            "per_task": {t: sum(v) / len(v) for t, v in per_task.items()}}


def answerable(examples: Sequence[dict]) -> list[dict]:
    return [ex for ex in examples if ex["answer"]]


def majority_baseline(train: Sequence[dict], test: Sequence[dict]) -> float:
    common = {}
    for task in {ex["task"] for ex in test}:
        answers = Counter(normalize_answer(ex["answer"]) for ex in train if ex["task"] == task and ex["answer"])
        common[task] = answers.most_common(1)[0][0] if answers else None
    hits = [normalize_answer(ex["answer"]) == common[ex["task"]] for ex in test]
    return sum(hits) / max(1, len(hits))


def latency_ms(model: CognateForCausalLM, prompt_ids: torch.Tensor, new_tokens: int = 16, repeats: int = 3) -> float:
    """Decode time of ``new_tokens`` tokens, in ms (the median of ``repeats`` after a warm-up)."""
    return decode_ms(model, prompt_ids, new_tokens, repeats)


def resolution_sensitivity(model: CognateForCausalLM, rows: torch.Tensor,
                           chunks: Sequence[int] = (4, 8, 16, 32, 64)) -> dict[str, Any]:
    saved = model.config.mem_chunk_size
    ppl = {}
    try:
        for c in chunks:
            model.set_runtime(mem_chunk_size=c)
            ppl[c] = perplexity(heldout_loss(model, rows))
    finally:
        model.set_runtime(mem_chunk_size=saved)
    values = list(ppl.values())
    return {"ppl_by_chunk": ppl, "cv": statistics.pstdev(values) / statistics.fmean(values)}
