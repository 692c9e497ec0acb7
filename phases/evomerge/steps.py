"""EvoMerge's steps on model directories: held-out sets, candidate evaluation, the search, the champion's files.

The search is a plain function over an ``evaluate`` callable (genomes in, measurements out as each finishes): the
flow passes one that submits each generation's candidates as Prefect tasks; tests and benches pass
``local_evaluator``, which measures them here, one after another.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import phases.cognate.modeling  # noqa: F401  (registers the Cognate Auto classes)
from phases.common.hf_io import _LOCK
from phases.data import dataset_files
from phases.data import tokenizer as bpe
from phases.evomerge import fitness as fit
from phases.evomerge.evolution import Evaluate, Evolution
from phases.evomerge.genome import Genome, techniques
from phases.evomerge.merge import Checkpoint, MergeError, merge_genome, save_merged
from phases.evomerge.settings import EvoMergeFitness, EvoMergeSection


def eval_set(curriculum_dir: Path, tokenizer_dir: Path, sec: EvoMergeFitness, seq_len: int, split: str) -> fit.EvalSet:
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


def measure_model(model, data: fit.EvalSet, probe: torch.Tensor, memo: dict | None, device: str = "cpu") -> dict[str, Any]:
    raw = fit.measure(model, data, memo, device=device)
    raw["predictions"] = fit.predictions(model, probe) if raw["non_finite"] == 0 else []
    return raw


def evaluate_genome(genome: Genome, base: Path, inputs: Sequence[Path], data: fit.EvalSet, probe_rows: int,
                    memo: dict | None = None, device: str = "cpu") -> dict[str, Any]:
    state, config = merge_genome(base, inputs, genome)
    model = build_model(state, config)
    return measure_model(model, data, data.rows[:probe_rows], memo, device) | {"n_layers": config["num_hidden_layers"]}


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


def search(raws: Sequence[dict[str, Any]], names: Sequence[str], base: Path, sec: EvoMergeSection, seed: int,
           weights: dict[str, float], state_dir: Path, evaluate: Evaluate, log: Callable[[str], None] = print,
           on_generation: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """The genetic algorithm, from the inputs' validation measurements ``raws`` (in ``names`` order) to the champion.
    The inputs' mean is the fitness reference and the fittest input the runtime donor of generation 0. Resumes from
    ``state_dir`` when it holds a killed run's records. Returns Evolution.run()'s result plus ``summary``."""
    reference = fit.reference(list(raws), sec.fitness.max_perplexity_increase)
    scores = [fit.score(r, reference, weights)[0] for r in raws]
    log(f"inputs on validation: {', '.join(f'{n} {s:.4f}' for n, s in zip(names, scores))} "
        "(reference = their mean, so ~1.0)")
    evolution = Evolution(sec.search, seed, Checkpoint(base).n_layers, runtime_donor(raws, reference, weights),
                          reference, weights, state_dir, evaluate, log=log, on_generation=on_generation)
    result = evolution.run()
    return result | {"summary": run_summary(result, max(scores))}


def run_summary(result: dict[str, Any], input_best_fitness: float) -> dict[str, Any]:
    history = result["history"]
    combos = {Genome.model_validate(r["genome"]).combo for h in history[:1] for r in h["population"]}
    if len(combos) != 8:  # checked here, where it is produced: generation 0 seeds one genome per combination
        raise RuntimeError(f"generation 0 evaluated {len(combos)} of the 8 technique combinations: {sorted(combos)}")
    return {
        "generations_run": result["generations_run"], "stop_reason": result["stop_reason"],
        "evaluated": result["evaluated"], "min_diversity": min(h["diversity"] for h in history),
        "final_diversity": history[-1]["diversity"], "combos_evaluated": len(combos),
        "best_per_generation": [h["best"] for h in history], "input_best_fitness": input_best_fitness,
        "champion_validation_fitness": history[-1]["best"],
        "combo_usage": {"+".join(techniques(c)): sum(Genome.model_validate(r["genome"]).combo == c
                                                     for h in history for r in h["population"]) for c in range(8)},
    }


def write_history(state_dir: Path, out: Path) -> list[dict[str, Any]]:
    """The search's records into the champion's directory: generations.jsonl as recorded, history.jsonl with every
    candidate ever evaluated (recipe, raw measurements, generation; predictions left out). Returns the generations."""
    state = Path(state_dir)
    generations = [json.loads(x) for x in (state / "generations.jsonl").read_text().splitlines() if x.strip()]
    evaluations = [json.loads(x) for x in (state / "evaluations.jsonl").read_text().splitlines() if x.strip()]
    shutil.copy2(state / "generations.jsonl", out / "generations.jsonl")
    # in (generation, key) order, not the order concurrent evaluations happened to finish in: the same
    # search writes the same bytes
    with open(out / "history.jsonl", "w") as f:
        for e in sorted(evaluations, key=lambda e: (e["generation"], e["key"])):
            g = Genome.model_validate(e["genome"])
            f.write(json.dumps({"generation": e["generation"], "key": e["key"], "techniques": g.describe(),
                                "origin": g.origin, "recipe": g.recipe(),
                                "raw": {k: v for k, v in e["raw"].items() if k != "predictions"}}) + "\n")
    return generations


def discard_state(state_dir: Path) -> None:
    """Once the champion is stored it holds the history, so the search's records go."""
    shutil.rmtree(state_dir, ignore_errors=True)


def final_evaluation(model_dirs: dict[str, Path], data: fit.EvalSet, weights: dict[str, float],
                     max_perplexity_increase: float | None, device: str = "cpu") -> dict[str, Any]:
    """Every model measured again on the test split, one at a time, scored against the inputs' mean on
    that split."""
    memo: dict = {}
    raws = {name: fit.measure(load_model(d), data, memo, device=device) for name, d in model_dirs.items()}
    ref = fit.reference([r for n, r in raws.items() if n != "champion"], max_perplexity_increase)
    out: dict[str, Any] = {"reference": ref, "inputs": {}}
    for name, raw in raws.items():
        f, parts = fit.score(raw, ref, weights)
        entry = {"fitness": f, "components": parts, **raw}
        if name == "champion":
            out["champion"] = entry
        else:
            out["inputs"][name] = entry
    return out


def skills_table(final: dict[str, Any]) -> str:
    """Markdown: each model's test accuracy per skill with its 95% Wilson interval, its mean over skills and
    its fitness, champion first (the header names the problems per skill)."""
    from phases.common.measure import accuracy_cell

    models = {"champion": final["champion"], **final["inputs"]}
    skills = sorted({s for m in models.values() for s in m.get("skill_hits", {})})
    asked = {s: max(m.get("skill_hits", {}).get(s, (0, 0))[1] for m in models.values()) for s in skills}
    lines = ["| model | " + " | ".join(f"{s} (n={asked[s]})" for s in skills) + " | mean | fitness |",
             "|---" * (len(skills) + 3) + "|"]
    for name, m in models.items():
        cells = [accuracy_cell(*m.get("skill_hits", {}).get(s, (0, 0)), decimals=1) for s in skills]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {m['accuracy']:.1%} | {m['fitness']:.3f} |")
    return "\n".join(lines)
