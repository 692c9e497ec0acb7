"""The measures every phase and gate shares, each defined once: held-out loss, teacher-forced answer
accuracy, decode latency and rates, forward FLOPs per token, relative change, range across models, and a
binomial accuracy's 95% interval."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from itertools import groupby
from typing import Any

import torch
from torch import nn


def _lm_loss(out: Any) -> torch.Tensor:
    """The next-token loss alone: Cognate's ``loss`` adds the ponder cost, ``lm_loss`` does not."""
    lm = getattr(out, "lm_loss", None)
    return lm if lm is not None else out.loss


@torch.no_grad()
def heldout_means(model: nn.Module, rows: torch.Tensor, batch_size: int = 8,
                  extra: Callable[[Any, torch.Tensor], dict[str, float]] | None = None,
                  labels: torch.Tensor | None = None) -> dict[str, float]:
    """One pass over ``rows`` (eval mode, no gradient; the mode is restored): the mean next-token loss
    (on ``labels`` where given, -100 ignored; else on every token), and the row-weighted mean of each
    figure ``extra(output, batch)`` reads off the same forward passes (rows are packed to one length, so
    row-weighted is token-weighted)."""
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {"loss": 0.0}
    n = 0
    try:
        for i in range(0, len(rows), batch_size):
            x = rows[i:i + batch_size]
            out = model(x, labels=x if labels is None else labels[i:i + batch_size])
            figures = {"loss": float(_lm_loss(out))} | (extra(out, x) if extra else {})
            for k, v in figures.items():
                sums[k] = sums.get(k, 0.0) + v * len(x)
            n += len(x)
    finally:
        model.train(was_training)
    return {k: v / max(1, n) for k, v in sums.items()}


def heldout_loss(model: nn.Module, rows: torch.Tensor, batch_size: int = 8, labels: torch.Tensor | None = None) -> float:
    return heldout_means(model, rows, batch_size, labels=labels)["loss"]


@torch.no_grad()
def decode_ms(model: nn.Module, prompt_ids: torch.Tensor, new_tokens: int = 16, repeats: int = 3,
              **generate_kwargs: Any) -> float:
    """Median wall time (ms) of greedily generating exactly ``new_tokens`` tokens after ``prompt_ids``
    with the decode cache, over ``repeats`` runs after one warm-up run."""
    model.eval()
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        model.generate(prompt_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=0, **generate_kwargs)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times[1:])


def relative_drop(before: float, after: float) -> float:
    """(before − after) / before: the fraction of ``before`` lost. NaN when ``before`` is not positive,
    where a relative change means nothing (a model that answers nothing cannot lose a fraction of it)."""
    if not before > 0:
        return math.nan
    return (before - after) / before


def value_range(values: Sequence[float]) -> float:
    """max − min: how far apart models are on one figure (NaN for none)."""
    return max(values) - min(values) if values else math.nan


def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% by default): unlike the normal
    approximation it stays inside [0, 1] and is honest at 0 or n hits and for small n."""
    if n <= 0:
        return (math.nan, math.nan)
    p = hits / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def accuracy_cell(hits: int, n: int, decimals: int = 0) -> str:
    """"96.0% [87%, 99%]": an accuracy and its 95% Wilson interval (bounds to ``decimals``), as tables show it."""
    if n <= 0:
        return "n/a"
    lo, hi = wilson_interval(hits, n)
    return f"{hits / n:.1%} [{lo:.{decimals}%}, {hi:.{decimals}%}]"


def difference_interval(hits_a: int, n_a: int, hits_b: int, n_b: int, z: float = 1.96) -> tuple[float, float]:
    """95% interval of p_a − p_b from the two Wilson intervals (Newcombe's hybrid score method). For two
    decodings of the same problems (an ablation) the samples are paired and positively correlated, so
    this interval is wider than the paired one: a difference it calls significant is."""
    pa, pb = hits_a / n_a, hits_b / n_b
    la, ua = wilson_interval(hits_a, n_a, z)
    lb, ub = wilson_interval(hits_b, n_b, z)
    d = pa - pb
    return (d - math.sqrt((pa - la) ** 2 + (ub - pb) ** 2), d + math.sqrt((ua - pa) ** 2 + (pb - lb) ** 2))


def mcnemar_p(a: Sequence[bool], b: Sequence[bool]) -> float:
    """Exact two-sided McNemar test of paired hits (the same problems decoded two ways): only the discordant
    problems count, and under "no difference" each goes either way with probability 1/2. Returns the p-value."""
    if len(a) != len(b):
        raise ValueError(f"paired hits of different lengths: {len(a)} and {len(b)}")
    only_a = sum(x and not y for x, y in zip(a, b))
    only_b = sum(y and not x for x, y in zip(a, b))
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


@torch.no_grad()
def teacher_forced_hits(model, problems: Sequence[tuple[list[int], list[int]]]) -> list[bool]:
    """Per (prompt ids, answer ids): whether the greedy prediction of every answer token, teacher-forced, is right
    (what greedy decoding writes first). Problems of one total length share a forward (no padding)."""
    hits = [False] * len(problems)
    device = next(model.parameters()).device
    length = lambda i: len(problems[i][0]) + len(problems[i][1])  # noqa: E731
    for _, group in groupby(sorted(range(len(problems)), key=length), key=length):
        idx = list(group)
        logits = model(torch.tensor([problems[i][0] + problems[i][1] for i in idx], device=device)).logits
        for row, i in enumerate(idx):
            prompt, target = problems[i]
            hits[i] = logits[row, len(prompt) - 1: len(prompt) + len(target) - 1].argmax(-1).tolist() == target
    return hits


def teacher_forced_accuracy(model, problems: Sequence[tuple[list[int], list[int]]]) -> float:
    hits = teacher_forced_hits(model, problems)
    return sum(hits) / len(hits)


@torch.no_grad()
def forward_flops_per_token(model: nn.Module, rows: torch.Tensor) -> float:
    """Floating-point operations of one no-grad forward pass over ``rows``, per token, counted by torch's
    ``FlopCounterMode`` (matrix products and attention). A count, not a timing: the same structure gives
    the same number in every process and under any machine load, so a result that depends on it can be
    reproduced byte for byte."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model(rows)
    return counter.get_total_flops() / rows.numel()


@torch.no_grad()
def decode_rates(models: dict[str, nn.Module], prompts: Sequence[torch.Tensor], new_tokens: int,
                 repeats: int) -> dict[str, dict[str, float]]:
    """Greedy decode tokens/s per model, wall-clock and per CPU-second of this process, median over ``repeats``.
    The models take turns within each repeat, so a change in machine load hits both alike."""
    for model in models.values():
        model.eval()
        model.generate(prompts[0], max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
    wall: dict[str, list[float]] = {name: [] for name in models}
    cpu: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            t0, c0 = time.perf_counter(), time.process_time()
            for p in prompts:
                model.generate(p, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            n = new_tokens * len(prompts)
            wall[name].append(n / (time.perf_counter() - t0))
            cpu[name].append(n / max(time.process_time() - c0, 1e-9))
    return {name: {"tokens_per_s": statistics.median(wall[name]), "tokens_per_cpu_s": statistics.median(cpu[name])}
            for name in models}
