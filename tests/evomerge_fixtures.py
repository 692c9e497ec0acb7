"""Merge-ready test models: one micro Cognate base trained briefly, three variants fine-tuned from it
on different task mixes (weight-space merging needs a shared ancestor), plus the curriculum and
tokenizer they were trained on. Deterministic; about 10 s on 2 cores."""

from __future__ import annotations

from pathlib import Path

import torch

from phases.cognate import CognateConfig, CognateForCausalLM
from phases.cognate.data import Batches, mixed_texts
from phases.data import curriculum, dataset_files
from phases.data import tokenizer as bpe
from phases.data.encoding import pack

SEQ = 48
MIXES = ({"arithmetic": 1.0}, {"kv_recall": 1.0}, {"text": 1.0, "word_problem": 1.0})
RUNTIME = ({"act_max_steps": 2}, {"act_max_steps": 2}, {"act_max_steps": 1})


def _train(model, rows: torch.Tensor, steps: int, seed: int) -> None:
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batches = Batches(rows, 8, seed)
    model.train()
    for s in range(steps):
        x = batches(s)
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def build(root: Path, n_layers: int = 2) -> dict[str, Path]:
    """Writes curriculum/, base/, a/, b/, c/ under ``root``; returns their paths."""
    torch.set_num_threads(1)
    splits = curriculum.generate(300, 30, seed=5)
    dataset_files.save_splits(splits, root / "curriculum")
    tok = bpe.train_bpe([r["text"] for r in splits["train"]], vocab_size=400)
    torch.manual_seed(0)
    base = CognateForCausalLM(CognateConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=n_layers,
                                            num_attention_heads=2, window_size=16, mem_chunk_size=8, act_max_steps=2,
                                            n_persistent=4))
    rows = pack([r["text"] for r in splits["train"]], tok, SEQ)
    _train(base, rows, 40, seed=1)
    paths = {"curriculum": root / "curriculum", "base": root / "base"}
    base.save_pretrained(paths["base"])
    bpe.save(tok, paths["base"])
    for i, (name, mix) in enumerate(zip("abc", MIXES)):
        model = CognateForCausalLM.from_pretrained(paths["base"])
        model.set_runtime(**RUNTIME[i])
        _train(model, pack(mixed_texts(list(splits["train"]), mix, seed=10 + i), tok, SEQ), 25, seed=10 + i)
        paths[name] = root / name
        model.save_pretrained(paths[name])
        bpe.save(tok, paths[name])
    return paths
