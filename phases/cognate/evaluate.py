"""Held-out evaluation of Cognate models. Every number is measured here; none has a default value.

Definitions (also in the README):
- held-out loss / perplexity, mean halting steps, LTM usage: one pass over packed test-split rows
  (trainer.heldout_stats, through phases/common/measure.py).
- held-out loss / perplexity: mean next-token cross-entropy, and exp of it.
- accuracy: greedy decoding (the model's own ``generate``) after each held-out problem's prompt; correct
  when the first number (or the trimmed text) of the continuation, after the rationale where the skill
  writes one, equals the recomputed answer (curriculum.check_answer). Per skill, with the 95% Wilson
  interval, on ``accuracy_per_skill`` test problems of each skill.
- majority baseline: for each task, always answer the task's most frequent training answer.
- memory ablation: the same decoding with the memory read zeroed (runtime ``mem_read_scale`` 0).
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
from phases.common.measure import decode_ms, heldout_loss, wilson_interval
from phases.common.telemetry import perplexity
from phases.data.curriculum import check_answer, normalize_answer

# New tokens decoded per problem: the answer alone takes a few (digits are single tokens), a word
# problem's rationale up to three steps of about 20 tokens each.
ANSWER_TOKENS = 6
RATIONALE_TOKENS = {"word_problem": 72}


@torch.no_grad()
def answer(model: CognateForCausalLM, tokenizer: PreTrainedTokenizerBase, prompt: str, max_new_tokens: int,
           first_line: bool = True) -> str:
    ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.eos_token_id)
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    return text.split("\n")[0] if first_line else text


def hits(model: CognateForCausalLM, tokenizer: PreTrainedTokenizerBase, examples: Sequence[dict]) -> dict[str, list[bool]]:
    """Per task, whether each problem's greedy continuation is right."""
    model.eval()
    per_task: dict[str, list[bool]] = {}
    for ex in examples:
        budget = RATIONALE_TOKENS.get(ex["task"], ANSWER_TOKENS)
        # a rationale spans lines; an answer alone ends at its line
        text = answer(model, tokenizer, ex["prompt"], budget, first_line=ex["task"] not in RATIONALE_TOKENS)
        per_task.setdefault(ex["task"], []).append(check_answer(ex, text))
    return per_task


def accuracy(model: CognateForCausalLM, tokenizer: PreTrainedTokenizerBase, examples: Sequence[dict]) -> dict[str, Any]:
    per_task = hits(model, tokenizer, examples)
    flat = [ok for oks in per_task.values() for ok in oks]
    return {"accuracy": sum(flat) / max(1, len(flat)), "n": len(flat),
            "per_task": {t: sum(v) / len(v) for t, v in per_task.items()}}


def per_skill(per_task: dict[str, list[bool]], baselines: dict[str, float]) -> dict[str, dict[str, Any]]:
    """The per-skill table: accuracy, its 95% Wilson interval, the majority-answer baseline."""
    return {t: {"accuracy": sum(v) / len(v), "hits": sum(v), "n": len(v), "wilson_95": list(wilson_interval(sum(v), len(v))),
                "majority_baseline": baselines[t]} for t, v in sorted(per_task.items())}


def by_skill(examples: Sequence[dict], per_skill_n: int) -> list[dict]:
    """Up to ``per_skill_n`` answerable problems of each skill, evenly spaced through the split (so every
    stage's share of a skill is in)."""
    out = []
    for task in sorted({ex["task"] for ex in examples if ex["answer"]}):
        rows = [ex for ex in examples if ex["task"] == task and ex["answer"]]
        out += rows[:: max(1, len(rows) // per_skill_n)][:per_skill_n]
    return out


def answerable(examples: Sequence[dict]) -> list[dict]:
    return [ex for ex in examples if ex["answer"]]


def majority_hits(train: Sequence[dict], test: Sequence[dict]) -> dict[str, list[bool]]:
    """Per task, whether always answering the task's most frequent training answer is right."""
    common = {}
    for task in {ex["task"] for ex in test}:
        answers = Counter(normalize_answer(ex["answer"]) for ex in train if ex["task"] == task and ex["answer"])
        common[task] = answers.most_common(1)[0][0] if answers else None
    out: dict[str, list[bool]] = {}
    for ex in test:
        out.setdefault(ex["task"], []).append(normalize_answer(ex["answer"]) == common[ex["task"]])
    return out


def majority_baseline(train: Sequence[dict], test: Sequence[dict]) -> float:
    flat = [h for v in majority_hits(train, test).values() for h in v]
    return sum(flat) / max(1, len(flat))


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
