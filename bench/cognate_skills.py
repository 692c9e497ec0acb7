"""Per-skill held-out accuracy of tiny Cognate specialists, end to end on a temp dir: curriculum ->
tokenizer -> foundation -> specialists -> evaluation. Ends with one JSON line.

    python bench/cognate_skills.py                      # the tiny preset as the flow runs it
    python bench/cognate_skills.py --set train.foundation_steps=300 --set train.stage_steps=100
    python bench/cognate_skills.py --format-only 600    # arithmetic alone: bare vs worked answers, 600 steps each

The format experiment trains a fresh tiny model on the arithmetic skill only, once on bare answers and once
on the curriculum's column-by-column working, and decodes held-out problems with ``generate``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phases.cognate import evaluate, steps  # noqa: E402
from phases.cognate.data import Batches, pack_whole  # noqa: E402
from phases.cognate.modeling import CognateForCausalLM  # noqa: E402
from phases.cognate.specialists import runtime_for, specialists  # noqa: E402
from phases.cognate.trainer import train  # noqa: E402
from phases.common.hf_io import build, load_pretrained  # noqa: E402
from phases.common.measure import heldout_loss  # noqa: E402
from phases.config import PipelineConfig  # noqa: E402
from phases.data import curriculum, dataset_files  # noqa: E402
from phases.data import tokenizer as bpe  # noqa: E402
from phases.data.encoding import pack  # noqa: E402


def _override(cfg: dict, dotted: str) -> None:
    key, value = dotted.split("=", 1)
    *path, last = key.split(".")
    for p in path:
        cfg = cfg.setdefault(p, {})
    cfg[last] = json.loads(value)


def format_experiment(config: PipelineConfig, splits, tok_dir: Path, work: Path, n_steps: int) -> dict:
    """Arithmetic alone, bare answers (prompt, then the number) against the curriculum's worked columns;
    same model, steps and batches; held-out problems decoded with the model's own generate."""
    tokenizer = bpe.load(tok_dir)
    sec, shape = config.cognate, config.model

    def rows(split: str, worked: bool) -> list[dict]:
        return [r if worked else {**r, "rationale": "", "text": f"{r['prompt']}{r['answer']}"}
                for r in splits[split] if r["task"] == "arithmetic"]

    result = {}
    for name, worked in (("bare", False), ("worked", True)):
        torch.manual_seed(config.seed)
        model = build(CognateForCausalLM, steps.model_config(shape, sec, tokenizer))
        train_rows, labels = pack_whole(rows("train", worked), tokenizer, shape.seq_len)
        eval_rows = pack([r["text"] for r in rows("validation", worked)], tokenizer, shape.seq_len)[:16]
        t0 = time.perf_counter()
        train(model, Batches(train_rows, sec.train.batch_size, config.seed, labels), eval_rows, sec.train, work / name, n_steps)
        seconds = time.perf_counter() - t0
        test = rows("test", worked)[: sec.eval.accuracy_per_skill]
        if not worked:  # the bare answer is the whole continuation: no answer mark to look for
            test = [{**r, "task": "bare_arithmetic"} for r in test]
        hits = [h for v in evaluate.hits(model, tokenizer, test).values() for h in v]
        result[name] = {"accuracy": sum(hits) / len(hits), "n": len(hits), "steps": n_steps, "train_seconds": round(seconds, 1),
                        "wilson_95": list(evaluate.wilson_interval(sum(hits), len(hits)))}
        print(name, result[name], flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--set", action="append", default=[], help="cognate.<dotted>=<json>, e.g. train.stage_steps=80")
    ap.add_argument("--data", action="append", default=[], help="data.<dotted>=<json>")
    ap.add_argument("--format-only", type=int, default=0, help="run only the answer-format experiment, this many steps each")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    over: dict = {"cognate": {}, "data": {}}
    for s in args.set:
        _override(over["cognate"], s)
    for s in args.data:
        _override(over["data"], s)
    config = PipelineConfig.from_preset("tiny", **over)
    sec, shape = config.cognate, config.model
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        splits = curriculum.generate(config.data.train_per_stage, config.data.eval_per_stage, config.data.seed)
        dataset_files.save_splits(splits, tmp / "cur")
        tok = bpe.train_bpe((r["text"] for r in splits["train"]), config.tokenizer.vocab_size)
        bpe.save(tok, tmp / "tok")
        if args.format_only:
            print(json.dumps({"bench": "cognate_skills", "format": format_experiment(
                config, splits, tmp / "tok", tmp / "format", args.format_only)}))
            return
        batch = sec.train.batch_size or 8
        t0 = time.perf_counter()
        base = steps.train_foundation(shape, sec, tmp / "cur", tmp / "tok", batch, config.seed, tmp / "w", tmp / "base")
        timings = {"foundation": time.perf_counter() - t0}
        fl = base["stages"]["foundation"]
        print("foundation", {k: fl[k] for k in ("eval_loss", "first_lm_loss", "last_lm_loss", "train_seconds")}, flush=True)
        # the regime check on equal data: the base's held-out loss on each specialist's first-stage skills,
        # under the base's own runtime settings and under the specialist's
        base_model = load_pretrained(CognateForCausalLM, tmp / "base").eval()
        regime_loss = {}
        for spec in specialists(sec):
            held = [r for r in splits["validation"] if r["stage"] == "reasoning" and spec.mix.get(r["task"], 0) > 0]
            ids, labels = pack_whole(held, bpe.load(tmp / "base"), shape.seq_len)
            rows, labels = ids[:32], labels[:32]
            own = heldout_loss(base_model, rows, labels=labels)
            saved = {k: getattr(base_model.config, k) for k in runtime_for(spec, sec.act_max_steps)}
            base_model.set_runtime(**runtime_for(spec, sec.act_max_steps))
            regime_loss[spec.name] = {"base_runtime": own, "specialist_runtime": heldout_loss(base_model, rows, labels=labels)}
            base_model.set_runtime(**saved)
        print("base held-out loss on each specialist's data, by runtime", regime_loss, flush=True)
        dirs, shock = {}, {}
        for spec in specialists(sec):
            t0 = time.perf_counter()
            m = steps.train_specialist(spec, tmp / "base", sec, shape.seq_len, tmp / "cur", batch, config.seed,
                                       tmp / f"w-{spec.name}", tmp / spec.name)
            timings[spec.name] = time.perf_counter() - t0
            first = m["stages"]["reasoning"]["first_lm_loss"]
            shock[spec.name] = {"first_step_loss": first, "foundation_last_loss": fl["last_lm_loss"],
                                "ratio": first / fl["last_lm_loss"]}
            print(spec.name, shock[spec.name], {s: round(v["eval_loss"], 3) for s, v in m["stages"].items()}, flush=True)
            dirs[spec.name] = tmp / spec.name
        t0 = time.perf_counter()
        ev = steps.evaluate_models(dirs, tmp / "cur", sec, shape.seq_len)
        timings["evaluate"] = time.perf_counter() - t0
    for name, m in ev["models"].items():
        for skill, row in m["per_skill"].items():
            lo, hi = row["wilson_95"]
            print(f"{name:10s} {skill:13s} {row['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] n={row['n']} "
                  f"majority={row['majority_baseline']:.3f}")
        if "kv_recall_memory_ablated" in m:
            print(f"{name:10s} kv_recall, memory read zeroed: {m['kv_recall_memory_ablated']['accuracy']:.3f}")
    timings["total"] = time.perf_counter() - t_all
    print(json.dumps({"bench": "cognate_skills", "per_skill": {n: m["per_skill"] for n, m in ev["models"].items()},
                      "memory_ablated": {n: m.get("kv_recall_memory_ablated") for n, m in ev["models"].items()},
                      "majority_baseline": ev["majority_baseline"], "first_step_loss": shock,
                      "base_heldout_loss_by_regime": regime_loss,
                      "seconds": {k: round(v, 1) for k, v in timings.items()}}))


if __name__ == "__main__":
    main()
