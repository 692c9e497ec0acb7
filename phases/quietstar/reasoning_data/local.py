"""Offline reasoning data: strategy-tagged thoughts written from the curriculum's own problems.

No model writes these: each thought is derived from a problem's verified program, so every arithmetic
step in a thought is true (each is recomputed with ``safe_eval``) and the final answer is the
curriculum's (recomputed by ``curriculum.verify``). The strategies differ in what they add around the
steps: a category split (mece), a refuted wrong answer (falsify), an inverse check (orthogonal), a
wrong step caught and fixed (correct), and so on. Deterministic: the same problems, strategies and seed
give the same examples, byte for byte.
"""

from __future__ import annotations

import ast
import json
import random
import re
from typing import Any

from phases.data.curriculum import safe_eval
from phases.quietstar.reasoning_data.generation import Job, assemble, example_record, plan
from phases.quietstar.tokens import format_completion

_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*"}
_INVERSE = {"+": "-", "-": "+", "*": "/"}
_SYMBOL = {"add": "+", "sub": "-", "mul": "*"}


def _expr_steps(expr: str) -> list[str]:
    """``a op b = c`` for every operation of ``expr``, innermost first (Python's precedence)."""
    steps: list[str] = []

    def ev(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.BinOp):
            left, right = ev(node.left), ev(node.right)
            value = safe_eval(f"({left}) {_OPS[type(node.op)]} ({right})")
            steps.append(f"{left} {_OPS[type(node.op)]} {right} = {value}")
            return value
        if isinstance(node, ast.UnaryOp):
            return -ev(node.operand)
        return node.value

    ev(ast.parse(expr, mode="eval"))
    return steps


def _story_steps(program: list) -> list[str]:
    """``count op value = new count`` for each step of a story's verified program (the curriculum's text works
    each one out column by column; a thought states it whole): the program as one expression, applied in order."""
    expr = ""
    for op, value in program:
        expr = str(value) if op == "start" else f"({expr}) {_SYMBOL[op]} {value}"
    return _expr_steps(expr)


def facts(problem: dict[str, Any]) -> dict[str, Any]:
    """What the thoughts are made of: the steps, the numbers given, what is asked."""
    prog = json.loads(problem["program"] or "{}")
    question = problem["prompt"].rsplit("Question:", 1)[-1].replace("Answer:", "").strip()
    if problem["task"] == "arithmetic":
        steps = _expr_steps(prog["expr"])
        asked = f"the value of {prog['expr']}"
    elif problem["task"] == "word_problem":
        steps = _story_steps(prog["steps"])
        asked = question.rsplit(".", 1)[-1].strip().rstrip("?").lower() if "." in question else question
    elif problem["task"] == "kv_recall":
        key = prog["key"]
        values = re.findall(rf"code for {re.escape(key)} (?:is|changed to) (\d+)\.", problem["prompt"])
        steps = [f"{key} is {values[0]}"] + [f"{key} changed to {v}" for v in values[1:]]
        asked = f"the last code for {key}"
    else:
        raise ValueError(f"no thoughts for task {problem['task']!r}")
    given = re.findall(r"\d+", problem["prompt"].split("\nQuestion:")[0] if problem["task"] == "kv_recall"
                       else question)
    return {"task": problem["task"], "steps": steps, "answer": problem["answer"], "asked": asked,
            "given": given, "prompt": problem["prompt"]}


def _wrong(f: dict[str, Any], rng: random.Random) -> str:
    """A plausible wrong answer: another code from the passage, or the answer off by a little."""
    if f["task"] == "kv_recall":
        others = sorted({n for n in f["given"] if n != f["answer"]})
        if others:
            return rng.choice(others)
    return str(int(f["answer"]) + rng.choice([-10, -2, -1, 1, 2, 10]))


def _undo(step: str) -> str | None:
    """``a op b = c`` -> ``c inverse b = a``; None where the inverse is not exact."""
    m = re.fullmatch(r"(-?\d+) ([+*-]) (-?\d+) = (-?\d+)", step)
    if not m:
        return None
    a, op, b, c = m.groups()
    if op == "*" and int(b) == 0:
        return None
    return f"{c} {_INVERSE[op]} {b} = {a}"


