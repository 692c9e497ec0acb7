"""The 16 Hugging Face Hub datasets of the planned Phase 1 curriculum: where each lives and how a row maps onto
our schema.

Ids are the current canonical ones. Where the dataset's original short id moved or no longer loads with datasets >= 4
(loading scripts are gone), the entry says so in ``note`` and points at a Parquet copy:
  gsm8k -> openai/gsm8k, mbpp -> google-research-datasets/mbpp, ai2_arc -> allenai/ai2_arc,
  hotpot_qa -> hotpotqa/hotpot_qa, drop -> ucinlp/drop, hellaswag -> Rowan/hellaswag,
  boolq -> google/boolq, wikitext -> Salesforce/wikitext, piqa -> ybisk/piqa (Parquet branch),
  wics/strategy-qa (Parquet branch), openwebtext -> Skylion007/openwebtext (Parquet at the pinned commit; optional).
Each converter returns a row of the curriculum schema, or None to drop a row it cannot use.

Where a dataset has a held-out split of its own with labels (``eval_split``), its rows are the evaluation set every
stage's model is scored on in the forging report, with the ``scorer`` that fits the dataset:
- "answer": the exact final answer after the prompt (GSM8K, SVAMP, ASDiv), read as the curriculum's problems are;
- "choice": the log-likelihood of each choice's text after the question, highest wins (ARC, BoolQ, PIQA,
  HellaSwag, StrategyQA), as lm-evaluation-harness scores multiple-choice tasks. Such a row's ``program`` holds
  {"stem", "choices", "label"}; its training text lists the choices by letter and answers with the letter.
Revisions are pinned commits: each one appears in public code as a Hugging Face cache snapshot path or a
``revision=`` pin, with the Parquet files read here under it. StrategyQA alone reads its Parquet branch's head (no
commit of it was found). Every download records the commit it read in its artifact's manifest, and
``data.hub_revisions`` overrides one per run.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from phases.data.curriculum import FIELDS, normalize_answer

Row = dict[str, Any]


def _row(task: str, prompt: str, answer: str, rationale: str = "", text: str | None = None) -> Row:
    prompt = prompt.strip()
    return {
        "task": task,
        "prompt": prompt,
        "answer": answer,
        "rationale": rationale.strip(),
        "text": text if text is not None else f"{prompt} {answer}".strip(),
        "program": "{}",
    }


def _qa(question: str, answer: str, context: str = "", rationale: str = "", task: str = "qa") -> Row:
    ctx = f"{context.strip()}\n" if context else ""
    return _row(task, f"{ctx}Question: {question.strip()}\nAnswer:", answer.strip(), rationale)


def _scored(row: Row, question: str, choices: list[str], correct: int, context: str = "") -> Row:
    """``row`` with what the log-likelihood scorer reads: the bare question (no choices listed) and the choices."""
    ctx = f"{context.strip()}\n" if context else ""
    row["program"] = json.dumps({"stem": f"{ctx}Question: {question.strip()}\nAnswer:",
                                 "choices": [c.strip() for c in choices], "label": correct})
    return row


def _choices(question: str, options: list[str], correct: int, context: str = "") -> Row | None:
    if not 0 <= correct < len(options):
        return None
    letters = "ABCDEFGH"
    listed = "\n".join(f"{letters[i]}. {o.strip()}" for i, o in enumerate(options))
    row = _qa(f"{question.strip()}\n{listed}", letters[correct], context, task="multiple_choice")
    return _scored(row, question, options, correct, context)


def _yes_no(question: str, answer: bool, context: str = "", rationale: str = "") -> Row:
    row = _qa(question, "yes" if answer else "no", context, rationale, task="yes_no")
    return _scored(row, question, ["no", "yes"], int(bool(answer)), context)


def _gsm8k(r: Row) -> Row | None:
    rationale, _, final = r["answer"].rpartition("####")
    rationale = re.sub(r"<<[^>]*>>", "", rationale)  # calculator annotations
    return _qa(r["question"], normalize_answer(final), rationale=rationale, task="word_problem")


def _svamp(r: Row) -> Row | None:
    return _qa(f"{r['Body'].strip()} {r['Question'].strip()}", normalize_answer(str(r["Answer"])),
               rationale=str(r.get("Equation", "")), task="word_problem")


def _asdiv(r: Row) -> Row | None:
    return _qa(r["question"], normalize_answer(str(r["result"])), task="word_problem")


def _mbpp(r: Row) -> Row | None:
    tests = "\n".join(r.get("test_list", []))
    prompt = f"Task: {r['text'].strip()}\nTests:\n{tests}\nCode:"
    row = _row("code", prompt, r["code"].strip())
    row["program"] = json.dumps({"tests": r.get("test_list", [])})
    return row


def _arc(r: Row) -> Row | None:
    labels = list(r["choices"]["label"])
    if r["answerKey"] not in labels:
        return None
    return _choices(r["question"], list(r["choices"]["text"]), labels.index(r["answerKey"]))


def _hotpot(r: Row) -> Row | None:
    paragraphs = [
        f"{title}: {''.join(sents)}" for title, sents in zip(r["context"]["title"], r["context"]["sentences"])
    ]
    return _qa(r["question"], r["answer"], context="\n".join(paragraphs))


def _drop(r: Row) -> Row | None:
    spans = list(r["answers_spans"]["spans"])
    return _qa(r["question"], spans[0], context=r["passage"]) if spans else None


def _strategyqa(r: Row) -> Row | None:
    return _yes_no(r["question"], r["answer"], rationale=" ".join(r.get("facts") or []))


def _piqa(r: Row) -> Row | None:
    label = int(r["label"])
    return _choices(f"Goal: {r['goal']}", [r["sol1"], r["sol2"]], label) if label in (0, 1) else None


def _hellaswag(r: Row) -> Row | None:
    if str(r["label"]).strip() == "":
        return None  # the test split hides its labels
    return _choices(f"How does this continue? {r['ctx']}", list(r["endings"]), int(r["label"]))


def _boolq(r: Row) -> Row | None:
    return _yes_no(r["question"].rstrip("?") + "?", r["answer"], context=r["passage"])


def _plain_text(r: Row) -> Row | None:
    text = r["text"].strip()
    if len(text) < 40 or text.startswith("="):  # wikitext headings and blank lines
        return None
    return _row("text", "", "", text=text)


@dataclass(frozen=True)
class HubDataset:
    name: str
    hub_id: str
    config: str | None
    split: str
    stage: str
    convert: Callable[[Row], Row | None]
    revision: str | None = None
    eval_split: str | None = None  # the dataset's own labelled held-out split, scored in the forging report
    scorer: Literal["answer", "choice"] | None = None
    streaming: bool = False
    optional: bool = False
    note: str = ""

    def to_schema(self, row: Row, index: int) -> Row | None:
        out = self.convert(row)
        if out is None:
            return None
        out.update(id=f"{self.name}-{index:07d}", stage=self.stage, source=f"hub:{self.hub_id}")
        return {f: out[f] for f in FIELDS}


# Commits, one per repository (allenai/ai2_arc and Salesforce/wikitext serve two configs each)
ARC, WIKITEXT = "210d026faf9955653af8916fad021475a3f00453", "b08601e04326c79dfdd32d625aee71d232d685c3"

REGISTRY: dict[str, HubDataset] = {
    d.name: d
    for d in [
        HubDataset("gsm8k", "openai/gsm8k", "main", "train", "reasoning", _gsm8k,
                   revision="740312add88f781978c0658806c59bc2815b9866", eval_split="test", scorer="answer",
                   note="original id 'gsm8k' moved"),
        HubDataset("svamp", "ChilleD/SVAMP", None, "train", "reasoning", _svamp,
                   revision="5e0bf1e5e7c0e9c4bc39180d224f41f3f801b7ef", eval_split="test", scorer="answer"),
        HubDataset("asdiv", "MU-NLPC/Calc-asdiv_a", "default", "test", "reasoning", _asdiv,
                   revision="520a6910e097ee287ecd2bb9104f7f45805f9df9", scorer="answer",
                   note="only a test split exists: its held-out rows are the 5% its ids hash to"),
        HubDataset("mbpp", "google-research-datasets/mbpp", "full", "train", "advanced", _mbpp,
                   revision="4bb6404fdc6cacfda99d4ac4205087b89d32030c", note="original id 'mbpp' moved"),
        HubDataset("arc_easy", "allenai/ai2_arc", "ARC-Easy", "train", "foundation", _arc, revision=ARC,
                   eval_split="test", scorer="choice", note="original id 'ai2_arc' moved"),
        HubDataset("arc_challenge", "allenai/ai2_arc", "ARC-Challenge", "train", "reasoning", _arc, revision=ARC,
                   eval_split="test", scorer="choice", note="original id 'ai2_arc' moved"),
        HubDataset("hotpot_qa", "hotpotqa/hotpot_qa", "distractor", "train", "advanced", _hotpot,
                   revision="1908d6afbbead072334abe2965f91bd2709910ab", note="original id 'hotpot_qa' moved"),
        HubDataset("drop", "ucinlp/drop", None, "train", "advanced", _drop,
                   revision="95cda593fae71b60b5b19f82de3fcf3298c1239c", note="original id 'drop' moved"),
        HubDataset("strategy_qa", "wics/strategy-qa", "strategyQA", "test", "advanced", _strategyqa,
                   revision="refs/convert/parquet", scorer="choice",
                   note="loading script; read from the Parquet branch's head (no commit of it found to pin)"),
        HubDataset("piqa", "ybisk/piqa", None, "train", "foundation", _piqa,
                   revision="142c51238b3ca2bc61e9a075913871b8b600e8e1", eval_split="validation", scorer="choice",
                   note="original id 'piqa' is a loading script; the revision is its Parquet branch's commit"),
        HubDataset("hellaswag", "Rowan/hellaswag", None, "train", "reasoning", _hellaswag,
                   revision="218ec52e09a7e7462a5400043bb9a69a41d06b76", eval_split="validation", scorer="choice",
                   note="original id 'hellaswag' moved"),
        HubDataset("boolq", "google/boolq", None, "train", "foundation", _boolq,
                   revision="35b264d03638db9f4ce671b711558bf7ff0f80d5", eval_split="validation", scorer="choice",
                   note="original id 'boolq' moved; its test labels are hidden"),
        HubDataset("wikitext", "Salesforce/wikitext", "wikitext-103-raw-v1", "train", "foundation", _plain_text,
                   revision=WIKITEXT, note="original id 'wikitext' moved; a config is required"),
        HubDataset("fineweb_edu", "HuggingFaceFW/fineweb-edu", "sample-10BT", "train", "foundation", _plain_text,
                   revision="87f09149ef4734204d70ed1d046ddc9ca3f2b8f9", streaming=True,
                   note="tens of GB: streamed, first rows kept"),
        HubDataset("openwebtext", "Skylion007/openwebtext", None, "train", "foundation", _plain_text,
                   revision="b4325f019c648b1641a1784748667e8b74e5e064", streaming=True, optional=True,
                   note="Parquet at this revision; tens of GB: streamed, first rows kept"),
        HubDataset("wikitext2", "Salesforce/wikitext", "wikitext-2-raw-v1", "train", "foundation", _plain_text,
                   revision=WIKITEXT, note="small wikitext for quick runs"),
    ]
}


def is_commit(revision: str | None) -> bool:
    """A 40-hex commit id, not a branch or tag that moves."""
    return bool(revision) and len(revision) == 40 and set(revision) <= set("0123456789abcdef")


def lookup(name: str) -> HubDataset:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown hub dataset {name!r}; known: {', '.join(sorted(REGISTRY))}") from None
