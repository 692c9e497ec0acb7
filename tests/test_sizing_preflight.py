from pathlib import Path

import pytest
import torch

from phases.common import resources
from phases.common.config import ModelShape
from phases.common.sizing import GB, MB, categorize, model_size, strategy_for, training_memory_bytes
from phases.config import PipelineConfig

SHAPE = ModelShape(n_layers=2, d_model=64, n_heads=4, seq_len=64)


@pytest.mark.parametrize(
    "params,category",
    [(0, "tiny"), (49_999_999, "tiny"), (50_000_000, "small"), (499_999_999, "small"),
     (500_000_000, "medium"), (1_999_999_999, "medium"), (2_000_000_000, "large"), (7_000_000_000, "large")],
)
def test_category_boundaries(params, category):
    assert categorize(params) == category


def test_model_size_counts_tied_weights_once():
    emb = torch.nn.Embedding(100, 16)
    head = torch.nn.Linear(16, 100, bias=False)
    head.weight = emb.weight
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    size = model_size(model)
    assert size.params == 1600 and size.size_mb == pytest.approx(1600 * 4 / MB) and size.category == "tiny"


@pytest.mark.parametrize(
    "params,compression,sparsity,batch,fitness",
    [(10_000_000, 6.0, 0.25, 32, (0.7, 0.2, 0.1)), (100_000_000, 8.0, 0.35, 16, (0.7, 0.2, 0.1)),
     (1_000_000_000, 10.0, 0.40, 8, (0.65, 0.2, 0.15)), (3_000_000_000, 12.0, 0.45, 8, (0.6, 0.2, 0.2))],
)
def test_strategy_table(params, compression, sparsity, batch, fitness):
    s = strategy_for(model_size(params), SHAPE)  # no memory limit given: the category's batch
    assert (s.compression_target, s.sparsity_target, s.batch_size) == (compression, sparsity, batch)
    assert tuple(s.fitness_weights.values()) == fitness and sum(fitness) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "size_mb,thoughts", [(50, (8, 20)), (99.9, (8, 20)), (100, (6, 15)), (499, (6, 15)), (500, (4, 12)),
                         (2047, (4, 12)), (2048, (4, 10)), (8000, (4, 10))],
)
def test_thought_budget_by_size_in_mb(size_mb, thoughts):
    params = int(size_mb * MB / 4)
    s = strategy_for(model_size(params), SHAPE)
    assert (s.thought_count, s.thought_length) == thoughts


def test_batch_size_shrinks_to_fit_memory():
    size, shape = model_size(20_000_000), ModelShape(n_layers=8, d_model=512, n_heads=8, seq_len=512)
    roomy = strategy_for(size, shape, free_memory_bytes=64 * GB)
    tight_budget = training_memory_bytes(size.params, shape, 4) / 0.8 + 1
    tight = strategy_for(size, shape, free_memory_bytes=int(tight_budget))
    assert roomy.batch_size == 32 and tight.batch_size == 4
    assert tight.training_memory_bytes <= tight_budget * 0.8


def test_preflight_passes_on_this_machine_for_tiny(tmp_path):
    cfg = PipelineConfig.from_preset("tiny")
    res = resources.probe(tmp_path, "cpu")
    needs = resources.check(cfg, tmp_path, res)
    assert res.device == "cpu" and res.memory_kind == "RAM" and needs.disk_bytes < res.free_disk_bytes


def test_impossible_disk_requirement_fails_with_advice(tmp_path):
    cfg = PipelineConfig.from_preset("tiny", preflight={"disk_headroom_gb": 10_000_000})
    res = resources.probe(tmp_path, "auto")
    with pytest.raises(resources.PreflightError) as e:
        resources.check(cfg, tmp_path, res)
    msg = str(e.value)
    assert f"disk at {tmp_path}: need" in msg and "free" in msg
    assert "AGENT_FORGE_HOME" in msg and "--preset tiny" not in msg  # tiny is the smallest already
    small = PipelineConfig.from_preset("small", preflight={"disk_headroom_gb": 10_000_000})
    with pytest.raises(resources.PreflightError, match=r"--preset tiny"):
        resources.check(small, tmp_path, res)


def test_impossible_memory_requirement_fails_with_advice(tmp_path):
    cfg = PipelineConfig.from_preset("small")
    res = resources.Resources(device="cpu", free_disk_bytes=10**15, free_memory_bytes=64 * MB, memory_kind="RAM")
    with pytest.raises(resources.PreflightError, match=r"RAM on cpu: training needs .* usable .*smaller preset"):
        resources.check(cfg, Path(tmp_path), res)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_asking_for_cuda_without_a_gpu_is_an_error():
    with pytest.raises(resources.PreflightError, match="no CUDA GPU"):
        resources.pick_device("cuda")


def test_config_presets_and_overrides():
    small = PipelineConfig.from_preset("small", data={"seed": 7})
    assert small.model.n_layers == 8 and small.data.seed == 7 and small.data.train_per_stage == 20000
    assert PipelineConfig().preset == "tiny" and PipelineConfig().model.n_layers == 2
    with pytest.raises(ValueError, match="unknown preset"):
        PipelineConfig.from_preset("huge")
    with pytest.raises(ValueError, match="Extra inputs"):
        PipelineConfig.model_validate({"data": {"sed": 1}})
    with pytest.raises(ValueError, match="not divisible"):
        PipelineConfig.model_validate({"model": {"n_layers": 1, "d_model": 100, "n_heads": 3, "seq_len": 64}})


def test_preflight_refuses_small_without_checkpointing_where_it_fits_with_it(tmp_path):
    """The same free memory: Cognate's T_max·L layer steps, each keeping its memory states, do not fit at
    batch 1; recomputing them in backward does, and so does back-propagating through the last recursion
    step only (L layer steps), and preflight says so before any work."""
    res = resources.Resources(device="cpu", free_disk_bytes=10**15, free_memory_bytes=3 * GB, memory_kind="RAM")
    fits = resources.check(PipelineConfig.from_preset("small"), Path(tmp_path), res)
    assert fits.memory_bytes <= 3 * GB * 0.8
    every_step = {"grad_steps": 0}  # the default, said here because the one-step case below differs by it
    plain = PipelineConfig.from_preset("small", cognate={"train": {"activation_checkpointing": False} | every_step})
    with pytest.raises(resources.PreflightError, match=r"training needs .* at batch size 1"):
        resources.check(plain, Path(tmp_path), res)
    checkpointed = resources.check(PipelineConfig.from_preset("small", cognate={"train": every_step}), Path(tmp_path), res)
    one_step = resources.check(PipelineConfig.from_preset(
        "small", cognate={"train": {"activation_checkpointing": False, "grad_steps": 1}}), Path(tmp_path), res)
    # each halves the batch until the estimate fits: the fewer values kept, the larger the batch
    assert one_step.memory_bytes <= 3 * GB * 0.8 and fits.batch_size >= checkpointed.batch_size >= 1
