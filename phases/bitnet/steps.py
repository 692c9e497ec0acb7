"""Phase 4's steps as plain functions over directories: quantize (staged, calibrated), fine-tune and pack, evaluate.

    quantize     input model → held-out "before" → layer groups quantized one by one, each calibrated and checked
                 (fallback to FP16 past its budget) → held-out "after quantization" → latent weights + plan.json
    finetune     plan → QAT with STE when the drop exceeds the threshold (the decision is recorded) → packed
                 artifact (2-bit weights, FP16 rest, config.json with quantization_config, tokenizer) → the packed
                 model reloaded from disk must give the fake-quantized model's logits
    evaluate     packed model from disk vs the input: accuracy, compression, sparsity, speed, memory, figure

Data: validation rows and problems drive every decision (calibration, staged checks, whether to fine-tune and
fine-tuning's best state); test rows and test problems give every reported number, so no reported figure was
selected on.

What judges what: fine-tuning (whether and which state) is judged on validation skill accuracy, then next-token
accuracy. The staged checks, which run before fine-tuning, judge a group on next-token accuracy alone: on tiny,
every group quantized alone costs held-out recall (layer 0's MLP all of it, 66% to 0%), yet 100 steps of
fine-tuning on answers bring the fully ternary model back to 66%, so judging groups on skills before fine-tuning
would keep most of them in FP16 for nothing.

A Quiet-STaR model thinks (L thought tokens) at every position when its thoughts are on, so a pass costs about
L + 2 passes of its decoder. Decisions and fine-tuning run the base path (thoughts off: the same decoder layers,
once per position); every reported figure (held-out quality, accuracy, speed) runs the model as it is configured.
The Prefect tasks in ``tasks/bitnet.py`` call these with store paths; tests call them directly.
"""

from __future__ import annotations

import copy
import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from phases.bitnet import calibrate as calib
from phases.bitnet import convert
from phases.bitnet import evaluate as ev
from phases.bitnet.finetune import finetune as qat
from phases.bitnet.packed_format import load_packed, packed_layers, save_packed
from phases.bitnet.plots import bitnet_report_png
from phases.bitnet.quantizer import ternarize
from phases.bitnet.settings import BitNetEvaluate, BitNetFinetune, BitNetHeldout, BitNetQuantize
from phases.cognate.data import Batches, mixed_texts
from phases.cognate.evaluate import majority_hits
from phases.common.config import ModelShape
from phases.common.hf_io import load_pretrained, save_pretrained
from phases.common.measure import decode_rates, mcnemar_p, relative_drop
from phases.common.sizing import model_size, strategy_for
from phases.data import dataset_files
from phases.data import tokenizer as bpe
from phases.data.encoding import EvalSet, pack

PLAN = "plan.json"
REPORT = "report.json"
FIGURE = "bitnet.png"