def _steps(f: dict[str, Any]) -> list[tuple[str, str]]:
    return [("step", s) for s in f["steps"]]


def thoughts_for(strategy: str, f: dict[str, Any], rng: random.Random) -> list[tuple[str, str]]:
    """The thoughts of one example: the strategy's own block(s) around the problem's true steps."""
    ans, steps, last = f["answer"], _steps(f), f["steps"][-1]
    kv = f["task"] == "kv_recall"
    given = ", ".join(f["given"][:8])
    if strategy == "step":
        return steps
    if strategy == "mece":
        split = f"given: {given}; asked: {f['asked']}" if not kv else \
            f"codes for other names: ignore; codes for {f['asked'].split()[-1]}: {len(f['steps'])}"
        return [("mece", split), *steps]
    if strategy == "falsify":
        wrong = _wrong(f, rng)
        why = f"{last.rsplit(' = ', 1)[0]} is {ans}, not {wrong}" if not kv else \
            f"{wrong} is not the last code given for {f['asked'].split()[-1]}"
        return [*steps, ("falsify", f"test {wrong}: {why}")]
    if strategy == "expert":
        who = {"arithmetic": rng.choice(["a mathematician does * before + and -", "a calculator works inside out"]),
               "word_problem": rng.choice(["a shopkeeper updates the count after each change",
                                           "a bookkeeper applies each change in order"]),
               "kv_recall": rng.choice(["an archivist trusts the latest record", "a clerk reads the last update"])}
        return [("expert", who[f["task"]]), *steps]
    if strategy == "orthogonal":
        undo = _undo(last)
        check = f"undo the last step: {undo}" if undo else f"read it again: {ans}"
        return [*steps, ("orthogonal", check)]
    if strategy == "doubt":
        worry = "did a later line change it? " + ("yes" if len(f["steps"]) > 1 else "no") if kv else \
            f"did I use every number? {given}: yes"
        return [*steps, ("doubt", worry)]
    if strategy == "bayesian":
        prior = f["given"][0] if f["given"] else "unknown"
        return [("bayesian", f"prior: near {prior}"), *steps, ("bayesian", f"posterior: {ans}")]
    if strategy == "multidomain":
        view = "as a database: the newest write wins" if kv else \
            rng.choice(["as a ledger: each step is a credit or a debit", "as algebra: the steps compose"])
        return [("multidomain", view), *steps]
    if strategy == "correct":
        # One step first written with a slip, then fixed: the pattern the <correct> tag teaches.
        i = rng.randrange(len(steps))
        slip_at = steps[i][1]
        if kv:
            slipped = f"{slip_at.rsplit(' ', 1)[0]} {_wrong(f, rng)}"
        else:
            lhs, rhs = slip_at.rsplit(" = ", 1)
            slipped = f"{lhs} = {int(rhs) + rng.choice([-2, -1, 1, 2])}"
        return [*steps[:i], ("step", slipped), ("correct", f"no: {slip_at}"), *steps[i + 1:]]
    if strategy == "uncertain":
        basis = "the passage states it" if kv else "every step is exact integer arithmetic"
        return [*steps, ("uncertain", f"high confidence: {basis}")]
    raise ValueError(f"unknown strategy {strategy!r}")


def generate(problems: list[dict[str, Any]], strategies: list[str], per_strategy: int,
             seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """(examples, rejects, summary) for ``strategies`` × ``per_strategy`` examples, model ``local``;
    every example goes through the same validation and dedup as the OpenRouter path."""
    jobs = plan(["local"], strategies, per_strategy, problems, seed)
    records = [example_record(job, local_completion(job, seed), "local") for job in jobs]
    return assemble(records, jobs, "local")


def local_completion(job: Job, seed: int) -> str:
    rng = random.Random(f"quietstar-local:{seed}:{job.key}")
    return format_completion(thoughts_for(job.strategy, facts(job.problem), rng), job.problem["answer"])
