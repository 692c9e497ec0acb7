"""Quiet-STaR tasks: bake the thinking tokens in, reinforce the thoughts, evaluate. The two training
tasks store their models ("quietstar-baked", "quietstar-model") with lineage (input model, reasoning
data, curriculum) and checkpoint into a work directory named by the recipe, so a retried task resumes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import get_run_logger, task

from phases.config import PipelineConfig
from phases.quietstar import steps
from storage import ArtifactRef, Recipe
from tasks.code_version import code_version
from tasks.runtime import phase_cache, recipe_cache, record_execution, store, stored_with_checkpoints


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


# A recipe's config is the whole block its step reads (every field is in the key by construction) and
# what else reaches that step; the data, evaluation and gate blocks do not shape the weights, so changing
# them never retrains.
def baked_recipe(config: PipelineConfig, model: ArtifactRef, data: ArtifactRef, curriculum: ArtifactRef) -> Recipe:
    return Recipe(kind="quietstar-baked", inputs=(model.id, data.id, curriculum.id),
                  config={"bake": config.quietstar.bake.model_dump(mode="json"), "seq_len": config.model.seq_len,
                          "seed": config.seed},
                  code_version=code_version("phases.quietstar"))


def reinforced_recipe(config: PipelineConfig, baked: ArtifactRef, curriculum: ArtifactRef) -> Recipe:
    return Recipe(kind="quietstar-model", inputs=(baked.id, curriculum.id),
                  config={"rl": config.quietstar.rl.model_dump(mode="json"), "model": config.model.model_dump(mode="json"),
                          "seed": config.seed},
                  code_version=code_version("phases.quietstar"))


@task(name="quietstar-bake", cache_policy=recipe_cache(baked_recipe), persist_result=True)
def bake(config: PipelineConfig, model: ArtifactRef, data: ArtifactRef, curriculum: ArtifactRef, home: str) -> ArtifactRef:
    st = store(home)
    recipe = baked_recipe(config, model, data, curriculum)
    return stored_with_checkpoints(home, recipe, "quietstar-bake", lambda work, out: steps.bake_model(
        st.load(model), st.load(data), st.load(curriculum), config.quietstar.bake, config.model.seq_len, config.seed, work, out,
        _reporter("baking")))


@task(name="quietstar-reinforce", cache_policy=recipe_cache(reinforced_recipe), persist_result=True)
def reinforce(config: PipelineConfig, baked: ArtifactRef, curriculum: ArtifactRef, home: str) -> ArtifactRef:
    st = store(home)
    recipe = reinforced_recipe(config, baked, curriculum)
    return stored_with_checkpoints(home, recipe, "quietstar-reinforce", lambda work, out: steps.reinforce_model(
        st.load(baked), st.load(curriculum), config.quietstar.rl, config.model, config.seed, work, out,
        _reporter("reinforce")))


@task(name="quietstar-evaluate", cache_policy=phase_cache("phases.quietstar"), persist_result=True)
def evaluate(config: PipelineConfig, baked: ArtifactRef, model: ArtifactRef, curriculum: ArtifactRef,
             home: str) -> dict[str, Any]:
    record_execution(home, "quietstar-evaluate")
    st = store(home)
    result = steps.evaluate(st.load(baked), st.load(model), st.load(curriculum), config.quietstar.eval)
    get_run_logger().info("quietstar evaluation: accuracy baked %.3f, reinforced %.3f (delta %+.3f); latency %.1f ms/token "
                          "with thoughts, %.1f without", result["accuracy_baked"]["accuracy"],
                          result["accuracy_reinforced"]["accuracy"], result["accuracy_delta"],
                          result["latency_ms_per_token"]["with_thoughts"],
                          result["latency_ms_per_token"]["without_thoughts"])
    return result
