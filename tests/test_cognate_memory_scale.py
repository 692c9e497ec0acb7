"""Cognate's training memory: checkpointing is exact, saves what it should, and the sizing estimate is
what a step measures (two small shapes and the small preset's shape)."""

import pytest
import torch

from phases.cognate import CognateConfig, CognateForCausalLM
from phases.common.config import ModelShape
from phases.common.memtrack import AllocatedBytes, saved_bytes
from phases.common.optim import MuonGrokfast
from phases.common.sizing import Recursion, training_memory_bytes


def _model(d=64, layers=2, heads=4, vocab=256, steps=3, chunk=8, window=16, seed=0) -> CognateForCausalLM:
    torch.manual_seed(seed)
    return CognateForCausalLM(CognateConfig(vocab_size=vocab, hidden_size=d, num_hidden_layers=layers,
                                            num_attention_heads=heads, act_max_steps=steps, mem_chunk_size=chunk,
                                            window_size=window)).train()


def _tokens(vocab, batch, seq, seed=1):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_checkpointing_gives_the_same_outputs_and_gradients():
    x = _tokens(256, 2, 40)  # 40 tokens, chunk 8: five memory writes per layer step
    results = []
    for on in (False, True):
        model = _model()
        if on:
            model.activation_checkpointing_enable()
        assert model.model.gradient_checkpointing is on
        out = model(x, labels=x)
        (out.loss + 0.1 * out.polarization_loss).backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (plain, plain_grads), (ckpt, ckpt_grads) = results
    for field in ("loss", "logits", "halting_steps", "gate", "polarization_loss"):
        torch.testing.assert_close(getattr(ckpt, field), getattr(plain, field), rtol=0, atol=0)
    assert plain_grads.keys() == ckpt_grads.keys()
    for name, g in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_checkpointing_keeps_one_layer_step_not_all_of_them():
    x = _tokens(256, 2, 64)
    sizes = {}
    for on in (False, True):
        model = _model(chunk=4)
        if on:
            model.activation_checkpointing_enable()
        out, sizes[on] = saved_bytes(lambda m=model: m(x, labels=x))
    # 3 steps × 2 layers of memory states and activations, against their inputs alone
    assert sizes[True] < sizes[False] / 4


def test_checkpointing_stays_off_without_gradients_and_in_decode():
    model = _model()
    model.activation_checkpointing_enable()
    x = _tokens(256, 1, 12)
    with torch.no_grad():
        a = model(x).logits
    model.eval()
    b = model.generate(x, max_new_tokens=3, do_sample=False)
    assert torch.equal(a, a) and b.shape == (1, 15)


def _measured_peak(model: CognateForCausalLM, x: torch.Tensor) -> int:
    """Bytes held at the peak of a steady-state training step: the weights and optimizer states that
    persist (counted directly), plus the most bytes that tensors created during the step (gradients,
    activations kept for backward, recomputed layer steps, the optimizer's temporaries) hold at once.
    This is the CPU analog of CUDA's max_memory_allocated, deterministic where peak RSS is not."""
    opt = MuonGrokfast(model)

    def step():
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()

    step()  # the optimizer states exist from here on, as they do in every later step
    persistent = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    for o in opt.optimizers:
        for st in o.state.values():
            persistent.update({v.untyped_storage().data_ptr(): v.untyped_storage().nbytes()
                               for v in st.values() if torch.is_tensor(v) and v.dim()})
    persistent.update({v.untyped_storage().data_ptr(): v.untyped_storage().nbytes() for v in opt.grokfast.ema.values()})
    with AllocatedBytes() as tracked:
        step()
    return sum(persistent.values()) + tracked.peak


@pytest.mark.parametrize("d,heads,vocab,steps,chunk,checkpointing", [
    (64, 4, 512, 3, 8, True), (128, 4, 1024, 4, 16, True), (64, 4, 512, 3, 8, False)])
def test_training_memory_estimate_matches_a_measured_step(d, heads, vocab, steps, chunk, checkpointing):
    torch.set_num_threads(1)
    layers, seq, batch = 2, 64, 2
    model = _model(d=d, layers=layers, heads=heads, vocab=vocab, steps=steps, chunk=chunk)
    if checkpointing:
        model.activation_checkpointing_enable()
    measured = _measured_peak(model, _tokens(vocab, batch, seq))
    shape = ModelShape(n_layers=layers, d_model=d, n_heads=heads, seq_len=seq)
    params = sum(p.numel() for p in model.parameters())
    estimate = training_memory_bytes(params, shape, batch, recursion=Recursion(steps, chunk, vocab, checkpointing))
    print(f"d={d} checkpointing={checkpointing}: measured/estimate {measured / estimate:.2f}")
    assert 0.7 <= measured / estimate <= 1.3, (measured, estimate)


def test_one_small_preset_step_fits_its_estimate():
    """The small preset's shape (d=512, 8 layers, 8 heads, vocab 8192, T_max 6, chunk at the schedule's
    floor) at batch 1 and sequence 256, half the preset's (a step at 512 takes about a minute on one core):
    the tensor bytes a training step holds at its peak, against the estimate preflight uses. What the
    allocator keeps beyond the tensors (peak RSS) varies by machine; bench/cognate.py reports it."""
    from phases.config import PipelineConfig

    torch.set_num_threads(1)
    cfg = PipelineConfig.from_preset("small")
    m, c, seq = cfg.model, cfg.cognate, cfg.model.seq_len // 2
    torch.manual_seed(0)
    model = CognateForCausalLM(CognateConfig(
        vocab_size=cfg.tokenizer.vocab_size, hidden_size=m.d_model, num_hidden_layers=m.n_layers,
        num_attention_heads=m.n_heads, window_size=c.window_size, act_max_steps=c.act_max_steps,
        n_persistent=c.n_persistent, shard_length=c.shard_length, mem_chunk_size=c.train.chunk_floor)).train()
    model.activation_checkpointing_enable()
    measured = _measured_peak(model, _tokens(cfg.tokenizer.vocab_size, 1, seq))
    params = sum(p.numel() for p in model.parameters())
    estimate = training_memory_bytes(params, m.model_copy(update={"seq_len": seq}), 1, recursion=Recursion(
        c.act_max_steps, c.train.chunk_floor, cfg.tokenizer.vocab_size, c.train.activation_checkpointing))
    print(f"small step, sequence {seq}: peak {measured / 2**20:.0f} MiB, estimate {estimate / 2**20:.0f} MiB")
    assert 0.8 <= measured / estimate <= 1.25, (measured / 2**20, estimate / 2**20)
