"""Phase 1, Cognate. ``CognateConfig`` and ``CognateForCausalLM`` are importable from here; importing either (or
``phases.cognate.modeling``) registers the model with the transformers Auto classes.

This package's __init__ stays light because PipelineConfig imports its settings: a configuration mistake is
refused before torch or transformers load (a second instead of six)."""

from __future__ import annotations

from typing import Any

__all__ = ["CognateConfig", "CognateForCausalLM"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from phases.cognate import modeling

        return getattr(modeling, name)
    raise AttributeError(f"module 'phases.cognate' has no attribute {name!r}")
