"""The 16 Hugging Face Hub datasets of the planned Phase 1 curriculum: where each lives and how a row maps onto
our schema.

Ids are the current canonical ones. Where the dataset's original short id moved or no longer loads with datasets >= 4
(loading scripts are gone), the entry says so in ``note`` and points at a Parquet copy:
  gsm8k -> openai/gsm8k, mbpp -> google-research-datasets/mbpp, ai2_arc -> allenai/ai2_arc,
  hotpot_qa -> hotpotqa/hotpot_qa, drop -> ucinlp/drop, hellaswag -> Rowan/hellaswag,
  boolq -> google/boolq, wikitext -> Salesforce/wikitext, piqa -> ybisk/piqa (Parquet branch),
  wics/strategy-qa (Parquet branch), openwebtext -> Skylion007/openwebtext (script only; optional).
Each converter returns a row of the curriculum schema, or None to drop a row it cannot use.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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


def _choices(question: str, options: list[str], correct: int, context: str = "") -> Row | None:
    if not 0 <= correct < len(options):
        return None
    letters = "ABCDEFGH"
    listed = "\n".join(f"{letters[i]}. {o.strip()}" for i, o in enumerate(options))
    row = _qa(f"{question.strip()}\n{listed}", letters[correct], context, task="multiple_choice")
    row["program"] = json.dumps({"options": len(options)})
    return row


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
    facts = " ".join(r.get("facts") or [])
    return _qa(r["question"], "yes" if r["answer"] else "no", rationale=facts, task="yes_no")


def _piqa(r: Row) -> Row | None:
    label = int(r["label"])
    return _choices(f"Goal: {r['goal']}", [r["sol1"], r["sol2"]], label) if label in (0, 1) else None


def _hellaswag(r: Row) -> Row | None:
    if str(r["label"]).strip() == "":
        return None  # the test split hides its labels
    return _choices(f"How does this continue? {r['ctx']}", list(r["endings"]), int(r["label"]))


def _boolq(r: Row) -> Row | None:
    return _qa(r["question"].rstrip("?") + "?", "yes" if r["answer"] else "no", context=r["passage"], task="yes_no")


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
    streaming: bool = False
    optional: bool = False
    note: str = ""

    def to_schema(self, row: Row, index: int) -> Row | None:
        out = self.convert(row)
        if out is None:
            return None
        out.update(id=f"{self.name}-{index:07d}", stage=self.stage, source=f"hub:{self.hub_id}")
        return {f: out[f] for f in FIELDS}


REGISTRY: dict[str, HubDataset] = {
    d.name: d
    for d in [
        HubDataset("gsm8k", "openai/gsm8k", "main", "train", "reasoning", _gsm8k, note="original id 'gsm8k' moved"),
        HubDataset("svamp", "ChilleD/SVAMP", None, "train", "reasoning", _svamp),
        HubDataset("asdiv", "MU-NLPC/Calc-asdiv_a", "default", "test", "reasoning", _asdiv,
                   note="only a test split exists"),
        HubDataset("mbpp", "google-research-datasets/mbpp", "full", "train", "advanced", _mbpp,
                   note="original id 'mbpp' moved"),
        HubDataset("arc_easy", "allenai/ai2_arc", "ARC-Easy", "train", "foundation", _arc,
                   note="original id 'ai2_arc' moved"),
        HubDataset("arc_challenge", "allenai/ai2_arc", "ARC-Challenge", "train", "reasoning", _arc,
                   note="original id 'ai2_arc' moved"),
        HubDataset("hotpot_qa", "hotpotqa/hotpot_qa", "distractor", "train", "advanced", _hotpot,
                   note="original id 'hotpot_qa' moved"),
        HubDataset("drop", "ucinlp/drop", None, "train", "advanced", _drop, note="original id 'drop' moved"),
        HubDataset("strategy_qa", "wics/strategy-qa", "strategyQA", "test", "advanced", _strategyqa,
                   revision="refs/convert/parquet", note="loading script; read from the Parquet branch"),
        HubDataset("piqa", "ybisk/piqa", None, "train", "foundation", _piqa, revision="refs/convert/parquet",
                   note="original id 'piqa' is a loading script; read from the Parquet branch"),
        HubDataset("hellaswag", "Rowan/hellaswag", None, "train", "reasoning", _hellaswag,
                   note="original id 'hellaswag' moved"),
        HubDataset("boolq", "google/boolq", None, "train", "foundation", _boolq, note="original id 'boolq' moved"),
        HubDataset("wikitext", "Salesforce/wikitext", "wikitext-103-raw-v1", "train", "foundation", _plain_text,
                   note="original id 'wikitext' moved; a config is required"),
        HubDataset("fineweb_edu", "HuggingFaceFW/fineweb-edu", "sample-10BT", "train", "foundation", _plain_text,
                   streaming=True, note="tens of GB: streamed, first rows kept"),
        HubDataset("openwebtext", "Skylion007/openwebtext", None, "train", "foundation", _plain_text,
                   streaming=True, optional=True, note="loading script on main: may not load with datasets >= 4"),
        HubDataset("wikitext2", "Salesforce/wikitext", "wikitext-2-raw-v1", "train", "foundation", _plain_text,
                   note="small wikitext for quick runs"),
    ]
}


def lookup(name: str) -> HubDataset:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown hub dataset {name!r}; known: {', '.join(sorted(REGISTRY))}") from None
