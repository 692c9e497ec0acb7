"""CognateConfig: the shapes of a TRM × Titans-MAG model, and its runtime settings.

Shapes (vocab, width, depth, heads, MLP width, persistent tokens) fix the parameter tensors, so every
model built from one shape can be merged with every other. Everything a specialist changes is a
runtime setting (window, memory chunk, shard length, recursion bound, halting threshold, memory step
size, decay, surprise threshold, gate and halting biases): it is saved in config.json but never changes a tensor's shape.
"""

from __future__ import annotations

from transformers import PretrainedConfig

# Runtime settings a specialist or the trainer may change without touching parameter shapes.
RUNTIME_KEYS = (
    "window_size", "mem_chunk_size", "shard_length", "act_max_steps", "act_threshold",
    "mem_lr_scale", "mem_decay_scale", "surprise_threshold", "ponder_cost", "gate_bias", "halt_bias",
    "mem_read_scale", "grad_steps",
)


class CognateConfig(PretrainedConfig):
    model_type = "cognate"

    def __init__(
        self,
        vocab_size: int = 1024,
        hidden_size: int = 128,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        intermediate_size: int | None = None,
        n_persistent: int = 8,
        window_size: int = 64,
        mem_chunk_size: int = 16,
        shard_length: int = 2048,
        act_max_steps: int = 3,
        act_threshold: float = 0.99,
        ponder_cost: float = 0.01,
        mem_lr_scale: float = 1.0,
        mem_decay_scale: float = 1.0,
        surprise_threshold: float = 0.0,
        gate_bias: float = 0.0,
        gate_init: float = 3.0,
        halt_bias: float = 0.0,
        mem_read_scale: float = 1.0,
        qk_projection: bool = False,
        grad_steps: int = 0,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = True,
        layer_scales: list[float] | None = None,
        **kwargs,
    ):
        if hidden_size % num_attention_heads:
            raise ValueError(f"hidden_size={hidden_size} is not divisible by num_attention_heads={num_attention_heads}")
        if act_max_steps < 1:
            raise ValueError(f"act_max_steps must be >= 1, got {act_max_steps}")
        if not 0.0 < act_threshold <= 1.0:
            raise ValueError(f"act_threshold must be in (0, 1], got {act_threshold}")
        if layer_scales is not None and len(layer_scales) != num_hidden_layers:
            raise ValueError(f"layer_scales has {len(layer_scales)} entries for {num_hidden_layers} layers")
        if grad_steps < 0:
            raise ValueError(f"grad_steps must be >= 0 (0: every recursion step back-propagates), got {grad_steps}")
        if min(window_size, mem_chunk_size, shard_length) < 1:
            raise ValueError("window_size, mem_chunk_size and shard_length must be >= 1")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size or 2 * hidden_size
        self.n_persistent = n_persistent
        self.window_size = window_size
        self.mem_chunk_size = mem_chunk_size
        self.shard_length = shard_length
        self.act_max_steps = act_max_steps
        self.act_threshold = act_threshold
        self.ponder_cost = ponder_cost
        self.mem_lr_scale = mem_lr_scale
        self.mem_decay_scale = mem_decay_scale
        self.surprise_threshold = surprise_threshold
        self.gate_bias = gate_bias  # added to the MAG gate logit: < 0 leans on memory
        # The MAG gate's learned bias starts here: σ(3) = 0.95 of each layer's mix from attention. The memory
        # read is RMS-normed, so an untrained memory adds full-scale noise in proportion to 1 − g; at an even
        # start (0) it drowned what attention learned. Arithmetic alone, tiny shape, T_max 1, 400 steps: 0.5%
        # of the test at 0, 16.5% at 1, 61% at 2, 94% at 3 (a zero-initialised memory output: 38%).
        self.gate_init = gate_init
        self.halt_bias = halt_bias  # added to the halting logit: < 0 thinks longer
        self.mem_read_scale = mem_read_scale  # 0 ablates the memory read: what does the model lose without it?
        # The memory reads with the query itself, not the Q-K projection q' = (M_persistent + Σ k kᵀ) q / norm. That
        # projection multiplies the query by the running key covariance, so it pulls every read toward the directions
        # the many filler tokens share and away from the rare one a stored code sits in. Tiny shape, window 16
        # (recall is the memory's alone), one-code recall only, 300 steps: 97.9% / 100% of recall problems 48 / 144
        # tokens beyond the window read with q, 0% / 0% with q' (4.2% after 600), 0% with the memory read zeroed.
        self.qk_projection = qk_projection
        # In training, only the last grad_steps recursion steps back-propagate (0: all): TRM's one-step gradient.
        self.grad_steps = grad_steps
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        # Data-flow-space merges (EvoMerge DFS) scale each layer's input; None is 1.0 everywhere.
        self.layer_scales = list(layer_scales) if layer_scales is not None else None
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
