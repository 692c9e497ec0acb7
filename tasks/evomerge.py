"""EvoMerge tasks: measure the inputs, measure one candidate (a recipe), store the champion.

A candidate's fitness task is keyed by its recipe (and the inputs), submitted concurrently with the
rest of its generation, so a distributed task runner spreads a generation over workers and a retried
flow gets finished candidates back from Prefect's cache."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from phases.config import PipelineConfig
from phases.evomerge import fitness as fit
from phases.evomerge import pipeline
from phases.evomerge.plots import fitness_curve
from phases.evomerge.recipe import Genome, techniques
from storage import ArtifactRef, Recipe
from tasks.code_version import code_version
from tasks.runtime import phase_cache, png_markdown, producer, recipe_cache, record_execution, store

_GATE_ONLY = {"min_fitness_ratio", "min_diversity", "gate_mode"}
_EVAL_SETS: dict[tuple, fit.EvalSet] = {}
_STRUCTURE_MEMO: dict[str, dict[str, float]] = {}  # speed and memory per model structure, per process
_LOCK = threading.Lock()


def search_config(config: PipelineConfig) -> dict[str, Any]:
    """What decides the champion (gate thresholds do not, so changing one never re-runs the search)."""
    return {"evomerge": config.evomerge.model_dump(mode="json", exclude=_GATE_ONLY), "seed": config.seed,
            "seq_len": config.model.seq_len}


def champion_recipe(config: PipelineConfig, base: ArtifactRef, inputs: list[ArtifactRef], curriculum: ArtifactRef) -> Recipe:
    return Recipe(kind="evomerge-champion", inputs=(base.id, *(r.id for r in inputs), curriculum.id),
                  config=search_config(config), code_version=code_version("phases.evomerge"))


def eval_set(home: str, curriculum: ArtifactRef, tokenizer_dir: Path, config: PipelineConfig, split: str) -> fit.EvalSet:
    key = (curriculum.id, str(tokenizer_dir), config.evomerge.eval_rows, config.evomerge.accuracy_problems,
           config.model.seq_len, split)
    with _LOCK:
        if key not in _EVAL_SETS:
            _EVAL_SETS[key] = pipeline.eval_set(store(home).load(curriculum), tokenizer_dir, config.evomerge,
                                                config.model.seq_len, split)
        return _EVAL_SETS[key]


@task(name="evomerge-measure-inputs", cache_policy=phase_cache("phases.evomerge"), persist_result=True)
def measure_inputs(config: PipelineConfig, inputs: list[ArtifactRef], curriculum: ArtifactRef, home: str) -> list[dict[str, Any]]:
    """The three input models on the validation split: the fitness reference and the runtime donor."""
    record_execution(home, "evomerge-measure-inputs")
    st = store(home)
    dirs = [st.load(r) for r in inputs]
    data = eval_set(home, curriculum, dirs[0], config, "validation")
    return [pipeline.measure_model(pipeline.load_model(d), data, data.rows[:config.evomerge.probe_rows], _STRUCTURE_MEMO)
            for d in dirs]


@task(name="evomerge-fitness", cache_policy=phase_cache("phases.evomerge"), persist_result=True,
      task_run_name="fitness-{label}")
def evaluate_candidate(genome: dict[str, Any], label: str, config: PipelineConfig, base: ArtifactRef,
                       inputs: list[ArtifactRef], curriculum: ArtifactRef, home: str) -> dict[str, Any]:
    """One recipe merged in memory and measured on the validation split."""
    record_execution(home, f"evomerge-fitness:{label}")
    st = store(home)
    dirs = [st.load(r, verify=False) for r in inputs]  # verified once by measure_inputs; not re-hashed per candidate
    data = eval_set(home, curriculum, dirs[0], config, "validation")
    return pipeline.evaluate_genome(Genome.model_validate(genome), st.load(base, verify=False), dirs, data,
                                    config.evomerge.probe_rows, _STRUCTURE_MEMO)


def _final_evaluation(model_dirs: dict[str, Path], data: fit.EvalSet, weights: dict[str, float],
                      max_perplexity_increase: float | None) -> dict[str, Any]:
    """Every model measured again on the test split, one at a time (no concurrent timing), scored
    against the inputs' mean on that split."""
    memo: dict = {}
    raws = {name: fit.measure(pipeline.load_model(d), data, memo) for name, d in model_dirs.items()}
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


