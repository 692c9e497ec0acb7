"""Quiet-STaR tasks: bake the thinking tokens in, reinforce the thoughts, evaluate. The two training
tasks store their models ("quietstar-baked", "quietstar-model") with lineage (input model, reasoning
data, curriculum) and checkpoint into a work directory named by the recipe, so a retried task resumes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from phases.config import PipelineConfig
from phases.quietstar import pipeline
from storage import ArtifactRef, Recipe
from tasks.code_version import code_version
from tasks.runtime import phase_cache, png_markdown, recipe_cache, record_execution, store, stored_with_checkpoints

_BAKE_FIELDS = {"bake_max_steps", "bake_batch_size", "bake_seq_len", "bake_lr", "bake_muon_lr", "bake_grokfast_alpha",
                "bake_grokfast_lambda", "bake_kl_weight", "bake_eval_every", "bake_target", "bake_heldout_fraction",
                "bake_heldout_examples", "embed_init_noise"}
_RL_FIELDS = {"thought_count_cap", "thought_length_cap", "n_true", "rl_steps", "rl_batch_size", "rl_seq_len", "rl_lr",
              "rl_muon_lr", "rl_mixing_lr", "rl_grokfast_alpha", "rl_grokfast_lambda", "rl_kl_weight", "rl_temperature",
              "theater_check_every", "theater_max_retries", "theater_problems", "theater_eval_thoughts",
              "min_divergence", "min_ablation", "min_correlation"}


def _section(config: PipelineConfig, fields: set[str]) -> dict[str, Any]:
    """What determines the weights (gate thresholds of later steps do not, so changing one never retrains)."""
    return config.quietstar.model_dump(mode="json", include=fields) | {"seed": config.seed}


def _reporter(label: str) -> Callable[[dict[str, Any]], None]:
    logger = get_run_logger()

    def report(rec: dict[str, Any]) -> None:
        every = max(1, rec["total_steps"] // 10)
        if not (rec["step"] % every == 0 or rec["step"] == rec["total_steps"] or rec.get("convergence") is not None
                or rec.get("theater")):
            return
        extra = ""
        if rec.get("convergence") is not None:
            extra = f", held-out structure {rec['convergence']:.3f}"
        if rec.get("theater"):
            t = rec["theater"]
            extra = f", divergence {t['divergence']:.3f} ablation {t['ablation']:.3f} correlation {t['correlation']:.3f}"
        logger.info("quietstar %s step %d/%d: loss %.3f%s", label, rec["step"], rec["total_steps"], rec["lm_loss"], extra)

    return report


def _stored(home: str, recipe: Recipe, label: str, journal: str, run: Callable[[Path, Path], dict]) -> ArtifactRef:
    ref = stored_with_checkpoints(home, recipe, journal, run)
    create_markdown_artifact(key=f"quietstar-{label}-loss", description=f"Quiet-STaR {label}: training loss",
                             markdown=png_markdown(store(home).file(ref, "loss.png"), f"{label} loss"))
    return ref


def baked_recipe(config: PipelineConfig, model: ArtifactRef, data: ArtifactRef) -> Recipe:
    return Recipe(kind="quietstar-baked", inputs=(model.id, data.id),
                  config=_section(config, _BAKE_FIELDS) | {"seq_len": config.model.seq_len},
                  code_version=code_version("phases.quietstar"))


def reinforced_recipe(config: PipelineConfig, baked: ArtifactRef, curriculum: ArtifactRef) -> Recipe:
    return Recipe(kind="quietstar-model", inputs=(baked.id, curriculum.id),
                  config=_section(config, _RL_FIELDS) | {"model": config.model.model_dump(mode="json")},
                  code_version=code_version("phases.quietstar"))


@task(name="quietstar-bake", cache_policy=recipe_cache(baked_recipe), persist_result=True)
def bake(config: PipelineConfig, model: ArtifactRef, data: ArtifactRef, home: str) -> ArtifactRef:
    st = store(home)
    recipe = baked_recipe(config, model, data)
    return _stored(home, recipe, "baking", "quietstar-bake", lambda work, out: pipeline.bake_model(
        st.load(model), st.load(data), config.quietstar, config.model.seq_len, config.seed, work, out,
        _reporter("baking")))


@task(name="quietstar-reinforce", cache_policy=recipe_cache(reinforced_recipe), persist_result=True)
def reinforce(config: PipelineConfig, baked: ArtifactRef, curriculum: ArtifactRef, home: str) -> ArtifactRef:
    st = store(home)
    recipe = reinforced_recipe(config, baked, curriculum)
    return _stored(home, recipe, "reinforce", "quietstar-reinforce", lambda work, out: pipeline.reinforce_model(
        st.load(baked), st.load(curriculum), config.quietstar, config.model, config.seed, work, out,
        _reporter("reinforce")))


@task(name="quietstar-evaluate", cache_policy=phase_cache("phases.quietstar"), persist_result=True)
def evaluate(config: PipelineConfig, baked: ArtifactRef, model: ArtifactRef, curriculum: ArtifactRef,
             home: str) -> dict[str, Any]:
    record_execution(home, "quietstar-evaluate")
    st = store(home)
    result = pipeline.evaluate(st.load(baked), st.load(model), st.load(curriculum), config.quietstar)
    get_run_logger().info("quietstar evaluation: accuracy baked %.3f, reinforced %.3f (delta %+.3f); latency %.1f ms/token "
                          "with thoughts, %.1f without", result["accuracy_baked"]["accuracy"],
                          result["accuracy_reinforced"]["accuracy"], result["accuracy_delta"],
                          result["latency_ms_per_token"]["with_thoughts"],
                          result["latency_ms_per_token"]["without_thoughts"])
    return result
