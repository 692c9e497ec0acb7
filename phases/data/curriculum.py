"""The built-in curriculum: a skill ladder, generated, deterministic by seed, with answers a program can check.

Each example names its skill in ``task``:
  text          plain sentences: the language-modelling share
  arithmetic    2-3-digit addition and subtraction, one operation, worked column by column
  kv_recall     key-value codes stated more than RECALL_GAP tokens before the question, filler in between,
                so a model whose attention window is shorter must read its long-term memory
  word_problem  multi-step stories whose text works each step out column by column before the answer
Three stages climb the ladder:
  foundation  2-digit arithmetic, a code to recall, 1-step word problems, text
  reasoning   up to 3-digit arithmetic, 1-2-step word problems, a code to recall, text
  advanced    3-digit arithmetic, 2-step word problems, a code changed later (the latest counts), text

Every example has one schema (the hub datasets are converted onto it too):
  id, stage, source, task, prompt, answer, rationale, text, program
``text`` is what a language model trains on (prompt, then rationale where the skill has one, then the
answer). ``program`` is a JSON record; the answer is recomputed from the prompt itself (``verify``), so a
wrong label is caught.
"""

from __future__ import annotations

import ast
import json
import operator
import random
import re
from typing import Any

STAGES = ("foundation", "reasoning", "advanced")
SPLITS = ("train", "validation", "test")
FIELDS = ("id", "stage", "source", "task", "prompt", "answer", "rationale", "text", "program")
SKILLS = ("text", "arithmetic", "kv_recall", "word_problem")

# Skill mix per stage (training weights). Validation and test draw every skill of a stage equally, so
# each skill gets enough held-out problems for a per-skill figure.
MIX: dict[str, dict[str, float]] = {
    "foundation": {"text": 0.15, "arithmetic": 0.35, "word_problem": 0.2, "kv_recall": 0.3},
    "reasoning": {"text": 0.1, "arithmetic": 0.3, "word_problem": 0.3, "kv_recall": 0.3},
    "advanced": {"text": 0.1, "arithmetic": 0.3, "word_problem": 0.3, "kv_recall": 0.3},
}

# Fewest tokens between a code's statement and the question about it: more than the tiny preset's
# 64-token attention window. Counted as words and punctuation runs, each at least one token of the
# byte-level BPE (its pre-tokenizer never joins two of them), so the token gap is at least this.
RECALL_GAP = 66

# (codes stated, later changes to one of them) per rung. One code per problem: a tiny model's memory learns to carry
# one across the gap in a few hundred steps, and two in the same problem stopped it (fresh tiny model, recall alone,
# 600 steps: 97.9-100% of one-code problems beyond the window when trained on one code each; 2% of the test when a
# third of the problems held one code and two thirds two)
RECALL_RUNGS = {"foundation": (1, 0), "reasoning": (1, 0), "advanced": (1, 1)}

# Where a worked rationale ends and its answer begins, in the text a model writes.
ANSWER_MARK = "So the answer is"
# Skills whose text works the problem out before the answer.
WORKED = ("arithmetic", "word_problem")

