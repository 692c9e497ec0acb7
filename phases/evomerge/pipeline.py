"""EvoMerge's steps on model directories: held-out sets, candidate evaluation, the champion's files."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import phases.cognate  # noqa: F401  (registers the Cognate Auto classes)
from phases.common.hf_io import _LOCK
from phases.data import dataset_files
from phases.data import tokenizer as bpe
from phases.evomerge import fitness as fit
from phases.evomerge.merge import MergeError, merge_genome, save_merged
from phases.evomerge.recipe import Genome
from phases.evomerge.settings import EvoMergeSection


def eval_set(curriculum_dir: Path, tokenizer_dir: Path, sec: EvoMergeSection, seq_len: int, split: str) -> fit.EvalSet:
    splits = dataset_files.load_splits(curriculum_dir)
    tokenizer = bpe.load(tokenizer_dir)
    return fit.EvalSet.build(list(splits[split]), tokenizer, seq_len, sec.eval_rows, sec.accuracy_problems, split)


def build_model(state: dict[str, torch.Tensor], config: dict[str, Any]):
    """A model from an in-memory state dict, without a round trip through disk."""
    cfg = dict(config)
    with _LOCK:  # transformers' model construction is not thread-safe (phases/common/hf_io.py)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise MergeError(f"merged weights do not fit the model: missing {sorted(set(missing) - tied)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]}")
    return model.eval()


def load_model(path: Path):
    from phases.common.hf_io import load_pretrained

    return load_pretrained(AutoModelForCausalLM, path).eval()


def measure_model(model, data: fit.EvalSet, probe: torch.Tensor, memo: dict | None) -> dict[str, Any]:
    raw = fit.measure(model, data, memo)
    raw["predictions"] = fit.predictions(model, probe) if raw["non_finite"] == 0 else []
    return raw


def evaluate_genome(genome: Genome, base: Path, inputs: Sequence[Path], data: fit.EvalSet, probe_rows: int,
                    memo: dict | None = None) -> dict[str, Any]:
    state, config = merge_genome(base, inputs, genome)
    model = build_model(state, config)
    return measure_model(model, data, data.rows[:probe_rows], memo) | {"n_layers": config["num_hidden_layers"]}


def write_champion(genome: Genome, base: Path, inputs: Sequence[Path], names: Sequence[str], out: Path) -> dict[str, Any]:
    """The champion's model directory, its recipe and its mergekit-style YAML."""
    state, config = merge_genome(base, inputs, genome)
    save_merged(state, config, out, tokenizer_from=inputs[0])
    (out / "recipe.json").write_text(json.dumps(genome.recipe(), indent=2, sort_keys=True))
    from phases.evomerge.mergekit_yaml import export

    yaml_text, exact = export(genome, base_name=names[0], input_names=list(names[1:]))
    (out / "mergekit.yaml").write_text(yaml_text)
    return {"n_layers": config["num_hidden_layers"], "mergekit_exact": exact}


def local_evaluator(base: Path, inputs: Sequence[Path], data: fit.EvalSet, probe_rows: int,
                    on_each: Any = None):
    """evaluate(genomes) for Evolution without Prefect: one after another, in this process."""
    memo: dict = {}

    def evaluate(genomes: Sequence[Genome]):
        for g in genomes:
            raw = evaluate_genome(g, base, inputs, data, probe_rows, memo)
            if on_each is not None:
                on_each(g)
            yield g, raw

    return evaluate


def runtime_donor(raws: Sequence[dict[str, Any]], reference: dict[str, float], weights: dict[str, float]) -> int:
    """Generation 0 takes its runtime settings from the fittest input."""
    scores = [fit.score(r, reference, weights)[0] for r in raws]
    return max(range(len(scores)), key=scores.__getitem__)
