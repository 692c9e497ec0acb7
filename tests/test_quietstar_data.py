"""Phase 3 reasoning data: the token structure and its validation, dedup, the local generator, and the
OpenRouter client against a real HTTP server on 127.0.0.1 with scripted faults (429, 500, timeout,
malformed JSON, truncation, budget exhaustion): nothing finished is lost, the cap holds, a rerun resumes
without asking again. The API key is looked for in logs, files, the artifact and a W&B offline run."""

from __future__ import annotations

import asyncio
import json
import logging
import re

import pytest
from fake_openrouter import FakeOpenRouter

from phases.data import curriculum, dataset_files
from phases.data import tokenizer as bpe
from phases.quietstar.reasoning_data import generation, local
from phases.quietstar.reasoning_data.generation import Ledger
from phases.quietstar.reasoning_data.openrouter import OpenRouterClient, OpenRouterError, Price, prompt_token_bound
from phases.quietstar.tokens import (
    SPECIAL_TOKENS,
    STRATEGIES,
    format_completion,
    parse_thinking,
    structure_tokens,
    validate,
)

KEY = "sk-or-v1-TESTKEY-0123456789abcdef-do-not-leak"
PRICE = {"fake/model-a": Price(1.0, 2.0), "fake/model-b": Price(0.5, 1.0)}


@pytest.fixture(scope="module")
def problems():
    splits = curriculum.generate(train_per_stage=120, eval_per_stage=5, seed=3)
    return generation.checkable_problems(splits["train"], max_prompt_chars=240)


@pytest.fixture
def server(problems):
    by_question = {generation.question_of(p): p["answer"] for p in problems}

    def answer_for(user: str) -> str:
        return next(a for q, a in by_question.items() if user.endswith(q))

    with FakeOpenRouter(KEY, answer_for) as s:
        yield s


def _client(server, **kw):
    opts = {"timeout_s": 5.0, "max_retries": 2, "backoff_s": 0.01, "backoff_max_s": 5.0, "max_concurrency": 1} | kw
    return OpenRouterClient(KEY, server.base_url, **opts)


def _bound(job, max_tokens=64):
    return PRICE[job.model].cost(prompt_token_bound(generation.messages_for(job.problem, job.strategy)), max_tokens)


# ----------------------------------------------------------------------------- structure and validation
def test_twelve_special_tokens_and_closers_stay_separate_in_a_bpe():
    assert len(SPECIAL_TOKENS) == 12 == len(set(SPECIAL_TOKENS))
    assert SPECIAL_TOKENS[:2] == ["[thinking]", "[/endthinking]"] and len(STRATEGIES) == 10
    tok = bpe.train_bpe(["Question: What is 2 + 3?\nAnswer: 5", "the step was slow"] * 20, 300, 1)
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    text = "Answer: [thinking]<step>2 + 3 = 5</step><doubt>sure</doubt>[/endthinking] 5"
    pieces = tok.convert_ids_to_tokens(tok.encode(text))
    for t in ("[thinking]", "<step>", "<doubt>", "[/endthinking]"):
        assert pieces.count(t) == 1  # one token each
    assert "</step>" not in pieces and tok.decode(tok.encode(text)) == text  # closers are plain text


@pytest.mark.parametrize("completion,reason", [
    ("[thinking]<step>2 + 3 = 5</step>[/endthinking] 5", "ok"),
    ("[thinking]<step>2 + 3 = 5[/endthinking] 5", "unbalanced_tags"),
    ("[thinking]<step>2 + 3 = 5</doubt>[/endthinking] 5", "unbalanced_tags"),
    ("[thinking]<step>2 + 3 = 5</step> 5", "unbalanced_tags"),
    ("[thinking]<step>a<doubt>b</doubt></step>[/endthinking] 5", "nested_tags"),
    ("[thinking]<think>2 + 3 = 5</think>[/endthinking] 5", "unknown_strategy"),
    ("[thinking]<step>2 + 3 = 5</step>[/endthinking]", "missing_answer"),
    ("[thinking]<step>2 + 3 = 5</step>[/endthinking] Final answer:  ", "missing_answer"),
    ("[thinking]<step>2 + 3 = 5</step>[/endthinking] 6", "wrong_answer"),
    ("[thinking]<doubt>fine</doubt>[/endthinking] 5", "strategy_not_used"),
    ("Sure! [thinking]<step>x</step>[/endthinking] 5", "text_before_thinking"),
    ("[thinking]so <step>x</step>[/endthinking] 5", "untagged_thought"),
    ("[thinking]<step> </step>[/endthinking] 5", "empty_thought"),
    ("just 5", "no_thinking_block"),
])
def test_validation_names_the_broken_rule(completion, reason):
    ok, got = validate({"strategy": "step", "completion": completion, "answer": "5"})
    assert (ok, got) == (reason == "ok", reason)


