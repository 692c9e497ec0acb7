"""The Prefect run form: every section has a title and a description, and no field in a section carries
a default (it would be the tiny preset's value, sent back as if typed, pinning a small run to tiny)."""

from prefect.utilities.callables import parameter_schema

from flows.full import full
from phases.config import PipelineConfig

SECTIONS = ("model", "data", "tokenizer", "tracking", "preflight", "gates", "report", "cognate", "evomerge", "quietstar",
            "bitnet")


def assert_form(schema: dict) -> None:
    """The run form's schema: each section titled and described, the presets shown, no section field's default."""
    defs = schema["definitions"]
    top = defs["PipelineConfig"]["properties"]
    for name in SECTIONS:
        assert top[name]["title"] and top[name]["description"] and top[name]["default"] is None, name
    assert "small: 8 layers" in top["preset"]["description"]  # what a preset fills is shown where it is picked
    with_defaults = [f"{d}.{f}" for d, body in defs.items() if d != "PipelineConfig"
                     for f, prop in body.get("properties", {}).items() if "default" in prop]
    assert not with_defaults, with_defaults


def test_sections_are_titled_and_carry_no_preset_value():
    assert_form(parameter_schema(full.fn).model_dump())


def test_a_section_with_one_field_changed_keeps_the_chosen_presets_other_values():
    # what the form posts, validated the way a flow run validates its parameters
    small = full.validate_parameters({"config": {"preset": "small", "model": {"seq_len": 256}}})["config"]
    assert (small.model.n_layers, small.model.d_model, small.model.seq_len) == (8, 512, 256)
    partial = PipelineConfig.model_validate({"preset": "small", "cognate": {"train": {"optim": {"muon_lr": 0.01}}}})
    assert partial.cognate.train.optim.adam_lr == 1e-3 and partial.cognate.train.foundation_steps == 3000


def test_every_deployed_flows_parameters_are_described():
    from flows.bitnet import bitnet
    from flows.cognate import cognate
    from flows.diagnose import diagnose
    from flows.evomerge import evomerge
    from flows.prepare import prepare
    from flows.quietstar import quietstar

    for f in (full, prepare, cognate, evomerge, quietstar, bitnet, diagnose):
        properties = parameter_schema(f.fn).model_dump()["properties"]
        assert all(p.get("title") and p.get("description") for p in properties.values()), (f.name, properties.keys())
