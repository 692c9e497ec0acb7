"""Hashes: file digests and the canonical-JSON recipe key."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace, so equal configs hash equally."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def recipe_key(kind: str, inputs: list[str], config: dict[str, Any], code_version: str) -> str:
    payload = canonical_json(
        {"kind": kind, "inputs": list(inputs), "config": config, "code_version": code_version}
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:20]