def test_unknown_strategy_and_answer_prefix_and_structure_tokens():
    assert validate({"strategy": "vibes", "completion": "[thinking]<step>x</step>[/endthinking] 5"}) == \
        (False, "unknown_strategy")
    parsed = parse_thinking("[thinking]<step>3 < 5 holds</step>[/endthinking] Final answer: 5")
    assert parsed.problem is None and parsed.answer == "5" and parsed.thoughts == [("step", "3 < 5 holds")]
    text = format_completion([("mece", "a; b"), ("step", "2 + 3 = 5")], "5")
    assert structure_tokens("Q: 2 + 3? " + text) == ["[thinking]", "<mece>", "</mece>", "<step>", "</step>",
                                                      "[/endthinking]"]


def test_duplicates_are_kept_once_and_counted(problems):
    jobs = generation.plan(["m"], ["step"], 3, problems, seed=0)
    completion = "[thinking]<step>I add.</step>[/endthinking] {}"
    recs = [generation.example_record(j, completion.format(j.problem["answer"]), "test") for j in jobs]
    recs[2] = recs[0] | {"key": jobs[2].key, "index": 2}  # the same text under another key
    examples, rejects, summary = generation.assemble(recs, jobs, "test")
    assert [e["key"] for e in examples] == [jobs[0].key, jobs[1].key]
    assert summary["rejects_by_reason"] == {"duplicate": 1} and summary["complete"]


def test_heldout_split_keeps_each_problem_on_one_side(problems):
    examples, _, _ = local.generate(problems, list(STRATEGIES), 20, seed=0)
    train, held = generation.heldout_split(examples, 0.2, seed=0)
    assert len(train) + len(held) == len(examples) and 0.1 < len(held) / len(examples) < 0.3
    assert not {e["problem_id"] for e in train} & {e["problem_id"] for e in held}
    assert (train, held) == generation.heldout_split(examples, 0.2, seed=0)


# ----------------------------------------------------------------------------- local generator
def test_local_generator_is_deterministic_true_and_checkable(problems):
    a = local.generate(problems, list(STRATEGIES), 6, seed=11)
    assert a == local.generate(problems, list(STRATEGIES), 6, seed=11)
    assert a[0] != local.generate(problems, list(STRATEGIES), 6, seed=12)[0]
    examples, rejects, summary = a
    assert summary["source"] == "local" and summary["accepted"] == 60 and not rejects
    assert summary["per_strategy"] == {s: 6 for s in STRATEGIES}
    by_id = {p["id"]: p for p in problems}
    for e in examples:
        assert validate(e) == (True, "ok")
        assert e["answer"] == by_id[e["problem_id"]]["answer"] and curriculum.verify(by_id[e["problem_id"]])
        thoughts = parse_thinking(e["completion"]).thoughts
        for i, (tag, text) in enumerate(thoughts):  # every arithmetic step is true, except a slip fixed next
            for lhs, rhs in re.findall(r"(-?\d+ [-+*] -?\d+) = (-?\d+)", text):
                slip = i + 1 < len(thoughts) and thoughts[i + 1][0] == "correct"
                assert (curriculum.safe_eval(lhs) == int(rhs)) != slip or tag != "step", (e["key"], text)


