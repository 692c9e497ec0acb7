"""Fitness of a merged model on held-out data, led by what it can do. Every component is measured on the model
in hand:

- accuracy: per skill, the share of held-out problems whose greedy continuation after the prompt is exactly the
  reference continuation (the working, where the skill writes one, then the answer) and then EOS, read off one
  teacher-forced pass per problem (the argmax at every position equals the reference token: the same as greedy
  decoding, without a decode loop); the candidate's accuracy is the mean over the skills, so a model that can do
  two skills beats one that does either alone;
- perplexity: exp of the mean next-token loss over packed held-out rows: a guard, not a goal;
- speed: forward FLOPs per token on a fixed batch of those rows, counted, not timed
  (``measure.forward_flops_per_token``): a timing differs between processes and machine loads, and a
  champion chosen by it would change with them under the same recipe id;
- memory: bytes of weights plus the decode cache after one ``seq_len`` prompt (KV windows, memory state).

Speed and memory are properties of the structure (depth, recursion bound, window), not of weight
values, so they are measured once per structure and reused: two merges of the same shape differ in
fitness by what they predict, not by timer noise.

The score divides each component by the reference (the mean over the input models, measured the same way):
    fitness = w_acc·acc/acc_ref + bonus,   bonus = w_speed·flops_ref/flops + w_mem·mem_ref/mem
(w_acc·(1 + acc − acc_ref) when no input answers anything), so the reference scores 1 and each term rewards
being better than it. Two guards keep the search on capability:
- a candidate less accurate than the most accurate input keeps at most that input's bonus, so speed and
  memory never buy back lost skill: it always scores below that input;
- a candidate whose perplexity exceeds the worst input's by more than ``max_perplexity_increase`` scores 0.
"""

from __future__ import annotations

import math
import statistics
import threading
from collections.abc import Sequence
from typing import Any

import torch

from phases.common.measure import forward_flops_per_token, heldout_loss, teacher_forced_hits
from phases.data.encoding import EvalSet

COMPONENTS = ("accuracy", "speed", "memory")  # what the weights weigh; perplexity is a guard
# Evaluations in one process run one at a time (merging still overlaps): a timing taken while another
# thread computes would make merges look slower than the inputs, which were timed alone. On 2 cores
# one evaluation already uses both; a distributed task runner spreads evaluations over processes.
_EXCLUSIVE = threading.RLock()


def structure_key(config: dict[str, Any]) -> str:
    keep = ("model_type", "num_hidden_layers", "hidden_size", "vocab_size", "act_max_steps", "window_size",
            "mem_chunk_size", "intermediate_size", "num_attention_heads")
    return "|".join(f"{k}={config.get(k)}" for k in keep)


def _nbytes(obj: Any, seen: set[int]) -> int:
    if isinstance(obj, torch.Tensor):
        if id(obj) in seen:
            return 0
        seen.add(id(obj))
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__"):
        return sum(_nbytes(v, seen) for v in vars(obj).values())
    return 0


@torch.no_grad()
def inference_memory_bytes(model, seq_len: int) -> int:
    weights = sum(t.numel() * t.element_size() for t in {id(t): t for t in
                  [*model.parameters(), *model.buffers()]}.values())
    out = model(torch.zeros(1, seq_len, dtype=torch.long, device=next(model.parameters()).device), use_cache=True)
    return weights + _nbytes(out.cache, set())


def measure(model, data: EvalSet, structure_memo: dict[str, dict[str, float]] | None = None,
            speed_rows: int = 4, device: str = "cpu") -> dict[str, float]:
    """The raw components, all measured on ``device`` (the model moves there). ``structure_memo`` carries
    speed and memory across candidates: both are counts (FLOPs, bytes), the same on any device."""
    model.to(device)
    with _EXCLUSIVE:
        # One intra-op thread on CPU: a candidate's ops are small, and on a busy 2-core machine two
        # OpenMP threads spent 15× longer at their barriers than one thread took to do the work.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return _measure(model, data, structure_memo, speed_rows)
        finally:
            torch.set_num_threads(threads)


