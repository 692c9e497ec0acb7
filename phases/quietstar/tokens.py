"""The Phase 3 thinking structure: 12 special tokens, the text layout built from them, and its checks.

Layout of one completion (what follows a problem's prompt)::

    [thinking]<step>17 + 5 = 22</step><doubt>did 5 leave or arrive? it arrived</doubt>[/endthinking] 22

The thinking structure has **12 special tokens** (not 16, and not ``<think>``): the outer pair
``[thinking]`` / ``[/endthinking]`` and the ten strategy tags ``<step> … <uncertain>``; each strategy tag is
also closed (``<step>…</step>``). Twelve tokens cannot hold 2 + 10 + 10 distinct markers, so:

* the 12 tokens added to the tokenizer (``SPECIAL_TOKENS``) are the 2 outer markers and the 10 OPENING tags,
  so a GPT-2 vocabulary of 50,257 grows to 50,269;
* closing tags (``</step>`` …) are plain text: the BPE splits each into a few ordinary tokens. A byte-level
  BPE never merges across an added token's boundary, and ``</step>`` does not contain ``<step>``, so the two
  never collide. Which strategy a closer ends is already fixed by its opener (tags do not nest), so a
  closer carries no information a model must learn beyond "the thought ends here".
* A faithful one-token-per-marker vocabulary would need 22 tokens: ``SPECIAL_TOKENS + CLOSING_TAGS``.
  ``added_tokens(closing_as_tokens=True)`` gives that list for a caller who prefers it.

Rules a valid completion obeys (``validate`` returns the first broken one as its reason):
exactly one ``[thinking]`` block, first in the completion; inside it only strategy blocks (whitespace
between them), each opened and closed by the same known tag, not nested, not empty; the example's own
strategy used at least once; a non-empty final answer after ``[/endthinking]``, equal to the expected
answer when the example carries one (``phases.data.curriculum.check_answer``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from phases.data.curriculum import check_answer

THINK_START = "[thinking]"
THINK_END = "[/endthinking]"

# The planned order; a short gloss of each is what the OpenRouter prompt shows the writing model.
STRATEGY_GLOSS: dict[str, str] = {
    "step": "break the problem into steps and work each one",
    "mece": "split the problem into mutually exclusive, collectively exhaustive parts",
    "falsify": "try to disprove a candidate answer",
    "expert": "reason as a domain expert would",
    "orthogonal": "check the result by an independent route",
    "doubt": "question an assumption or the reading of the problem",
    "bayesian": "state a prior belief and update it with the evidence",
    "multidomain": "look at the problem from another field",
    "correct": "catch and fix a mistake in an earlier step",
    "uncertain": "say how confident you are and why",
}
STRATEGIES: tuple[str, ...] = tuple(STRATEGY_GLOSS)
OPENING_TAGS: tuple[str, ...] = tuple(f"<{s}>" for s in STRATEGIES)
CLOSING_TAGS: tuple[str, ...] = tuple(f"</{s}>" for s in STRATEGIES)
SPECIAL_TOKENS: list[str] = [THINK_START, THINK_END, *OPENING_TAGS]
assert len(SPECIAL_TOKENS) == 12

# Any lowercase angle-bracket tag, known or not: an unknown one (``<think>``) is a reject, while
# comparison text such as ``3 < 5`` never matches.
_ANY_TAG = re.compile(r"<(/?)([a-z][a-z_-]*)>")
_STRUCTURE = re.compile("|".join(re.escape(t) for t in (THINK_START, THINK_END, *OPENING_TAGS, *CLOSING_TAGS)))
_ANSWER_PREFIX = re.compile(r"^(?:final\s+answer|answer)\s*[:=]\s*", re.IGNORECASE)


def added_tokens(closing_as_tokens: bool = False) -> list[str]:
    """Tokens to add to a tokenizer: the 12 markers, or 22 with the closers as tokens too."""
    return SPECIAL_TOKENS + (list(CLOSING_TAGS) if closing_as_tokens else [])


def format_thinking(thoughts: list[tuple[str, str]]) -> str:
    """``[(strategy, text), ...]`` -> ``[thinking]<s>text</s>...[/endthinking]``."""
    for strategy, _ in thoughts:
        if strategy not in STRATEGY_GLOSS:
            raise ValueError(f"unknown strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    return THINK_START + "".join(f"<{s}>{' '.join(t.split())}</{s}>" for s, t in thoughts) + THINK_END


def format_completion(thoughts: list[tuple[str, str]], answer: str) -> str:
    return f"{format_thinking(thoughts)} {answer.strip()}"


def format_example(prompt: str, thoughts: list[tuple[str, str]], answer: str) -> str:
    """The whole training text: the problem's prompt (ending ``Answer:``), the thinking, the answer."""
    return f"{prompt.rstrip()} {format_completion(thoughts, answer)}"


