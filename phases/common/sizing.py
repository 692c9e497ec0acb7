"""Model-size detection and the size-adaptive strategy table.

The final model size is not known until runtime, so every phase asks here. Categories go by
parameter count (tiny < 50M, small < 500M, medium < 2B, large); the Quiet-STaR thought budget goes by
size in MB (< 100 MB, < 500 MB, < 2 GB, larger).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch

from phases.common.config import ModelShape

Category = Literal["tiny", "small", "medium", "large"]
MB = 1024**2
GB = 1024**3

_CATEGORY_LIMITS: list[tuple[int, Category]] = [(50_000_000, "tiny"), (500_000_000, "small"), (2_000_000_000, "medium")]

# Compression 6/8/10/12x: the FP16 embeddings are 15-20% of a tiny model's parameters and 2-5% of a large
# one's, so larger models compress further. Sparsity 25/35/40/45%, conservative to aggressive. Batch 32 -> 8.
_COMPRESSION = {"tiny": 6.0, "small": 8.0, "medium": 10.0, "large": 12.0}
_SPARSITY = {"tiny": 0.25, "small": 0.35, "medium": 0.40, "large": 0.45}
_BASE_BATCH = {"tiny": 32, "small": 16, "medium": 8, "large": 8}
# Thought count x length by size in MB: 8x20, 6x15, 4x12, 4x10 (fewer, shorter thoughts as models grow).
_THOUGHTS: list[tuple[float, tuple[int, int]]] = [(100, (8, 20)), (500, (6, 15)), (2048, (4, 12))]
_THOUGHTS_LARGEST = (4, 10)
# EvoMerge fitness (accuracy, speed, memory). The seeds weigh perplexity/accuracy/speed/memory 0.4/0.3/0.2/0.1;
# a merge is for skills, and a fitness led by perplexity picked champions that answered nothing the inputs did
# not, so perplexity's share goes to held-out skill accuracy and perplexity stays a guard (a limit). As models
# grow, their speed and memory decide whether they fit the target device, so weight moves there.
_FITNESS = {
    "tiny": (0.7, 0.2, 0.1),
    "small": (0.7, 0.2, 0.1),
    "medium": (0.65, 0.2, 0.15),
    "large": (0.6, 0.2, 0.2),
}


@dataclass(frozen=True)
class ModelSize:
    params: int
    size_mb: float
    category: Category


def categorize(params: int) -> Category:
    for limit, name in _CATEGORY_LIMITS:
        if params < limit:
            return name
    return "large"


def model_size(model_or_params: torch.nn.Module | int, bytes_per_param: int = 4) -> ModelSize:
    """Parameter count (shared tensors counted once), size in MB at ``bytes_per_param``, category."""
    if isinstance(model_or_params, int):
        params = model_or_params
    else:
        params = sum(p.numel() for p in {id(p): p for p in model_or_params.parameters()}.values())
    return ModelSize(params=params, size_mb=params * bytes_per_param / MB, category=categorize(params))


def estimate_params(shape: ModelShape, vocab_size: int) -> int:
    """A decoder's parameters before it exists: 12·L·d² for attention + MLP, tied embeddings."""
    return 12 * shape.n_layers * shape.d_model**2 + vocab_size * shape.d_model


@dataclass(frozen=True)
class Recursion:
    """What a recurrent-depth model with a matrix-valued memory (Cognate) adds to training memory: the layer
    stack runs ``steps`` times, and each layer's memory keeps d×d states per write of ``mem_chunk`` tokens
    (the smallest chunk training reaches). Phase packages fill it in; this module knows no phase."""

    steps: int
    mem_chunk: int
    vocab_size: int
    checkpointing: bool = True