_NAMES = ["Ada", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lena", "Milo", "Nora"]
_ITEMS = ["apples", "marbles", "books", "coins", "stamps", "pencils", "shells", "cards", "eggs", "beads"]
_CONTAINERS = ["boxes", "bags", "jars", "crates", "baskets"]
_ADJ = ["small", "old", "bright", "quiet", "heavy", "green", "narrow", "warm", "curious", "patient"]
_NOUN = ["river", "teacher", "garden", "machine", "village", "student", "lantern", "market", "bridge", "library"]
_VERB = ["crossed", "repaired", "visited", "painted", "measured", "watched", "opened", "followed", "cleaned", "built"]
_PLACE = ["near the hill", "after the storm", "in the morning", "before dinner", "by the sea", "at the station"]
_CONNECT = ["Then", "Later", "Meanwhile", "Because of that", "After a while", "Soon"]
_SYL = ["ka", "lo", "mi", "ru", "te", "vo", "zan", "pel", "dor", "fin", "gra", "sol", "tik", "wem"]


def _number(rng: random.Random, lo: int, hi: int) -> int:
    return rng.randint(lo, hi)


def pretokens(text: str) -> int:
    """Words and punctuation runs: a lower bound on the byte-level BPE's token count."""
    return len(re.findall(r"\w+|[^\w\s]+", text))


# ----------------------------------------------------------------------------- generators
def _sentence(rng: random.Random, first: bool) -> str:
    s = (f"The {rng.choice(_ADJ)} {rng.choice(_NOUN)} {rng.choice(_VERB)} "
         f"the {rng.choice(_ADJ)} {rng.choice(_NOUN)} {rng.choice(_PLACE)}.")
    return s if first else f"{rng.choice(_CONNECT)}, {s[0].lower()}{s[1:]}"


def _text(rng: random.Random, stage: str) -> dict[str, Any]:
    n_sent = {"foundation": 2, "reasoning": 3, "advanced": 4}[stage]
    text = " ".join(_sentence(rng, i == 0) for i in range(n_sent))
    return {"task": "text", "prompt": "", "answer": "", "rationale": "", "text": text, "program": "{}"}


_OPERAND_RANGE = {"foundation": (10, 99), "reasoning": (10, 999), "advanced": (100, 999)}


def column_steps(a: int, b: int, op: str) -> list[str]:
    """Column arithmetic, least significant digit first: one ``x+y+c=dcC`` step per column, c the carry
    (or borrow) in, d the digit written, C the carry out. Each step is a lookup in a 200-entry table, so a
    small model learns the rule once and applies it per column; asked for the whole sum at once it must
    learn every carry chain (``bench/cognate_skills.py --format-only`` measures both)."""
    da, db = str(a)[::-1], str(b)[::-1].ljust(len(str(a)), "0")
    out, carry = [], 0
    for x, y in zip(map(int, da), map(int, db)):
        r = x + y + carry if op == "+" else x - y - carry
        digit, nxt = r % 10, int(r >= 10 or r < 0)
        out.append(f"{x}{op}{y}{op}{carry}={digit}c{nxt}")
        carry = nxt
    return out


def _arithmetic(rng: random.Random, stage: str) -> dict[str, Any]:
    lo, hi = _OPERAND_RANGE[stage]
    a, b = _number(rng, lo, hi), _number(rng, lo, hi)
    op = rng.choice(["+", "-"])
    if op == "-" and b > a:  # answers stay non-negative: no sign to learn
        a, b = b, a
    if b > a:  # the longer operand first, so every column has both digits written out
        a, b = b, a
    expr = f"{a}{op}{b}"
    answer = str(a + b if op == "+" else a - b)
    # Written the way a small model learns it: no words around the sum, the working in one token run.
    # Measured on the tiny shape, 2-digit problems only, T_max 1, loss on the continuation: this form
    # reaches 19% exact after 200 steps, the same working inside "Question: What is a + b?" 0%.
    prompt = f"{expr}="
    rationale = ",".join(column_steps(a, b, op))
    return {
        "task": "arithmetic", "prompt": prompt, "answer": answer, "rationale": rationale,
        "text": f"{prompt}{rationale}. {ANSWER_MARK} {answer}", "program": json.dumps({"expr": expr}),
    }


def worked_step(a: int, b: int, op: str) -> tuple[str, int]:
    """One story step written as the arithmetic skill writes a sum: ``a+b=`` and its columns, the longer
    operand first. Returns the text and the result."""
    if op == "+" and len(str(b)) > len(str(a)):
        a, b = b, a
    return f"{a}{op}{b}=" + ",".join(column_steps(a, b, op)), a + b if op == "+" else a - b


def _word_problem(rng: random.Random, stage: str) -> dict[str, Any]:
    lo, hi = {"reasoning": (1, 2), "advanced": (2, 2)}.get(stage, (1, 1))
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    total = _number(rng, 5, 40)
    sentences = [f"{name} has {total} {item}."]
    steps: list[list[Any]] = [["start", total]]
    # Each step is worked column by column, as the arithmetic skill is, so a model that has learnt columns
    # can carry out a story. Tiny shape, T_max 1, 600 steps of arithmetic and word problems from the 40-step
    # base, seed 0: 27% of the word-problem test with this working (82% of the arithmetic), 10% with steps
    # written whole, "40 - 2 = 38", whose result must come out at once (17% of the arithmetic)
    rationale = []
    for _ in range(rng.randint(lo, hi)):
        kind = rng.choice(["buy", "give", "pack", "double"] if total > 3 else ["buy", "pack"])
        if kind == "buy":
            k = _number(rng, 2, 25)
            sentences.append(f"{name} buys {k} more {item}.")
            steps.append(["add", k])
            step, total = worked_step(total, k, "+")
        elif kind == "give":
            k = _number(rng, 1, total - 1)
            friend = rng.choice([n for n in _NAMES if n != name])
            sentences.append(f"{name} gives {k} {item} to {friend}.")
            steps.append(["sub", k])
            step, total = worked_step(total, k, "-")
        elif kind == "pack":
            n, per = _number(rng, 2, 6), _number(rng, 2, 9)
            sentences.append(f"{name} gets {n} {rng.choice(_CONTAINERS)} with {per} {item} in each.")
            steps.append(["add", n * per])
            rationale.append(f"{n}*{per}={n * per}")  # a one-digit product: a 40-entry table
            step, total = worked_step(total, n * per, "+")
        else:
            sentences.append(f"{name} finds as many {item} again as {name} already has.")
            steps.append(["mul", 2])
            step, total = worked_step(total, total, "+")
        rationale.append(step)
    prompt = "Question: " + " ".join(sentences) + f" How many {item} does {name} have now?\nAnswer:"
    answer = str(total)
    reasons = ". ".join(rationale) + "."
    return {
        "task": "word_problem", "prompt": prompt, "answer": answer, "rationale": reasons,
        "text": f"{prompt} {reasons} {ANSWER_MARK} {answer}", "program": json.dumps({"steps": steps}),
    }


def _key(rng: random.Random) -> str:
    return "".join(rng.choice(_SYL) for _ in range(rng.randint(2, 3)))


def filler(rng: random.Random, at_least: int) -> str:
    """Prose sentences of at least ``at_least`` pretokens: the distance a recall problem puts between a code and
    its question."""
    sentences: list[str] = []
    while pretokens(" ".join(sentences)) < at_least:
        sentences.append(_sentence(rng, not sentences))
    return " ".join(sentences)


def recall_statement(rng: random.Random) -> tuple[str, str, str]:
    """(key, code, the sentence stating it), as a recall problem states a code."""
    key, code = _key(rng), str(_number(rng, 100, 999))
    return key, code, f"The code for {key} is {code}."


def recall_question(key: str) -> str:
    return f"\nQuestion: What is the code for {key}?\nAnswer:"


def _kv_recall(rng: random.Random, stage: str) -> dict[str, Any]:
    n_pairs, n_updates = RECALL_RUNGS[stage]
    keys: list[str] = []
    while len(keys) < n_pairs:
        k = _key(rng)
        if k not in keys:
            keys.append(k)
    values = {k: _number(rng, 100, 999) for k in keys}
    lines = [f"The code for {k} is {values[k]}." for k in keys]
    for _ in range(n_updates):
        k = rng.choice(keys)
        values[k] = _number(rng, 100, 999)
        lines.append(f"Later, the code for {k} changed to {values[k]}.")
    gap = filler(rng, RECALL_GAP)
    target = rng.choice(keys)
    prompt = " ".join(lines) + " " + gap + recall_question(target)
    answer = str(values[target])
    return {
        "task": "kv_recall", "prompt": prompt, "answer": answer, "rationale": f"The last code given for {target}.",
        "text": f"{prompt} {answer}", "program": json.dumps({"key": target}),
    }


_GENERATORS = {"text": _text, "arithmetic": _arithmetic, "word_problem": _word_problem, "kv_recall": _kv_recall}


def generate_stage(stage: str, split: str, n: int, seed: int, exclude: set[str]) -> list[dict[str, Any]]:
    """``n`` unique examples for one stage and split; ``exclude`` (updated) keeps splits disjoint. Training
    draws skills by the stage's mix; validation and test cycle through them, an equal share each."""
    if stage not in STAGES or split not in SPLITS:
        raise ValueError(f"unknown stage/split {stage}/{split}")
    rng = random.Random(f"{seed}:{stage}:{split}")
    tasks, weights = zip(*MIX[stage].items())
    out: list[dict[str, Any]] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise RuntimeError(f"could not generate {n} unique {stage}/{split} examples (got {len(out)})")
        task = rng.choices(tasks, weights)[0] if split == "train" else tasks[len(out) % len(tasks)]
        ex = _GENERATORS[task](rng, stage)
        if ex["text"] in exclude:
            continue
        exclude.add(ex["text"])
        ex.update(id=f"{stage}-{split}-{len(out):06d}", stage=stage, source="builtin")
        out.append({f: ex[f] for f in FIELDS})
    return out


def generate(train_per_stage: int, eval_per_stage: int, seed: int) -> dict[str, list[dict[str, Any]]]:
    """All splits; test and validation are drawn first so no training example leaks into them."""
    seen: set[str] = set()
    splits: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    for split, n in (("test", eval_per_stage), ("validation", eval_per_stage), ("train", train_per_stage)):
        for stage in STAGES:
            splits[split].extend(generate_stage(stage, split, n, seed, seen))
    return splits


# ----------------------------------------------------------------------------- checking
_BIN = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def safe_eval(expr: str) -> int:
    """Integer +, -, * only: an answer checker that never runs arbitrary code."""

    def ev(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.BinOp) and type(node.op) in _BIN:
            return _BIN[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        raise ValueError(f"unsupported expression: {expr!r}")

    return ev(ast.parse(expr, mode="eval"))


_NUM = re.compile(r"-?\d+(?:\.\d+)?")


def normalize_answer(text: str) -> str:
    """The first number in ``text`` if there is one, else the trimmed lower-case text."""
    m = _NUM.search(text.replace(",", ""))
    if m:
        value = float(m.group())
        return str(int(value)) if value.is_integer() else str(value)
    return text.strip().lower().rstrip(".")


def final_part(prediction: str) -> str:
    """What follows the last ANSWER_MARK (a rationale's numbers are not the answer), else all of it."""
    return prediction.rsplit(ANSWER_MARK, 1)[-1]


def check_answer(example: dict[str, Any], prediction: str) -> bool:
    return bool(example["answer"]) and normalize_answer(final_part(prediction)) == normalize_answer(example["answer"])


def recompute_answer(example: dict[str, Any]) -> str | None:
    """The answer derived again from the prompt and program, not from the generator's bookkeeping."""
    prog = json.loads(example["program"] or "{}")
    task = example["task"]
    if task == "arithmetic":
        m = re.fullmatch(r"([-+*\d]+)=", example["prompt"])
        return str(safe_eval(m.group(1))) if m and m.group(1) == prog["expr"] else None
    if task == "word_problem":
        # Replay the story's sentences in order; the program must agree with the text.
        total: int | None = None
        for sentence in re.split(r"(?<=\.)\s+", example["prompt"].split("\n")[0]):
            if m := re.search(r" has (\d+) ", sentence):
                total = int(m.group(1))
            elif m := re.search(r" buys (\d+) more ", sentence):
                total += int(m.group(1))
            elif m := re.search(r" gives (\d+) ", sentence):
                total -= int(m.group(1))
            elif m := re.search(r" gets (\d+) \w+ with (\d+) ", sentence):
                total += int(m.group(1)) * int(m.group(2))
            elif " as many " in sentence and " again " in sentence:
                total *= 2
        replay = None
        for op, v in prog["steps"]:
            replay = v if op == "start" else {"add": replay + v, "sub": replay - v, "mul": replay * v}[op]
        return str(total) if total == replay else None
    if task == "kv_recall":
        # Read the passage itself: the last statement about the key wins, and it must lie at least
        # RECALL_GAP tokens before the question or the example would not test recall beyond the window.
        key = prog["key"]
        passage = example["prompt"].split("\nQuestion:")[0]
        found = list(re.finditer(rf"code for {re.escape(key)} (?:is|changed to) (\d+)\.", passage))
        if not found or pretokens(passage[found[-1].end():]) < RECALL_GAP:
            return None
        return found[-1].group(1)
    return None


_COLUMN = re.compile(r"(\d)([+-])(\d)\2([01])=(\d)c([01])")


def columns_add_up(prompt: str, rationale: str, answer: str) -> bool:
    """A second solver for the worked columns, sharing no code with ``column_steps``: every step's digits are the
    operands' (least significant first), its sum or difference with the carry in is its digit and carry out, each
    carry goes into the next column, and the digits written, with a last carry in front, are the answer."""
    m = re.fullmatch(r"(\d+)([+-])(\d+)=", prompt)
    if not m:
        return False
    a, op, b = m[1], m[2], m[3]
    steps = rationale.split(",")
    if len(steps) != len(a) or len(b) > len(a):
        return False
    digits, carry_in = [], 0
    for i, step in enumerate(steps):
        s = _COLUMN.fullmatch(step)
        if not s or s[2] != op or int(s[4]) != carry_in:
            return False
        x, y, digit, carry_out = int(s[1]), int(s[3]), int(s[5]), int(s[6])
        if x != int(a[-1 - i]) or y != (int(b[-1 - i]) if i < len(b) else 0):
            return False
        value = x + y + carry_in if op == "+" else x - y - carry_in
        if value != (digit + 10 * carry_out if op == "+" else digit - 10 * carry_out):
            return False
        digits.append(str(digit))
        carry_in = carry_out
    if op == "-" and carry_in:  # a borrow out of the top column: the difference would be negative
        return False
    written = ("1" if carry_in else "") + "".join(reversed(digits))
    return (written.lstrip("0") or "0") == answer


def story_steps_add_up(rationale: str, answer: str) -> bool:
    """A second solver for a word problem's working: each product multiplied again, each sum's or difference's
    columns re-added (``columns_add_up``), each step starting from the count the step before left (or the
    product just written), and the last count the answer."""
    if not rationale.endswith("."):
        return False
    count: int | None = None
    product: int | None = None
    for step in rationale[:-1].split(". "):
        if m := re.fullmatch(r"(\d)\*(\d)=(\d+)", step):
            if int(m[1]) * int(m[2]) != int(m[3]):
                return False
            product = int(m[3])
            continue
        m = re.fullmatch(r"(\d+)([+-])(\d+)=(.+)", step)
        if not m:
            return False
        a, op, b = int(m[1]), m[2], int(m[3])
        value = a + b if op == "+" else a - b
        if not columns_add_up(f"{m[1]}{op}{m[3]}=", m[4], str(value)):
            return False
        if any(v is not None and v not in (a, b) for v in (count, product)):
            return False
        count, product = value, None
    return count is not None and str(count) == answer


def verify(example: dict[str, Any]) -> bool:
    if example["task"] == "text":
        return bool(example["text"]) and not example["answer"]
    if example["task"] not in _GENERATORS:
        return bool(example["answer"])  # converted hub rows: checked by their own converters
    if example["task"] == "arithmetic":  # the worked columns are re-added too: a wrong step is a wrong label
        if not columns_add_up(example["prompt"], example["rationale"], example["answer"]):
            return False
        expected = f"{example['prompt']}{example['rationale']}. {ANSWER_MARK} "
    elif example["task"] == "word_problem":  # every step of the working is re-done too
        if not story_steps_add_up(example["rationale"], example["answer"]):
            return False
        expected = f"{example['prompt']} {example['rationale']} {ANSWER_MARK} "
    else:
        expected = f"{example['prompt']} "
    return recompute_answer(example) == example["answer"] and example["text"] == expected + example["answer"]
