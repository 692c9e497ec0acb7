"""The forging report: what each phase added, on one table.

Every stage's model answers the same held-out test problems (``per_skill`` of each skill, spread over its
rungs) with the same decode: the exact-match greedy answer read off one teacher-forced pass
(measure.teacher_forced_hits, as EvoMerge's fitness reads it). A Quiet-STaR model is scored twice, with
its thoughts (the batched pass puts a thought after every position, as decoding does) and without. Each
figure carries its 95% Wilson interval. Where hub datasets were selected, a second table scores every stage on
their own held-out splits (phases/common/hub_scoring.py: choices by log-likelihood, answers exactly), beside
chance. Below the tables: each phase's gates and its wall time.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from phases.common.measure import accuracy_cell, teacher_forced_hits


@dataclass
class Stage:
    """One row: a model directory, how to load it, and whether to score it with thoughts."""

    name: str
    path: Path
    packed: bool = False  # a BitNet packed directory
    thoughts: bool = False


@dataclass
class HubSet:
    """A hub dataset with a labelled held-out split: its stored directory and how it is scored."""

    name: str
    path: Path
    scorer: str  # "choice" or "answer"


@dataclass
class PhaseSummary:
    name: str
    passed: bool | None  # None: the phase did not run in this pipeline run
    failed: list[str] = field(default_factory=list)
    seconds: float | None = None  # a phase a retry found finished takes seconds
    link: str | None = None  # where the phase's own run is shown (its gates, plots, progress)


def _load(stage: Stage):
    if stage.packed:
        from phases.bitnet.packed_format import load_packed

        model = load_packed(stage.path)
    else:
        from transformers import AutoModelForCausalLM

        import phases.cognate.modeling  # noqa: F401  (registers the Cognate Auto classes)
        import phases.quietstar.model  # noqa: F401
        from phases.common.hf_io import load_pretrained

        model = load_pretrained(AutoModelForCausalLM, stage.path)
    if hasattr(model.config, "thoughts_enabled"):
        model.config.thoughts_enabled = stage.thoughts
    elif stage.thoughts:
        raise ValueError(f"{stage.name}: {stage.path} has no thoughts to score with")
    return model.eval()


@torch.no_grad()
def measure(stages: Sequence[Stage], curriculum_dir: Path, seq_len: int, per_skill: int,
            hub: Sequence[HubSet] = (), hub_problems: int = 0) -> list[dict[str, Any]]:
    """Per stage: {"stage", "skills": {skill: [hits, n]}, "hub": {dataset: [hits, n]}}, all on the same test problems
    (``hub_problems`` of each hub set's held-out rows)."""
    from phases.common import hub_scoring
    from phases.data import dataset_files
    from phases.data import tokenizer as bpe
    from phases.data.encoding import EvalSet

    rows = list(dataset_files.load_splits(curriculum_dir)["test"])
    by_vocabulary: dict[str, tuple[EvalSet, Any]] = {}  # the stages share a few tokenizers: load and encode once each
    hub_sets = [hub_scoring.HubEvalSet(h.name, h.scorer, list(dataset_files.load_splits(h.path)["test"])[:hub_problems])
                for h in hub]
    out = []
    for stage in stages:
        # each model with its own tokenizer: Quiet-STaR's adds thought tokens, and the problems' ids must match
        vocabulary = (stage.path / "tokenizer.json").read_text()
        if vocabulary not in by_vocabulary:
            tokenizer = bpe.load(stage.path)
            by_vocabulary[vocabulary] = EvalSet.build(rows, tokenizer, seq_len, 1, per_skill, "test"), tokenizer
        (problems, tokenizer), model = by_vocabulary[vocabulary], _load(stage)
        hub_hits = {h.name: hub_scoring.hits(model, tokenizer, h, seq_len) for h in hub_sets}
        out.append({"stage": stage.name, "skills": problems.skill_hits(teacher_forced_hits(model, problems.problems)),
                    "hub": {name: [sum(h), len(h)] for name, h in hub_hits.items()}})
    if hub_sets:
        out.append({"stage": "chance", "skills": {}, "hub": {h.name: [h.chance(), 1] for h in hub_sets}})
    return out


def markdown(rows: Sequence[dict[str, Any]], phases: Sequence[PhaseSummary]) -> str:
    skills = sorted({s for r in rows for s in r["skills"]})
    n = max((r["skills"][s][1] for r in rows for s in r["skills"]), default=0)
    lines = ["## Forging report", "",
             f"Held-out test accuracy per skill ({n} problems each, exact greedy answer; 95% Wilson interval):", "",
             "| stage | " + " | ".join(skills) + " | mean |", "|---" * (len(skills) + 2) + "|"]
    for r in rows:
        if not r["skills"]:
            continue  # the chance row: hub sets only
        cells = [accuracy_cell(*r["skills"][s]) if s in r["skills"] else "n/a" for s in skills]
        mean = sum(h / m for h, m in r["skills"].values()) / max(1, len(r["skills"]))
        lines.append(f"| {r['stage']} | " + " | ".join(cells) + f" | {mean:.1%} |")
    hub = sorted({d for r in rows for d in r.get("hub", {})})
    if hub:
        sizes = ", ".join(f"{d} {next(r['hub'][d][1] for r in rows if r['skills'])}" for d in hub)
        lines += ["", f"Hub datasets' own held-out splits ({sizes} problems; choices by log-likelihood, answers "
                  "exact; 95% Wilson interval):", "", "| stage | " + " | ".join(hub) + " |", "|---" * (len(hub) + 1) + "|"]
        for r in rows:
            cells = [f"{r['hub'][d][0]:.1%}" if not r["skills"] else accuracy_cell(*r["hub"][d]) for d in hub]
            lines.append(f"| {r['stage']} | " + " | ".join(cells) + " |")
    if phases:  # the stored table has none: gates and times belong to a run, and are added per run
        lines += ["", "| phase | gates | failing | wall time |", "|---|---|---|---|"]
    for p in phases:
        verdict = "not run" if p.passed is None else "PASS" if p.passed else "FAIL"
        wall = "" if p.seconds is None else f"{p.seconds:.0f} s"
        name = f"[{p.name}]({p.link})" if p.link else p.name
        failing = ", ".join(p.failed[:3]) + (f" and {len(p.failed) - 3} more" if len(p.failed) > 3 else "")
        lines.append(f"| {name} | {verdict} | {failing or '-'} | {wall} |")  # the whole list: the phase's gate table
    return "\n".join(lines) + "\n"


def write(out: Path, rows: Sequence[dict[str, Any]], phases: Sequence[PhaseSummary]) -> str:
    """report.md and report.json into ``out``; returns the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(rows, phases)
    (out / "report.md").write_text(text)
    (out / "report.json").write_text(json.dumps({"stages": list(rows), "phases": [vars(p) for p in phases]},
                                                indent=2, sort_keys=True))
    return text
