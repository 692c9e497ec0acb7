"""Phase 1 as plain functions over directories: the foundation, a specialist, the evaluation.

The Prefect tasks in ``tasks/cognate.py`` call these with store paths; tests call them directly.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from phases.cognate import diagnostics, evaluate
from phases.cognate.configuration import CognateConfig
from phases.cognate.data import Batches, mixed_examples, pack_whole, with_hub_share
from phases.cognate.modeling import CognateForCausalLM
from phases.cognate.plots import diagnosis_figure, loss_curve
from phases.cognate.settings import CognateDiagnostics, CognateSection
from phases.cognate.specialists import Specialist, runtime_for, specialists, stage_steps_for
from phases.cognate.trainer import TrainResult, heldout_stats, niah, train
from phases.common.config import ModelShape
from phases.common.data_parallel import SINGLE, Rank, launch
from phases.common.hf_io import build, load_pretrained, save_pretrained
from phases.common.measure import mcnemar_p, value_range
from phases.common.resources import usable_cpus
from phases.common.telemetry import perplexity
from phases.common.workers import run_in_worker
from phases.data import curriculum, dataset_files
from phases.data import tokenizer as bpe

Progress = Callable[[dict[str, Any]], None]


def model_config(shape: ModelShape, sec: CognateSection, tokenizer: PreTrainedTokenizerBase) -> CognateConfig:
    return CognateConfig(
        vocab_size=len(tokenizer), hidden_size=shape.d_model, num_hidden_layers=shape.n_layers,
        num_attention_heads=shape.n_heads, n_persistent=sec.n_persistent, window_size=sec.window_size,
        mem_chunk_size=sec.train.chunk_start, shard_length=sec.shard_length, act_max_steps=sec.act_max_steps,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.eos_token_id,
    )


def load_inputs(curriculum_dir: Path, tokenizer_dir: Path, hub_dirs: Sequence[Path] = ()):
    """(curriculum splits, tokenizer, the hub datasets' training rows)."""
    hub_rows = [r for d in hub_dirs for r in dataset_files.load_splits(d)["train"]]
    return dataset_files.load_splits(curriculum_dir), bpe.load(tokenizer_dir), hub_rows


def stage_rows(splits, split: str, stage: str | None, climb: bool = False) -> list[dict]:
    """One stage's rows (all with ``stage`` None); with ``climb``, that stage's and every rung below it."""
    if stage is None:
        return list(splits[split])
    wanted = set(curriculum.STAGES[: curriculum.STAGES.index(stage) + 1]) if climb else {stage}
    return [r for r in splits[split] if r["stage"] in wanted]


def train_stage(model: CognateForCausalLM, splits, tokenizer, stage: str, sec: CognateSection, seq_len: int,
                batch_size: int, seed: int, workdir: Path, steps: int, step_offset: int,
                mix: dict[str, float] | None, on_progress: Progress | None, regimes=(), climb: bool = False,
                schedule_span: tuple[int, int] | None = None, hub_rows: Sequence[dict] = (),
                rank: Rank = SINGLE) -> TrainResult:
    examples = mixed_examples(stage_rows(splits, "train", stage, climb), mix, seed)
    examples = with_hub_share(examples, stage_rows({"train": hub_rows}, "train", stage, climb), sec.train.hub_share, seed)
    rows, labels = pack_whole(examples, tokenizer, seq_len)
    # the rollback detector watches the skills this stage trains: a specialist narrowing onto its own mix
    # loses ground on the others by design, and that is no spike
    held = [r for r in stage_rows(splits, "validation", stage, climb) if not mix or mix.get(r["task"], 0) > 0]
    eval_ids, eval_labels = pack_whole(held, tokenizer, seq_len)
    eval_rows = (eval_ids[: sec.train.eval_rows], eval_labels[: sec.train.eval_rows])
    progress = (lambda rec: on_progress(rec | {"stage": stage})) if on_progress else None
    return train(model, Batches(rows, batch_size, seed, labels), eval_rows, sec.train, workdir, steps, step_offset,
                 on_progress=progress, regimes=regimes, schedule_span=schedule_span, rank=rank)


def _finish(model: CognateForCausalLM, tokenizer, results: dict[str, TrainResult], out: Path) -> dict[str, Any]:
    model.set_runtime(grad_steps=0)  # how it trained is the recipe's; a later phase back-propagates as it chooses
    save_pretrained(model, out)
    tokenizer.save_pretrained(str(out))  # the artifact generates text on its own
    for stage, r in results.items():
        shutil.copy(r.telemetry, out / f"telemetry-{stage}.jsonl")
    loss_curve({s: Path(r.telemetry) for s, r in results.items()}, out / "loss.png")
    bad = [n for n, p in model.state_dict().items() if p.is_floating_point() and not torch.isfinite(p).all()]
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "runtime": {k: getattr(model.config, k) for k in ("act_max_steps", "act_threshold", "window_size",
                                                          "mem_chunk_size", "mem_lr_scale", "mem_decay_scale",
                                                          "surprise_threshold", "ponder_cost", "gate_bias", "halt_bias")},
        "non_finite_tensors": len(bad),
        "stages": {s: r.as_dict() | {"telemetry": f"telemetry-{s}.jsonl"} for s, r in results.items()},
    }


