"""Phase 3 reasoning data: written offline from the curriculum, or bought from OpenRouter, stored as a
``reasoning-data`` artifact (``examples.jsonl``, ``rejects.jsonl``, ``summary.json``).

OpenRouter runs keep a ledger in a work directory named by what determines the examples (models,
strategies, counts, prompt version, endpoint; not the budget or the retry settings), so a rerun, with
the same or a raised budget, resumes there and never pays twice. The ledger stays after the artifact is
stored: it is the record of what was paid for.

The API key comes from ``$OPENROUTER_API_KEY`` or a Prefect Secret block; it is resolved here, handed to
the client as a ``SecretStr`` and is in no recipe, config, manifest, log line or file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from pydantic import SecretStr

from phases.config import PipelineConfig
from phases.data import dataset_files
from phases.quietstar.reasoning_data import generation, local
from phases.quietstar.reasoning_data.generation import BudgetExhausted, GenerationIncomplete, Ledger, usd
from phases.quietstar.reasoning_data.openrouter import OpenRouterClient, OpenRouterError, Price, resolve_base_url
from storage import ArtifactRef, Recipe
from tasks.code_version import code_version
from tasks.runtime import create, recipe_cache, store, work_dir

# The paid-for ledger is named by the content and the prompt's own version, not the whole package's
# code version: a change elsewhere in phases/quietstar must never make a rerun buy the examples again.
LEDGER_VERSION = f"1.prompt{generation.PROMPT_VERSION}"  # the value ledgers were first named with


def content_config(config: PipelineConfig, base_url: str | None) -> dict[str, Any]:
    """What determines the examples (and so names the ledger's work directory). Its keys and values must
    stay as they are: a changed dict names a new directory, and a rerun would buy the examples again."""
    q = config.quietstar.data
    content = {"source": q.source, "strategies": q.strategies, "examples_per_pair": q.examples_per_pair,
               "max_prompt_chars": q.max_prompt_chars, "seed": config.seed}
    if q.source == "openrouter":
        content |= {"models": q.models, "max_tokens": q.max_tokens, "temperature": q.temperature, "base_url": base_url}
    return content


def api_key(block_name: str) -> SecretStr:
    """``$OPENROUTER_API_KEY``, else the Prefect Secret block ``block_name``."""
    value = os.environ.get("OPENROUTER_API_KEY", "").strip()
    if value:
        return SecretStr(value)
    from prefect.blocks.system import Secret

    try:
        secret = Secret.load(block_name, _sync=True).get()
    except Exception as e:  # a missing block is a ValueError; no key text can be in it
        raise OpenRouterError(
            f"no OpenRouter API key: set OPENROUTER_API_KEY, or create a Prefect Secret block named {block_name!r} "
            f"(lookup failed: {type(e).__name__}), or use quietstar.data.source=local") from None
    return SecretStr(str(secret))


def _base_url(config: PipelineConfig) -> str | None:
    """The effective endpoint ($OPENROUTER_BASE_URL is not a task input): data from a test server must
    never be returned for a run aimed at OpenRouter."""
    q = config.quietstar.data
    return resolve_base_url(q.openrouter_base_url) if q.source == "openrouter" else None


def reasoning_data_recipe(config: PipelineConfig, curriculum: ArtifactRef) -> Recipe:
    q = config.quietstar.data
    spend = {"budget_usd": q.budget_usd, "accept_partial": q.accept_partial} if q.source == "openrouter" else {}
    return Recipe(kind="reasoning-data", inputs=(curriculum.id,), config=content_config(config, _base_url(config)) | spend,
                  code_version=code_version("phases.quietstar"))


@task(name="quietstar-data", cache_policy=recipe_cache(reasoning_data_recipe), persist_result=True)
def generate_reasoning_data(config: PipelineConfig, curriculum: ArtifactRef, home: str) -> ArtifactRef:
    logger = get_run_logger()
    st = store(home)
    q = config.quietstar.data
    openrouter = q.source == "openrouter"
    base_url = _base_url(config)
    content = content_config(config, base_url)
    recipe = reasoning_data_recipe(config, curriculum)
    # keyed by the content alone, so a raised budget resumes the same ledger
    work = work_dir(home, Recipe(kind="reasoning-data", inputs=(curriculum.id,), config=content,
                                 code_version=LEDGER_VERSION))

    def build(out: Path) -> dict[str, Any]:
        rows = dataset_files.load_splits(st.load(curriculum))["train"]
        problems = generation.checkable_problems(rows, q.max_prompt_chars)
        if openrouter:
            examples, rejects, summary = _from_openrouter(config, problems, base_url, work, logger)
        else:
            examples, rejects, summary = local.generate(problems, q.strategies, q.examples_per_pair, config.seed)
        if not examples:
            raise GenerationIncomplete(
                f"no example passed validation; rejects by reason: {summary['rejects_by_reason']}")
        generation.write_dataset(out, examples, rejects, summary)
        logger.info("reasoning data (%s): %d accepted of %d planned, rejects %s, spent %s", summary["source"],
                    summary["accepted"], summary["planned"], summary["rejects_by_reason"], usd(summary["spent_usd"]))
        return summary

    return create(home, recipe, "quietstar-data", build)


def _from_openrouter(config: PipelineConfig, problems: list[dict[str, Any]], base_url: str, work: Path, logger):
    q = config.quietstar.data
    jobs = generation.plan(q.models, q.strategies, q.examples_per_pair, problems, config.seed)
    ledger = Ledger(work / "ledger.jsonl")
    prices = {m: Price(*q.prices[m]) for m in q.models}
    done = ledger.done_keys()
    pending = [j for j in jobs if j.key not in done]
    est = generation.estimate(pending, prices, q.max_tokens)
    spent, unaccounted = ledger.spent_usd(), ledger.unaccounted_usd()
    logger.info("dry run: %d of %d planned requests still to make; worst case %s (%s); already spent %s of the %s "
                "cap", len(pending), len(jobs), usd(est["worst_case_usd"]),
                ", ".join(f"{m} {usd(c)}" for m, c in est["per_model_usd"].items()), usd(spent), usd(q.budget_usd))
    if unaccounted:
        logger.warning("%s of that is the worst case of requests an earlier run left in flight (killed before their "
                       "answers were recorded): counted as spent, since they may have been billed", usd(unaccounted))
    if spent + est["worst_case_usd"] > q.budget_usd:
        logger.warning("the worst case passes the cap: the run stops at %s unless completions stay shorter than "
                       "data.max_tokens", usd(q.budget_usd))
    step = max(1, len(pending) // 10)

    def progress(finished: int, total: int) -> None:
        if finished % step == 0 or finished == total:
            logger.info("reasoning data: %d/%d requests finished", finished, total)

    with OpenRouterClient(api_key(q.openrouter_key_block), base_url, timeout_s=q.timeout_s,
                          max_retries=q.max_retries, backoff_s=q.backoff_s,
                          backoff_max_s=q.backoff_max_s, max_concurrency=q.max_concurrency,
                          seed=config.seed) as client:
        report = generation.run_openrouter(client, jobs, ledger, prices, q.budget_usd, q.max_tokens,
                                           q.temperature, progress)
        sent = client.requests_sent
    examples, rejects, summary = generation.assemble(ledger.records, jobs,
                                                     generation.source_label("openrouter", q.models),
                                                     q.budget_usd)
    summary |= {"requests_this_run": sent, "worst_case_estimate_usd": round(est["worst_case_usd"], 6)}
    if report.over_bound:
        raise OpenRouterError(f"{report.over_bound} responses cost more than data.prices allow for; the run stopped "
                              f"at {usd(summary['spent_usd'])}: raise the prices for {q.models} and rerun")
    if not summary["complete"]:
        where = f"{len(jobs) - summary['pending']} finished examples are kept in {ledger.path}"
        if report.stopped_by_budget and not q.accept_partial:
            raise BudgetExhausted(f"the {usd(q.budget_usd)} budget stopped the run with {summary['pending']} of "
                                  f"{len(jobs)} examples to go (spent {usd(summary['spent_usd'])}); {where}. Raise "
                                  "quietstar.data.budget_usd to resume, or set quietstar.data.accept_partial to keep what exists")
        if report.api_down:
            raise GenerationIncomplete(f"OpenRouter at {base_url} looks down: {generation.DEAD_API_AFTER} examples "
                                       f"in a row failed after retries (last: {report.api_down}); {where}; rerun "
                                       "to resume")
        if not report.stopped_by_budget:
            raise GenerationIncomplete(f"{summary['pending']} examples still failed after retries "
                                       f"({summary['failures_by_reason']}); {where}; rerun to resume")
        logger.warning("budget reached: storing %d examples, %d still pending (data.accept_partial)",
                       summary["accepted"], summary["pending"])
    return examples, rejects, summary
