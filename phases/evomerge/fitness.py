"""Fitness of a merged model on held-out data. Every component is measured on the model in hand:

- perplexity: exp of the mean next-token loss over packed held-out rows;
- accuracy: share of held-out problems whose greedy continuation after the prompt is exactly the
  reference continuation (the working, where the skill writes one, then the answer) and then EOS, read
  off one teacher-forced pass per problem (the argmax at every position equals the reference token:
  the same as greedy decoding, without a decode loop);
- speed: forward FLOPs per token on a fixed batch of those rows, counted, not timed
  (``measure.forward_flops_per_token``): a timing differs between processes and machine loads, and a
  champion chosen by it would change with them under the same recipe id;
- memory: bytes of weights plus the decode cache after one ``seq_len`` prompt (KV windows, memory state).

Speed and memory are properties of the structure (depth, recursion bound, window), not of weight
values, so they are measured once per structure and reused: two merges of the same shape differ in
fitness by what they predict, not by timer noise.

The score divides each component by the reference (the mean over the input models, measured the same
way): fitness = w_ppl·ppl_ref/ppl + w_acc·(1 + acc − acc_ref) + w_speed·flops_ref/flops + w_mem·mem_ref/mem,
so the reference scores exactly 1 and each term rewards being better than it. A candidate whose
perplexity exceeds the worst input's by more than ``max_perplexity_increase`` scores 0 (infeasible).
"""

from __future__ import annotations

import math
import statistics
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from phases.common.measure import forward_flops_per_token, heldout_loss, teacher_forced_accuracy

COMPONENTS = ("perplexity", "accuracy", "speed", "memory")
# Evaluations in one process run one at a time (merging still overlaps): a timing taken while another
# thread computes would make merges look slower than the inputs, which were timed alone. On 2 cores
# one evaluation already uses both; a distributed task runner spreads evaluations over processes.
_EXCLUSIVE = threading.RLock()


@dataclass
class EvalSet:
    rows: torch.Tensor  # (N, seq_len) packed held-out token rows
    problems: list[tuple[list[int], list[int]]]  # (prompt ids, answer ids + EOS)
    split: str

    @classmethod
    def build(cls, split_rows: Sequence[dict], tokenizer, seq_len: int, n_rows: int, n_problems: int,
              split: str) -> EvalSet:
        from phases.cognate.data import pack  # the same packing the models were trained on

        rows = pack([r["text"] for r in split_rows], tokenizer, seq_len)[:n_rows]
        problems = []
        answerable = [r for r in split_rows if r["answer"]]
        for r in answerable[:: max(1, len(answerable) // n_problems)][:n_problems]:
            prompt = tokenizer.encode(r["prompt"], add_special_tokens=False)
            full = tokenizer.encode(r["text"], add_special_tokens=False) + [tokenizer.eos_token_id]
            if full[: len(prompt)] != prompt:  # BPE merged across the boundary: score the answer alone
                full = prompt + tokenizer.encode(" " + r["answer"], add_special_tokens=False) + [tokenizer.eos_token_id]
            problems.append((prompt, full[len(prompt):]))
        if not problems:
            raise ValueError(f"the {split} split has no problems with an answer to score accuracy on")
        return cls(rows=rows, problems=problems, split=split)


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
    out = model(torch.zeros(1, seq_len, dtype=torch.long), use_cache=True)
    return weights + _nbytes(out.cache, set())


def measure(model, data: EvalSet, structure_memo: dict[str, dict[str, float]] | None = None,
            speed_rows: int = 4) -> dict[str, float]:
    """The raw components, all measured. ``structure_memo`` carries speed and memory across candidates."""
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
    loss = heldout_loss(model, data.rows)
    if not math.isfinite(loss):
        return {"loss": loss, "perplexity": math.inf, "accuracy": 0.0, "flops_per_token": math.inf, "memory_bytes": math.inf,
                "non_finite": 1.0}
    key = structure_key(model.config.to_dict())
    memo = structure_memo if structure_memo is not None else {}
    if key not in memo:
        memo[key] = {"flops_per_token": forward_flops_per_token(model, data.rows[:speed_rows]),
                     "memory_bytes": float(inference_memory_bytes(model, data.rows.shape[1]))}
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
            "accuracy": teacher_forced_accuracy(model, data.problems), **memo[key], "non_finite": 0.0}


def reference(raws: Sequence[dict[str, float]], max_perplexity_increase: float | None = None) -> dict[str, float]:
    """The scoring reference: each component's mean over the input models, and the perplexity limit
    (the worst input's, plus ``max_perplexity_increase``) beyond which a candidate is infeasible."""
    ref = {k: statistics.fmean(r[k] for r in raws) for k in ("perplexity", "accuracy", "flops_per_token", "memory_bytes")}
    if max_perplexity_increase is not None:
        ref["perplexity_limit"] = max(r["perplexity"] for r in raws) * (1 + max_perplexity_increase)
    return ref


def score(raw: dict[str, float], ref: dict[str, float], weights: dict[str, float]) -> tuple[float, dict[str, float]]:
    """(fitness, components). A candidate past the reference's perplexity limit scores 0: without the
    limit the search trades language modelling for speed (on tiny it chose a 1-layer merge, 3.3× faster
    and 40% worse in perplexity than the inputs, at 1.23× their fitness)."""
    if raw.get("non_finite"):
        return 0.0, dict.fromkeys(COMPONENTS, 0.0)
    parts = {
        "perplexity": ref["perplexity"] / raw["perplexity"],
        "accuracy": 1.0 + raw["accuracy"] - ref["accuracy"],
        "speed": ref["flops_per_token"] / raw["flops_per_token"],
        "memory": ref["memory_bytes"] / raw["memory_bytes"],
    }
    if raw["perplexity"] > ref.get("perplexity_limit", math.inf):
        return 0.0, parts
    return sum(weights[k] * parts[k] for k in COMPONENTS), parts


@torch.no_grad()
def predictions(model, rows: torch.Tensor) -> list[int]:
    """Argmax next-token predictions on probe rows: the candidate's behaviour, for diversity."""
    return model(rows).logits.argmax(-1).reshape(-1).tolist()


def diversity(preds: Sequence[Sequence[int]]) -> float:
    """Mean pairwise disagreement of the candidates' argmax predictions on the same probe tokens: 0 when
    all predict alike, 1 when no two ever agree."""
    n = len(preds)
    if n < 2:
        return 0.0
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    return statistics.fmean(sum(a != b for a, b in zip(preds[i], preds[j])) / len(preds[i]) for i, j in pairs)
