"""transformers' from_pretrained builds models under a process-global meta-device context, so two
threads loading at once can hand each other meta tensors (observed with transformers 5.23: a Prefect
thread pool loading three models). Every load and save in the pipeline goes through one lock."""

from __future__ import annotations

import threading
from pathlib import Path

_LOCK = threading.RLock()


def load_pretrained(cls, path: str | Path, **kwargs):
    with _LOCK:
        return cls.from_pretrained(str(path), **kwargs)


def save_pretrained(model, path: str | Path) -> None:
    with _LOCK:
        model.save_pretrained(str(path))


def build(cls, config):
    """Construct a model from a config under the same lock (construction is what the meta context hijacks)."""
    with _LOCK:
        return cls(config)
