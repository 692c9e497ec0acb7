"""Held-out evaluation of Cognate models. Every number is measured here; none has a default value.

Definitions (also in the README):
- held-out loss / perplexity, mean halting steps, LTM usage: one pass over packed test-split rows
  (trainer.heldout_stats, through phases/common/measure.py).
- held-out loss / perplexity: mean next-token cross-entropy on what a model writes (the text skill's every
  token, a problem's working and answer; not its prompt, as in training), and exp of it.
- accuracy: greedy decoding (the model's own ``generate``) after each held-out problem's prompt; correct
  when the first number (or the trimmed text) of the continuation, after the rationale where the skill
  writes one, equals the recomputed answer (curriculum.check_answer). Per skill, with the 95% Wilson
  interval, on ``accuracy_per_skill`` test problems of each skill.
- majority baseline: for each task, always answer the task's most frequent training answer.
- memory ablation: the same decoding with the memory read zeroed (runtime ``mem_read_scale`` 0), with the
  exact McNemar p-value of the paired hits (measure.mcnemar_p).
- prediction disagreement: for two models, the share of held-out positions (those a model writes) where
  their greedy next tokens differ; the diversity gate takes the mean over pairs. Behaviour on the same
  inputs, so copies of one model measure 0 whatever their settings say.
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
from phases.data.curriculum import WORKED, check_answer, normalize_answer

# Problems decoded together in one ``generate`` call (same prompt length, so no padding).
DECODE_BATCH = 64


@torch.no_grad()
def answer(model: CognateForCausalLM, tokenizer: PreTrainedTokenizerBase, prompt: str, max_new_tokens: int,
           first_line: bool = True) -> str:
    return answers(model, tokenizer, [prompt], max_new_tokens, first_line)[0]


@torch.no_grad()
def answers(model: CognateForCausalLM, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
            max_new_tokens: int, first_line: bool = True) -> list[str]:
    """Greedy continuations of prompts that tokenize to the same length, decoded as one batch."""
    ids = torch.tensor([tokenizer.encode(p, add_special_tokens=False) for p in prompts])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    texts = tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    return [t.split("\n")[0] if first_line else t for t in texts]


def hits(model: CognateForCausalLM, tokenizer: PreTrainedTokenizerBase, examples: Sequence[dict]) -> dict[str, list[bool]]:
    """Per task, whether each problem's greedy continuation is right. Each task's decode budget is the
    longest reference continuation among its problems plus two tokens; a worked skill's continuation runs
    past line ends (its rationale may), an answer alone ends at its line."""
    model.eval()
    lengths = [len(tokenizer.encode(ex["prompt"], add_special_tokens=False)) for ex in examples]
    budget: dict[str, int] = {}
    for ex, n in zip(examples, lengths):
        ref = len(tokenizer.encode(ex["text"], add_special_tokens=False)) - n
        budget[ex["task"]] = max(budget.get(ex["task"], 0), ref + 2)
    groups: dict[tuple[str, int], list[int]] = {}
    for i, (ex, n) in enumerate(zip(examples, lengths)):
        groups.setdefault((ex["task"], n), []).append(i)
    ok = [False] * len(examples)
    for (task, _), idx in groups.items():
        for start in range(0, len(idx), DECODE_BATCH):
            part = idx[start:start + DECODE_BATCH]
            texts = answers(model, tokenizer, [examples[i]["prompt"] for i in part], budget[task],
                            first_line=task not in WORKED)
            for i, text in zip(part, texts):
                ok[i] = check_answer(examples[i], text)
    per_task: dict[str, list[bool]] = {}
    for ex, hit in zip(examples, ok):
        per_task.setdefault(ex["task"], []).append(hit)
    return per_task


def pooled(per_task: dict[str, list[bool]]) -> list[bool]:
    """Every task's hits in one list."""
    return [ok for oks in per_task.values() for ok in oks]


