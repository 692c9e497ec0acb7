"""Greedy batched decoding for Quiet-STaR's checks (baking's well-formedness, the accuracy evaluation).

Cognate takes no padding mask, so prompts of different lengths are left-filled with EOS (the document
separator every training row contains) and decoded together; a row's continuation ends at its first EOS
after the prompt. ``AnswerBudget`` stops a row once it has written enough visible text: the answer check
reads one line, and what a model writes inside a thinking block is not its answer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from phases.cognate.modeling import CognateForCausalLM
from phases.quietstar.tokens import THINK_END, THINK_START


class AnswerBudget(StoppingCriteria):
    """Stop a row once it has written ``budget`` tokens outside ``[thinking] … [/endthinking]``."""

    def __init__(self, prompt_len: int, start_id: int, end_id: int, budget: int):
        self.prompt_len, self.start_id, self.end_id, self.budget = prompt_len, start_id, end_id, budget

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        new = input_ids[:, self.prompt_len:]
        idx = torch.arange(new.shape[1], device=new.device).expand_as(new)
        last_start = torch.where(new == self.start_id, idx, -1).cummax(1).values
        last_end = torch.where(new == self.end_id, idx, -1).cummax(1).values
        visible = (last_start <= last_end) & (new != self.start_id) & (new != self.end_id)
        return visible.sum(1) >= self.budget


@torch.no_grad()
def generate_batched(model: CognateForCausalLM, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[list[int]],
                     max_new_tokens: int | Sequence[int], batch_size: int = 16, answer_tokens: int | None = None,
                     **generate_kwargs) -> list[list[int]]:
    """Greedy continuations of ``prompts`` (token lists), each cut at its first EOS; with
    ``answer_tokens``, a row also stops after that many tokens outside a thinking block."""
    model.eval()
    eos = tokenizer.eos_token_id
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[eos] * (width - len(p)) + list(p) for p in chunk])
        if answer_tokens is not None:
            marks = tokenizer.convert_tokens_to_ids([THINK_START, THINK_END])
            generate_kwargs["stopping_criteria"] = StoppingCriteriaList([AnswerBudget(width, *marks, answer_tokens)])
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max(limits[start:start + batch_size]),
                             do_sample=False, eos_token_id=eos, pad_token_id=eos, **generate_kwargs)
        pad = getattr(model.config, "pad_token_id", None)
        for k, row in enumerate(gen[:, width:].tolist()):
            row = row[: limits[start + k]]
            row = row[: row.index(eos)] if eos in row else row
            out.append([t for t in row if t != pad])  # rows a hidden thinking block shortened are right-padded
    return out