# Per sequence, in values, measured with phases/common/memtrack.py on Cognate (tests/test_cognate_memory_scale.py
# re-measures three small shapes and the small preset's): one (recursion step, layer) keeps ~30 values per token
# per channel (projections, attention, norms, SwiGLU, the memory's per-token reads) and 2 d×d matrices per memory
# write (W and S; a model reading through the Q-K projection keeps its running sum A too); each recursion step
# keeps ~7 more per token per channel (halting, the ACT mixture); the LM loss keeps 3 per token per vocabulary
# entry (logits, log-softmax, their gradient). A checkpointed (step, layer) holds its input, 1 per token per
# channel, until backward reaches it.
_LAYER_STEP_PER_TOKEN, _MEMORY_MATRICES_PER_WRITE, _RECURSION_PER_TOKEN, _LOSS_PER_VOCAB = 30, 2, 7, 3
_CHECKPOINT_PER_TOKEN = 1


def recursion_activation_values(shape: ModelShape, rec: Recursion) -> int:
    """Values alive at the peak of one training step, per sequence. With checkpointing each (step, layer)
    keeps only its input and one of them is recomputed at a time in backward; without it all
    ``steps · n_layers`` layer steps keep everything until backward reaches them."""
    s, d, n_layers = shape.seq_len, shape.d_model, shape.n_layers
    layer_step = _LAYER_STEP_PER_TOKEN * s * d + _MEMORY_MATRICES_PER_WRITE * d * d * math.ceil(s / rec.mem_chunk)
    if rec.checkpointing:
        stack = _CHECKPOINT_PER_TOKEN * rec.steps * n_layers * s * d + layer_step
    else:
        stack = rec.steps * n_layers * layer_step
    return stack + rec.steps * _RECURSION_PER_TOKEN * s * d + _LOSS_PER_VOCAB * s * rec.vocab_size


def training_memory_bytes(params: int, shape: ModelShape, batch_size: int, bytes_per_value: int = 4,
                          recursion: Recursion | None = None) -> int:
    """Weights + grads + two optimizer moments (16 B/param in fp32) + activations.

    Without ``recursion``, activations per layer follow Korthikanti et al. (2022), s·b·h·(34 + 5·a·s/h)
    bytes in half precision, scaled to ``bytes_per_value``. With it, they are counted for a recurrent-depth
    model (``recursion_activation_values``): the transformer formula misses the recursion and the memory
    states, which are most of it.
    """
    if recursion is not None:
        return int(params * 4 * bytes_per_value + batch_size * recursion_activation_values(shape, recursion) * bytes_per_value)
    s, b, h, a, n_layers = shape.seq_len, batch_size, shape.d_model, shape.n_heads, shape.n_layers
    activations = n_layers * s * b * h * (34 + 5 * a * s / h) * bytes_per_value / 2
    return int(params * 4 * bytes_per_value + activations)


@dataclass(frozen=True)
class Strategy:
    size: ModelSize
    batch_size: int
    compression_target: float
    sparsity_target: float
    thought_count: int
    thought_length: int
    fitness_weights: dict[str, float]
    training_memory_bytes: int

    def as_dict(self) -> dict:
        return asdict(self)


def adaptive_batch_size(
    size: ModelSize, shape: ModelShape, free_memory_bytes: int | None, headroom: float = 0.2,
    recursion: Recursion | None = None,
) -> int:
    """The category's batch size, halved until training fits in the usable part of free memory."""
    batch = _BASE_BATCH[size.category]
    if free_memory_bytes is None:
        return batch
    usable = free_memory_bytes * (1 - headroom)
    while batch > 1 and training_memory_bytes(size.params, shape, batch, recursion=recursion) > usable:
        batch //= 2
    return batch


def strategy_for(
    size: ModelSize, shape: ModelShape, free_memory_bytes: int | None = None, headroom: float = 0.2,
    recursion: Recursion | None = None,
) -> Strategy:
    batch = adaptive_batch_size(size, shape, free_memory_bytes, headroom, recursion)
    count, length = next((t for limit, t in _THOUGHTS if size.size_mb < limit), _THOUGHTS_LARGEST)
    weights = dict(zip(("accuracy", "speed", "memory"), _FITNESS[size.category]))
    return Strategy(
        size=size,
        batch_size=batch,
        compression_target=_COMPRESSION[size.category],
        sparsity_target=_SPARSITY[size.category],
        thought_count=count,
        thought_length=length,
        fitness_weights=weights,
        training_memory_bytes=training_memory_bytes(size.params, shape, batch, recursion=recursion),
    )
