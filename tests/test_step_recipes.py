"""Each step's recipe is the dump of the settings blocks it reads: every field of those blocks moves the artifact's
key (a new field cannot stay out of it), and a field of any other block, a gate threshold above all, moves none."""

from typing import Any

import pytest

from phases.config import PipelineConfig
from storage import ArtifactRef
from tasks.bitnet import packed_recipe, report_recipe, staged_recipe
from tasks.evomerge import champion_recipe

REF = ArtifactRef(kind="any", id="0" * 64, path="/nowhere", manifest_sha256="0" * 64)
BITNET_STEPS = {"staged": ("quantize", staged_recipe), "packed": ("finetune", packed_recipe),
                "report": ("evaluate", report_recipe)}


def _leaves(d: dict[str, Any], path: tuple[str, ...] = ()):
    for k, v in d.items():
        yield from _leaves(v, (*path, k)) if isinstance(v, dict) else [((*path, k), v)]


def _other(v: Any) -> Any:
    """A different value every field accepts."""
    if isinstance(v, bool):
        return not v
    if isinstance(v, int):
        return v + 1
    if isinstance(v, float):
        return v * 0.9 if v else 0.1
    # a choice takes its other value; None (an optional number or mode) takes a string only as a mode
    return {"strict": "lenient", "both": "answers", "answers": "text", "text": "answers"}.get(v, "strict")


def _changed(section: str, path: tuple[str, ...], value: Any) -> PipelineConfig:
    over: dict[str, Any] = {path[-1]: value}
    for k in reversed(path[:-1]):
        over = {k: over}
    return PipelineConfig.from_preset("tiny", **{section: over})


def _bitnet_keys(config: PipelineConfig) -> dict[str, str]:
    return {name: recipe(config, *[REF] * (4 if name == "report" else 3)).key for name, (_, recipe) in BITNET_STEPS.items()}


def _field_cases(section: str):
    dumped = getattr(PipelineConfig.from_preset("tiny"), section).model_dump(mode="json")
    for path, v in _leaves(dumped):
        new = _other(v) if v is not None else (0.5 if path[-1] != "mode" else "strict")
        yield pytest.param(path, new, id=".".join(path))


@pytest.mark.parametrize("path,value", list(_field_cases("bitnet")))
def test_bitnet_field_moves_exactly_the_keys_of_the_steps_that_read_it(path, value):
    base = _bitnet_keys(PipelineConfig.from_preset("tiny"))
    moved = _bitnet_keys(_changed("bitnet", path, value))
    readers = {name for name, (block, _) in BITNET_STEPS.items() if path[0] in (block, "heldout")}
    assert {name for name in base if base[name] != moved[name]} == readers
    if path[0] == "gates":
        assert not readers


def test_bitnet_recipe_holds_the_whole_of_each_block_it_reads():
    config = PipelineConfig.from_preset("small")
    for name, (block, recipe) in BITNET_STEPS.items():
        held = recipe(config, *[REF] * (4 if name == "report" else 3)).config["bitnet"]
        assert held == config.bitnet.model_dump(mode="json", include={"heldout", block})


@pytest.mark.parametrize("path,value", list(_field_cases("evomerge")))
def test_evomerge_field_moves_the_champion_key_unless_it_is_a_gate(path, value):
    key = champion_recipe(PipelineConfig.from_preset("tiny"), REF, [REF] * 3, REF).key
    moved = champion_recipe(_changed("evomerge", path, value), REF, [REF] * 3, REF).key
    assert (moved != key) == (path[0] != "gates")
