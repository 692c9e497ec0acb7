"""Buys reasoning data from a (fake) OpenRouter in its own process, for the kill test:
python openrouter_worker.py BASE_URL LEDGER CAP_USD"""

import sys
from pathlib import Path

from phases.data import curriculum
from phases.quietstar.reasoning_data import generation
from phases.quietstar.reasoning_data.generation import Ledger
from phases.quietstar.reasoning_data.openrouter import OpenRouterClient, Price

KEY = "sk-or-v1-TESTKEY-0123456789abcdef-do-not-leak"
PRICE = {"fake/model-a": Price(1.0, 2.0)}


def jobs() -> list[generation.Job]:
    problems = generation.checkable_problems(curriculum.generate(120, 5, 3)["train"], max_prompt_chars=240)
    return generation.plan(["fake/model-a"], ["step", "doubt"], 4, problems, seed=0)


if __name__ == "__main__":
    base_url, ledger, cap = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])
    with OpenRouterClient(KEY, base_url, timeout_s=30.0, max_retries=0, max_concurrency=4) as client:
        generation.run_openrouter(client, jobs(), Ledger(ledger), PRICE, cap, max_tokens=64)
