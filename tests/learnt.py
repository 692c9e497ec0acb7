"""Micro Cognates with a skill: they answer a handful of problems exactly because they learnt them. The controls
on real models build their failing cases on these (a merge that drops skills, noise thoughts, ternary weights
without QAT): a gate can only be shown to catch a lost skill on a model that had one."""

import torch

from phases.cognate import CognateConfig, CognateForCausalLM
from phases.cognate.data import pack_whole


def micro_cognate(tok) -> CognateForCausalLM:
    """One layer of width 32, one recursion step: about 40k parameters, a few seconds to learn 8 problems."""
    return CognateForCausalLM(CognateConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, window_size=16,
        mem_chunk_size=4, act_max_steps=1, n_persistent=2, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id))


def learn(model: CognateForCausalLM, problems: list[dict], tok, seq_len: int = 48, steps: int = 300,
          lr: float = 3e-3) -> CognateForCausalLM:
    """Full-batch AdamW on the problems' answers (one problem per row) until they are learnt; returns it in eval."""
    ids, labels = pack_whole(problems, tok, seq_len)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        model(ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()