def train_foundation(shape: ModelShape, sec: CognateSection, curriculum_dir: Path, tokenizer_dir: Path,
                     batch_size: int, seed: int, workdir: Path, out: Path,
                     on_progress: Progress | None = None, hub_dirs: Sequence[Path] = ()) -> dict[str, Any]:
    """The shared base: a fresh model trained once on the foundation stage, at ``train.foundation_act_steps``
    recursion steps, with its batches rotating through the specialists' runtime settings where
    ``train.rotate_regimes`` is on (each specialist then starts in a regime the base has trained in). With
    ``train.data_parallel`` N > 1, N processes train it, each on its share of every batch; rank 0 reports the
    progress."""
    n = sec.train.data_parallel
    if n > 1:
        if batch_size % n:
            raise ValueError(f"cognate.train.data_parallel={n} does not divide the batch size {batch_size}")
        return launch(_foundation, n, shape, sec, curriculum_dir, tokenizer_dir, batch_size, seed, workdir, out,
                      list(hub_dirs), threads=max(1, usable_cpus() // n), on_progress=on_progress)
    return _foundation(SINGLE, shape, sec, curriculum_dir, tokenizer_dir, batch_size, seed, workdir, out, hub_dirs,
                       on_progress=on_progress)


def _foundation(rank: Rank, shape: ModelShape, sec: CognateSection, curriculum_dir: Path, tokenizer_dir: Path,
                batch_size: int, seed: int, workdir: Path, out: Path, hub_dirs: Sequence[Path],
                on_progress: Progress | None = None) -> dict[str, Any]:
    """One rank's foundation training (all of it, on one rank); rank 0 writes the model and returns its record."""
    splits, tokenizer, hub_rows = load_inputs(curriculum_dir, tokenizer_dir, hub_dirs)
    torch.manual_seed(seed)
    model = build(CognateForCausalLM, model_config(shape, sec, tokenizer))
    regimes = [runtime_for(s, sec.act_max_steps) for s in specialists(sec)] if sec.train.rotate_regimes else []
    if not sec.train.foundation_polarization:
        sec = sec.model_copy(update={"train": sec.train.model_copy(update={"polarization_weight": 0.0})})
    model.set_runtime(act_max_steps=sec.train.foundation_act_steps or sec.act_max_steps)
    result = train_stage(model, splits, tokenizer, "foundation", sec, shape.seq_len, batch_size, seed,
                         workdir / "foundation", sec.train.foundation_steps, 0, None, on_progress, regimes,
                         hub_rows=hub_rows, rank=rank)
    model.set_runtime(act_max_steps=sec.act_max_steps)  # the base keeps the shape's bound; specialists set their own
    return _finish(model, tokenizer, {"foundation": result}, out) if rank.leader else {}


def train_specialist(spec: Specialist, base_dir: Path, sec: CognateSection, seq_len: int, curriculum_dir: Path,
                     batch_size: int, seed: int, workdir: Path, out: Path,
                     on_progress: Progress | None = None, hub_dirs: Sequence[Path] = ()) -> dict[str, Any]:
    """A specialist: the shared base, its own runtime settings, then the reasoning and advanced stages. Each
    stage keeps the rungs below it in its data (``climb``): the test covers every rung, and trained on the
    harder rungs alone the speed specialist answered 0.5% of the arithmetic test."""
    splits, tokenizer, hub_rows = load_inputs(curriculum_dir, base_dir, hub_dirs)
    model = load_pretrained(CognateForCausalLM, base_dir)
    model.set_runtime(**runtime_for(spec, sec.act_max_steps))
    results, offset = {}, sec.train.foundation_steps
    n_steps = stage_steps_for(spec, sec.act_max_steps, sec.train.stage_steps)
    stages = ("reasoning", "advanced")
    span = (offset + 1, offset + n_steps * len(stages))  # one learning-rate schedule over both stages
    for i, stage in enumerate(stages):
        results[stage] = train_stage(model, splits, tokenizer, stage, sec, seq_len, batch_size, seed + spec.seed_offset + i,
                                     workdir / stage, n_steps, offset, spec.mix, on_progress, climb=True,
                                     schedule_span=span, hub_rows=hub_rows)
        offset += n_steps
    return _finish(model, tokenizer, results, out) | {"specialist": spec.name}


def evaluate_models(model_dirs: dict[str, Path], curriculum_dir: Path, sec: CognateSection, seq_len: int) -> dict[str, Any]:
    """Held-out metrics per model, the per-skill accuracy table, the diversity spreads across models, and
    the majority baseline."""
    splits = dataset_files.load_splits(curriculum_dir)
    test = list(splits["test"])
    any_dir = next(iter(model_dirs.values()))
    tokenizer = bpe.load(any_dir)
    # the loss on what a model writes, as in training (pack_whole's labels)
    test_ids, test_labels = pack_whole(test, tokenizer, seq_len)
    test_rows, test_labels = test_ids[: sec.eval.heldout_rows], test_labels[: sec.eval.heldout_rows]
    # resolution is judged where a model has quality to keep: on its own skills' rows. A specialist's perplexity
    # on skills it never trained runs into the thousands (tiny memory specialist: 872-2173 over the chunk sizes,
    # CV 0.27; on recall and text: 2.8-2.9, CV 0.008), and how far such a number swings says nothing of its memory
    mixes = {s.name: s.mix for s in specialists(sec)}
    own_rows = {}
    for name in model_dirs:
        skills = {k for k, w in mixes.get(name, {}).items() if w > 0}
        ids, labels = pack_whole([r for r in test if not skills or r["task"] in skills], tokenizer, seq_len)
        own_rows[name] = (ids[: sec.eval.heldout_rows], labels[: sec.eval.heldout_rows])
    problems = evaluate.by_skill(test, sec.eval.accuracy_per_skill)
    prompt = torch.tensor([tokenizer.encode(problems[0]["prompt"], add_special_tokens=False)])
    majority = evaluate.majority_hits(list(splits["train"]), problems)
    baselines = {t: sum(v) / len(v) for t, v in majority.items()}
    ablation = sec.eval.memory_ablation
    # the longest decode first: its worker starts at once, the others share the remaining cores
    order = sorted(model_dirs, key=lambda n: -CognateConfig.from_pretrained(model_dirs[n]).act_max_steps)
    workers = max(1, min(len(model_dirs), usable_cpus()))
    args = (test_rows, test_labels, problems, baselines, prompt, ablation)
    if workers == 1:
        per_model = {n: evaluate_one(model_dirs[n], *args, own_rows[n]) for n in order}
    else:
        # each model in its own worker process, not a thread: decoding a small model is mostly Python, which
        # threads share (tiny: 107 s for the three in threads, 63-73 s in workers)
        with ThreadPoolExecutor(workers) as pool:
            futures = {n: pool.submit(run_in_worker, evaluate_one, model_dirs[n], *args, own_rows[n], threads=1)
                       for n in order}
            per_model = {n: futures[n].result() for n in order}
    per_model = {n: per_model[n] for n in model_dirs}
    disagreement = evaluate.disagreement({n: m.pop("predictions") for n, m in per_model.items()})
    names = list(per_model)
    flat_majority = evaluate.pooled(majority)
    return {
        "models": per_model,
        "majority_baseline": sum(flat_majority) / len(flat_majority),
        "accuracy_examples": len(problems),
        "diversity": {key: value_range([per_model[n][key] for n in names])
                      for key in ("halting_steps", "ltm_usage", "latency_ms")} | {"prediction_disagreement": disagreement},
    }


def evaluate_one(path: Path, test_rows: torch.Tensor, test_labels: torch.Tensor, problems: list[dict],
                 baselines: dict[str, float], prompt: torch.Tensor, memory_ablation: bool,
                 own_rows: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
    """One model's held-out figures (run in a worker process by ``evaluate_models``); ``own_rows``: packed test
    rows and labels of the skills it trains, for the resolution sensitivity."""
    tokenizer = bpe.load(path)
    model = load_pretrained(CognateForCausalLM, path).eval()
    stats = heldout_stats(model, test_rows, labels=test_labels)
    hits = evaluate.hits(model, tokenizer, problems)
    flat = evaluate.pooled(hits)
    result = {
        "heldout_loss": stats["loss"],
        "heldout_ppl": perplexity(stats["loss"]),
        "accuracy": sum(flat) / len(flat),
        "n": len(flat),
        "per_skill": evaluate.per_skill(hits, baselines),
        "halting_steps": stats["halting_steps"],
        "ltm_usage": stats["ltm_usage"],
        "latency_ms": evaluate.latency_ms(model, prompt),
        "niah": niah(model, model.config.mem_chunk_size, seed=12345),
        "resolution": evaluate.resolution_sensitivity(model, own_rows[0], labels=own_rows[1]),
        "resolution_all_skills": evaluate.resolution_sensitivity(model, test_rows, labels=test_labels)["cv"],
        "predictions": evaluate.next_token_predictions(model, test_rows, test_labels),
    }
    recall = [p for p in problems if p["task"] == "kv_recall"]
    if recall and memory_ablation:
        model.set_runtime(mem_read_scale=0.0)
        ablated = evaluate.hits(model, tokenizer, recall)["kv_recall"]
        # the same problems in the same order both times: a paired test
        result["kv_recall_memory_ablated"] = evaluate.proportion(ablated) | {
            "mcnemar_p": mcnemar_p(hits["kv_recall"], ablated)}
    return result


def telemetry_summary(model_dir: Path) -> dict[str, Any]:
    """What the gates need from a trained model's telemetry files."""
    lines = []
    for f in sorted(model_dir.glob("telemetry-*.jsonl")):
        lines += [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
    steps = [x for x in lines if "lm_loss" in x and x.get("event") is None]
    return {
        "steps_logged": len(steps),
        "steps_with_ppl_delta": sum(isinstance(x.get("ppl_delta"), (int, float)) for x in steps),
        "non_finite_steps": sum(x.get("event") == "non-finite loss" for x in lines),
        "spikes": sum(bool(x.get("is_spike")) for x in lines),
    }


DIAGNOSIS, DIAGNOSIS_FIGURE, DIAGNOSIS_REPORT = "diagnosis.json", "diagnosis.png", "diagnosis.md"


def diagnose_model(model_dir: Path, settings: CognateDiagnostics, out: Path, name: str) -> dict[str, Any]:
    """The state diagnostics and go/no-go of the Cognate model in ``model_dir`` (its tokenizer beside it), written
    to ``out`` as JSON, a figure and a markdown table; returns the headline figures."""
    if not (Path(model_dir) / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json, so not a model directory")
    model = load_pretrained(CognateForCausalLM, Path(model_dir))
    tokenizer = bpe.load(Path(model_dir))
    d = diagnostics.diagnose(model, tokenizer, name, settings)
    out.mkdir(parents=True, exist_ok=True)
    (out / DIAGNOSIS).write_text(json.dumps(d.as_dict(), indent=1))
    diagnosis_figure(d.as_dict(), out / DIAGNOSIS_FIGURE)
    (out / DIAGNOSIS_REPORT).write_text(diagnostics.markdown([d]) + "\n")
    return headline(d.as_dict())


def headline(d: dict[str, Any]) -> dict[str, Any]:
    """What the gates and a summary read from a diagnosis."""
    return {"name": d["name"], "verdict": d["verdict"], "health": d["health"],
            "statuses": {r["diagnostic"]: r["status"] for r in d["rows"]},
            "worst_growth": d["d1"]["worst_growth"], "min_read_rank": d["d2"]["min_read_rank"],
            "min_state_dispersion": d["d2"]["min_state_dispersion"], "worst_coupling": d["d3"]["worst_coupling"],
            "memory_share": d["d3"]["memory_share"],
            "d4": {k: d["d4"][k] for k in ("beyond_accuracy", "beyond_ablated", "beyond_n", "difference", "interval",
                                           "mcnemar_p")}}
