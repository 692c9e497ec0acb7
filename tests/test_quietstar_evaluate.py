"""Quiet-STaR's reasoning accuracy reads a worked answer whole: a model that writes the curriculum's column working
before "So the answer is N" is scored on N, not cut off after a fixed dozen tokens."""

from __future__ import annotations

import torch
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from phases.data import curriculum
from phases.data import tokenizer as bpe
from phases.quietstar.evaluate import reasoning_accuracy


class ScriptedLM(PreTrainedModel, GenerationMixin):
    """A causal LM whose every prediction is the next token of the sequences it was given: what a model that has
    learnt the curriculum's text greedily writes, with no training in the test."""

    config_class = PretrainedConfig

    def __init__(self, config: PretrainedConfig, sequences: list[list[int]]):
        super().__init__(config)
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # generate reads a device and dtype off the parameters
        self.next = {tuple(s[:i]): s[i] for s in sequences for i in range(1, len(s))}

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, attention_mask=None, **_) -> dict:
        return {"input_ids": input_ids}  # no cache: every step reads the whole sequence

    def forward(self, input_ids: torch.Tensor, attention_mask=None, **_) -> CausalLMOutput:
        logits = torch.full((*input_ids.shape, self.config.vocab_size), -1e4)
        eos = self.config.eos_token_id
        for b, row in enumerate(input_ids.tolist()):
            pad = next((i for i, x in enumerate(row) if x != eos), len(row))  # a batch's shorter prompts are left-filled
            for t in range(len(row)):
                logits[b, t, self.next.get(tuple(row[pad: t + 1]), eos)] = 0.0
        return CausalLMOutput(logits=logits + 0 * self.anchor)


def test_a_worked_answer_is_read_whole():
    splits = curriculum.generate(40, 10, seed=0)
    problems = [r for r in splits["test"] if r["task"] == "word_problem" and r["stage"] == "advanced"][:3]
    tok = bpe.train_bpe((r["text"] for r in splits["train"]), 300)
    tok.add_special_tokens({"additional_special_tokens": ["[thinking]", "[/endthinking]"]})
    eos = tok.eos_token_id
    sequences = [tok.encode(p["text"], add_special_tokens=False) + [eos] for p in problems]
    assert min(len(s) - len(tok.encode(p["prompt"], add_special_tokens=False)) for s, p in zip(sequences, problems)) > 14
    config = PretrainedConfig(vocab_size=len(tok), eos_token_id=eos, pad_token_id=eos, use_cache=False,
                              num_hidden_layers=1, hidden_size=8, num_attention_heads=1)
    model = ScriptedLM(config, sequences).eval()
    read = reasoning_accuracy(model, tok, problems, max_new_tokens=200)
    assert read["accuracy"] == 1.0, read["samples"]
    # the fixed budget this replaced stopped every worked answer before its "So the answer is"
    assert reasoning_accuracy(model, tok, problems, max_new_tokens=200, answer_tokens=12)["accuracy"] == 0.0
