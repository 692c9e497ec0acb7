"""The Cognate model: causality, cache, round trip, ACT gradient, memory, Q-K reset, gradient mask.

Each test is one of the origin project's failures turned into a check that would have caught it.
"""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import phases.cognate.modeling  # noqa: F401  (registers the Cognate Auto classes)
from phases.cognate import CognateConfig, CognateForCausalLM
from phases.cognate.memory import MemoryState, NeuralMemory, niah_probe, qk_project


def _model(**kw) -> CognateForCausalLM:
    torch.manual_seed(0)
    cfg = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, window_size=8,
               mem_chunk_size=4, shard_length=16, act_max_steps=3, n_persistent=4)
    return CognateForCausalLM(CognateConfig(**(cfg | kw))).eval()


def test_changing_a_token_leaves_earlier_logits_unchanged():
    model = _model()
    x = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    for j in (0, 7, 21, 39):  # chunk-, window- and shard-internal positions
        y = x.clone()
        y[:, j] = (y[:, j] + 1) % 300
        with torch.no_grad():
            a, b = model(x).logits, model(y).logits
        assert torch.allclose(a[:, :j], b[:, :j], atol=1e-5), f"token {j} changed earlier logits"
        assert not torch.allclose(a[:, j:], b[:, j:], atol=1e-4), f"token {j} changed nothing at all"


def test_decode_cache_matches_full_forward_and_generate_is_greedy_forward():
    model = _model()
    x = torch.randint(0, 300, (2, 37), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(x).logits
        out = model(x[:, :11], use_cache=True)
        pieces, cache = [out.logits], out.cache
        for i in range(11, 37):  # crosses chunk (4), window (8) and shard (16) boundaries
            out = model(x[:, i:i + 1], cache=cache, use_cache=True)
            pieces.append(out.logits)
    assert torch.allclose(torch.cat(pieces, 1), full, atol=1e-4)

    gen = model.generate(x[:1, :9], max_new_tokens=20, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        greedy = model(gen).logits.argmax(-1)
    assert torch.equal(gen[0, 9:], greedy[0, 8:-1])


def test_save_pretrained_round_trip_through_auto_classes(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is CognateForCausalLM
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # still tied
    x = torch.randint(0, 300, (2, 30))
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)


def test_act_head_gets_gradient_halting_varies_and_is_bounded():
    model = _model(act_max_steps=4).train()
    x = torch.randint(0, 300, (4, 32))
    out = model(x, labels=x)
    out.loss.backward()
    grad = model.model.halt_head.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert out.halt_steps_int.max() <= 4 and out.halt_steps_int.min() >= 1
    assert out.halting_steps.std() > 0  # N + R differs between positions: halting depends on the input
    # the ponder cost alone reaches the head: its gradient is not just the LM loss's
    model.zero_grad()
    out = model(x, labels=x)
    out.ponder_loss.backward()
    assert model.model.halt_head.weight.grad.abs().sum() > 0


def test_niah_passes_for_a_working_memory_and_fails_for_an_ema():
    working = NeuralMemory(theta=0.2, eta=0.9, alpha=0.001)
    assert niah_probe(working, d=192, chunk=16) >= 0.8
    forgetful = NeuralMemory(theta=0.2, eta=0.01, alpha=0.9)  # keeps only the last chunks, like an EMA
    assert niah_probe(forgetful, d=192, chunk=16) < 0.3


def test_memory_state_changes_with_input():
    mem = NeuralMemory()
    d = 32
    outs = []
    for seed in (0, 1):
        g = torch.Generator().manual_seed(seed)
        q, k = (F.normalize(torch.randn(1, 12, d, generator=g), dim=-1) for _ in range(2))
        v = torch.randn(1, 12, d, generator=g)
        state = MemoryState.empty(1, d, "cpu", torch.float32)
        mem(q, k, v, torch.eye(d), torch.tensor(float(d)), state, chunk=4, shard=100)
        assert state.W.abs().sum() > 0 and state.writes == 3
        outs.append(state.W)
    assert not torch.allclose(outs[0], outs[1])


def test_reading_with_the_query_retrieves_a_stored_value_the_qk_projection_blurs():
    """Why the memory reads with q (CognateConfig.qk_projection): a code among filler comes back from a read with
    its own key, and the Q-K projection, which multiplies the query by the running key covariance, loses it."""
    mem = NeuralMemory()
    d, T = 64, 96
    g = torch.Generator().manual_seed(0)
    filler = F.normalize(torch.randn(d, generator=g), dim=0)  # the direction most keys share (prose)
    k = F.normalize(filler + 0.6 * torch.randn(1, T, d, generator=g), dim=-1)
    k[0, 5] = F.normalize(torch.randn(d, generator=g), dim=0)  # the code's key, off that direction
    v = torch.randn(1, T, d, generator=g)
    q = k.clone()
    q[0, -1] = k[0, 5]  # the last token asks for the code
    cos = {}
    for projected in (False, True):
        state = MemoryState.empty(1, d, "cpu", torch.float32)
        y = mem(q, k, v, torch.eye(d) / d, torch.tensor(1.0), state, chunk=8, shard=1000, qk_projection=projected)
        cos[projected] = float(F.cosine_similarity(y[0, -1], v[0, 5], dim=0))
    assert cos[False] > 0.6 and cos[True] < cos[False] - 0.2, cos  # measured: 0.69 against 0.39


def test_qk_projection_right_after_reset_is_persistent_over_norm():
    d = 16
    g = torch.Generator().manual_seed(3)
    kp = F.normalize(torch.randn(4, d, generator=g), dim=-1)
    m_p, n_p = kp.T @ kp, kp.pow(2).sum()
    state = MemoryState.empty(2, d, "cpu", torch.float32)
    state.A, state.nsum = torch.randn(2, d, d, generator=g), torch.rand(2, generator=g)  # a used memory...
    state.reset()  # ...reset at a shard boundary
    q = torch.randn(2, 1, d, generator=g)
    projected, _, _ = qk_project(q, torch.zeros(2, 1, d), m_p, n_p, state.A, state.nsum)
    assert torch.allclose(projected, q @ m_p / n_p, atol=1e-6)
    # and the first key of the new shard enters numerator and denominator together
    k = F.normalize(torch.randn(2, 1, d, generator=g), dim=-1)
    projected, _, nsum = qk_project(q, k, m_p, n_p, state.A, state.nsum)
    expected = (q @ m_p + (q @ k.transpose(1, 2)) @ k) / (n_p + 1.0)
    assert torch.allclose(projected, expected, atol=1e-6) and torch.allclose(nsum, torch.ones(2))


def test_memory_gradient_is_zero_across_a_shard_boundary():
    d, shard = 16, 8
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 2 * shard, d, generator=g).requires_grad_() for _ in range(3))
    kp = F.normalize(torch.randn(3, d, generator=g), dim=-1)
    mem = NeuralMemory()
    state = MemoryState.empty(2, d, "cpu", torch.float32)
    y = mem(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, kp.T @ kp, kp.pow(2).sum(), state, chunk=4, shard=shard)
    y[:, shard:].pow(2).sum().backward()
    for name, t in (("q", q), ("k", k), ("v", v)):
        assert torch.count_nonzero(t.grad[:, :shard]) == 0, f"gradient of {name} crossed the shard boundary"
    assert k.grad[:, shard:].abs().sum() > 0 and v.grad[:, shard:].abs().sum() > 0


