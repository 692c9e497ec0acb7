"""Pull a registry dataset from the Hub once and convert it onto the curriculum schema."""

from __future__ import annotations

import hashlib
import itertools
from typing import Any

import datasets

from phases.data.hub_registry import HubDataset


class DatasetUnavailable(RuntimeError):
    pass


def _split_of(row_id: str) -> str:
    """Stable 90/5/5 train/validation/test assignment by the row's id."""
    bucket = int(hashlib.sha256(row_id.encode()).hexdigest()[:8], 16) % 100
    return "test" if bucket < 5 else "validation" if bucket < 10 else "train"


def fetch(ds: HubDataset, max_examples: int) -> dict[str, list[dict[str, Any]]]:
    """First ``max_examples`` usable rows, converted and split. Raises DatasetUnavailable on any failure."""
    try:
        stream = datasets.load_dataset(
            ds.hub_id, ds.config, split=ds.split, revision=ds.revision, streaming=True
        )
        splits: dict[str, list[dict[str, Any]]] = {"train": [], "validation": [], "test": []}
        kept = 0
        for i, raw in enumerate(itertools.islice(stream, max_examples * 4)):
            row = ds.to_schema(dict(raw), i)
            if row is None:
                continue
            splits[_split_of(row["id"])].append(row)
            kept += 1
            if kept >= max_examples:
                break
    except Exception as e:  # network, auth, schema: all mean "this dataset is not available here"
        raise DatasetUnavailable(
            f"hub dataset {ds.name!r} ({ds.hub_id}, config={ds.config}, split={ds.split}) could not be "
            f"downloaded: {type(e).__name__}: {str(e)[:300]}. Check the network (or HF_ENDPOINT), "
            "or drop it from data.hub_datasets to train on the built-in curriculum."
        ) from e
    if kept == 0:
        raise DatasetUnavailable(f"hub dataset {ds.name!r} ({ds.hub_id}) gave no usable rows")
    return splits
