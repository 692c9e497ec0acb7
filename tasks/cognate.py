"""Cognate tasks: the shared foundation, one specialist, the evaluation. Each trains inside the
store's build step, checkpointing to a work directory named by its recipe, so a killed run resumes
from its latest good checkpoint when the flow is retried, and a finished one comes back Cached."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from phases.cognate import steps
from phases.cognate.specialists import specialists, stage_steps_for
from phases.common.resources import usable_cpus
from phases.common.workers import run_in_worker
from phases.config import PipelineConfig
from storage import ArtifactRef, Recipe
from tasks.code_version import code_version
from tasks.runtime import (
    create,
    phase_cache,
    png_markdown,
    recipe_cache,
    record_execution,
    store,
    stored_with_checkpoints,
)


def _training_config(config: PipelineConfig, batch_size: int) -> dict[str, Any]:
    """What determines the weights: the whole section but its evaluation and gate blocks, which are read
    after training (changing one never retrains)."""
    sec = config.cognate.model_dump(mode="json", exclude={"eval", "diagnose", "gates"})
    return {"model": config.model.model_dump(mode="json"), "cognate": sec, "seed": config.seed, "batch_size": batch_size}


def _reporter(label: str, total_steps: int):
    """A Prefect progress artifact per model, updated every 5%, plus a log line."""
    logger = get_run_logger()
    artifact_id = create_progress_artifact(progress=0.0, key=f"cognate-{label}-progress",
                                           description=f"Cognate {label}: training progress")
    state = {"last": -1, "done": 0, "stage": None, "stage_start": 0}

    def report(rec: dict[str, Any]) -> None:
        if rec["stage"] != state["stage"]:
            state["stage"], state["stage_start"] = rec["stage"], state["done"]
        state["done"] = state["stage_start"] + rec["step"]
        pct = min(100.0, 100.0 * state["done"] / total_steps)
        if int(pct) // 5 > state["last"]:
            state["last"] = int(pct) // 5
            update_progress_artifact(artifact_id, progress=pct)
            logger.info("%s %s step %d/%d: loss %.3f, halting %.2f, gate %.2f%s", label, rec["stage"], rec["step"],
                        rec["total_steps"], rec["lm_loss"], rec["halting_steps"], rec["gate_mean"],
                        f", held-out {rec['eval_loss']:.3f}" if rec.get("eval_loss") is not None else "")

    return report


def _trained_model(home: str, recipe: Recipe, journal: str, train: Callable[[Path, Path], dict]) -> ArtifactRef:
    """The model artifact for ``recipe``, trained (resumably) only when it is not stored yet."""
    return stored_with_checkpoints(home, recipe, journal,
                                   lambda work, out: train(work, out) | {"telemetry": steps.telemetry_summary(out)})


def foundation_recipe(config: PipelineConfig, curriculum: ArtifactRef, tokenizer: ArtifactRef, batch_size: int,
                      hub: Sequence[ArtifactRef] = ()) -> Recipe:
    return Recipe(kind="cognate-base", inputs=(curriculum.id, tokenizer.id, *(r.id for r in hub)),
                  config=_training_config(config, batch_size), code_version=code_version("phases.cognate"))


def specialist_recipe(name: str, config: PipelineConfig, base: ArtifactRef, curriculum: ArtifactRef,
                      batch_size: int, hub: Sequence[ArtifactRef] = ()) -> Recipe:
    return Recipe(kind="cognate-model", inputs=(base.id, curriculum.id, *(r.id for r in hub)),
                  config=_training_config(config, batch_size) | {"specialist": name},
                  code_version=code_version("phases.cognate"))


@task(name="cognate-foundation", cache_policy=recipe_cache(foundation_recipe), persist_result=True)
def train_foundation(config: PipelineConfig, curriculum: ArtifactRef, tokenizer: ArtifactRef, batch_size: int,
                     home: str, hub: Sequence[ArtifactRef] = ()) -> ArtifactRef:
    st = store(home)
    recipe = foundation_recipe(config, curriculum, tokenizer, batch_size, hub)
    return _trained_model(home, recipe, "cognate-foundation", lambda work, out: steps.train_foundation(
        config.model, config.cognate, st.load(curriculum), st.load(tokenizer), batch_size, config.seed, work, out,
        _reporter("base", config.cognate.train.foundation_steps), [st.load(r) for r in hub]))


@task(name="cognate-specialist", cache_policy=recipe_cache(specialist_recipe), persist_result=True)
def train_specialist(name: str, config: PipelineConfig, base: ArtifactRef, curriculum: ArtifactRef, batch_size: int,
                     home: str, hub: Sequence[ArtifactRef] = ()) -> ArtifactRef:
    spec = {s.name: s for s in specialists(config.cognate)}[name]
    st = store(home)
    recipe = specialist_recipe(name, config, base, curriculum, batch_size, hub)
    # the flow trains every specialist side by side: each in its own process, with its share of the cores
    threads = max(1, usable_cpus() // len(specialists()))
    return _trained_model(home, recipe, f"cognate-specialist:{name}", lambda work, out: run_in_worker(
        steps.train_specialist, spec, st.load(base), config.cognate, config.model.seq_len, st.load(curriculum),
        batch_size, config.seed, work, out, threads=threads,
        on_progress=_reporter(name, 2 * stage_steps_for(spec, config.cognate.act_max_steps, config.cognate.train.stage_steps)),
        hub_dirs=[st.load(r) for r in hub]))


@task(name="cognate-evaluate", cache_policy=phase_cache("phases.cognate"), persist_result=True)
def evaluate_cognate(config: PipelineConfig, models: dict[str, ArtifactRef], curriculum: ArtifactRef,
                     home: str) -> dict[str, Any]:
    record_execution(home, "cognate-evaluate")
    st = store(home)
    evaluation = steps.evaluate_models({n: st.load(r) for n, r in models.items()}, st.load(curriculum),
                                          config.cognate, config.model.seq_len)
    logger = get_run_logger()
    logger.info("cognate evaluation: diversity %s, majority baseline %.3f",
                evaluation["diversity"], evaluation["majority_baseline"])
    for name, m in evaluation["models"].items():
        logger.info("%s held-out accuracy per skill: %s", name, ", ".join(
            f"{s} {r['accuracy']:.1%} [{r['wilson_95'][0]:.1%}, {r['wilson_95'][1]:.1%}] (majority {r['majority_baseline']:.1%}, "
            f"n={r['n']})" for s, r in m["per_skill"].items()))
    return evaluation


def diagnosis_recipe(config: PipelineConfig, model: ArtifactRef) -> Recipe:
    return Recipe(kind="cognate-diagnosis", inputs=(model.id,),
                  config={"diagnose": config.cognate.diagnose.model_dump(mode="json")},
                  code_version=code_version("phases.cognate"))


@task(name="cognate-diagnose", cache_policy=recipe_cache(diagnosis_recipe), persist_result=True)
def diagnose_model(name: str, config: PipelineConfig, model: ArtifactRef, home: str, workers: int = 1) -> ArtifactRef:
    """The state diagnostics and go/no-go of one model, as a store artifact (diagnosis.json, .png, .md) whose input
    is the model; ``workers``: how many run side by side (each gets its share of the cores)."""
    st = store(home)

    def build(out: Path) -> dict[str, Any]:
        return run_in_worker(steps.diagnose_model, st.load(model), config.cognate.diagnose, out, name,
                             threads=max(1, usable_cpus() // workers))

    ref = create(home, diagnosis_recipe(config, model), "cognate-diagnose", build)
    m = st.manifest(ref)["metrics"]
    get_run_logger().info("%s state diagnostics: %s (state health %.2f): %s", name, m["verdict"], m["health"],
                          ", ".join(f"{k} {v}" for k, v in m["statuses"].items()))
    return ref


def go_no_go_markdown(home: str, diagnoses: dict[str, ArtifactRef]) -> str:
    """Every model's go/no-go table and figure, for the Prefect UI."""
    st = store(home)
    return "\n\n".join(st.file(ref, steps.DIAGNOSIS_REPORT).read_text() + "\n\n"
                        + png_markdown(st.file(ref, steps.DIAGNOSIS_FIGURE), f"{name} diagnostics")
                        for name, ref in diagnoses.items())
