"""Token streams for training: curriculum texts, weighted by a task mix, packed into fixed-length rows.

A batch is a pure function of (rows, seed, step), so a resumed or rolled-back run sees exactly the
batches it would have seen, and three specialists with different seeds see different ones.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase


def pack_whole(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, seq_len: int) -> torch.Tensor:
    """Rows of whole examples, each followed by EOS, the rest of a row PAD (the trainer masks PAD out of
    the loss). An example cut at a row boundary would ask for a code whose statement fell in the
    previous row: training on it teaches guessing. An example longer than a row starts a fresh row and
    runs on across as many as it needs, as ``pack`` would cut it."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    rows: list[list[int]] = []
    row: list[int] = []
    for t in texts:
        ids = tokenizer.encode(t, add_special_tokens=False) + [eos]
        if len(row) + len(ids) > seq_len and row:
            rows.append(row + [pad] * (seq_len - len(row)))
            row = []
        while len(ids) > seq_len:
            rows.append(ids[:seq_len])
            ids = ids[seq_len:]
        row += ids
    if row:
        rows.append(row + [pad] * (seq_len - len(row)))
    if not rows:
        raise ValueError("no texts to pack")
    return torch.tensor(rows, dtype=torch.long)


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


def mixed_texts(rows: Sequence[dict], mix: dict[str, float] | None, seed: int, epochs: int = 1) -> list[str]:
    """Examples resampled so each task's share follows ``mix`` (weights; None keeps the data's own mix)."""
    rng = random.Random(seed)
    if not mix:
        texts = [r["text"] for r in rows] * epochs
        rng.shuffle(texts)
        return texts
    by_task: dict[str, list[str]] = {}
    for r in rows:
        by_task.setdefault(r["task"], []).append(r["text"])
    tasks = [t for t in by_task if mix.get(t, 0) > 0]
    if not tasks:
        raise ValueError(f"data mix {mix} selects none of the tasks present: {sorted(by_task)}")
    weights = [mix[t] for t in tasks]
    n = len(rows) * epochs
    return [rng.choice(by_task[t]) for t in rng.choices(tasks, weights, k=n)]


class Batches:
    """batch(step) -> (B, S) token ids drawn from packed rows with a per-step seeded generator."""

    def __init__(self, rows: torch.Tensor, batch_size: int, seed: int):
        if len(rows) < 1:
            raise ValueError("no training rows")
        self.rows, self.batch_size, self.seed = rows, batch_size, seed

    def __call__(self, step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        idx = torch.randint(len(self.rows), (self.batch_size,), generator=g)
        return self.rows[idx]
