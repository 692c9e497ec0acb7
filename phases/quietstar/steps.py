"""Phase 3's steps as plain functions over directories: bake, reinforce, evaluate.

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
from phases.common.measure import difference_interval, mcnemar_p
from phases.common.sizing import model_size, strategy_for
from phases.data import dataset_files
from phases.data import tokenizer as bpe
from phases.quietstar.baking import BakingError, add_thinking_tokens, bake, thinking_ids
from phases.quietstar.evaluate import latency_ms_per_token, reasoning_accuracy
from phases.quietstar.model import QuietStarForCausalLM, quietstar_config
from phases.quietstar.reasoning_data import generation
from phases.quietstar.reinforce import answer_windows, reinforce, theater_problems
from phases.quietstar.settings import Baking, QuietStarEvaluation, Reinforcement
from phases.quietstar.tokens import THINK_END, THINK_START

Progress = Callable[[dict[str, Any]], None]


def evenly_spaced(items: Sequence[Any], n: int) -> list[Any]:
    """``n`` items taken evenly across ``items`` (tasks are interleaved, so every task is represented)."""
    return list(items[:: max(1, len(items) // n)][:n])


def answerable(rows) -> list[dict[str, Any]]:
    return [dict(r) for r in rows if r["answer"]]


def _non_finite(model: torch.nn.Module) -> int:
    return sum(not torch.isfinite(p).all() for p in model.state_dict().values() if p.is_floating_point())


def bake_model(model_dir: Path, data_dir: Path, curriculum_dir: Path, settings: Baking, seq_len: int, seed: int,
               workdir: Path, out: Path, on_progress: Progress | None = None) -> dict[str, Any]:
    """The input model + the 12 tokens, fine-tuned on the reasoning data (and, ``settings.replay`` of the rows,
    the curriculum's training problems); saved with its tokenizer. ``seq_len`` (the model's) is the row length
    unless ``settings.seq_len`` sets one."""
    seq_len = settings.seq_len or seq_len
    model = load_pretrained(CognateForCausalLM, model_dir)
    tokenizer = bpe.load(model_dir)
    init = add_thinking_tokens(model, tokenizer, settings.embed_init_noise, seed)
    examples = generation.load_examples(data_dir)
    train, heldout = generation.heldout_split(examples, settings.heldout_fraction, seed)
    if not train or not heldout:
        raise BakingError(f"{len(examples)} reasoning examples split into {len(train)} train / {len(heldout)} held-out "
                          f"(bake.heldout_fraction={settings.heldout_fraction}): generate more examples")
    # alternate held-out problems between the two sets, so each spans the strategies and tasks
    select, gate = (evenly_spaced(heldout[k::2], settings.heldout_examples) for k in (0, 1))
    if not gate:
        raise BakingError(f"{len(heldout)} held-out reasoning example(s): two are needed, one to select the baked "
                          f"state and one to gate it (raise bake.heldout_fraction={settings.heldout_fraction})")
    curriculum = answerable(dataset_files.load_splits(curriculum_dir)["train"]) if settings.replay else []
    result = bake(model, tokenizer, train, select, gate, settings, seq_len, seed, workdir, on_progress, curriculum)
    save_pretrained(model, out)
    tokenizer.save_pretrained(str(out))
    shutil.copy(result.pop("telemetry"), out / "telemetry-baking.jsonl")
    loss_curve({"baking": out / "telemetry-baking.jsonl"}, out / "loss.png", title="Quiet-STaR prompt baking")
    return {"baking": result, "embedding_init": init,
            "settings": settings.model_dump(mode="json") | {"seq_len": seq_len, "seed": seed},
            "examples": {"train": len(train), "heldout_select": len(select), "heldout_gate": len(gate),
                         "total": len(examples)},
            "params": sum(p.numel() for p in model.parameters()), "non_finite_tensors": _non_finite(model)}


def thought_budget(model: torch.nn.Module, shape: ModelShape, settings: Reinforcement) -> dict[str, int]:
    """The size-adaptive thought count × length (sizing's strategy table), capped by the settings."""
    strategy = strategy_for(model_size(model), shape)
    count, length = strategy.thought_count, strategy.thought_length
    return {"strategy_count": count, "strategy_length": length,
            "count": min(count, settings.thought_count_cap or count),
            "length": min(length, settings.thought_length_cap or length)}


def quietstar_from_baked(baked: CognateForCausalLM, tokenizer, thought_length: int, seed: int = 0) -> QuietStarForCausalLM:
    """The baked model with a fresh mixing head (output 0): at this point it IS the baked model. The head's
    hidden layer is drawn from ``seed`` alone, not the process's global RNG, so the same recipe gives the
    same model whatever ran before it in the process."""
    ids = thinking_ids(tokenizer)
    start, end = ids[THINK_START], ids[THINK_END]
    cfg = quietstar_config(baked.config, thought_length, start, end, banned=[start, end, tokenizer.eos_token_id])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build(QuietStarForCausalLM, cfg)
    missing, unexpected = model.load_state_dict(baked.state_dict(), strict=False)
    if unexpected or any(not k.startswith("mixing.") for k in missing):
        raise BakingError(f"baked weights do not fit the Quiet-STaR model: missing {missing}, unexpected {unexpected}")
    model.mixing.reset_output()
    return model


def reinforce_model(baked_dir: Path, curriculum_dir: Path, settings: Reinforcement, shape: ModelShape, seed: int,
                    workdir: Path, out: Path, on_progress: Progress | None = None) -> dict[str, Any]:
    """The baked model with thoughts and a mixing head, reinforced; ``shape`` picks the size-adaptive
    thought budget that ``settings`` caps."""
    baked = load_pretrained(CognateForCausalLM, baked_dir)
    tokenizer = bpe.load(baked_dir)
    budget = thought_budget(baked, shape, settings)
    model = quietstar_from_baked(baked, tokenizer, budget["length"], seed)
    splits = dataset_files.load_splits(curriculum_dir)
    train = answerable(splits["train"])
    train = evenly_spaced(train, max(200, 8 * settings.steps * settings.batch_size))
    rows = answer_windows(train, tokenizer, settings.seq_len)
    checks = theater_problems(evenly_spaced(answerable(splits["validation"]), settings.theater.problems), tokenizer)
    result = reinforce(model, baked, rows, checks, settings, budget["count"], seed, workdir, on_progress)
    # A mixing head whose output layer is all zeros weights every thought 0: thoughts cannot change an output, and
    # running them costs L + 2 decoder passes a token. The model ships with them off (the forging report and the
    # gates still measure it with them forced on, which gives the same figures).
    model.config.thoughts_enabled = not model.mixing.weights_nothing()
    save_pretrained(model, out)
    tokenizer.save_pretrained(str(out))
    shutil.copy(result.pop("telemetry"), out / "telemetry-reinforce.jsonl")
    loss_curve({"reinforce (mixed NLL)": out / "telemetry-reinforce.jsonl"}, out / "loss.png",
               title="Quiet-STaR reinforcement")
    return {"reinforce": result, "thought_budget": budget,
            "settings": settings.model_dump(mode="json") | {"seed": seed}, "rows": len(rows),
            "theater_problems": len(checks), "non_finite_tensors": _non_finite(model),
            "thoughts_enabled": model.config.thoughts_enabled}


def evaluate(baked_dir: Path, model_dir: Path, curriculum_dir: Path, settings: QuietStarEvaluation,
             latency_tokens: int = 4) -> dict[str, Any]:
    """Held-out reasoning accuracy of the baked model and of the reinforced one (thoughts on and off),
    and latency per token with and without thoughts."""
    tokenizer = bpe.load(model_dir)
    problems = evenly_spaced(answerable(dataset_files.load_splits(curriculum_dir)["test"]), settings.problems)
    baked = load_pretrained(CognateForCausalLM, baked_dir).eval()
    model = load_pretrained(QuietStarForCausalLM, model_dir).eval()
    acc_baked = reasoning_accuracy(baked, tokenizer, problems, settings.max_new_tokens)
    model.config.thoughts_enabled = True  # shipped off when its mixing weight is 0 everywhere: the same figures
    acc_rl = reasoning_accuracy(model, tokenizer, problems, settings.max_new_tokens)
    model.config.thoughts_enabled = False
    acc_rl_plain = reasoning_accuracy(model, tokenizer, problems, settings.max_new_tokens)
    model.config.thoughts_enabled = True
    prompt = torch.tensor([tokenizer.encode(problems[0]["prompt"], add_special_tokens=False)])
    # no written thinking block during the latency run, so every token really gets a thought
    no_block = {"bad_words_ids": [[model.config.thought_start_id]]}
    latency = {"with_thoughts": latency_ms_per_token(model, prompt, latency_tokens, repeats=1, **no_block),
               "without_thoughts": latency_ms_per_token(baked, prompt, latency_tokens, repeats=1, **no_block)}
    latency["ratio"] = latency["with_thoughts"] / latency["without_thoughts"]
    return {"accuracy_baked": acc_baked, "accuracy_reinforced": acc_rl, "accuracy_reinforced_no_thoughts": acc_rl_plain,
            "accuracy_delta": acc_rl["accuracy"] - acc_baked["accuracy"],
            "accuracy_delta_interval": difference_interval(sum(acc_rl["hits"]), acc_rl["n"], sum(acc_baked["hits"]),
                                                           acc_baked["n"]),
            "accuracy_delta_mcnemar_p": mcnemar_p(acc_rl["hits"], acc_baked["hits"]), "latency_ms_per_token": latency,
            "thought_length": model.config.thought_length, "problems": len(problems)}
