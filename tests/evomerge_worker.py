"""Runs EvoMerge's search without Prefect, for the kill-and-resume test:
python evomerge_worker.py MODELS_DIR STATE_DIR GENERATIONS SLEEP_PER_EVALUATION"""

import json
import sys
import time
from pathlib import Path

import torch

from phases.evomerge import steps
from phases.evomerge.settings import EvoMergeSection

WEIGHTS = {"accuracy": 0.7, "speed": 0.2, "memory": 0.1}

if __name__ == "__main__":
    root, state, generations, sleep = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    torch.set_num_threads(1)
    sec = EvoMergeSection.model_validate({
        "search": {"generations": generations, "patience": 100},
        # no perplexity limit: this test is about resuming, so every candidate keeps a fitness to rank by
        "fitness": {"eval_rows": 4, "accuracy_problems": 6, "probe_rows": 1, "max_perplexity_increase": None}})
    data = steps.eval_set(root / "curriculum", root / "base", sec.fitness, 48, "validation")
    inputs = [root / n for n in "abc"]
    memo: dict = {}
    raws = [steps.measure_model(steps.load_model(p), data, data.rows[:1], memo) for p in inputs]
    evaluate = steps.local_evaluator(root / "base", inputs, data, 1, on_each=lambda g: time.sleep(sleep))
    result = steps.search(raws, "abc", root / "base", sec, 1, WEIGHTS, state, evaluate,
                          log=lambda m: print(m, flush=True))
    print(json.dumps({"evaluated_now": result["evaluated_now"], "generations_run": result["generations_run"],
                      "champion": result["champion"].genome.key(), "stop_reason": result["stop_reason"]}))
