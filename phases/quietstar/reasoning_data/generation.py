"""Reasoning data for prompt baking: the plan, the prompts, an append-only ledger, the OpenRouter run,
validation, deduplication and the dataset's summary.

The plan is models × strategies × examples per pair (planned: 5 × 10 × 500 = 25,000). Every example
is keyed ``model|strategy|index`` and draws a problem from the curriculum's training split (checkable
answers; the held-out splits stay unseen for Quiet-STaR's accuracy gate), so a completion is kept only
if its final answer is the curriculum's.

The ledger (``ledger.jsonl``) gets one line per finished request, written and fsync'd as it arrives:
an ``example`` or a ``reject`` (paid for, unusable, with its reason) marks the key done; a ``failure``
(retries used up) keeps the key pending and records what its attempts cost. A rerun reads the ledger,
skips the done keys (it never pays twice) and carries the spent total into the budget, so the cap holds
over all runs together. A torn last line from a crash is cut off on open.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import secrets
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phases.data.curriculum import verify
from phases.quietstar.reasoning_data.openrouter import Budget, Completion, OpenRouterClient, Price, prompt_token_bound
from phases.quietstar.tokens import (
    STRATEGIES,
    STRATEGY_GLOSS,
    THINK_END,
    THINK_START,
    format_completion,
    parse_thinking,
    validate,
)

PROMPT_VERSION = "1"  # part of the dataset's recipe: a changed prompt is a different dataset
CHECKABLE_TASKS = ("arithmetic", "word_problem", "kv_recall")
log = logging.getLogger("agent_forge.quietstar.generation")


class GenerationIncomplete(RuntimeError):
    """The plan is not done (requests failed after their retries); a rerun resumes from the ledger."""


class BudgetExhausted(GenerationIncomplete):
    """The cap stopped the run before the plan was done; the ledger keeps what was bought."""


@dataclass(frozen=True)
class Job:
    model: str
    strategy: str
    index: int
    problem: dict[str, Any] = field(hash=False, compare=False)

    @property
    def key(self) -> str:
        return f"{self.model}|{self.strategy}|{self.index}"


def checkable_problems(rows: Iterable[dict[str, Any]], max_prompt_chars: int | None = None) -> list[dict[str, Any]]:
    """Curriculum rows whose answer a program recomputes (``curriculum.verify``), short enough to fit."""
    out = [dict(r) for r in rows if r["task"] in CHECKABLE_TASKS and r["answer"] and verify(r)
           and (max_prompt_chars is None or len(r["prompt"]) <= max_prompt_chars)]
    if not out:
        raise ValueError("the curriculum has no checkable problems"
                         + (f" of at most {max_prompt_chars} characters" if max_prompt_chars else ""))
    return out


def plan(models: list[str], strategies: list[str], per_pair: int, problems: list[dict[str, Any]],
         seed: int) -> list[Job]:
    """Every (model, strategy, index), each with its own problem while the problems last (a seeded
    permutation walked in order), so models and strategies see different problems."""
    unknown = [s for s in strategies if s not in STRATEGY_GLOSS]
    if unknown:
        raise ValueError(f"unknown strategies {unknown}; known: {', '.join(STRATEGIES)}")
    if not models or not strategies or per_pair < 1:
        raise ValueError(f"empty plan: {len(models)} models x {len(strategies)} strategies x {per_pair}")
    order = list(range(len(problems)))
    random.Random(f"quietstar-plan:{seed}").shuffle(order)
    jobs, slot = [], 0
    for model in models:
        for strategy in strategies:
            for index in range(per_pair):
                jobs.append(Job(model, strategy, index, problems[order[slot % len(order)]]))
                slot += 1
    return jobs


def question_of(problem: dict[str, Any]) -> str:
    return re.sub(r"\s*Answer:\s*$", "", problem["prompt"]).strip()


def messages_for(problem: dict[str, Any], strategy: str, max_words: int = 80) -> list[dict[str, str]]:
    tags = "\n".join(f"<{s}> ... </{s}>: {g}" for s, g in STRATEGY_GLOSS.items())
    system = (
        "You write training data that teaches a small language model to think in a fixed structure. "
        f"Reply with exactly this and nothing else:\n{THINK_START}<tag>thought</tag><tag>thought</tag>...{THINK_END} "
        "final answer\n\nEach thought sits in one of these tags, opened and closed, never nested; "
        f"nothing else goes between {THINK_START} and {THINK_END}:\n{tags}\n\n"
        f"After {THINK_END} write only the final answer (just the number when the question asks for one). "
        f"Keep the whole thinking under {max_words} words.")
    user = (f"Use the <{strategy}> tag at least once ({STRATEGY_GLOSS[strategy]}); other tags may help too.\n\n"
            f"{question_of(problem)}")
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


# ----------------------------------------------------------------------------- records
def example_record(job: Job, completion: str, source: str) -> dict[str, Any]:
    """A validated example, or a reject naming the first rule the completion breaks. Accepted
    completions are rewritten in the canonical layout with the curriculum's answer string."""
    problem = job.problem
    base = {"key": job.key, "model": job.model, "strategy": job.strategy, "index": job.index,
            "problem_id": problem["id"], "task": problem["task"], "source": source}
    ok, reason = validate({"strategy": job.strategy, "completion": completion, "answer": problem["answer"]})
    if not ok:
        return base | {"type": "reject", "reason": reason, "detail": parse_thinking(completion).detail,
                       "raw": completion[:2000]}
    canonical = format_completion(parse_thinking(completion).thoughts, problem["answer"])
    return base | {"type": "example", "prompt": problem["prompt"], "answer": problem["answer"],
                   "completion": canonical, "text": f"{problem['prompt'].rstrip()} {canonical}"}


