"""Curriculum-schema splits on disk, written and read through ``datasets``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets

from phases.data.curriculum import FIELDS

datasets.disable_progress_bars()  # per-shard bars flood Prefect's logs; tasks log their own counts

FEATURES = datasets.Features({f: datasets.Value("string") for f in FIELDS})


def save_splits(splits: dict[str, list[dict[str, Any]]], out_dir: Path) -> dict[str, int]:
    dd = datasets.DatasetDict(
        {name: datasets.Dataset.from_list(rows, features=FEATURES) for name, rows in splits.items()}
    )
    dd.save_to_disk(str(out_dir))
    return {name: len(rows) for name, rows in splits.items()}


def load_splits(path: Path) -> datasets.DatasetDict:
    return datasets.load_from_disk(str(path))