def _measure(model, data: EvalSet, structure_memo: dict[str, dict[str, float]] | None, speed_rows: int) -> dict[str, float]:
    model.eval()
    rows = data.rows.to(next(model.parameters()).device)
    loss = heldout_loss(model, rows)
    if not math.isfinite(loss):
        return {"loss": loss, "perplexity": math.inf, "accuracy": 0.0, "skill_hits": {}, "hits": [], "flops_per_token": math.inf,
                "memory_bytes": math.inf, "non_finite": 1.0}
    key = structure_key(model.config.to_dict())
    memo = structure_memo if structure_memo is not None else {}
    if key not in memo:
        memo[key] = {"flops_per_token": forward_flops_per_token(model, rows[:speed_rows]),
                     "memory_bytes": float(inference_memory_bytes(model, rows.shape[1]))}
    hits = teacher_forced_hits(model, data.problems)
    skills = data.skill_hits(hits)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
            "accuracy": statistics.fmean(h / n for h, n in skills.values()), "skill_hits": skills,
            "hits": [int(h) for h in hits], **memo[key], "non_finite": 0.0}


def reference(raws: Sequence[dict[str, float]], max_perplexity_increase: float | None = None) -> dict[str, Any]:
    """The scoring reference: each component's mean over the input models, the perplexity limit (the worst
    input's, plus ``max_perplexity_increase``) beyond which a candidate is infeasible, and the most accurate
    inputs' accuracy and structure, which cap the bonus of any candidate less accurate than them."""
    ref: dict[str, Any] = {k: statistics.fmean(r[k] for r in raws)
                           for k in ("perplexity", "accuracy", "flops_per_token", "memory_bytes")}
    if max_perplexity_increase is not None:
        ref["perplexity_limit"] = max(r["perplexity"] for r in raws) * (1 + max_perplexity_increase)
    ref["best_accuracy"] = max(r["accuracy"] for r in raws)
    ref["most_accurate"] = [[r["flops_per_token"], r["memory_bytes"]] for r in raws if r["accuracy"] == ref["best_accuracy"]]
    return ref


def _bonus(flops: float, memory: float, ref: dict[str, Any], weights: dict[str, float]) -> float:
    return weights["speed"] * ref["flops_per_token"] / flops + weights["memory"] * ref["memory_bytes"] / memory


def score(raw: dict[str, Any], ref: dict[str, Any], weights: dict[str, float]) -> tuple[float, dict[str, float]]:
    """(fitness, components). A candidate past the reference's perplexity limit scores 0: without the
    limit the search trades language modelling for speed (on tiny it chose a 1-layer merge, 3.3× faster
    and 40% worse in perplexity than the inputs, at 1.23× their fitness). A candidate less accurate than the
    most accurate input gets at most that input's speed and memory bonus."""
    if raw.get("non_finite"):
        return 0.0, dict.fromkeys((*COMPONENTS, "perplexity"), 0.0)
    accuracy = (raw["accuracy"] / ref["accuracy"] if ref["accuracy"] > 0 else 1.0 + raw["accuracy"] - ref["accuracy"])
    parts = {
        "accuracy": accuracy,
        "speed": ref["flops_per_token"] / raw["flops_per_token"],
        "memory": ref["memory_bytes"] / raw["memory_bytes"],
        "perplexity": ref["perplexity"] / raw["perplexity"],  # reported; the limit below is its only say
    }
    if raw["perplexity"] > ref.get("perplexity_limit", math.inf):
        return 0.0, parts
    bonus = _bonus(raw["flops_per_token"], raw["memory_bytes"], ref, weights)
    if raw["accuracy"] < ref.get("best_accuracy", -math.inf):
        bonus = min(bonus, max(_bonus(f, m, ref, weights) for f, m in ref["most_accurate"]))
    return weights["accuracy"] * accuracy + bonus, parts


@torch.no_grad()
def predictions(model, rows: torch.Tensor) -> list[int]:
    """Argmax next-token predictions on probe rows: the candidate's behaviour, for diversity."""
    return model(rows.to(next(model.parameters()).device)).logits.argmax(-1).reshape(-1).tolist()


def diversity(preds: Sequence[Sequence[int]]) -> float:
    """Mean pairwise disagreement of the candidates' argmax predictions on the same probe tokens: 0 when
    all predict alike, 1 when no two ever agree."""
    n = len(preds)
    if n < 2:
        return 0.0
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    return statistics.fmean(sum(a != b for a, b in zip(preds[i], preds[j])) / len(preds[i]) for i, j in pairs)
