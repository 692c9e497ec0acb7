"""A small model and data for the training-loop tests; run as a script it trains in its own process,
for the kill-and-resume tests: python train_worker.py WORKDIR STEPS SLEEP [RANKS] (RANKS > 1: data-parallel)."""

import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_model

from phases.cognate import CognateConfig, CognateForCausalLM
from phases.cognate.settings import CognateTraining
from phases.cognate.trainer import train
from phases.common.data_parallel import SINGLE, Rank, launch
from phases.common.optim import MuonGrokfastConfig


def _settings(**kw) -> CognateTraining:
    """The trainer settings these tests were tuned with: a light polarization warm-up and the
    optimizer block's class defaults."""
    return CognateTraining(**({"polarization_weight": 0.02, "optim": MuonGrokfastConfig().model_dump()} | kw))



def setup():
    """(model, batches(step), eval rows), the same on every call."""
    torch.manual_seed(0)
    model = CognateForCausalLM(CognateConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                             window_size=8, mem_chunk_size=4, act_max_steps=2))
    data = torch.randint(0, 64, (32, 24), generator=torch.Generator().manual_seed(1))
    return model, (lambda s: data[s % 28:s % 28 + 4]), data[:4]


def run(rank: Rank, workdir: Path, steps: int, sleep: float, on_progress=None) -> dict:
    """One rank's training (the whole of it with ``SINGLE``); its record and the weights' sum."""
    model, batches, eval_rows = setup()

    def slow(step, loss):
        time.sleep(sleep)  # gives the test time to kill us mid-run
        return loss

    result = train(model, batches, eval_rows, _settings(eval_every=2, niah_every=5), workdir, steps,
                   loss_hook=slow, rank=rank, on_progress=on_progress)
    if rank.leader:
        save_model(model, str(workdir / "final.safetensors"))
    return result.as_dict() | {"weight_sum": float(sum(p.double().sum() for p in model.parameters()))}


if __name__ == "__main__":  # WORKDIR STEPS SLEEP [RANKS]
    workdir, steps, sleep = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    ranks = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    torch.set_num_threads(1)
    out = launch(run, ranks, workdir, steps, sleep) if ranks > 1 else run(SINGLE, workdir, steps, sleep)
    print(json.dumps(out))