@dataclass
class Parsed:
    """A completion split into its parts; ``problem`` names the first rule it breaks, None if none."""

    thoughts: list[tuple[str, str]] = field(default_factory=list)
    answer: str = ""
    problem: str | None = None
    detail: str = ""


def _fail(parsed: Parsed, problem: str, detail: str) -> Parsed:
    parsed.problem, parsed.detail = problem, detail
    return parsed


def parse_thinking(text: str) -> Parsed:
    """Parse a completion (``[thinking]…[/endthinking] answer``). Never raises on bad input."""
    p = Parsed()
    text = text.strip()
    starts, ends = text.count(THINK_START), text.count(THINK_END)
    if starts == 0 and ends == 0:
        return _fail(p, "no_thinking_block", "no [thinking] ... [/endthinking] block")
    if starts != 1 or ends != 1:
        problem = "multiple_thinking_blocks" if starts == ends else "unbalanced_tags"
        return _fail(p, problem, f"{starts} {THINK_START} and {ends} {THINK_END}")
    i, j = text.index(THINK_START), text.index(THINK_END)
    if j < i:
        return _fail(p, "unbalanced_tags", f"{THINK_END} before {THINK_START}")
    if text[:i].strip():
        return _fail(p, "text_before_thinking", repr(text[:i].strip()[:60]))
    body, tail = text[i + len(THINK_START):j], text[j + len(THINK_END):]
    open_tag: str | None = None
    content_start = last_end = 0
    for m in _ANY_TAG.finditer(body):
        closing, name = m.group(1) == "/", m.group(2)
        if name not in STRATEGY_GLOSS:
            return _fail(p, "unknown_strategy", f"tag <{m.group(1)}{name}>")
        if not closing:
            if open_tag is not None:
                return _fail(p, "nested_tags", f"<{name}> inside <{open_tag}>")
            if body[last_end:m.start()].strip():
                return _fail(p, "untagged_thought", repr(body[last_end:m.start()].strip()[:60]))
            open_tag, content_start = name, m.end()
        else:
            if open_tag != name:
                closes = f"<{open_tag}>" if open_tag else "nothing"
                return _fail(p, "unbalanced_tags", f"</{name}> closes {closes}")
            content = " ".join(body[content_start:m.start()].split())
            if not content:
                return _fail(p, "empty_thought", f"<{name}></{name}>")
            p.thoughts.append((name, content))
            open_tag, last_end = None, m.end()
    if open_tag is not None:
        return _fail(p, "unbalanced_tags", f"<{open_tag}> never closed")
    if body[last_end:].strip():
        return _fail(p, "untagged_thought", repr(body[last_end:].strip()[:60]))
    if not p.thoughts:
        return _fail(p, "empty_thinking", "no strategy block inside [thinking]")
    p.answer = _ANSWER_PREFIX.sub("", tail.strip()).strip()
    if not p.answer:
        return _fail(p, "missing_answer", f"nothing after {THINK_END}")
    return p


def final_answer(completion: str) -> str:
    """The text after ``[/endthinking]`` (the whole text if there is none): what an answer check reads."""
    tail = completion.rsplit(THINK_END, 1)[-1]
    return _ANSWER_PREFIX.sub("", tail.strip()).strip()


def validate(example: dict[str, Any]) -> tuple[bool, str]:
    """``(ok, reason)`` for an example with ``strategy`` and ``completion`` (and ``answer`` when the
    problem has a checkable one). ``reason`` is ``"ok"`` or a short key counted in the rejects."""
    strategy = example.get("strategy")
    if strategy not in STRATEGY_GLOSS:
        return False, "unknown_strategy"
    parsed = parse_thinking(str(example.get("completion", "")))
    if parsed.problem:
        return False, parsed.problem
    if strategy not in {s for s, _ in parsed.thoughts}:
        return False, "strategy_not_used"
    expected = example.get("answer")
    if expected and not check_answer({"answer": expected}, parsed.answer):
        return False, "wrong_answer"
    return True, "ok"


def structure_tokens(text: str) -> list[str]:
    """The structure markers of ``text`` in order (outer, opening and closing tags), e.g.
    ``['[thinking]', '<step>', '</step>', '[/endthinking]']``: compare a generated completion's list with
    the reference's to score how well a model reproduces the thinking structure."""
    return _STRUCTURE.findall(text)