def _champion_recipe(config: PipelineConfig, base: ArtifactRef, inputs: dict[str, ArtifactRef],
                     curriculum: ArtifactRef) -> Recipe:
    return champion_recipe(config, base, list(inputs.values()), curriculum)


@task(name="evomerge-champion", cache_policy=recipe_cache(_champion_recipe), persist_result=True)
def store_champion(config: PipelineConfig, champion: dict[str, Any], base: ArtifactRef, inputs: dict[str, ArtifactRef],
                   curriculum: ArtifactRef, state_dir: str, run: dict[str, Any], weights: dict[str, float],
                   home: str) -> ArtifactRef:
    st = store(home)
    recipe = champion_recipe(config, base, list(inputs.values()), curriculum)
    genome = Genome.model_validate(champion)

    def build(out: Path) -> dict[str, Any]:
        record_execution(home, "evomerge-champion")
        dirs = {n: st.load(r) for n, r in inputs.items()}
        files = pipeline.write_champion(genome, st.load(base), list(dirs.values()),
                                        [str(st.load(base)), *map(str, dirs.values())], out)
        state = Path(state_dir)
        generations = [json.loads(x) for x in (state / "generations.jsonl").read_text().splitlines() if x.strip()]
        evaluations = [json.loads(x) for x in (state / "evaluations.jsonl").read_text().splitlines() if x.strip()]
        shutil.copy2(state / "generations.jsonl", out / "generations.jsonl")
        # every candidate ever evaluated: recipe, raw measurements, generation (predictions left out)
        with open(out / "history.jsonl", "w") as f:
            for e in evaluations:
                g = Genome.model_validate(e["genome"])
                f.write(json.dumps({"generation": e["generation"], "key": e["key"], "techniques": g.describe(),
                                    "origin": g.origin, "recipe": g.recipe(),
                                    "raw": {k: v for k, v in e["raw"].items() if k != "predictions"}}) + "\n")
        data = eval_set(home, curriculum, next(iter(dirs.values())), config, "test")
        final = _final_evaluation({**dirs, "champion": out}, data, weights, config.evomerge.max_perplexity_increase)
        fitness_curve(generations, out / "fitness.png", input_best=run["input_best_fitness"],
                      reseed_below=config.evomerge.reseed_below)
        return {"final": final, "run": run, "champion": {"key": genome.key(), "techniques": genome.describe(),
                                                          "recipe": genome.recipe(), **files}}

    ref = st.get_or_create(recipe, build, producer())
    create_markdown_artifact(key="evomerge-fitness", description="EvoMerge: fitness per generation",
                             markdown=png_markdown(st.file(ref, "fitness.png"), "fitness per generation"))
    get_run_logger().info("champion %s stored as %s", genome.describe(), ref.id)
    return ref


def run_summary(result: dict[str, Any], input_best_fitness: float) -> dict[str, Any]:
    history = result["history"]
    combos = {Genome.model_validate(r["genome"]).combo for h in history[:1] for r in h["population"]}
    return {
        "generations_run": result["generations_run"], "stop_reason": result["stop_reason"],
        "evaluated": result["evaluated"], "min_diversity": min(h["diversity"] for h in history),
        "final_diversity": history[-1]["diversity"], "combos_evaluated": len(combos),
        "best_per_generation": [h["best"] for h in history], "input_best_fitness": input_best_fitness,
        "champion_validation_fitness": history[-1]["best"],
        "combo_usage": {"+".join(techniques(c)): sum(Genome.model_validate(r["genome"]).combo == c
                                                     for h in history for r in h["population"]) for c in range(8)},
    }
