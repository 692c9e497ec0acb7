"""What each flow parameter means, written once: the run form in the Prefect UI shows it under the parameter's
title (Prefect reads a flow's parameter descriptions from the ``Args:`` section of its docstring)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)

PARAMETERS = {
    "config": "pick a preset (tiny: 2 CPU cores, small: one ~6 GB GPU); a section left empty takes the preset's values",
    "home": "the artifact store's directory; empty: $AGENT_FORGE_HOME, else ./.agent-forge",
    "run_group": "the W&B group this phase logs into; empty: this run's own id (the full pipeline passes its id)",
    "checked": "a preflight check the caller just made; empty: check disk and memory here",
    "prepared": "prepare's artifacts (curriculum, hub datasets, tokenizer); empty: run prepare first",
    "models": "the Cognate specialists to merge; empty: the store's newest complete set",
    "base": "the foundation those specialists share; empty: theirs, from the store",
    "model": "the model artifact to start from; empty: the store's newest of the kinds this phase takes",
}


def described(fn: F) -> F:
    """``fn``'s docstring gains an ``Args:`` section naming each of its parameters from PARAMETERS."""
    lines = [f"    {name}: {PARAMETERS[name]}" for name in inspect.signature(fn).parameters]
    summary = fn.__doc__ or (inspect.getmodule(fn).__doc__ or fn.__name__).split("\n\n")[0]  # the flow's, or its module's
    fn.__doc__ = f"{inspect.cleandoc(summary)}\n\nArgs:\n" + "\n".join(lines) + "\n"
    return fn