def test_model_memory_reads_after_a_shard_boundary_ignore_the_previous_shard():
    model = _model(window_size=1, shard_length=8)  # window 1: attention sees only the token itself
    x = torch.randint(0, 300, (1, 16))
    y = x.clone()
    y[:, :8] = (y[:, :8] + 5) % 300
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    assert torch.allclose(a[:, 8:], b[:, 8:], atol=1e-5)


def test_runtime_settings_never_change_shapes():
    model = _model()
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    model.set_runtime(window_size=3, mem_chunk_size=2, act_max_steps=5, gate_bias=-1.0)
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes
    with pytest.raises(ValueError, match="not runtime settings"):
        model.set_runtime(hidden_size=32)


def test_padded_batches_are_refused_not_silently_wrong():
    model = _model()
    x = torch.randint(0, 300, (2, 8))
    with pytest.raises(ValueError, match="padded"):
        model(x, attention_mask=torch.tensor([[1] * 8, [0] * 2 + [1] * 6]))


def test_base_model_returns_named_fields_and_layers_take_any_attention_function():
    from phases.cognate.modeling import CognateModelOutput

    model = _model()
    x = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        out = model.model(x)
    assert isinstance(out, CognateModelOutput)
    assert out.last_hidden_state.shape == (2, 12, 64)
    assert out.ponder.shape == out.steps.shape == out.gate.shape == (2, 12)
    assert out.polarization_loss.shape == () and isinstance(out.gate_polarized, float)
    assert out.mem_chunks == 2 * 3 * 2 * 3 and 0 <= out.mem_writes <= out.mem_chunks  # layers x steps x rows x chunks
    assert torch.equal(model.lm_head(out.last_hidden_state), model(x).logits)

    def eager(q, k, v, mask):  # the attention written out: what a new attention function replaces
        scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
        return torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ v

    layer, h = model.model.layers[0], torch.randn(2, 12, 64)
    _, q, k, v = layer.project(h)
    kp, vp = layer.persistent_keys()
    positions = torch.arange(12)
    heads = layer.rotary_heads(q, k, v, positions, model.config.rope_theta)
    with torch.no_grad():
        a = layer.attend(*heads, kp, vp, positions, model.config)
        b = layer.attend(*heads, kp, vp, positions, model.config, attention=eager)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_zeroed_memory_read_leaves_what_the_window_sees_and_changes_what_only_memory_carries():
    """The recall ablation switch: with ``mem_read_scale`` 0 a token far beyond the window (and the stacked,
    recursed receptive field) no longer reaches later logits."""
    model = _model(act_max_steps=1, num_hidden_layers=1, shard_length=64)
    x = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(5))
    y = x.clone()
    y[:, 0] = (y[:, 0] + 1) % 300
    with torch.no_grad():
        reach = (model(x).logits[:, 30:] - model(y).logits[:, 30:]).abs().max()
        model.set_runtime(mem_read_scale=0.0)
        ablated = (model(x).logits[:, 30:] - model(y).logits[:, 30:]).abs().max()
    assert reach > 1e-4 and ablated < 1e-6, (reach, ablated)


