"""Quiet-STaR's model side: parallel thoughts equal the per-position definition (attention and memory),
the mixing head starts as the baked model, REINFORCE moves thought probabilities, anti-theater catches a
thought-blind model, generate hides thoughts, baking adds tied token rows, rollback doubles KL."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from thought_references import cached_sequential, sliced_reference

import phases.quietstar.thought_memory as thought_memory
import phases.quietstar.thoughts as T
from phases.cognate import CognateConfig, CognateForCausalLM
from phases.data import curriculum
from phases.data import tokenizer as bpe
from phases.quietstar.baking import add_thinking_tokens, encode
from phases.quietstar.model import QuietStarForCausalLM, outside_thinking
from phases.quietstar.reinforce import (
    anti_theater,
    reinforce,
    reinforce_loss,
    score,
    theater_problems,
    thought_spec,
)
from phases.quietstar.settings import Reinforcement
from phases.quietstar.steps import answerable, quietstar_from_baked
from phases.quietstar.tokens import SPECIAL_TOKENS

START, END = 48, 49


def micro(chunk=3, shard=7, window=5, act=2, gate_bias=-2.0, seed=1, qk_projection=False) -> CognateForCausalLM:
    """Chunks of 3 and shards of 7 so thoughts write and reset memory mid-extension; the gate leans on
    memory so that branch carries real weight; strong writes and forgetting."""
    torch.manual_seed(seed)
    cfg = CognateConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, window_size=window,
                        mem_chunk_size=chunk, shard_length=shard, act_max_steps=act, surprise_threshold=0.02,
                        n_persistent=2, gate_bias=gate_bias, eos_token_id=0, pad_token_id=0,
                        qk_projection=qk_projection)
    model = CognateForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.memory.theta_logit.fill_(0.5)
            layer.memory.alpha_logit.fill_(-2.0)
        model.model.halt_head.bias.fill_(-1.0)  # several ACT steps contribute
    return model


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


@pytest.mark.parametrize("chunk,shard,window,length,n_true,batch,qk",
                         [(3, 7, 5, 3, 2, 2, False), (2, 5, 3, 5, 3, 1, False), (4, 2048, 64, 2, 1, 1, False),
                          (3, 7, 5, 3, 2, 2, True)])
def test_parallel_thoughts_equal_the_per_position_reference(chunk, shard, window, length, n_true, batch, qk):
    model = micro(chunk, shard, window, qk_projection=qk)
    if batch == 2:
        model.config.layer_scales = [0.9, 1.1]  # an EvoMerge data-flow merge scales each layer's input
    x = torch.randint(1, 48, (batch, 11), generator=torch.Generator().manual_seed(0))
    spec = T.ThoughtSpec(count=2, length=length, n_true=n_true, start_id=START, end_id=END)
    with torch.no_grad():
        tp = T.parallel_thoughts(model, x, spec, generator=torch.Generator().manual_seed(0), keep_ext_logits=True)
        reference = sliced_reference(model, x, tp.extension)  # x[:i+1] + extension through the plain model
        assert torch.equal(tp.base_logits, model(x).logits)
    assert tp.extension.shape == (batch, 2, 11, spec.extension)
    assert (tp.extension[..., 0] == START).all() and (tp.extension[..., length + 1] == END).all()
    torch.testing.assert_close(tp.ext_logits, reference, atol=1e-5, rtol=1e-5)


def test_memory_inside_a_thought_is_checked_not_ignored(monkeypatch):
    """The reference test above would catch a thought that skipped the chunk writes and shard resets
    falling inside it: without them the outputs differ by far more than the tolerance."""
    model = micro()
    x = torch.randint(1, 48, (1, 11), generator=torch.Generator().manual_seed(2))
    spec = T.ThoughtSpec(count=1, length=4, n_true=2, start_id=START, end_id=END, greedy=True)
    with torch.no_grad():
        tp = T.parallel_thoughts(model, x, spec, keep_ext_logits=True)
        reference = sliced_reference(model, x, tp.extension)
        monkeypatch.setattr(thought_memory, "memory_events", lambda *a, **k: None)
        frozen = T.parallel_thoughts(model, x, spec, forced=tp.thoughts, keep_ext_logits=True)
    assert (tp.ext_logits - reference).abs().max() < 1e-5
    assert (frozen.ext_logits - reference).abs().max() > 1e-2


def test_a_thought_sees_only_its_prefix_and_itself():
    model = micro()
    g = torch.Generator().manual_seed(3)
    x = torch.randint(1, 48, (1, 10), generator=g)
    spec = T.ThoughtSpec(count=2, length=3, n_true=1, start_id=START, end_id=END)
    thoughts = torch.randint(1, 48, (1, 2, 10, 3), generator=g)
    i = 4
    later = x.clone()
    later[:, i + 1:] = torch.randint(1, 48, (1, 10 - i - 1), generator=g)
    other = thoughts.clone()
    other[:, :, i + 1:] = torch.randint(1, 48, other[:, :, i + 1:].shape, generator=g)  # other positions' thoughts
    other[:, 1, i] = torch.randint(1, 48, (3,), generator=g)  # and the other thought of the same position
    with torch.no_grad():
        a = T.parallel_thoughts(model, x, spec, forced=thoughts, keep_ext_logits=True).ext_logits
        b = T.parallel_thoughts(model, later, spec, forced=other, keep_ext_logits=True).ext_logits
    torch.testing.assert_close(a[:, 0, : i + 1], b[:, 0, : i + 1], atol=1e-6, rtol=0)
    assert (a[:, 0, i + 1:] - b[:, 0, i + 1:]).abs().max() > 1e-3  # the perturbation does reach later positions


def test_batched_decoding_of_thoughts_matches_the_parallel_pass():
    model = micro(chunk=4, shard=2048, window=64)
    x = torch.randint(1, 48, (2, 7), generator=torch.Generator().manual_seed(4))
    spec = T.ThoughtSpec(count=2, length=3, n_true=2, start_id=START, end_id=END)
    with torch.no_grad():
        tp = T.parallel_thoughts(model, x, spec, generator=torch.Generator().manual_seed(1), keep_ext_logits=True)
        torch.testing.assert_close(cached_sequential(model, x, tp.extension), tp.ext_logits, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ the wrapper model
def wrapped(base: CognateForCausalLM, length: int = 2) -> QuietStarForCausalLM:
    from phases.common.hf_io import build
    from phases.quietstar.model import quietstar_config

    model = build(QuietStarForCausalLM, quietstar_config(base.config, length, START, END, [START, END, 0]))
    model.load_state_dict(base.state_dict(), strict=False)
    model.mixing.reset_output()
    return model.eval()


def test_mixing_head_at_init_gives_exactly_the_baked_logits():
    base = micro(chunk=4, shard=2048, window=64)
    model = wrapped(base)
    x = torch.randint(1, 48, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(model(x).logits, base(x).logits)
        assert torch.equal(model.generate(x, max_new_tokens=6, do_sample=False, pad_token_id=0),
                           base.generate(x, max_new_tokens=6, do_sample=False, pad_token_id=0))
        sc = score(model, x, T.ThoughtSpec(count=2, length=2, n_true=2, start_id=START, end_id=END))
    assert torch.equal(sc.mixed, sc.base_at[:, None].expand_as(sc.mixed))


def _open_mixing(model: QuietStarForCausalLM) -> None:
    with torch.no_grad():
        model.mixing.net[-1].bias.fill_(0.6)


def test_decoding_with_thoughts_matches_the_full_sequence_pass():
    model = wrapped(micro(chunk=4, shard=2048, window=64))
    _open_mixing(model)
    x = torch.randint(1, 48, (1, 8), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = model(x).logits
        step = model(x, use_cache=True).logits
    torch.testing.assert_close(step[:, -1], full[:, -1], atol=1e-5, rtol=1e-5)
    assert (full[:, -1] - model(x, thoughts=False).logits[:, -1]).abs().max() > 1e-3  # thoughts do change it


def test_generate_hides_thought_tokens_and_can_show_them():
    model = wrapped(micro(chunk=4, shard=2048, window=64), length=2)
    _open_mixing(model)
    x = torch.randint(1, 48, (1, 5), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        hidden = model.generate(x, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0,
                                bad_words_ids=[[START]])
        shown = model.generate(x, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0,
                               bad_words_ids=[[START]], show_thoughts=True)
    assert hidden.shape == (1, 9) and not ((hidden == START) | (hidden == END)).any()
    assert shown.shape == (1, 5 + 4 * (1 + 2 + 1 + 1))  # per token: [thinking] t1 t2 [/endthinking], the token
    new = shown[0, 5:].view(4, 5)
    assert (new[:, 0] == START).all() and (new[:, 3] == END).all()
    assert torch.equal(new[:, 4], hidden[0, 5:])
    # a block the model writes itself is cut out by default
    written = torch.tensor([[7, START, 9, 9, END, 11, START, 12]])
    assert model.hide_written_thoughts(written).tolist() == [[7, 11]]


def test_thoughts_only_where_the_direct_prediction_is_unsure_in_every_path():
    model = wrapped(micro(chunk=4, shard=2048, window=64), length=2)
    _open_mixing(model)
    x = torch.randint(1, 48, (1, 5), generator=torch.Generator().manual_seed(7))
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0, bad_words_ids=[[START]])
    with torch.no_grad():
        seq = model.generate(x, thoughts=False, **kwargs)  # 11 tokens to measure on
        plain = model(seq, thoughts=False).logits
        logp = torch.log_softmax(plain.float(), -1)
        entropy = -(logp.exp() * logp).sum(-1)[0]
        ranked = entropy.sort().values  # half the positions sure enough; the cut midway between two of them, so
        model.config.thought_entropy = float(ranked[5:7].mean())  # rounding in either path cannot flip one
        gated = model(seq).logits
        unsure = entropy > model.config.thought_entropy
        assert 0 < int(unsure.sum()) < len(unsure)
        torch.testing.assert_close(gated[0, ~unsure], plain[0, ~unsure])  # a sure position: no thought reaches it
        assert (gated[0, unsure] - plain[0, unsure]).abs().amax(-1).min() > 1e-4  # an unsure one: thought mixed in
        for i in range(1, seq.shape[1] + 1):  # decoding thinks exactly where the full pass does
            torch.testing.assert_close(model(seq[:, :i], use_cache=True).logits[:, -1], gated[:, i - 1],
                                       atol=1e-5, rtol=1e-5)
        shown = model.generate(x, show_thoughts=True, **kwargs)
        thoughts = int((shown[0, 5:] == START).sum())
        out = model.generate(x, **kwargs)  # the visible sequence: the positions that predicted its 6 new tokens
        direct = torch.log_softmax(model(out, thoughts=False).logits[0, 4:10].float(), -1)
        expected = int((-(direct.exp() * direct).sum(-1) > model.config.thought_entropy).sum())
        model.config.thought_entropy = 1e9  # never unsure: plain decoding, token for token
        never = model.generate(x, show_thoughts=True, **kwargs)
        assert torch.equal(never, model.generate(x, thoughts=False, **kwargs))
    assert 0 < thoughts == expected < 6  # one thought per unsure position, none elsewhere


def test_no_thought_inside_a_written_block():
    ids = torch.tensor([[5, START, 6, 7, END, 8, START, 9]])
    assert outside_thinking(ids, START, END).tolist() == [[True, False, False, False, True, True, False, False]]
    assert outside_thinking(ids[:, :1], START, END, torch.tensor([True])).tolist() == [[False]]


# ------------------------------------------------------------------ REINFORCE
def test_reinforce_raises_the_probability_of_the_rewarded_thought_token():
    """A toy policy (the micro model's thought sampler) rewarded for writing token 17 in its thoughts:
    REINFORCE through the thoughts' own log-probabilities makes token 17 more likely."""
    torch.manual_seed(0)
    model = micro(chunk=4, shard=2048, window=64)
    model.train()
    spec = T.ThoughtSpec(count=4, length=2, n_true=1, start_id=START, end_id=END, banned=(START, END))
    x = torch.randint(1, 48, (2, 6), generator=torch.Generator().manual_seed(8))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    g = torch.Generator().manual_seed(9)

    def p17() -> float:
        with torch.no_grad():
            tp = T.parallel_thoughts(model, x, T.ThoughtSpec(count=1, length=1, n_true=1, start_id=START, end_id=END),
                                     keep_ext_logits=True)
        return float(torch.softmax(tp.ext_logits[:, 0, :, 0], -1)[..., 17].mean())

    before = p17()
    for _ in range(15):
        tp = T.parallel_thoughts(model, x, spec, generator=g)
        reward = (tp.thoughts == 17).float().sum(-1)  # (B, K, S)
        loss, advantage = reinforce_loss(reward, tp.thought_logprobs)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert p17() > 3 * before


def test_policy_gradient_is_minus_the_advantage_on_each_thought_logprob():
    reward = torch.tensor([[[1.0], [3.0]]])  # (B=1, K=2, S=1)
    logp = torch.zeros(1, 2, 1, 3, requires_grad=True)
    loss, advantage = reinforce_loss(reward, logp)
    loss.backward()
    assert advantage.flatten().tolist() == [-1.0, 1.0]  # baseline: the mean over the position's thoughts
    # d loss / d log π(t) = −advantage / (thoughts × positions): every token of a thought gets it
    assert logp.grad[0, :, 0].tolist() == [[0.5] * 3, [-0.5] * 3]


def test_positive_only_advantages_reinforce_only_the_better_thoughts():
    reward = torch.tensor([[[1.0], [3.0], [5.0]]])  # (B=1, K=3, S=1): mean 3
    logp = torch.zeros(1, 3, 1, 2, requires_grad=True)
    loss, advantage = reinforce_loss(reward, logp, positive_only=True)
    loss.backward()
    assert advantage.flatten().tolist() == [0.0, 0.0, 2.0]
    assert logp.grad[0, :2].abs().sum() == 0 and (logp.grad[0, 2] < 0).all()


def test_the_reward_scores_the_talk_or_the_mixed_prediction():
    """With the mixing weight at 0 the mixed prediction is the direct one, so a reward on it is 0 for every
    thought, while the reward on the prediction right after the thought is not."""
    model = wrapped(micro(chunk=4, shard=2048, window=64))
    spec = T.ThoughtSpec(count=2, length=2, n_true=2, start_id=START, end_id=END, banned=(START, END))
    x = torch.randint(1, 48, (1, 6), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        sc = score(model, x, spec, torch.Generator().manual_seed(1), forced_w=0.0)
        assert sc.reward_on("mixed").abs().max() < 1e-5
        assert sc.reward_on("talk").abs().max() > 1e-3
        assert torch.equal(sc.reward, sc.reward_on("talk"))
        sc = score(model, x, spec, torch.Generator().manual_seed(1), forced_w=1.0)
        torch.testing.assert_close(sc.reward_on("mixed"), sc.reward_on("talk"))


# ------------------------------------------------------------------ with a tokenizer: baking and anti-theater
@pytest.fixture(scope="module")
def tiny_lm():
    torch.set_num_threads(1)
    splits = curriculum.generate(60, 10, seed=3)
    tok = bpe.train_bpe([r["text"] for r in splits["train"]], vocab_size=300)
    torch.manual_seed(0)
    model = CognateForCausalLM(CognateConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, window_size=16, mem_chunk_size=4, act_max_steps=1,
                                             n_persistent=2, eos_token_id=tok.eos_token_id,
                                             pad_token_id=tok.pad_token_id))
    record = add_thinking_tokens(model, tok, init_noise=0.02, seed=0)
    return model.eval(), tok, splits, record


def test_thinking_tokens_join_the_vocabulary_with_tied_initialised_rows(tiny_lm):
    model, tok, _, record = tiny_lm
    assert record["vocab_after"] == record["vocab_before"] + 12 == len(tok) == model.config.vocab_size
    emb = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight.data_ptr() == emb.data_ptr()
    for t in SPECIAL_TOKENS:
        i = tok.convert_tokens_to_ids(t)
        assert tok.encode(t, add_special_tokens=False) == [i]  # one token, never split
        pieces = [tok.convert_tokens_to_ids(p) for p in record["pieces"][t]]
        drift = (emb[i] - emb[pieces].mean(0)).norm() / emb[pieces].mean(0).norm()
        assert 0 < drift < 0.2  # the text's mean plus a little noise
    e = encode({"prompt": "Q: 1?\nAnswer:", "text": "Q: 1?\nAnswer: [thinking]<step>1</step>[/endthinking] 1"}, tok)
    markers = [tok.convert_ids_to_tokens(i) for i, m in zip(e.ids, e.marker) if m]
    assert markers[:2] == ["[thinking]", "<step>"] and markers[-1] == "[/endthinking]"
    assert "".join(markers[2:-1]).replace("Ġ", "") == "</step>"


def test_anti_theater_fails_a_model_whose_thoughts_are_ignored(tiny_lm):
    base, tok, splits, _ = tiny_lm
    model = quietstar_from_baked(base, tok, thought_length=2).eval()
    _open_mixing(model)
    problems = theater_problems(answerable(splits["validation"])[:4], tok)
    settings = Reinforcement(n_true=2, theater={"eval_thoughts": 3})
    blind = anti_theater(model, problems, settings, forced_w=0.0)
    assert blind["divergence"] == 0.0 and blind["ablation"] == 0.0 and blind["correlation"] == 0.0
    assert not blind["passed"]
    seeing = anti_theater(model, problems, settings, forced_w=1.0)
    assert seeing["divergence"] > 0.05  # the same measurement sees thoughts that do change predictions


def test_anti_theater_fails_noise_thoughts_mixed_into_a_model_that_answers(tiny_lm):
    """The control on a real model that has a skill: a Cognate that answers 8 arithmetic problems exactly, wrapped
    with thoughts it was never taught to write (to it, noise) mixed in at full weight. The thoughts move its
    predictions (divergence passes) and cost the answers: the ablation check fails, and so does the gate."""
    from learnt import learn, micro_cognate

    from phases.quietstar.gates import quietstar_gates
    from phases.quietstar.settings import QuietStarSection

    _, tok, splits, _ = tiny_lm
    learnt = [r for r in answerable(splits["train"]) if r["task"] == "arithmetic"][:8]
    torch.manual_seed(0)
    model = learn(micro_cognate(tok), learnt, tok)
    qs = quietstar_from_baked(model, tok, thought_length=2).eval()
    problems = theater_problems(learnt, tok)
    settings = Reinforcement(n_true=2, theater={"eval_thoughts": 2})
    blind = anti_theater(qs, problems, settings, forced_w=0.0)
    assert blind["accuracy_without_thoughts"] == 1.0  # it has the skill
    noise = anti_theater(qs, problems, settings, forced_w=1.0)
    assert noise["divergence"] > 0.3 and noise["ablation"] <= -0.5 and not noise["passed"]
    report = quietstar_gates({"baking": {"final": {"convergence": 0.9}}, "non_finite_tensors": 0},
                             {"reinforce": {"final_check": noise}, "non_finite_tensors": 0},
                             {"accuracy_delta": 0.0, "problems": 8, "latency_ms_per_token": {"with_thoughts": 1.0}},
                             QuietStarSection(), "strict")
    gates = {g.id: g for g in report.gates}
    assert gates["theater_divergence"].passed and not gates["theater_ablation"].passed


def test_failed_anti_theater_rolls_back_doubles_kl_then_stops(tiny_lm, tmp_path):
    base, tok, splits, _ = tiny_lm
    model = quietstar_from_baked(base, tok, thought_length=2)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    from phases.quietstar.reinforce import answer_windows

    rows = answer_windows(answerable(splits["train"])[:20], tok, 16)
    problems = theater_problems(answerable(splits["validation"])[:2], tok)
    settings = Reinforcement(steps=2, batch_size=1, n_true=2, kl_weight=0.1,
                             theater={"check_every": 1, "max_retries": 2, "eval_thoughts": 2})
    result = reinforce(model, base, rows, problems, settings, thought_count=2, seed=0, workdir=tmp_path / "rl")
    assert [r["new_kl_weight"] for r in result["rollbacks"]] == pytest.approx([0.2, 0.4])
    assert all(r["to_step"] == 0 and r["at_step"] == 1 for r in result["rollbacks"])
    assert result["retries"] == 2 and result["kl_weight_final"] == pytest.approx(0.4)
    assert len(result["checks"]) == 4 and result["steps_run"] == 3
    assert not any(c["passed"] for c in result["checks"])
    # out of retries, the model that ships is the last that passed: here the start, thoughts weighted 0, bit for bit
    assert all(torch.equal(initial[k], v) for k, v in model.state_dict().items())
    assert result["stopped"]["at_step"] == 1 and result["stopped"]["kept_step"] == 0
    assert set(result["stopped"]["failed"]) == {"divergence", "ablation", "correlation"}
    # and the final check, which the gates read, measures that model: thoughts change nothing
    final = result["final_check"]
    assert final["kept_step"] == 0 and final["divergence"] == 0 and final["ablation"] == 0 and not final["passed"]
    spec = thought_spec(settings, model, 2)
    assert spec.count == 2 and spec.length == 2 and spec.banned == (model.config.thought_start_id, model.config.thought_end_id,
                                               tok.eos_token_id)


def test_the_mixing_head_comes_from_the_seed_not_from_what_ran_before(tiny_lm):
    base, tok, _, _ = tiny_lm
    torch.manual_seed(1)
    first = quietstar_from_baked(base, tok, thought_length=2, seed=5).state_dict()
    torch.randn(1000)  # another task in the same process drew from the global RNG meanwhile
    second = quietstar_from_baked(base, tok, thought_length=2, seed=5).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    other = quietstar_from_baked(base, tok, thought_length=2, seed=6).state_dict()
    assert any(not torch.equal(first[k], other[k]) for k in first if k.startswith("mixing."))


def test_baking_keeps_the_state_best_on_one_held_out_set_and_gates_it_on_the_other(tiny_lm, tmp_path, monkeypatch):
    import copy

    import phases.quietstar.baking as baking
    from phases.common.checkpoints import CheckpointManager
    from phases.quietstar.settings import Baking

    base, tok, splits, _ = tiny_lm
    model = copy.deepcopy(base).requires_grad_(True)  # the fixture's model is shared: a test before may freeze it
    reasoning = [{"prompt": r["prompt"], "answer": r["answer"],
                  "text": f"{r['prompt']} [thinking]<step>{r['answer']}</step>[/endthinking] {r['answer']}"}
                 for r in answerable(splits["train"])[:40]]
    select, gate = reasoning[30:32], reasoning[32:35]
    scripted = iter([0.6, 0.2])  # the select set's convergence at steps 2 and 4: the earlier state is the better
    measure = baking.structure_accuracy
    read = []

    def structure_accuracy(m, t, examples, extra_tokens=16):
        read.append("select" if examples is select else "gate" if examples is gate else "other")
        out = measure(m, t, examples, extra_tokens)
        return out | {"convergence": next(scripted)} if examples is select else out

    monkeypatch.setattr(baking, "structure_accuracy", structure_accuracy)
    settings = Baking(max_steps=4, eval_every=2, batch_size=2, replay=0.5, optim={"adam_lr": 1e-2, "muon_lr": 0.05})
    result = baking.bake(model, tok, reasoning[:30], select, gate, settings, 48, 0, tmp_path,
                         curriculum=answerable(splits["train"]))
    assert read == ["select", "select", "gate"]  # the stopping rule reads one set, the gate's figure the other
    assert result["selected"]["step"] == 2 and result["final"]["examples"] == len(gate)
    assert result["replay_rows"] > 0 and result["replay_rows"] == pytest.approx(result["train_rows"] / 2, abs=1)
    at_step_2 = copy.deepcopy(base)
    CheckpointManager(tmp_path / "checkpoints", keep_last=2, max_rollbacks=0).load(2, at_step_2)
    at_step_4 = copy.deepcopy(base)
    CheckpointManager(tmp_path / "checkpoints", keep_last=2, max_rollbacks=0).load(4, at_step_4)
    kept = model.state_dict()
    assert all(torch.equal(kept[k], v) for k, v in at_step_2.state_dict().items())
    assert not all(torch.equal(kept[k], v) for k, v in at_step_4.state_dict().items())  # training moved on after 2


class _Killed(Exception):
    pass


def _dies_on(calls: set[int], real):
    """``real``, except that its n-th calls (counted over every process it is used in) raise, the way a
    SIGKILL lands mid-measurement."""
    count = [0]

    def measured(*args, **kwargs):
        count[0] += 1
        if count[0] in calls:
            raise _Killed(count[0])
        return real(*args, **kwargs)

    return measured


def _until_done(run):
    for _ in range(20):
        try:
            return run()
        except _Killed:
            pass
    raise AssertionError("never finished")


def test_interrupted_reinforcement_ends_with_an_unbroken_runs_record(tiny_lm, tmp_path, monkeypatch):
    import phases.quietstar.reinforce as rl

    base, tok, splits, _ = tiny_lm
    rows = rl.answer_windows(answerable(splits["train"])[:20], tok, 16)
    problems = theater_problems(answerable(splits["validation"])[:2], tok)
    # checks at every step, one of them failing: a rollback, then steps run again
    settings = Reinforcement(steps=4, batch_size=1, n_true=2, kl_weight=0.1,
                             theater={"check_every": 1, "max_retries": 1, "eval_thoughts": 2})
    real = rl.anti_theater
    verdicts = iter([True, False] + [True] * 20)  # step 2 fails once

    def scripted(*args, **kwargs):
        return real(*args, **kwargs) | {"passed": next(verdicts)}

    def run(workdir):
        model = quietstar_from_baked(base, tok, thought_length=2)
        out = rl.reinforce(model, base, rows, problems, settings, thought_count=2, seed=0, workdir=workdir)
        return out, model.state_dict()

    monkeypatch.setattr(rl, "anti_theater", scripted)
    unbroken, weights = run(tmp_path / "unbroken")
    assert len(unbroken["rollbacks"]) == 1 and unbroken["steps_run"] == 5
    verdicts = iter([True, False] + [True] * 20)
    monkeypatch.setattr(rl, "anti_theater", _dies_on({2, 4, 6}, scripted))  # in a check, after a rollback, and later
    resumed, resumed_weights = _until_done(lambda: run(tmp_path / "killed"))
    for key in ("checks", "rollbacks", "retries", "kl_weight_final", "steps_run", "final_check"):
        assert resumed[key] == unbroken[key], key
    assert Path(resumed["telemetry"]).read_text() == Path(unbroken["telemetry"]).read_text()
    assert all(torch.equal(resumed_weights[k], v) for k, v in weights.items())


def test_a_reinforcement_that_ran_out_of_retries_ends_there_when_run_again(tiny_lm, tmp_path, monkeypatch):
    """A process killed after the loop gave up, before its artifact was stored: the rerun ends where it ended."""
    import phases.quietstar.reinforce as rl

    base, tok, splits, _ = tiny_lm
    rows = rl.answer_windows(answerable(splits["train"])[:20], tok, 16)
    problems = theater_problems(answerable(splits["validation"])[:2], tok)
    settings = Reinforcement(steps=3, batch_size=1, n_true=2, theater={"check_every": 1, "max_retries": 1,
                                                                       "eval_thoughts": 2})
    real = rl.anti_theater
    monkeypatch.setattr(rl, "anti_theater", lambda *a, **k: real(*a, **k) | {"passed": False})
    runs = []
    for _ in range(2):
        model = quietstar_from_baked(base, tok, thought_length=2)
        out = rl.reinforce(model, base, rows, problems, settings, thought_count=2, seed=0, workdir=tmp_path)
        runs.append((out, Path(out["telemetry"]).read_text(), model.state_dict()))
    (first, lines, weights), (again, lines_again, weights_again) = runs
    assert first["retries"] == 1 and first["steps_run"] == 2 and lines.count("retries used up") == 1
    assert {k: again[k] for k in ("checks", "steps_run", "final_check")} == {
        k: first[k] for k in ("checks", "steps_run", "final_check")}
    assert lines_again == lines
    assert all(torch.equal(weights_again[k], v) for k, v in weights.items())


def test_interrupted_baking_ends_with_an_unbroken_runs_record(tiny_lm, tmp_path, monkeypatch):
    import copy

    import phases.quietstar.baking as baking
    from phases.quietstar.settings import Baking

    base, tok, splits, _ = tiny_lm
    reasoning = [{"prompt": r["prompt"], "answer": r["answer"],
                  "text": f"{r['prompt']} [thinking]<step>{r['answer']}</step>[/endthinking] {r['answer']}"}
                 for r in answerable(splits["train"])[:40]]
    settings = Baking(max_steps=6, eval_every=2, batch_size=2, target=1.0, replay=0.0, optim={"adam_lr": 1e-2, "muon_lr": 0.05})

    def run(workdir):
        model = copy.deepcopy(base).requires_grad_(True)
        out = baking.bake(model, tok, reasoning[:30], reasoning[30:32], reasoning[32:35], settings, 48, 0, workdir)
        return out, model.state_dict()

    unbroken, weights = run(tmp_path / "unbroken")
    monkeypatch.setattr(baking, "structure_accuracy", _dies_on({2, 4}, baking.structure_accuracy))
    resumed, resumed_weights = _until_done(lambda: run(tmp_path / "killed"))
    assert resumed["resumed_from"] == 4 and unbroken["resumed_from"] is None
    for key in ("evals", "selected", "steps_run", "final"):
        assert resumed[key] == unbroken[key], key
    assert Path(resumed["telemetry"]).read_text() == Path(unbroken["telemetry"]).read_text()
    assert all(torch.equal(resumed_weights[k], v) for k, v in weights.items())
