"""Pull a registry dataset once, from the Hub or from a local mirror in the Hub's layout, and convert it onto the
curriculum schema.

A mirror is a directory holding dataset repositories by id (``<mirror>/openai/gsm8k``), each as the Hub serves it:
Parquet files and the README whose YAML header names the configs and splits. ``datasets`` reads it exactly as it
reads the Hub, so a machine without the network trains on the same rows (a ``git clone`` of the Hub repository is
such a mirror).
"""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path
from typing import Any

import datasets

from phases.data.hub_registry import HubDataset, is_commit

Splits = dict[str, list[dict[str, Any]]]


class DatasetUnavailable(RuntimeError):
    pass


def _split_of(row_id: str) -> str:
    """Stable 90/5/5 train/validation/test assignment by the row's id."""
    bucket = int(hashlib.sha256(row_id.encode()).hexdigest()[:8], 16) % 100
    return "test" if bucket < 5 else "validation" if bucket < 10 else "train"


def source_of(ds: HubDataset, mirror: str | None) -> str:
    return str(Path(mirror) / ds.hub_id) if mirror else ds.hub_id


def _rows(ds: HubDataset, source: str, split: str, revision: str | None, limit: int, start: int = 0):
    """Up to ``limit`` converted rows of one split, ids numbered from ``start``."""
    stream = datasets.load_dataset(source, ds.config, split=split, revision=revision, streaming=True)
    kept = 0
    for i, raw in enumerate(itertools.islice(stream, limit * 4)):
        row = ds.to_schema(dict(raw), start + i)
        if row is None:
            continue
        yield row
        kept += 1
        if kept >= limit:
            return


def resolved_revision(ds: HubDataset, revision: str | None, mirror: str | None) -> str:
    """The commit the rows came from: what a pinned revision names, or what the branch resolved to on the Hub."""
    if mirror:
        return f"mirror:{source_of(ds, mirror)}"
    if is_commit(revision):
        return revision  # a commit already: nothing to resolve
    from huggingface_hub import HfApi

    return HfApi().dataset_info(ds.hub_id, revision=revision).sha or str(revision)


def fetch(ds: HubDataset, max_examples: int, eval_examples: int, mirror: str | None = None,
          revision: str | None = None) -> tuple[Splits, str]:
    """(splits, resolved revision): the first ``max_examples`` usable rows of the training split, hashed by id into
    train/validation/test; where the dataset has a labelled held-out split of its own (``eval_split``), test is
    its first ``eval_examples`` rows instead. Raises DatasetUnavailable naming the dataset, the source and the
    cause on any failure."""
    source, revision = source_of(ds, mirror), revision or ds.revision
    try:
        splits: Splits = {"train": [], "validation": [], "test": []}
        for row in _rows(ds, source, ds.split, revision, max_examples):
            split = _split_of(row["id"])
            splits["train" if ds.eval_split and split == "test" else split].append(row)
        for split in ("validation", "test"):  # a small read can hash no row to a split; none may be empty on disk
            if not splits[split] and len(splits["train"]) > 1 and not (split == "test" and ds.eval_split):
                splits[split].append(splits["train"].pop())
        if ds.eval_split:
            # ids numbered past the training rows', so no held-out row shares an id with a training row
            splits["test"] = list(_rows(ds, source, ds.eval_split, revision, eval_examples, start=10 * max_examples))
        resolved = resolved_revision(ds, revision, mirror)
    except Exception as e:  # network, auth, a missing file, a schema that moved: the dataset is not available here
        raise DatasetUnavailable(
            f"hub dataset {ds.name!r} ({source}, config={ds.config}, split={ds.split}"
            f"{', eval split=' + ds.eval_split if ds.eval_split else ''}, revision={revision}) could not be "
            f"read: {type(e).__name__}: {str(e)[:300]}. Check the network (or HF_ENDPOINT, or data.hub_mirror), "
            "or drop it from data.hub_datasets."
        ) from e
    if not splits["train"]:
        raise DatasetUnavailable(f"hub dataset {ds.name!r} ({source}) gave no usable training rows")
    if ds.eval_split and not splits["test"]:
        raise DatasetUnavailable(f"hub dataset {ds.name!r} ({source}) gave no usable rows in its {ds.eval_split} split")
    return splits, resolved