def test_batched_greedy_decoding_matches_one_problem_at_a_time():
    """Held-out accuracy decodes problems of equal prompt length as one batch: the same text as one by one."""
    from phases.cognate import evaluate

    class Digits:  # a tokenizer stand-in with the two calls evaluate uses: one token per character
        eos_token_id = 0

        def encode(self, text, add_special_tokens=False):
            return [1 + ord(c) % 250 for c in text]

        def batch_decode(self, rows, skip_special_tokens=True):
            return ["".join(chr(96 + int(t) % 26) for t in row if int(t) != 0) for row in rows]

    model = _model(act_max_steps=2, gate_init=0.0).eval()  # an even gate: untrained, its answers still differ
    prompts = ["What is 12 + 34?", "What is 56 - 17?", "What is 90 + 11?"]
    batched = evaluate.answers(model, Digits(), prompts, 8, first_line=False)
    alone = [evaluate.answer(model, Digits(), p, 8, first_line=False) for p in prompts]
    assert batched == alone and len(set(batched)) > 1


def test_a_batch_whose_labels_are_all_ignored_has_zero_loss_not_nan():
    model = _model()
    x = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    out = model(x, labels=torch.full_like(x, -100))
    assert out.lm_loss.item() == 0.0 and torch.isfinite(out.loss)
    mean = model(x, labels=x).lm_loss  # with targets, the usual mean over them
    logits = model(x).logits[:, :-1]
    torch.testing.assert_close(mean, torch.nn.functional.cross_entropy(logits.reshape(-1, 300), x[:, 1:].reshape(-1)))


def test_an_untrained_model_has_no_polarized_gates_so_the_polarization_gate_cannot_pass_on_its_start():
    model = _model()
    with torch.no_grad():
        out = model.model(torch.randint(0, 300, (2, 12)))
    assert out.gate_polarized == 0.0
    assert float(out.gate.mean()) == pytest.approx(torch.sigmoid(torch.tensor(3.0)).item(), abs=0.01)


def test_one_step_gradient_keeps_the_forward_and_back_propagates_through_the_last_step_only():
    x = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    grads, losses = {}, {}
    for g in (0, 1, 3):
        model = _model(act_max_steps=3, grad_steps=g, halt_bias=-2.0).train()
        out = model(x, labels=x)
        out.loss.backward()
        losses[g] = out.loss.item()
        grads[g] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert losses[0] == losses[1] == losses[3]  # the same forward: only what back-propagates differs
    for n in grads[0]:  # grad_steps ≥ T_max is every step, as 0 is
        assert torch.allclose(grads[0][n], grads[3][n], atol=1e-6), n
    # one step: the layers and the halting head still learn, from a different (truncated) gradient
    assert grads[1]["model.halt_head.weight"].abs().sum() > 0
    w = "model.layers.0.q_proj.weight"
    assert grads[1][w].abs().sum() > 0 and not torch.allclose(grads[1][w], grads[0][w])
    with pytest.raises(ValueError, match="grad_steps"):
        CognateConfig(grad_steps=-1)
