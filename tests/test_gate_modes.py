"""One rule for a phase's gate mode: its own ``gates.mode`` where set, else the pipeline's. Presets set only
the pipeline's, so ``--set gates.mode=strict`` makes every phase strict; a lenient preset says why."""

import pytest

from flows.cli import _overrides
from phases.common.gates import GateFailed, GateReport
from phases.config import PipelineConfig, deep_merge

PHASES = ("prepare", "cognate", "evomerge", "quietstar", "bitnet")


def _as_cli(preset: str, *pairs: str) -> PipelineConfig:
    """The config `agent-forge run … --preset P --set …` builds."""
    return PipelineConfig.model_validate(deep_merge({"preset": preset}, _overrides(list(pairs))))


def test_tiny_is_lenient_only_where_it_writes_why_and_small_is_strict():
    tiny = _as_cli("tiny")
    lenient = {p for p in PHASES if tiny.gate_mode(p) == "lenient"}
    assert lenient == set(tiny.gates.reasons) == {"evomerge", "quietstar", "bitnet"}
    # their gates pass on tiny, Cognate's on its specialists' merit: nothing to excuse
    assert tiny.gate_mode("prepare") == tiny.gate_mode("cognate") == "strict"
    assert all(len(why) > 40 for why in tiny.gates.reasons.values())
    assert {_as_cli("small").gate_mode(p) for p in PHASES} == {"strict"}


def test_a_user_made_lenient_without_reasons_covers_every_phase():
    assert {_as_cli("small", "gates.mode=lenient").gate_mode(p) for p in PHASES} == {"lenient"}


def test_set_gates_mode_strict_makes_every_phase_strict():
    assert {_as_cli("tiny", "gates.mode=strict").gate_mode(p) for p in PHASES} == {"strict"}


def test_a_phases_own_mode_wins_for_that_phase_only():
    one = _as_cli("small", "bitnet.gates.mode=lenient")
    assert one.gate_mode("bitnet") == "lenient" and {one.gate_mode(p) for p in PHASES if p != "bitnet"} == {"strict"}
    other = _as_cli("tiny", "cognate.gates.mode=strict")
    assert other.gate_mode("cognate") == "strict" and other.gate_mode("evomerge") == "lenient"


def test_strict_stops_naming_the_failing_gate_and_lenient_says_why_in_its_title():
    def report(mode: str, reason: str = "") -> GateReport:
        r = GateReport(phase="cognate", mode=mode, reason=reason)
        r.add("no_nan", "non-finite tensors", 0, "==", 0)
        r.add("arithmetic", "best model's held-out arithmetic accuracy", 0.09, ">=", 0.9)
        return r

    with pytest.raises(GateFailed, match=r"cognate exit gates failed: arithmetic: measured 0.09 not >= 0.9"):
        report("strict").enforce()
    lenient = report("lenient", "tiny is the CPU demo")
    assert lenient.enforce() == ["arithmetic: measured 0.09 not >= 0.9 (best model's held-out arithmetic accuracy)"]
    assert lenient.title() == "cognate exit gates (lenient: tiny is the CPU demo): FAIL"
    assert report("strict").title() == "cognate exit gates (strict): FAIL"
