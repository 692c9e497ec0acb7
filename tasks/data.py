"""Data tasks: the built-in curriculum, hub pre-download, the tokenizer."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from phases.common.config import DataConfig, TokenizerConfig
from phases.data import curriculum, dataset_files, hub_download, hub_registry
from phases.data import tokenizer as bpe
from storage import ArtifactRef, Recipe
from tasks.code_version import code_version
from tasks.runtime import create, recipe_cache, store


def curriculum_recipe(data: DataConfig) -> Recipe:
    return Recipe(
        kind="curriculum",
        config={"seed": data.seed, "train_per_stage": data.train_per_stage, "eval_per_stage": data.eval_per_stage},
        code_version=code_version("phases.data"),
    )


def hub_recipe(name: str, data: DataConfig) -> Recipe:
    ds = hub_registry.lookup(name)
    return Recipe(
        kind="hub-dataset",
        config={"name": ds.name, "hub_id": ds.hub_id, "config": ds.config, "split": ds.split,
                "eval_split": ds.eval_split, "revision": data.hub_revisions.get(name, ds.revision),
                "source": hub_download.source_of(ds, data.hub_mirror), "max_examples": data.hub_max_examples,
                "eval_examples": data.hub_eval_examples},
        code_version=code_version("phases.data"),
    )


def tokenizer_recipe(tok: TokenizerConfig, corpora: list[ArtifactRef]) -> Recipe:
    return Recipe(kind="tokenizer", inputs=tuple(r.id for r in corpora), config=tok.model_dump(mode="json"),
                  code_version=code_version("phases.data"))


@task(name="build-curriculum", cache_policy=recipe_cache(curriculum_recipe), persist_result=True)
def build_curriculum(data: DataConfig, home: str) -> ArtifactRef:
    recipe = curriculum_recipe(data)

    def build(out: Path) -> dict:
        splits = curriculum.generate(data.train_per_stage, data.eval_per_stage, data.seed)
        sizes = dataset_files.save_splits(splits, out)
        rows = [r for split in splits.values() for r in split]
        train_texts = {r["text"] for r in splits["train"]}
        held_out = [r["text"] for s in ("validation", "test") for r in splits[s]]
        return {
            "rows": sizes,
            "verified_fraction": sum(curriculum.verify(r) for r in rows) / len(rows),
            "train_heldout_overlap": sum(t in train_texts for t in held_out),
            "tasks": {t: sum(r["task"] == t for r in rows) for t in sorted({r["task"] for r in rows})},
        }

    st = store(home)
    ref = create(home, recipe, "build-curriculum", build)
    get_run_logger().info("curriculum %s: %s", ref, st.manifest(ref)["metrics"]["rows"])
    return ref


@task(name="download-hub-dataset", cache_policy=recipe_cache(hub_recipe), persist_result=True)
def download_hub_dataset(name: str, data: DataConfig, home: str) -> ArtifactRef:
    ds = hub_registry.lookup(name)
    recipe = hub_recipe(name, data)

    def build(out: Path) -> dict:
        # raises DatasetUnavailable with the dataset, its source and the cause
        splits, revision = hub_download.fetch(ds, data.hub_max_examples, data.hub_eval_examples, data.hub_mirror,
                                              recipe.config["revision"])
        return {"rows": dataset_files.save_splits(splits, out), "hub_id": ds.hub_id, "resolved_revision": revision,
                "stage": ds.stage, "scorer": ds.scorer, "eval_split": ds.eval_split}

    return create(home, recipe, f"download-hub-dataset:{name}", build)


@task(name="train-tokenizer", cache_policy=recipe_cache(tokenizer_recipe), persist_result=True)
def train_tokenizer(tok: TokenizerConfig, corpora: list[ArtifactRef], home: str) -> ArtifactRef:
    st = store(home)
    recipe = tokenizer_recipe(tok, corpora)

    def build(out: Path) -> dict:
        splits = [dataset_files.load_splits(st.load(r)) for r in corpora]
        train_texts = [t for dd in splits for t in dd["train"]["text"]]
        val_texts = [t for dd in splits for t in dd["validation"]["text"]]
        tokenizer = bpe.train_bpe(train_texts, tok.vocab_size, tok.min_frequency)
        bpe.save(tokenizer, out)
        reloaded = bpe.load(out)  # measure what was written, not the object in memory
        return {
            "vocab_size": len(reloaded),
            "roundtrip_rate": bpe.roundtrip_rate(reloaded, val_texts),
            "chars_per_token": bpe.chars_per_token(reloaded, val_texts),
            "trained_on_texts": len(train_texts),
        }

    return create(home, recipe, "train-tokenizer", build)