TERMINAL = ("example", "reject", "failure", "settled")


def spent_from(records: list[dict[str, Any]]) -> tuple[float, float]:
    """(settled US$, US$ reserved by requests that left and were never settled). A process killed with
    requests in flight leaves ``inflight`` lines and no answer: whatever they cost is unknown, so their
    worst case is counted against the cap for good (it may have been billed)."""
    settled, open_reserved = 0.0, {}
    for r in records:
        request = (r.get("run"), r["key"])  # a later run's answer does not settle an earlier run's request
        if r["type"] == "inflight":
            open_reserved[request] = open_reserved.get(request, 0.0) + float(r["reserved_usd"])
        else:
            settled += float(r.get("cost_usd", 0.0))
            if r["type"] in TERMINAL:
                open_reserved.pop(request, None)
    return settled, sum(open_reserved.values())


def usd(amount: float) -> str:
    """Money with the decimals it needs: $0.0030 reads as what it is, where "$0.00" hid it."""
    return f"${amount:,.2f}" if amount >= 10 else f"${amount:.4f}"


class Ledger:
    """Append-only JSONL, write-ahead: an ``inflight`` line (with the request's worst-case cost) before a
    request leaves, and one line per finished request, each durable before the next is counted."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.run = secrets.token_hex(6)  # names this process's lines, so a killed run's in-flight ones stay open
        self.records: list[dict[str, Any]] = []
        if self.path.exists():
            raw = self.path.read_bytes()
            whole = raw[: raw.rfind(b"\n") + 1]
            if len(whole) != len(raw):  # a crash mid-line: that request's record never finished
                log.warning("ledger %s: dropping a torn last line (%d bytes)", self.path, len(raw) - len(whole))
                with open(self.path, "r+b") as f:
                    f.truncate(len(whole))
            self.records = [json.loads(line) for line in whole.decode().splitlines() if line.strip()]

    def append(self, record: dict[str, Any]) -> None:
        record = {"run": self.run} | record
        line = json.dumps(record, sort_keys=True) + "\n"
        with self._lock:
            with open(self.path, "a") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            self.records.append(record)

    def done_keys(self) -> set[str]:
        return {r["key"] for r in self.records if r["type"] in ("example", "reject")}

    def spent_usd(self) -> float:
        """Settled costs plus the worst case of requests a killed run left in flight."""
        return sum(spent_from(self.records))

    def unaccounted_usd(self) -> float:
        """The in-flight part of ``spent_usd``: reserved by requests whose answers were never recorded."""
        return spent_from(self.records)[1]


# ----------------------------------------------------------------------------- OpenRouter run
def estimate(jobs: list[Job], prices: dict[str, Price], max_tokens: int) -> dict[str, Any]:
    """Worst-case cost of sending ``jobs`` once each (prompt bound + max_tokens): the dry-run figure."""
    per_model: dict[str, float] = {}
    for job in jobs:
        cost = price_for(prices, job.model).cost(prompt_token_bound(messages_for(job.problem, job.strategy)),
                                                 max_tokens)
        per_model[job.model] = per_model.get(job.model, 0.0) + cost
    return {"requests": len(jobs), "worst_case_usd": sum(per_model.values()), "per_model_usd": per_model}


def price_for(prices: dict[str, Price], model: str) -> Price:
    if model not in prices:
        raise ValueError(f"no price for model {model!r}: add it to quietstar.data.prices "
                         "([prompt, completion] US$ per million tokens) so the budget cap can hold")
    return Price(*prices[model])


DEAD_API_AFTER = 8  # examples failing in a row (retries used up) before the run stops as "API down"


@dataclass
class RunReport:
    stopped_by_budget: bool = False
    over_bound: int = 0  # responses that cost more than their reservation
    failed_in_a_row: int = 0
    api_down: str | None = None  # the last failure's reason when DEAD_API_AFTER examples failed in a row


def run_openrouter(client: OpenRouterClient, jobs: list[Job], ledger: Ledger, prices: dict[str, Price],
                   budget_usd: float, max_tokens: int, temperature: float = 0.7,
                   progress: Callable[[int, int], None] | None = None) -> RunReport:
    """Request every job not yet done in the ledger, within the budget. Raises OpenRouterError on a
    failure no retry fixes, after the requests in flight have finished and been recorded."""
    done = ledger.done_keys()
    pending = [j for j in jobs if j.key not in done]
    for job in pending:
        price_for(prices, job.model)  # a missing price is an error before anything is spent
    budget = Budget(budget_usd, spent_usd=ledger.spent_usd())
    stop, report, fatal = threading.Event(), RunReport(), []
    lock = threading.Lock()
    finished = [0]

    def work(job: Job) -> None:
        if stop.is_set():
            return
        try:
            c = client.complete(job.model, messages_for(job.problem, job.strategy), max_tokens=max_tokens,
                                price=price_for(prices, job.model), budget=budget, temperature=temperature, stop=stop,
                                on_send=lambda bound: ledger.append({"type": "inflight", "key": job.key,
                                                                     "model": job.model, "reserved_usd": bound}))
        except Exception as e:  # OpenRouterError (no retry fixes it) or a bug: stop the others, then raise
            fatal.append(e)
            stop.set()
            return
        _record(job, c, ledger, report, lock, stop)
        with lock:
            finished[0] += 1
            if progress:
                progress(finished[0], len(pending))

    with ThreadPoolExecutor(max_workers=client.max_concurrency) as pool:
        list(pool.map(work, pending))
    if fatal:
        raise fatal[0]
    return report


def _record(job: Job, c: Completion, ledger: Ledger, report: RunReport, lock: threading.Lock,
            stop: threading.Event) -> None:
    with lock:
        report.stopped_by_budget |= c.status == "budget"
        report.over_bound += c.over_bound
        report.failed_in_a_row = report.failed_in_a_row + 1 if c.status == "failed" else 0
        if report.failed_in_a_row >= DEAD_API_AFTER:
            report.api_down = f"{c.reason}: {c.detail[:200]}"
    # Stop at the cap; when the provider charges more than the prices allow for (reservations can no
    # longer be trusted); and when the API looks down, rather than retrying every remaining example.
    if c.status == "budget" or c.over_bound or report.api_down:
        stop.set()
    meta = {"attempts": c.attempts, "cost_usd": c.cost_usd, "usage": c.usage, "finish_reason": c.finish_reason}
    if c.status == "ok":
        ledger.append(example_record(job, c.text, "openrouter") | meta)
    elif c.status == "reject":
        ledger.append({"type": "reject", "key": job.key, "model": job.model, "strategy": job.strategy,
                       "index": job.index, "problem_id": job.problem["id"], "task": job.problem["task"],
                       "source": "openrouter", "reason": c.reason, "detail": c.detail, "raw": c.text[:2000]} | meta)
    elif c.cost_usd > 0 or c.status == "failed":
        ledger.append({"type": "failure", "key": job.key, "model": job.model, "strategy": job.strategy,
                       "reason": c.reason, "detail": c.detail} | meta)
    elif c.attempts > 0:  # sent, then stopped or refused without a charge: close its in-flight lines
        ledger.append({"type": "settled", "key": job.key, "reason": c.reason} | meta)


# ----------------------------------------------------------------------------- the dataset
def _dedup_key(record: dict[str, Any]) -> str:
    text = " ".join(record["text"].lower().split())
    return hashlib.sha256(text.encode()).hexdigest()


def assemble(records: list[dict[str, Any]], jobs: list[Job], source: str,
             budget_usd: float | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """(examples, rejects, summary) from the ledger's records for this plan: the last record per key
    wins, examples in plan order, a repeated text kept once (the later copies counted as ``duplicate``)."""
    order = {j.key: i for i, j in enumerate(jobs)}
    final: dict[str, dict[str, Any]] = {}
    failures: Counter = Counter()
    for r in records:
        if r["key"] not in order or r["type"] in ("inflight", "settled"):
            continue
        if r["type"] in ("example", "reject"):
            final[r["key"]] = r
        else:
            failures[r["reason"]] += 1
    examples, rejects, seen = [], [], set()
    for key in sorted(final, key=order.__getitem__):
        r = final[key]
        if r["type"] == "reject":
            rejects.append(r)
            continue
        dk = _dedup_key(r)
        if dk in seen:
            rejects.append(r | {"type": "reject", "reason": "duplicate", "detail": "same text as an earlier example"})
            continue
        seen.add(dk)
        examples.append({k: r[k] for k in ("key", "model", "strategy", "index", "problem_id", "task", "prompt",
                                           "answer", "completion", "text", "source")})
    spent = sum(spent_from([r for r in records if r["key"] in order]))
    summary = {
        "source": source,
        "planned": len(jobs),
        "accepted": len(examples),
        "rejected": len(rejects),
        "pending": len(jobs) - len(final),
        "complete": len(final) == len(jobs),
        "rejects_by_reason": dict(sorted(Counter(r["reason"] for r in rejects).items())),
        "failures_by_reason": dict(sorted(failures.items())),
        "per_strategy": {s: sum(e["strategy"] == s for e in examples) for s in STRATEGIES
                         if any(j.strategy == s for j in jobs)},
        "per_model": dict(sorted(Counter(e["model"] for e in examples).items())),
        "acceptance_rate": len(examples) / len(final) if final else 0.0,
        "spent_usd": round(spent, 6),
        "requests": sum(int(r.get("attempts", 0)) for r in records if r["key"] in order),
    }
    if budget_usd is not None:
        summary["budget_usd"] = budget_usd
    return examples, rejects, summary


def source_label(data_source: str, models: list[str]) -> str:
    return "local" if data_source == "local" else "openrouter:" + ",".join(models)


def write_dataset(out: Path, examples: list[dict[str, Any]], rejects: list[dict[str, Any]],
                  summary: dict[str, Any]) -> None:
    """``examples.jsonl`` (what baking trains on), ``rejects.jsonl`` (key, reason, detail), ``summary.json``."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "examples.jsonl", "w") as f:
        for e in examples:
            f.write(json.dumps(e, sort_keys=True) + "\n")
    with open(out / "rejects.jsonl", "w") as f:
        for r in rejects:
            f.write(json.dumps({k: r.get(k) for k in ("key", "model", "strategy", "reason", "detail")}) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))


def load_examples(dataset_dir: Path) -> list[dict[str, Any]]:
    path = Path(dataset_dir) / "examples.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{dataset_dir} is not a reasoning dataset: no examples.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def heldout_split(examples: list[dict[str, Any]], fraction: float,
                  seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, held-out), split by problem so no held-out problem was trained on under another strategy."""
    def held(e: dict[str, Any]) -> bool:
        h = hashlib.sha256(f"{seed}:{e['problem_id']}".encode()).digest()
        return int.from_bytes(h[:8], "big") / 2 ** 64 < fraction

    return [e for e in examples if not held(e)], [e for e in examples if held(e)]

