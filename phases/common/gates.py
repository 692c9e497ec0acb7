"""Exit gates: every phase ends with a table of (criterion, threshold, measured, passed).

A gate compares a measured number with a threshold; nothing here can pass without a measurement.
"""

from __future__ import annotations

import math
import operator
from typing import Literal

from pydantic import BaseModel, Field

_OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt, "==": operator.eq}


class GateFailed(RuntimeError):
    pass


class Gate(BaseModel):
    id: str
    criterion: str
    op: Literal[">=", ">", "<=", "<", "=="]
    threshold: float
    measured: float | None
    # a difference's 95% interval: the gate passes only when the interval also excludes 0 (significant)
    interval: tuple[float, float] | None = None
    # a paired difference's test: the gate passes only when p < 0.05 too
    p_value: float | None = None
    passed: bool

    @classmethod
    def check(cls, id: str, criterion: str, measured: float | None, op: str, threshold: float,
              interval: tuple[float, float] | None = None, p_value: float | None = None) -> Gate:
        ok = measured is not None and not math.isnan(measured) and _OPS[op](measured, threshold)
        if interval is not None:
            ok = ok and (interval[0] > 0 if op in (">=", ">") else interval[1] < 0)
        if p_value is not None:
            ok = ok and p_value < 0.05
        return cls(id=id, criterion=criterion, op=op, threshold=threshold, measured=measured, interval=interval,
                   p_value=p_value, passed=bool(ok))


class Fact(BaseModel):
    """A measured figure shown beside the gates but never gated: one that the configuration or the code
    decides (a spread of hand-set runtime settings, a count the trainer caps), so a gate on it could not fail
    on merit."""

    id: str
    description: str
    value: float | None


class GateReport(BaseModel):
    phase: str
    mode: Literal["strict", "lenient"] = "strict"
    reason: str = ""  # why a lenient report is lenient (the preset's written reason)
    gates: list[Gate] = Field(default_factory=list)
    facts: list[Fact] = Field(default_factory=list)

    def fact(self, id: str, description: str, value: float | None) -> None:
        self.facts.append(Fact(id=id, description=description, value=value))

    def add(self, id: str, criterion: str, measured: float | None, op: str, threshold: float,
            interval: tuple[float, float] | None = None, p_value: float | None = None) -> Gate:
        gate = Gate.check(id, criterion, measured, op, threshold, interval, p_value)
        self.gates.append(gate)
        return gate

    @property
    def passed(self) -> bool:
        return bool(self.gates) and all(g.passed for g in self.gates)

    @property
    def failed(self) -> list[Gate]:
        return [g for g in self.gates if not g.passed]

    def rows(self) -> list[dict]:
        return [
            {
                "gate": g.id,
                "criterion": g.criterion,
                "threshold": f"{g.op} {g.threshold:g}",
                "measured": "not measured" if g.measured is None else f"{g.measured:.6g}" + (
                    f" (95% {g.interval[0]:.3g} to {g.interval[1]:.3g})" if g.interval is not None else "") + (
                    f" (McNemar p = {g.p_value:.3g})" if g.p_value is not None else ""),
                "passed": "PASS" if g.passed else "FAIL",
            }
            for g in self.gates
        ]

    def title(self) -> str:
        """``<phase> exit gates (<mode>[: reason]): PASS|FAIL``."""
        mode = f"lenient: {self.reason}" if self.mode == "lenient" and self.reason else self.mode
        return f"{self.phase} exit gates ({mode}): {'PASS' if self.passed else 'FAIL'}"

    def markdown(self) -> str:
        head = "| gate | criterion | threshold | measured | passed |\n|---|---|---|---|---|\n"
        table = head + "\n".join("| " + " | ".join(r.values()) + " |" for r in self.rows())
        if self.facts:
            table += "\n\nReported, not gated:\n\n| fact | what | value |\n|---|---|---|\n" + "\n".join(
                f"| {f.id} | {f.description} | {'not measured' if f.value is None else f'{f.value:.6g}'} |"
                for f in self.facts)
        return table

    def enforce(self) -> list[str]:
        """Strict: raise on any failure. Lenient: return the failures as warnings."""
        if not self.gates:
            raise GateFailed(f"{self.phase}: no gate was evaluated")
        problems = [f"{g.id}: measured {g.measured} not {g.op} {g.threshold:g} ({g.criterion})" for g in self.failed]
        if problems and self.mode == "strict":
            raise GateFailed(f"{self.phase} exit gates failed: " + "; ".join(problems))
        return problems
