"""Phase 3 as plain functions over directories: bake, reinforce, evaluate.

The Prefect tasks in ``tasks/quietstar.py`` call these with store paths; tests call them directly.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from phases.cognate.modeling import CognateForCausalLM
from phases.cognate.plots import loss_curve
from phases.common.config import ModelShape
from phases.common.hf_io import build, load_pretrained, save_pretrained
from phases.common.optim import MuonGrokfastConfig
from phases.common.sizing import model_size, strategy_for
from phases.data import dataset_files
from phases.data import tokenizer as bpe
from phases.quietstar import generation
from phases.quietstar.baking import BakeSettings, BakingError, add_thinking_tokens, bake, thinking_ids
from phases.quietstar.evaluate import latency_ms_per_token, reasoning_accuracy
from phases.quietstar.model import QuietStarForCausalLM, quietstar_config
from phases.quietstar.reinforce import RLSettings, answer_windows, reinforce, theater_problems
from phases.quietstar.settings import QuietStarSection
from phases.quietstar.tokens import THINK_END, THINK_START

Progress = Callable[[dict[str, Any]], None]


def spread(items: Sequence[Any], n: int) -> list[Any]:
    """``n`` items taken evenly across ``items`` (tasks are interleaved, so every task is represented)."""
    return list(items[:: max(1, len(items) // n)][:n])


def answerable(rows) -> list[dict[str, Any]]:
    return [dict(r) for r in rows if r["answer"]]


def _non_finite(model: torch.nn.Module) -> int:
    return sum(not torch.isfinite(p).all() for p in model.state_dict().values() if p.is_floating_point())


def bake_settings(sec: QuietStarSection, seq_len: int, seed: int) -> BakeSettings:
    return BakeSettings(
        max_steps=sec.bake_max_steps, batch_size=sec.bake_batch_size, seq_len=sec.bake_seq_len or seq_len,
        optim=MuonGrokfastConfig(muon_lr=sec.bake_muon_lr, adam_lr=sec.bake_lr, weight_decay=0.0,
                                 grokfast_alpha=sec.bake_grokfast_alpha, grokfast_lambda=sec.bake_grokfast_lambda),
        kl_weight=sec.bake_kl_weight, eval_every=sec.bake_eval_every, target=sec.bake_target, seed=seed)


def bake_model(model_dir: Path, data_dir: Path, sec: QuietStarSection, seq_len: int, seed: int, workdir: Path,
               out: Path, on_progress: Progress | None = None) -> dict[str, Any]:
    """The input model + the 12 tokens, fine-tuned on the reasoning data; saved with its tokenizer."""
    model = load_pretrained(CognateForCausalLM, model_dir)
    tokenizer = bpe.load(model_dir)
    init = add_thinking_tokens(model, tokenizer, sec.embed_init_noise, seed)
    examples = generation.load_examples(data_dir)
    train, heldout = generation.heldout_split(examples, sec.bake_heldout_fraction, seed)
    if not train or not heldout:
        raise BakingError(f"{len(examples)} reasoning examples split into {len(train)} train / {len(heldout)} held-out "
                          f"(bake_heldout_fraction={sec.bake_heldout_fraction}): generate more examples")
    heldout = spread(heldout, sec.bake_heldout_examples)
    settings = bake_settings(sec, seq_len, seed)
    result = bake(model, tokenizer, train, heldout, settings, workdir, on_progress)
    save_pretrained(model, out)
    tokenizer.save_pretrained(str(out))
    shutil.copy(result.pop("telemetry"), out / "telemetry-baking.jsonl")
    loss_curve({"baking": out / "telemetry-baking.jsonl"}, out / "loss.png", title="Quiet-STaR prompt baking")
    return {"baking": result, "embedding_init": init, "settings": settings.as_dict(),
            "examples": {"train": len(train), "heldout_scored": len(heldout), "total": len(examples)},
            "params": sum(p.numel() for p in model.parameters()), "non_finite_tensors": _non_finite(model)}


def thought_budget(model: torch.nn.Module, shape: ModelShape, sec: QuietStarSection) -> dict[str, int]:
    """The size-adaptive thought count × length (sizing's strategy table), capped by the settings."""
    strategy = strategy_for(model_size(model), shape)
    count, length = strategy.thought_count, strategy.thought_length
    return {"strategy_count": count, "strategy_length": length,
            "count": min(count, sec.thought_count_cap or count), "length": min(length, sec.thought_length_cap or length)}


def rl_settings(sec: QuietStarSection, budget: dict[str, int], seed: int) -> RLSettings:
    return RLSettings(
        steps=sec.rl_steps, batch_size=sec.rl_batch_size, thought_count=budget["count"],
        thought_length=budget["length"], n_true=sec.n_true, temperature=sec.rl_temperature,
        optim=MuonGrokfastConfig(muon_lr=sec.rl_muon_lr, adam_lr=sec.rl_lr, weight_decay=0.0,
                                 grokfast_alpha=sec.rl_grokfast_alpha, grokfast_lambda=sec.rl_grokfast_lambda),
        mixing_lr=sec.rl_mixing_lr, kl_weight=sec.rl_kl_weight, check_every=sec.theater_check_every,
        max_retries=sec.theater_max_retries, eval_thoughts=sec.theater_eval_thoughts,
        min_divergence=sec.min_divergence, min_ablation=sec.min_ablation, min_correlation=sec.min_correlation,
        seed=seed)


def quietstar_from_baked(baked: CognateForCausalLM, tokenizer, thought_length: int) -> QuietStarForCausalLM:
    """The baked model with a fresh mixing head (output 0): at this point it IS the baked model."""
    ids = thinking_ids(tokenizer)
    start, end = ids[THINK_START], ids[THINK_END]
    cfg = quietstar_config(baked.config, thought_length, start, end, banned=[start, end, tokenizer.eos_token_id])
    model = build(QuietStarForCausalLM, cfg)
    missing, unexpected = model.load_state_dict(baked.state_dict(), strict=False)
    if unexpected or any(not k.startswith("mixing.") for k in missing):
        raise BakingError(f"baked weights do not fit the Quiet-STaR model: missing {missing}, unexpected {unexpected}")
    model.mixing.reset_output()
    return model


def reinforce_model(baked_dir: Path, curriculum_dir: Path, sec: QuietStarSection, shape: ModelShape, seed: int,
                    workdir: Path, out: Path, on_progress: Progress | None = None) -> dict[str, Any]:
    baked = load_pretrained(CognateForCausalLM, baked_dir)
    tokenizer = bpe.load(baked_dir)
    budget = thought_budget(baked, shape, sec)
    settings = rl_settings(sec, budget, seed)
    model = quietstar_from_baked(baked, tokenizer, budget["length"])
    splits = dataset_files.load_splits(curriculum_dir)
    train = answerable(splits["train"])
    train = spread(train, max(200, 8 * sec.rl_steps * sec.rl_batch_size))
    rows = answer_windows(train, tokenizer, sec.rl_seq_len)
    checks = theater_problems(spread(answerable(splits["validation"]), sec.theater_problems), tokenizer)
    result = reinforce(model, baked, rows, checks, settings, workdir, on_progress)
    save_pretrained(model, out)
    tokenizer.save_pretrained(str(out))
    shutil.copy(result.pop("telemetry"), out / "telemetry-reinforce.jsonl")
    loss_curve({"reinforce (mixed NLL)": out / "telemetry-reinforce.jsonl"}, out / "loss.png",
               title="Quiet-STaR reinforcement")
    return {"reinforce": result, "thought_budget": budget, "settings": settings.as_dict(), "rows": len(rows),
            "theater_problems": len(checks), "non_finite_tensors": _non_finite(model)}


def evaluate(baked_dir: Path, model_dir: Path, curriculum_dir: Path, sec: QuietStarSection,
             latency_tokens: int = 4) -> dict[str, Any]:
    """Held-out reasoning accuracy of the baked model and of the reinforced one (thoughts on and off),
    and latency per token with and without thoughts."""
    tokenizer = bpe.load(model_dir)
    problems = spread(answerable(dataset_files.load_splits(curriculum_dir)["test"]), sec.eval_problems)
    baked = load_pretrained(CognateForCausalLM, baked_dir).eval()
    model = load_pretrained(QuietStarForCausalLM, model_dir).eval()
    acc_baked = reasoning_accuracy(baked, tokenizer, problems, sec.eval_max_new_tokens)
    acc_rl = reasoning_accuracy(model, tokenizer, problems, sec.eval_max_new_tokens)
    model.config.thoughts_enabled = False
    acc_rl_plain = reasoning_accuracy(model, tokenizer, problems, sec.eval_max_new_tokens)
    model.config.thoughts_enabled = True
    prompt = torch.tensor([tokenizer.encode(problems[0]["prompt"], add_special_tokens=False)])
    # no written thinking block during the latency run, so every token really gets a thought
    no_block = {"bad_words_ids": [[model.config.thought_start_id]]}
    latency = {"with_thoughts": latency_ms_per_token(model, prompt, latency_tokens, repeats=1, **no_block),
               "without_thoughts": latency_ms_per_token(baked, prompt, latency_tokens, repeats=1, **no_block)}
    latency["ratio"] = latency["with_thoughts"] / latency["without_thoughts"]
    return {"accuracy_baked": acc_baked, "accuracy_reinforced": acc_rl, "accuracy_reinforced_no_thoughts": acc_rl_plain,
            "accuracy_delta": acc_rl["accuracy"] - acc_baked["accuracy"], "latency_ms_per_token": latency,
            "thought_length": model.config.thought_length, "problems": len(problems)}
