"""Quiet-STaR's recipes: every field of the bake and rl blocks is in its model's key by construction, the
gate and evaluation blocks are in neither, and the reasoning-data ledger keeps the name it had."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import BaseModel

from phases.config import PipelineConfig
from phases.quietstar.settings import QuietStarSection
from storage import ArtifactRef, Recipe
from tasks.quietstar import baked_recipe, reinforced_recipe
from tasks.quietstar_data import LEDGER_VERSION, content_config


def _ref(kind: str) -> ArtifactRef:
    return ArtifactRef(kind=kind, id=f"{kind}-id", path="/nowhere", manifest_sha256="0" * 64)


def _recipes(config: PipelineConfig) -> tuple[Recipe, Recipe]:
    return (baked_recipe(config, _ref("cognate-model"), _ref("reasoning-data"), _ref("curriculum")),
            reinforced_recipe(config, _ref("quietstar-baked"), _ref("curriculum")))


def _leaves(block: BaseModel, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    for name in type(block).model_fields:
        value = getattr(block, name)
        if isinstance(value, BaseModel):
            yield from _leaves(value, (*path, name))
        else:
            yield (*path, name), value


def _at(tree: dict[str, Any], path: tuple[str, ...]) -> Any:
    for name in path:
        tree = tree[name]
    return tree


def test_every_bake_and_rl_field_is_in_its_recipe():
    config = PipelineConfig.from_preset("tiny", quietstar={"bake": {"seq_len": 48}, "rl": {"theater": {"problems": 5}}})
    baked, reinforced = _recipes(config)
    section = QuietStarSection()
    for block, recipe in (("bake", baked), ("rl", reinforced)):
        leaves = dict(_leaves(getattr(section, block)))
        assert len(leaves) > 10 and ("optim", "adam_lr") in leaves
        for path in leaves:
            assert _at(recipe.config, (block, *path)) == _at(getattr(config.quietstar, block).model_dump(mode="json"), path)
    assert baked.config["bake"]["seq_len"] == 48 and reinforced.config["rl"]["theater"]["problems"] == 5


@pytest.mark.parametrize("change", [{"gates": {"min_accuracy_delta": 0.5}}, {"gates": {"mode": "strict"}},
                                    {"eval": {"problems": 99}}, {"data": {"budget_usd": 9.0}}])
def test_what_is_read_after_training_is_in_neither_key(change):
    before = [r.key for r in _recipes(PipelineConfig.from_preset("tiny"))]
    assert [r.key for r in _recipes(PipelineConfig.from_preset("tiny", quietstar=change))] == before


def test_a_training_field_changes_its_own_key():
    base_baked, base_rl = _recipes(PipelineConfig.from_preset("tiny"))
    baked, rl = _recipes(PipelineConfig.from_preset("tiny", quietstar={"rl": {"theater": {"min_divergence": 0.4}}}))
    assert baked.key == base_baked.key and rl.key != base_rl.key
    baked, rl = _recipes(PipelineConfig.from_preset("tiny", quietstar={"bake": {"optim": {"grokfast_lambda": 0.3}}}))
    assert baked.key != base_baked.key and rl.key == base_rl.key  # a new baked model reaches rl as a new input id


@pytest.mark.parametrize(("preset", "source", "key"), [
    ("tiny", "local", "c5a09e08851c838bd755"), ("small", "local", "b48a75b37b258dd205af"),
    ("tiny", "openrouter", "dcfeca393e2a7461c31e"), ("small", "openrouter", "25224456aa4b5153ca2b")])
def test_the_ledger_directory_keeps_its_name(preset, source, key):
    """The keys are those the flat settings gave before the section nested: a paid-for ledger is found again."""
    config = PipelineConfig.from_preset(preset, seed=7, quietstar={"data": {"source": source}})
    base_url = "http://127.0.0.1:9/v1" if source == "openrouter" else None
    content = content_config(config, base_url)
    assert Recipe(kind="reasoning-data", inputs=("cur",), config=content, code_version=LEDGER_VERSION).key == key


def test_the_accuracy_gain_passes_only_when_significant_on_the_same_problems():
    """+1 problem of 12 (8 points, over the 3-point target) is noise: FAIL. +60 of 200 with none lost: PASS."""
    from phases.common.measure import difference_interval, mcnemar_p
    from phases.quietstar.gates import quietstar_gates
    from phases.quietstar.settings import QuietStarSection

    def gate(before: list[bool], after: list[bool]):
        n = len(before)
        evaluation = {"accuracy_delta": (sum(after) - sum(before)) / n, "problems": n,
                      "accuracy_delta_interval": difference_interval(sum(after), n, sum(before), n),
                      "accuracy_delta_mcnemar_p": mcnemar_p(after, before), "latency_ms_per_token": {"with_thoughts": 10.0}}
        baking = {"baking": {"final": {"convergence": 0.9}}, "non_finite_tensors": 0}
        reinforcement = {"reinforce": {"final_check": {"divergence": 0.5, "ablation": 0.1, "correlation": 0.6}},
                         "non_finite_tensors": 0}
        report = quietstar_gates(baking, reinforcement, evaluation, QuietStarSection(), "strict")
        return {g.id: g for g in report.gates}["reasoning_accuracy_delta"]

    noise = gate([True] * 2 + [False] * 10, [True] * 3 + [False] * 9)
    assert noise.measured == pytest.approx(1 / 12) and noise.p_value == 1.0 and not noise.passed
    real = gate([True] * 20 + [False] * 180, [True] * 80 + [False] * 120)
    assert real.p_value < 1e-6 and real.interval[0] > 0 and real.passed
