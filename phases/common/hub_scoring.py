"""Scoring a model on the hub datasets' own held-out splits, the way each kind of dataset is scored elsewhere.

- "choice" (ARC, BoolQ, PIQA, HellaSwag, StrategyQA): the summed log-likelihood of each choice's text after the
  question, the highest wins (lm-evaluation-harness's ``acc``). Nothing is generated, so a model that cannot yet
  write the answer format is still measured on what it prefers; chance is 1 / choices.
- "answer" (GSM8K, SVAMP, ASDiv): the exact final answer after the prompt, every token the greedy prediction
  under teacher forcing (measure.teacher_forced_hits, as the curriculum's problems are read).

Inputs longer than the trained context lose their oldest tokens: the question's end and the answer are kept.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import groupby

import torch

from phases.common.measure import teacher_forced_hits


@dataclass
class HubEvalSet:
    name: str
    scorer: str  # "choice" or "answer"
    rows: list[dict]  # curriculum-schema rows of the dataset's held-out split

    def __post_init__(self) -> None:
        if not self.rows:
            raise ValueError(f"hub dataset {self.name} has no held-out rows to score")

    def chance(self) -> float:
        """The expected accuracy of a uniform guess (0 for an answer a model writes)."""
        if self.scorer != "choice":
            return 0.0
        return sum(1 / len(json.loads(r["program"])["choices"]) for r in self.rows) / len(self.rows)


def _fit(context: list[int], continuation: list[int], seq_len: int) -> tuple[list[int], list[int]]:
    """Oldest context tokens dropped so the pair fits ``seq_len``; at least one context token stays."""
    continuation = continuation[: seq_len - 1]
    return context[max(0, len(context) - (seq_len - len(continuation))):] or context[-1:], continuation


@torch.no_grad()
def loglikelihoods(model, pairs: Sequence[tuple[list[int], list[int]]]) -> list[float]:
    """Per (context ids, continuation ids): log P(continuation | context), summed over its tokens. Pairs of one total
    length share a forward (no padding)."""
    out = [0.0] * len(pairs)
    device = next(model.parameters()).device
    length = lambda i: len(pairs[i][0]) + len(pairs[i][1])  # noqa: E731
    for _, group in groupby(sorted(range(len(pairs)), key=length), key=length):
        idx = list(group)
        logits = model(torch.tensor([pairs[i][0] + pairs[i][1] for i in idx], device=device)).logits.float()
        logp = torch.log_softmax(logits, dim=-1)
        for row, i in enumerate(idx):
            ctx, cont = pairs[i]
            steps = logp[row, len(ctx) - 1: len(ctx) + len(cont) - 1]
            out[i] = float(steps.gather(-1, torch.tensor(cont, device=device)[:, None]).sum())
    return out


def choice_hits(model, tokenizer, rows: Sequence[dict], seq_len: int) -> list[bool]:
    """Per multiple-choice row: whether the right choice has the highest log-likelihood (ties go to the first)."""
    pairs, spans = [], []
    for r in rows:
        program = json.loads(r["program"])
        stem = tokenizer.encode(program["stem"], add_special_tokens=False)
        start = len(pairs)
        for choice in program["choices"]:
            pairs.append(_fit(stem, tokenizer.encode(" " + choice, add_special_tokens=False), seq_len))
        spans.append((start, len(pairs), program["label"]))
    scores = loglikelihoods(model, pairs)
    return [max(range(a, b), key=lambda j: scores[j]) - a == label for a, b, label in spans]


def answer_hits(model, tokenizer, rows: Sequence[dict], seq_len: int) -> list[bool]:
    eos = tokenizer.eos_token_id
    problems = []
    for r in rows:
        prompt = tokenizer.encode(r["prompt"], add_special_tokens=False)
        full = tokenizer.encode(r["text"], add_special_tokens=False) + [eos]
        target = full[len(prompt):] if full[: len(prompt)] == prompt else (
            tokenizer.encode(" " + r["answer"], add_special_tokens=False) + [eos])  # BPE merged across the boundary
        problems.append(_fit(prompt, target, seq_len))
    return teacher_forced_hits(model, problems)


def hits(model, tokenizer, eval_set: HubEvalSet, seq_len: int) -> list[bool]:
    model.eval()
    score = choice_hits if eval_set.scorer == "choice" else answer_hits
    return score(model, tokenizer, eval_set.rows, seq_len)
