"""A local mirror of three Hub datasets in the Hub's own layout: each repository a README whose YAML header names its
configs and splits, and Parquet files under them, with the columns the real datasets have. ``datasets`` reads it
as it reads the Hub. The rows are generated (seeded): small, and with answers a rule decides."""

from __future__ import annotations

import random
from pathlib import Path

import datasets

NAMES = ("gsm8k", "arc_easy", "boolq")  # registry names of the mirrored datasets
THINGS = ["apples", "pens", "cards", "coins", "books", "shells"]
ANIMALS = [("mouse", "elephant"), ("ant", "horse"), ("cat", "whale"), ("frog", "bear"), ("bee", "cow")]


def _gsm8k(rng: random.Random) -> dict:
    a, b, thing = rng.randint(2, 40), rng.randint(2, 40), rng.choice(THINGS)
    return {"question": f"Sam has {a} {thing}. He gets {b} more. How many {thing} does Sam have now?",
            "answer": f"Sam has {a}+{b}=<<{a}+{b}={a + b}>>{a + b} {thing}.\n#### {a + b}"}


def _arc(rng: random.Random, i: int) -> dict:
    small, big = rng.choice(ANIMALS)
    others = [rng.choice(THINGS) for _ in range(3)]
    texts = [big, *others]
    rng.shuffle(texts)
    labels = ["A", "B", "C", "D"]
    return {"id": f"Mirror_{i}", "question": f"Which is bigger than a {small}?",
            "choices": {"text": texts, "label": labels}, "answerKey": labels[texts.index(big)]}


def _boolq(rng: random.Random) -> dict:
    a, b = rng.randint(1, 99), rng.randint(1, 99)
    return {"question": f"is {a} more than {b}", "answer": a > b, "passage": f"The numbers are {a} and {b}."}


def _repo(root: Path, hub_id: str, config: str, splits: dict[str, list[dict]]) -> None:
    repo = root / hub_id
    files = []
    for split, rows in splits.items():
        path = repo / config / f"{split}-00000-of-00001.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_list(rows).to_parquet(str(path))
        files.append(f"  - split: {split}\n    path: {config}/{split}-*")
    (repo / "README.md").write_text(f"---\nconfigs:\n- config_name: {config}\n  data_files:\n" + "\n".join(files)
                                    + "\n---\n# a local mirror for tests\n")


def write_mirror(root: Path, rows: int = 60, held_out: int = 24) -> Path:
    rng = random.Random(7)
    _repo(root, "openai/gsm8k", "main", {"train": [_gsm8k(rng) for _ in range(rows)],
                                         "test": [_gsm8k(rng) for _ in range(held_out)]})
    _repo(root, "allenai/ai2_arc", "ARC-Easy", {"train": [_arc(rng, i) for i in range(rows)],
                                                "test": [_arc(rng, rows + i) for i in range(held_out)]})
    _repo(root, "google/boolq", "default", {"train": [_boolq(rng) for _ in range(rows)],
                                            "validation": [_boolq(rng) for _ in range(held_out)]})
    return root