class Data:
    """The curriculum cut for Phase 4: validation rows and problems for decisions, test rows and problems for
    reporting, the training split's text and problems for fine-tuning."""

    def __init__(self, curriculum_dir: Path, tokenizer, seq_len: int, heldout: BitNetHeldout):
        splits = dataset_files.load_splits(curriculum_dir)
        self.splits, self.tokenizer, self.seq_len = splits, tokenizer, seq_len
        self.validation_rows = pack([r["text"] for r in splits["validation"]], tokenizer, seq_len)
        self.select_rows = self.validation_rows[: heldout.eval_rows]
        self.test_rows = pack([r["text"] for r in splits["test"]], tokenizer, seq_len)[: heldout.eval_rows]
        n = heldout.problems_per_skill
        # the same problems, per skill, and the same teacher-forced exact answer as the forging report reads
        self.select_problems = EvalSet.build(list(splits["validation"]), tokenizer, seq_len, 0, n, "validation")
        self.problems = EvalSet.build(list(splits["test"]), tokenizer, seq_len, 0, n, "test")

    def majority_skills(self) -> dict[str, list[int]]:
        """Per skill of the test problems, [hits, n] of always answering the skill's commonest training answer."""
        test = [{"task": k, "answer": a} for k, a in zip(self.problems.skills, self.problems.answers)]
        hits = majority_hits(list(self.splits["train"]), test)
        return {k: [sum(v), len(v)] for k, v in sorted(hits.items())}

    def calibration_rows(self, n: int) -> torch.Tensor:
        """The far end of the validation rows: it overlaps the check rows least."""
        return self.validation_rows[-n:]

    def train_batches(self, batch_size: int, steps: int, seed: int) -> Batches:
        """Batches from a shuffled slice of the training split, about 8x what ``steps`` will draw (tokenizing all of
        it would cost more than the fine-tuning)."""
        texts = mixed_texts(list(self.splits["train"]), None, seed)
        return Batches(pack(texts[: max(64, 8 * steps * batch_size)], self.tokenizer, self.seq_len), batch_size, seed)

    def answer_batches(self, batch_size: int, steps: int, seed: int) -> AnswerBatches:
        """Batches of the training split's problems (every skill), labelled on their answer tokens only."""
        per_skill = -(-max(64, 8 * steps * batch_size) // 3)  # about 8x what ``steps`` draws, over three skills
        train = EvalSet.build(list(self.splits["train"]), self.tokenizer, self.seq_len, 0, per_skill, "train")
        return AnswerBatches(train.problems, batch_size, seed, self.tokenizer.pad_token_id or 0)

    def finetune_batches(self, objective: str, batch_size: int, steps: int, seed: int):
        """batch(step) for ``finetune.objective``: "both" takes answers on even steps and text on odd ones."""
        if objective == "answers":
            return self.answer_batches(batch_size, steps, seed)
        if objective == "text":
            return self.train_batches(batch_size, steps, seed)
        answers, text = self.answer_batches(batch_size, steps, seed), self.train_batches(batch_size, steps, seed)
        return lambda step: answers(step) if step % 2 == 0 else text(step)

    def prompts(self, n: int = 2) -> list[torch.Tensor]:
        return [torch.tensor([prompt]) for prompt, _ in self.problems.problems[:n]]


class AnswerBatches:
    """batch(step) -> (ids, labels): problems drawn with a per-step seeded generator, right-padded (a causal model
    never reads the padding), labels -100 everywhere but the answer tokens."""

    def __init__(self, problems: list[tuple[list[int], list[int]]], batch_size: int, seed: int, pad_id: int):
        if not problems:
            raise ValueError("no training problems with an answer in the curriculum's training split")
        self.problems, self.batch_size, self.seed, self.pad_id = problems, batch_size, seed, pad_id

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        drawn = [self.problems[i] for i in torch.randint(len(self.problems), (self.batch_size,), generator=g).tolist()]
        width = max(len(p) + len(a) for p, a in drawn)
        ids = torch.full((len(drawn), width), self.pad_id, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        for row, (prompt, answer) in enumerate(drawn):
            ids[row, :len(prompt) + len(answer)] = torch.tensor(prompt + answer)
            labels[row, len(prompt):len(prompt) + len(answer)] = torch.tensor(answer)
        return ids, labels


def load_tokenizer(model_dir: Path, tokenizer_dir: Path | None):
    """The model's own tokenizer when its artifact has one (Quiet-STaR adds thinking tokens), else the pipeline's."""
    if (Path(model_dir) / "tokenizer.json").exists() or tokenizer_dir is None:
        return bpe.load(model_dir)
    return bpe.load(tokenizer_dir)


def held_out(model, data: Data, with_accuracy: bool = True) -> dict[str, Any]:
    stats = ev.token_stats(model, data.test_rows)
    if with_accuracy:
        stats |= ev.skill_accuracy(model, data.problems)
    return stats


@contextmanager
def base_path(model):
    """Thoughts off for the duration (a no-op for a model without them)."""
    thinking = getattr(model.config, "thoughts_enabled", None)
    if thinking:
        model.config.thoughts_enabled = False
    try:
        yield model
    finally:
        if thinking:
            model.config.thoughts_enabled = thinking


def _select_score(data: Data):
    return lambda m: ev.token_stats(m, data.select_rows)["token_accuracy"]


def _select_stats(model, data: Data) -> dict[str, Any]:
    """What fine-tuning is judged on, on validation: skill accuracy first, next-token accuracy on ties."""
    skills = ev.skill_accuracy(model, data.select_problems)
    return ev.token_stats(model, data.select_rows) | {"skill_accuracy": skills["accuracy"],
                                                      "skills": skills["skills"]}


def quantize(model_dir: Path, curriculum_dir: Path, tokenizer_dir: Path | None, heldout: BitNetHeldout,
             sec: BitNetQuantize, shape: ModelShape, out: Path) -> dict[str, Any]:
    """Staged, calibrated post-training quantization. Writes the latent (full-precision) weights and plan.json."""
    t0, c0 = time.perf_counter(), time.process_time()
    model = load_pretrained(AutoModelForCausalLM, model_dir).eval()
    tokenizer = load_tokenizer(model_dir, tokenizer_dir)
    data = Data(curriculum_dir, tokenizer, shape.seq_len, heldout)
    calibration_rows = data.calibration_rows(sec.calibration_rows)
    groups = convert.layer_groups(model)
    if not groups:
        raise ValueError(f"{model_dir}: no linear layer but the LM head: nothing to quantize")
    size = model_size(model)
    strategy = strategy_for(size, shape)
    targets = {"category": size.category, "params": size.params,
               "compression": sec.compression_target or strategy.compression_target,
               "sparsity": sec.sparsity_target if sec.sparsity_target is not None else strategy.sparsity_target}

    before = held_out(model, data)
    score = _select_score(data)
    with base_path(model):
        skills_before = ev.skill_accuracy(model, data.select_problems)["accuracy"]

    def calibrate(names: list[str]) -> tuple[dict, float]:
        """Fit the group's output scales; keep them only where they beat plain mean|W| on held-out rows."""
        layers = {n: model.get_submodule(n) for n in names}
        fitted = calib.calibrate(model, layers, calibration_rows)
        with_fit = score(model)
        calib.reset(layers.values())
        plain = score(model)
        keep = with_fit > plain
        if keep:
            for n, layer in layers.items():
                layer.out_scale.fill_(fitted[n]["out_scale"])
        info = {"kept": keep, "score_calibrated": with_fit, "score_absmean": plain, "layers": fitted}
        return info, max(with_fit, plain)

    with base_path(model):
        stages = convert.staged_quantize(model, score, sec.group_drop_budget, groups,
                                         calibrate if sec.calibrate else None)
    quantized = sorted(convert.bitlinears(model))
    if not quantized:
        raise ValueError("every layer group failed its staged check: nothing was quantized "
                         f"(group budget {sec.group_drop_budget}); see the stage records")
    after = held_out(model, data)
    with base_path(model):
        skills_after = ev.skill_accuracy(model, data.select_problems)["accuracy"]
    select_before = stages[0]["metric_before"]
    select_after = next((s["metric_after"] for s in reversed(stages) if not s["kept_fp16"]), select_before)

    plan = {
        "quantized": quantized,
        "out_scales": {n: float(m.out_scale) for n, m in convert.bitlinears(model).items()},
        "fp16_groups": {s["group"]: s["reason"] for s in stages if s["kept_fp16"]},
        "fp16_modules": {n: f"staged fallback ({s['group']}): {s['reason']}"
                         for s in stages if s["kept_fp16"] for n in s["modules"]},
        "select_before": select_before, "select_after_quantization": select_after,
        "select_skills_before": skills_before, "select_skills_after_quantization": skills_after,
    }
    convert.to_linear(model, quantized)  # the latent weights, as a plain Cognate model
    save_pretrained(model, out)
    tokenizer.save_pretrained(str(out))
    (Path(out) / PLAN).write_text(json.dumps(plan, indent=2))
    return {"targets": targets, "before": before, "after_quantization": after, "stages": stages,
            "quantized_layers": len(quantized), "fp16_groups": plan["fp16_groups"],
            "select_before": select_before, "select_after_quantization": select_after,
            "select_skills_before": skills_before, "select_skills_after_quantization": skills_after,
            "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0}


def _quantized_model(staged_dir: Path):
    plan = json.loads((Path(staged_dir) / PLAN).read_text())
    model = load_pretrained(AutoModelForCausalLM, staged_dir).eval()
    convert.to_bitlinear(model, plan["quantized"])
    for name, scale in plan["out_scales"].items():
        model.get_submodule(name).out_scale.fill_(scale)
    return model, plan


def finetune(staged_dir: Path, curriculum_dir: Path, heldout: BitNetHeldout, sec: BitNetFinetune, shape: ModelShape,
             seed: int, out: Path) -> dict[str, Any]:
    """QAT when needed, then the packed artifact; checks the reloaded packed model against the fake-quantized one."""
    t0, c0 = time.perf_counter(), time.process_time()
    model, plan = _quantized_model(staged_dir)
    tokenizer = bpe.load(staged_dir)
    data = Data(curriculum_dir, tokenizer, shape.seq_len, heldout)
    drop = relative_drop(plan["select_before"], plan["select_after_quantization"])
    skill_drop = relative_drop(plan["select_skills_before"], plan["select_skills_after_quantization"])
    # a NaN drop is not above the threshold: a model that answers nothing has no skill to lose
    run = sec.steps > 0 and (drop > sec.threshold or skill_drop > sec.threshold)
    verdict = ("fine-tuning" if run else "no fine-tuning needed" if sec.steps
               else "fine-tuning disabled (finetune.steps=0)")
    decision = (f"after quantization, validation skill accuracy dropped {skill_drop:.1%} "
                f"({plan['select_skills_before']:.4f} -> {plan['select_skills_after_quantization']:.4f}) and "
                f"next-token accuracy {drop:.1%} ({plan['select_before']:.4f} -> "
                f"{plan['select_after_quantization']:.4f}); threshold {sec.threshold:.1%}: {verdict}")
    metrics: dict[str, Any] = {"decision": decision, "finetuned": run, "drop_before_finetune": drop,
                               "skill_drop_before_finetune": skill_drop, "objective": sec.objective}
    probe = data.test_rows[:2]
    with base_path(model):
        if run:
            torch.manual_seed(seed)
            telemetry = Path(out) / "telemetry-finetune.jsonl"
            batches = data.finetune_batches(sec.objective, sec.batch_size, sec.steps, seed)
            result = qat(model, batches, lambda m: _select_stats(m, data), sec, telemetry)
            metrics["finetune"] = result
        metrics["after_finetune_base_path"] = held_out(model, data, with_accuracy=False)
        with torch.no_grad():
            fake_logits = model(probe).logits
    save_packed(copy.deepcopy(model), out, dict(plan["fp16_modules"]))
    tokenizer.save_pretrained(str(out))
    with torch.no_grad(), base_path(load_packed(out)) as packed:
        packed_logits = packed(probe).logits
    diff = (packed_logits - fake_logits).abs()
    metrics["packed_vs_fake_quant"] = {"max_abs_logit_diff": float(diff.max()),
                                       "mean_abs_logit_diff": float(diff.mean()),
                                       "logit_scale": float(fake_logits.abs().max()),
                                       "argmax_agreement": float((packed_logits.argmax(-1) == fake_logits.argmax(-1))
                                                                 .float().mean())}
    metrics["seconds"], metrics["cpu_seconds"] = time.perf_counter() - t0, time.process_time() - c0
    return metrics


def evaluate(input_dir: Path, staged_metrics: dict[str, Any], packed_dir: Path, curriculum_dir: Path,
             heldout: BitNetHeldout, sec: BitNetEvaluate, shape: ModelShape, out: Path) -> dict[str, Any]:
    """The packed model from disk against its FP32 input: every figure of the gates, plus the PNG."""
    t0, c0 = time.perf_counter(), time.process_time()
    packed = load_packed(packed_dir)
    fp32 = load_pretrained(AutoModelForCausalLM, input_dir).eval()
    data = Data(curriculum_dir, bpe.load(packed_dir), shape.seq_len, heldout)
    qc = packed.config.quantization_config
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    layers = packed_layers(packed)
    ternary = {n: m.ternary() for n, m in layers.items()}

    after = held_out(packed, data)
    before = staged_metrics["before"]
    comp = ev.compression(input_dir, packed_dir, list(layers), ev.input_fp32_bytes(input_dir, fp32),
                          ev.saved_bytes(fp32, torch.float16), sum(w.numel() for w in ternary.values()))
    prompts = data.prompts()
    rates = decode_rates({"fp32": fp32, "packed": packed}, prompts, sec.speed_tokens, sec.speed_repeats)
    sparsity = ev.sparsity_by_layer(ternary)
    # what absmean ternarization zeroes on the FP32 input's own weights, before any fine-tuning: the sparsity the
    # quantizer gives for free (|w| < mean|w| / 2; 0.31 for Gaussian weights, 0.25 for uniform)
    sparsity["input_free"] = ev.sparsity_by_layer(
        {n: ternarize(fp32.get_submodule(n).weight)[0] for n in ternary})["overall"]
    fp16_linear = [n for n in qc["fp16_modules"] if n not in convert.lm_heads(packed)]
    report = {
        "targets": staged_metrics["targets"],
        "before": before,
        "after_quantization": staged_metrics["after_quantization"],
        "packed": after,
        "accuracy": {
            "before": before["accuracy"], "after_quantization": staged_metrics["after_quantization"]["accuracy"],
            "packed": after["accuracy"], "task_accuracy_drop": relative_drop(before["accuracy"], after["accuracy"]),
            "token_accuracy_drop": relative_drop(before["token_accuracy"], after["token_accuracy"]),
            "examples": after["accuracy_n"],
            "skills_before": before["skills"], "skills_packed": after["skills"],
            # what always giving a skill's commonest training answer scores on the same problems: a skill the input
            # does not answer above it has nothing to keep
            "skills_majority": data.majority_skills(),
            # paired: the same problems, input vs packed; small p means the packed model answers differently
            "mcnemar_p": mcnemar_p(before["hits"], after["hits"]),
        },
        "compression": comp,
        "sparsity": sparsity,
        "speed": {"fp32_tokens_per_s": rates["fp32"]["tokens_per_s"],
                  "packed_tokens_per_s": rates["packed"]["tokens_per_s"],
                  "speedup": rates["packed"]["tokens_per_s"] / rates["fp32"]["tokens_per_s"],
                  "speedup_cpu_time": rates["packed"]["tokens_per_cpu_s"] / rates["fp32"]["tokens_per_cpu_s"],
                  "fp32_tokens_per_cpu_s": rates["fp32"]["tokens_per_cpu_s"],
                  "packed_tokens_per_cpu_s": rates["packed"]["tokens_per_cpu_s"],
                  "new_tokens": sec.speed_tokens, "prompts": len(prompts), "repeats": sec.speed_repeats,
                  "threads": torch.get_num_threads(), "device": str(next(packed.parameters()).device),
                  "shape": f"d={fp32.config.hidden_size}, {fp32.config.num_hidden_layers} layers, "
                           f"{sum(p.numel() for p in fp32.parameters()):,} params"},
        "memory": {"fp32_resident_bytes": ev.resident_bytes(fp32), "packed_resident_bytes": ev.resident_bytes(packed)},
        "fp16_layers": qc["fp16_modules"],
        "stages": [{k: s[k] for k in ("group", "kept_fp16", "drop", "reason")} for s in staged_metrics["stages"]],
    }
    report["seconds"], report["cpu_seconds"] = time.perf_counter() - t0, time.process_time() - c0
    report["memory"]["ratio"] = report["memory"]["fp32_resident_bytes"] / report["memory"]["packed_resident_bytes"]
    bitnet_report_png(
        sparsity["per_layer"], fp16_linear, report["targets"]["sparsity"],
        {"FP32 input": before, "ternary, before fine-tuning": staged_metrics["after_quantization"],
         "packed, final": after},
        Path(out) / FIGURE)
    # report.json holds what the recipe determines; the timings (decode speeds, durations) differ on every run, so
    # they live in the manifest's metrics, this copy's record of how it was made: an artifact id names one set of bytes
    (Path(out) / REPORT).write_text(json.dumps(without_timings(report), indent=2))  # an undefined drop is NaN
    return report


TIMINGS = ("speed", "seconds", "cpu_seconds")  # the report's keys measured by a clock


def without_timings(report: dict) -> dict:
    return {k: v for k, v in report.items() if k not in TIMINGS}