# ----------------------------------------------------------------------------- OpenRouter fault matrix
FAULTS = {
    # fault: (script, final ledger record types per job, pending after run 1, expected reject reason)
    "429": (["ok", "429", "ok"], 0, None),
    "500": (["ok", "500", "500", "ok"], 0, None),
    "slow": (["ok", "slow", "slow", "slow"], 1, None),
    "malformed": (["ok", "malformed"], 0, "malformed_json"),
    "truncated": (["ok", "truncated"], 0, "truncated"),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_fault_keeps_work_holds_budget_and_resumes(fault, server, problems, tmp_path):
    script, pending_after_first, reject = FAULTS[fault]
    server.script = list(script)
    server.slow_s = 1.0
    jobs = generation.plan(["fake/model-a"], ["step", "doubt"], 2, problems, seed=0)
    cap = 10 * sum(_bound(j) for j in jobs)
    ledger = Ledger(tmp_path / "ledger.jsonl")
    with _client(server, timeout_s=0.3) as client:
        generation.run_openrouter(client, jobs, ledger, PRICE, cap, max_tokens=64)
    first = (tmp_path / "ledger.jsonl").read_text().splitlines()
    assert len(ledger.done_keys()) == len(jobs) - pending_after_first
    assert 0 < ledger.spent_usd() <= cap
    if reject:
        assert [r["reason"] for r in ledger.records if r["type"] == "reject"] == [reject]
        assert any(r["type"] == "reject" and r["cost_usd"] > 0 for r in ledger.records)  # paid, counted
    if fault == "429":  # the retry waited for Retry-After (1 s), not the 0.01 s backoff
        t = [r["at"] for r in server.requests]
        assert t[2] - t[1] >= 0.9
    if fault == "slow":  # each timed-out attempt is charged at its bound: it may have been billed
        failure = next(r for r in ledger.records if r["type"] == "failure")
        assert failure["reason"] == "timeout" and failure["cost_usd"] == pytest.approx(3 * _bound(jobs[1]))
    asked_first = len(server.requests)

    # A rerun (a new process would re-read the same file) asks only for what is not done.
    ledger2 = Ledger(tmp_path / "ledger.jsonl")
    with _client(server) as client:
        generation.run_openrouter(client, jobs, ledger2, PRICE, cap, max_tokens=64)
        assert client.requests_sent == pending_after_first
    assert (tmp_path / "ledger.jsonl").read_text().splitlines()[:len(first)] == first  # nothing lost
    assert len(server.requests) == asked_first + pending_after_first
    examples, rejects, summary = generation.assemble(ledger2.records, jobs, "openrouter:fake/model-a", cap)
    assert summary["complete"] and summary["accepted"] == len(jobs) - (reject is not None)
    assert summary["spent_usd"] <= cap and summary["rejects_by_reason"] == ({reject: 1} if reject else {})
    assert all(validate(e) == (True, "ok") for e in examples)


def test_budget_cap_is_never_passed_and_a_raised_cap_resumes(server, problems, tmp_path):
    jobs = generation.plan(["fake/model-a", "fake/model-b"], ["step", "mece", "falsify"], 2, problems, seed=1)
    bounds = {j.key: _bound(j, 128) for j in jobs}
    server.script = ["worst"] * len(jobs)  # every answer costs exactly its reservation
    cap = sum(sorted(bounds.values())[:5]) * 0.999  # room for fewer than 5 of 12 requests
    ledger = Ledger(tmp_path / "ledger.jsonl")
    with _client(server, max_concurrency=3) as client:
        report = generation.run_openrouter(client, jobs, ledger, PRICE, cap, max_tokens=128)
    assert report.stopped_by_budget and 0 < len(ledger.done_keys()) < 5
    assert ledger.spent_usd() <= cap
    with _client(server) as client:  # same cap: nothing fits, nothing is sent
        generation.run_openrouter(client, jobs, Ledger(tmp_path / "ledger.jsonl"), PRICE, cap, max_tokens=128)
        assert client.requests_sent == 0
    big = sum(bounds.values()) * 2
    ledger3 = Ledger(tmp_path / "ledger.jsonl")
    with _client(server, max_concurrency=3) as client:
        report = generation.run_openrouter(client, jobs, ledger3, PRICE, big, max_tokens=128)
    assert not report.stopped_by_budget and ledger3.done_keys() == {j.key for j in jobs}
    assert len(server.asked()) == len(set(server.asked())) == len(jobs)  # no example was paid for twice
    assert ledger3.spent_usd() == pytest.approx(sum(bounds.values()))


def test_a_provider_charging_above_the_prices_stops_the_run(server, problems, tmp_path):
    jobs = generation.plan(["fake/model-a"], ["step"], 4, problems, seed=2)
    server.script = ["overcharge"]
    ledger = Ledger(tmp_path / "ledger.jsonl")
    with _client(server) as client:
        report = generation.run_openrouter(client, jobs, ledger, PRICE, 100.0, max_tokens=64)
    assert report.over_bound == 1 and len(server.requests) == 1 and ledger.spent_usd() == pytest.approx(1.0)


def test_a_torn_ledger_line_is_dropped_and_the_rest_kept(tmp_path):
    path = tmp_path / "ledger.jsonl"
    path.write_text(json.dumps({"type": "example", "key": "m|step|0", "cost_usd": 0.5}) + "\n" + '{"type": "exa')
    ledger = Ledger(path)
    assert ledger.done_keys() == {"m|step|0"} and ledger.spent_usd() == 0.5
    ledger.append({"type": "reject", "key": "m|step|1", "cost_usd": 0.25})
    assert [json.loads(line)["key"] for line in path.read_text().splitlines()] == ["m|step|0", "m|step|1"]


def test_a_refused_key_fails_fast_without_showing_it(server, problems, tmp_path, caplog):
    jobs = generation.plan(["fake/model-a"], ["step"], 3, problems, seed=0)
    server.script = ["echo401"]
    with caplog.at_level(logging.DEBUG), _client(server) as client, pytest.raises(OpenRouterError) as err:
        generation.run_openrouter(client, jobs, Ledger(tmp_path / "l.jsonl"), PRICE, 1.0, max_tokens=64)
    assert "401" in str(err.value) and "[REDACTED]" in str(err.value)
    assert KEY not in str(err.value) and KEY not in repr(client) and KEY not in caplog.text
    assert len(server.requests) == 1  # not retried, not repeated for the other examples


def test_a_dead_api_stops_the_run_instead_of_retrying_every_example(server, problems, tmp_path):
    jobs = generation.plan(["fake/model-a"], ["step"], generation.DEAD_API_AFTER + 5, problems, seed=0)
    server.script = ["500"] * 100
    ledger = Ledger(tmp_path / "l.jsonl")
    with _client(server, max_retries=0) as client:
        report = generation.run_openrouter(client, jobs, ledger, PRICE, 1.0, max_tokens=64)
    assert report.api_down.startswith("http_500") and len(server.requests) == generation.DEAD_API_AFTER
    assert not ledger.done_keys() and ledger.spent_usd() == 0  # a 500 is not billed


def test_missing_price_is_an_error_before_spending(server, problems, tmp_path):
    jobs = generation.plan(["unpriced/model"], ["step"], 1, problems, seed=0)
    with _client(server) as client, pytest.raises(ValueError, match="no price for model 'unpriced/model'"):
        generation.run_openrouter(client, jobs, Ledger(tmp_path / "l.jsonl"), PRICE, 1.0, max_tokens=64)
    assert not server.requests


# ----------------------------------------------------------------------------- the Prefect task
def test_task_resumes_after_the_cap_and_never_leaks_the_key(prefect_harness, problems, server, home, monkeypatch,
                                                            caplog, capsys):
    from prefect import flow
    from prefect.blocks.system import Secret

    from phases.common.gates import GateReport
    from phases.config import PipelineConfig
    from storage import ArtifactStore, Recipe
    from tasks.quietstar_data import api_key, generate_reasoning_data
    from tasks.tracking import log_phase_boundary

    monkeypatch.delenv("OPENROUTER_API_KEY", raising=False)
    monkeypatch.setenv("OPENROUTER_BASE_URL", server.base_url)
    with pytest.raises(OpenRouterError, match="no OpenRouter API key: set OPENROUTER_API_KEY"):
        api_key("no-such-block")
    Secret(value=KEY).save("openrouter-api-key", overwrite=True)
    st = ArtifactStore(home)
    splits = curriculum.generate(train_per_stage=120, eval_per_stage=5, seed=3)
    cur = st.get_or_create(Recipe(kind="curriculum", config={"test": 1}),
                           lambda out: {"rows": dataset_files.save_splits(splits, out)})
    data = {"source": "openrouter", "models": list(PRICE), "strategies": ["step", "bayesian"],
            "examples_per_pair": 2, "prices": {m: list(p) for m, p in PRICE.items()},
            "max_tokens": 64, "backoff_s": 0.01, "timeout_s": 5.0, "max_concurrency": 1}
    jobs = generation.plan(list(PRICE), ["step", "bayesian"], 2, generation.checkable_problems(splits["train"], 240), 0)
    small_cap = sum(sorted(_bound(j) for j in jobs)[:3])

    @flow
    def make(config, home):
        return generate_reasoning_data(config, cur, home)

    server.script, server.retry_after = ["429", "malformed"], "0"  # the wait itself is tested above
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(generation.BudgetExhausted, match=r"Raise quietstar\.data\.budget_usd"):
            make(PipelineConfig.from_preset("tiny", quietstar={"data": data | {"budget_usd": small_cap}}), str(home))
        first = len(server.requests)
        monkeypatch.setenv("OPENROUTER_API_KEY", KEY)
        config = PipelineConfig.from_preset("tiny", quietstar={"data": data | {"budget_usd": 5.0}})
        ref = make(config, str(home))
    assert len(set(server.asked())) == len(jobs) and len(server.requests) == len(jobs) + 1  # one 429 retry
    assert first < len(server.requests)
    manifest = st.manifest(ref)
    m = manifest["metrics"]
    assert ref.kind == "reasoning-data" and m["source"] == "openrouter:fake/model-a,fake/model-b"
    assert m["complete"] and m["accepted"] == len(jobs) - 1 and m["rejects_by_reason"] == {"malformed_json": 1}
    assert 0 < m["spent_usd"] <= 5.0 and m["requests_this_run"] < len(jobs)
    assert len(generation.load_examples(st.load(ref))) == m["accepted"]

    # W&B offline run of the phase boundary with this config and these metrics
    monkeypatch.setenv("WANDB_MODE", "offline")
    gates = GateReport(phase="quietstar", mode="lenient")
    gates.add("reasoning_data", "examples accepted", m["accepted"], ">=", 1)

    @flow
    def track():
        return log_phase_boundary("quietstar", "group1", str(home), "offline", "agent-forge",
                                  config.model_dump(mode="json"), m, gates, [ref])

    wandb_dir = track()
    assert wandb_dir and str(home) in wandb_dir

    logs = asyncio.run(_prefect_logs())
    assert any("dry run:" in line for line in logs)  # the estimate came before the spending
    out = capsys.readouterr()
    haystacks = {"caplog": caplog.text, "stdout": out.out, "stderr": out.err, "prefect logs": "\n".join(logs),
                 "manifest": json.dumps(manifest)}
    files = [p for p in home.rglob("*") if p.is_file()]
    assert any(p.name == "examples.jsonl" for p in files) and any("wandb" in p.parts for p in files)
    assert any(p.name == "ledger.jsonl" for p in files)
    for p in files:
        haystacks[str(p)] = p.read_bytes().decode("latin-1")
    leaks = [where for where, text in haystacks.items() if KEY in text or KEY[10:30] in text]
    assert not leaks, f"the API key appears in {leaks}"


async def _prefect_logs() -> list[str]:
    from prefect.client.orchestration import get_client

    # every log of the session's API (other tests share it), page by page: the newest may be past the first page
    messages: list[str] = []
    async with get_client() as client:
        while page := await client.read_logs(limit=200, offset=len(messages)):
            messages += [log.message for log in page]
    return messages


def test_a_killed_run_counts_its_requests_in_flight_and_pays_twice_only_for_what_the_ledger_shows(server, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import openrouter_worker as worker

    here = Path(__file__).parent
    jobs = worker.jobs()
    cap = 10 * sum(_bound(j) for j in jobs)
    server.slow_s = 30.0
    server.script = ["ok", "ok", "slow", "slow", "slow", "slow"]  # two answer, then four hang in flight
    path = tmp_path / "ledger.jsonl"
    env = dict(os.environ, PYTHONPATH=f"{here.parent}:{here}")
    proc = subprocess.Popen([sys.executable, str(here / "openrouter_worker.py"), server.base_url, str(path), str(cap)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and sum(r["behaviour"] == "slow" for r in server.requests) < 4:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    ledger = Ledger(path)
    finished = ledger.done_keys()
    in_flight = {r["key"] for r in ledger.records if r["type"] == "inflight"} - finished
    assert len(finished) == 2 and len(in_flight) == 4
    reserved = sum(_bound(j) for j in jobs if j.key in in_flight)
    assert ledger.unaccounted_usd() == pytest.approx(reserved)  # the worst case of what may have been billed
    assert ledger.spent_usd() == pytest.approx(sum(r.get("cost_usd", 0.0) for r in ledger.records) + reserved)

    server.slow_s, server.script = 0.0, []
    with _client(server, max_concurrency=2) as client:
        generation.run_openrouter(client, jobs, ledger, PRICE, cap, max_tokens=64)
    assert ledger.done_keys() == {j.key for j in jobs} and ledger.unaccounted_usd() == pytest.approx(reserved)
    prompt_of = {generation.messages_for(j.problem, j.strategy)[-1]["content"]: j.key for j in jobs}
    asked = [prompt_of[user] for _, user in server.asked()]
    paid_twice = {k for k in asked if asked.count(k) > 1}
    assert paid_twice == in_flight  # re-sent: exactly the requests the ledger counts as possibly billed
    assert generation.usd(0.003) == "$0.0030" and generation.usd(200) == "$200.00"
