"""EvoMerge tasks: measure the inputs, measure one candidate (a recipe), store the champion.

A candidate's fitness task is keyed by its recipe (and the inputs), submitted concurrently with the
rest of its generation, so a distributed task runner spreads a generation over workers and a retried
flow gets finished candidates back from Prefect's cache."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from phases.common.resources import pick_device
from phases.config import PipelineConfig
from phases.evomerge import fitness as fit
from phases.evomerge import steps
from phases.evomerge.genome import Genome
from phases.evomerge.plots import fitness_curve
from storage import ArtifactRef, Recipe
from tasks.code_version import code_version
from tasks.runtime import create, phase_cache, recipe_cache, record_execution, store

_EVAL_SETS: dict[tuple, fit.EvalSet] = {}
_STRUCTURE_MEMO: dict[str, dict[str, float]] = {}  # speed and memory per model structure, per process
_LOCK = threading.Lock()


def search_config(config: PipelineConfig) -> dict[str, Any]:
    """What decides the champion: the whole section but its gates block, which is read after the search
    (changing a threshold never re-runs it), and the device the candidates are measured on (floating-point
    sums differ across devices, so a near tie could go the other way)."""
    return {"evomerge": config.evomerge.model_dump(mode="json", exclude={"gates"}), "seed": config.seed,
            "seq_len": config.model.seq_len, "eval_device": eval_device(config)}


def eval_device(config: PipelineConfig) -> str:
    """Where fitness is measured: the device preflight checked (``preflight.device``, resolved the same way)."""
    return pick_device(config.preflight.device)


def champion_recipe(config: PipelineConfig, base: ArtifactRef, inputs: list[ArtifactRef], curriculum: ArtifactRef) -> Recipe:
    return Recipe(kind="evomerge-champion", inputs=(base.id, *(r.id for r in inputs), curriculum.id),
                  config=search_config(config), code_version=code_version("phases.evomerge"))


def eval_set(home: str, curriculum: ArtifactRef, tokenizer_dir: Path, config: PipelineConfig, split: str) -> fit.EvalSet:
    sec = config.evomerge.fitness
    key = (curriculum.id, str(tokenizer_dir), sec.eval_rows, sec.accuracy_problems, config.model.seq_len, split)
    with _LOCK:
        if key not in _EVAL_SETS:
            _EVAL_SETS[key] = steps.eval_set(store(home).load(curriculum), tokenizer_dir, sec, config.model.seq_len, split)
        return _EVAL_SETS[key]


@task(name="evomerge-measure-inputs", cache_policy=phase_cache("phases.evomerge"), persist_result=True)
def measure_inputs(config: PipelineConfig, inputs: list[ArtifactRef], curriculum: ArtifactRef, home: str) -> list[dict[str, Any]]:
    """The three input models on the validation split: the fitness reference and the runtime donor."""
    record_execution(home, "evomerge-measure-inputs")
    st = store(home)
    dirs = [st.load(r) for r in inputs]
    data = eval_set(home, curriculum, dirs[0], config, "validation")
    probe = data.rows[:config.evomerge.fitness.probe_rows]
    return [steps.measure_model(steps.load_model(d), data, probe, _STRUCTURE_MEMO, eval_device(config)) for d in dirs]


@task(name="evomerge-fitness", cache_policy=phase_cache("phases.evomerge"), persist_result=True,
      task_run_name="fitness-{label}")
def evaluate_candidate(genome: dict[str, Any], label: str, config: PipelineConfig, base: ArtifactRef,
                       inputs: list[ArtifactRef], curriculum: ArtifactRef, home: str) -> dict[str, Any]:
    """One recipe merged in memory and measured on the validation split."""
    record_execution(home, f"evomerge-fitness:{label}")
    st = store(home)
    dirs = [st.load(r, verify=False) for r in inputs]  # verified once by measure_inputs; not re-hashed per candidate
    data = eval_set(home, curriculum, dirs[0], config, "validation")
    return steps.evaluate_genome(Genome.model_validate(genome), st.load(base, verify=False), dirs, data,
                                 config.evomerge.fitness.probe_rows, _STRUCTURE_MEMO, eval_device(config))


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
        dirs = {n: st.load(r) for n, r in inputs.items()}
        # the YAML names its inputs relative to where the champion will live, so the artifact's bytes are
        # the same in every home (and the YAML still runs with `agent-forge merge` from inside it)
        final_dir = st.artifact_dir(recipe.kind, recipe.key)
        names = [os.path.relpath(d, final_dir) for d in (st.load(base), *dirs.values())]
        files = steps.write_champion(genome, st.load(base), list(dirs.values()), names, out)
        generations = steps.write_history(Path(state_dir), out)
        data = eval_set(home, curriculum, next(iter(dirs.values())), config, "test")
        final = steps.final_evaluation({**dirs, "champion": out}, data, weights,
                                       config.evomerge.fitness.max_perplexity_increase, eval_device(config))
        fitness_curve(generations, out / "fitness.png", input_best=run["input_best_fitness"],
                      reseed_below=config.evomerge.search.reseed_below)
        (out / "skills.md").write_text(steps.skills_table(final) + "\n")
        return {"final": final, "run": run, "champion": {"key": genome.key(), "techniques": genome.describe(),
                                                          "recipe": genome.recipe(), **files}}

    ref = create(home, recipe, "evomerge-champion", build)
    get_run_logger().info("champion %s stored as %s", genome.describe(), ref.id)
    return ref