def accuracy(model: CognateForCausalLM, tokenizer: PreTrainedTokenizerBase, examples: Sequence[dict]) -> dict[str, Any]:
    per_task = hits(model, tokenizer, examples)
    flat = pooled(per_task)
    return {"accuracy": sum(flat) / max(1, len(flat)), "n": len(flat),
            "per_task": {t: sum(v) / len(v) for t, v in per_task.items()}}


def proportion(oks: Sequence[bool]) -> dict[str, Any]:
    """Accuracy, hits, n and the 95% Wilson interval of one list of hits."""
    k, n = sum(oks), len(oks)
    return {"accuracy": k / n, "hits": k, "n": n, "wilson_95": list(wilson_interval(k, n))}


def per_skill(per_task: dict[str, list[bool]], baselines: dict[str, float]) -> dict[str, dict[str, Any]]:
    """The per-skill table: accuracy, its 95% Wilson interval, the majority-answer baseline."""
    return {t: proportion(v) | {"majority_baseline": baselines[t]} for t, v in sorted(per_task.items())}


def by_skill(examples: Sequence[dict], per_skill_n: int) -> list[dict]:
    """Up to ``per_skill_n`` answerable problems of each skill, evenly spaced through the split (so every
    stage's share of a skill is in)."""
    out = []
    for task in sorted({ex["task"] for ex in examples if ex["answer"]}):
        rows = [ex for ex in examples if ex["task"] == task and ex["answer"]]
        # fractional spacing: a whole-number stride of 1 took the first 200 of 300 rows, which left the last
        # stage (3-digit arithmetic, overwritten codes) out of the test
        n = min(per_skill_n, len(rows))
        out += [rows[i * len(rows) // n] for i in range(n)]
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



@torch.no_grad()
def next_token_predictions(model: CognateForCausalLM, rows: torch.Tensor, labels: torch.Tensor,
                           batch_size: int = 8) -> list[int]:
    """The greedy next token at every position whose next label is scored (what a model writes), in order."""
    was_training = model.training
    model.eval()
    out: list[int] = []
    try:
        for i in range(0, len(rows), batch_size):
            logits = model(rows[i:i + batch_size]).logits[:, :-1]
            scored = labels[i:i + batch_size, 1:] != -100
            out += logits.argmax(-1)[scored].tolist()
    finally:
        model.train(was_training)
    return out


def disagreement(predictions: dict[str, Sequence[int]]) -> dict[str, Any]:
    """Pairwise share of positions where two models' greedy next tokens differ, and its mean over pairs."""
    names = sorted(predictions)
    pairs = {f"{a}/{b}": sum(x != y for x, y in zip(predictions[a], predictions[b])) / max(1, len(predictions[a]))
             for i, a in enumerate(names) for b in names[i + 1:]}
    return {"pairs": pairs, "mean": statistics.fmean(pairs.values()) if pairs else 0.0}


def latency_ms(model: CognateForCausalLM, prompt_ids: torch.Tensor, new_tokens: int = 16, repeats: int = 3) -> float:
    """Decode time of ``new_tokens`` tokens, in ms (the median of ``repeats`` after a warm-up)."""
    return decode_ms(model, prompt_ids, new_tokens, repeats)


def resolution_sensitivity(model: CognateForCausalLM, rows: torch.Tensor,
                           chunks: Sequence[int] = (4, 8, 16, 32, 64), labels: torch.Tensor | None = None) -> dict[str, Any]:
    saved = model.config.mem_chunk_size
    ppl = {}
    try:
        for c in chunks:
            model.set_runtime(mem_chunk_size=c)
            ppl[c] = perplexity(heldout_loss(model, rows, labels=labels))
    finally:
        model.set_runtime(mem_chunk_size=saved)
    values = list(ppl.values())
    return {"ppl_by_chunk": ppl, "cv": statistics.pstdev(values) / statistics.fmean(values)}
