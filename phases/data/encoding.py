"""Curriculum text as model input: ``pack`` (text into rows of token ids, as every phase trains and measures on)
and ``EvalSet`` (held-out problems by skill, encoded once for a tokenizer: what EvoMerge's fitness, BitNet's
checks and the forging report all score, with the same exact-answer read, measure.teacher_forced_hits)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase


def pack(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, seq_len: int) -> torch.Tensor:
    """Concatenate texts with EOS between them and cut into (N, seq_len) rows; the tail is dropped."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer.encode(t, add_special_tokens=False))
        ids.append(eos)
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"{len(texts)} texts give {len(ids)} tokens: fewer than one row of {seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


@dataclass
class EvalSet:
    rows: torch.Tensor  # (N, seq_len) packed held-out token rows
    problems: list[tuple[list[int], list[int]]]  # (prompt ids, answer ids + EOS)
    split: str
    skills: list[str]  # each problem's skill (its curriculum task)
    answers: list[str] = field(default_factory=list)  # each problem's answer string, for chance baselines

    @classmethod
    def build(cls, split_rows: Sequence[dict], tokenizer, seq_len: int, n_rows: int, n_problems: int,
              split: str) -> EvalSet:
        """``n_problems`` per skill, spread over each skill's rows (so over its rungs), and the first ``n_rows``
        packed rows of the split (0: none, and the split's text is not packed)."""
        rows = (pack([r["text"] for r in split_rows], tokenizer, seq_len)[:n_rows] if n_rows
                else torch.empty(0, seq_len, dtype=torch.long))
        by_skill: dict[str, list[dict]] = {}
        for r in split_rows:
            if r["answer"]:
                by_skill.setdefault(r["task"], []).append(r)
        problems, skills, answers = [], [], []
        for skill in sorted(by_skill):
            answerable = by_skill[skill]
            for r in answerable[:: max(1, len(answerable) // n_problems)][:n_problems]:
                prompt = tokenizer.encode(r["prompt"], add_special_tokens=False)
                full = tokenizer.encode(r["text"], add_special_tokens=False) + [tokenizer.eos_token_id]
                if full[: len(prompt)] != prompt:  # BPE merged across the boundary: score the answer alone
                    full = prompt + tokenizer.encode(" " + r["answer"], add_special_tokens=False) + [tokenizer.eos_token_id]
                problems.append((prompt, full[len(prompt):]))
                skills.append(skill)
                answers.append(r["answer"])
        if not problems:
            raise ValueError(f"the {split} split has no problems with an answer to score accuracy on")
        return cls(rows=rows, problems=problems, split=split, skills=skills, answers=answers)

    def skill_hits(self, hits: Sequence[bool]) -> dict[str, list[int]]:
        """Per skill, [problems answered, problems]."""
        out: dict[str, list[int]] = {}
        for h, k in zip(hits, self.skills):
            out.setdefault(k, [0, 0])
            out[k][0] += int(h)
            out[k][1] += 1
        return dict(sorted(out.items()))
