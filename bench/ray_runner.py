"""Local against Ray: the wall time of the `cognate` and `evomerge` flows with `--task-runner local` and
`--task-runner ray` (a local Ray instance sized to the machine), and EvoMerge's speed-up from one Ray worker core to
two (`ray start --head --num-cpus=N`, joined with `--address`). Every run is a fresh `agent-forge run` process in
its own store; the EvoMerge runs start from a copy of the local run's Cognate artifacts. Ends with one JSON line.

    python bench/ray_runner.py                 # the tiny preset
    python bench/ray_runner.py --preset small  # on a machine that trains it
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
COGNATE_KINDS = ("curriculum", "tokenizer", "cognate-base", "cognate-model", "cognate-diagnosis")


def run(flow: str, preset: str, home: Path, env: dict, *runner: str) -> float:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "flows.cli", "run", flow, "--preset", preset, "--home", str(home),
                          *runner], cwd=REPO, env=env, capture_output=True, text=True)
    took = time.perf_counter() - start
    if out.returncode:
        raise SystemExit(f"{flow} {' '.join(runner)} failed:\n{out.stderr[-3000:]}")
    print(f"{flow:9s} {' '.join(runner) or '--task-runner local':40s} {took:7.1f} s", file=sys.stderr)
    return took


def champion(home: Path) -> str:
    """The champion's id: its recipe key (inputs, config, code). Byte equality across runners is tests/test_ray_runner.py's."""
    return next(p.name for p in (home / "artifacts" / "evomerge-champion").iterdir() if not p.name.startswith("."))


def cognate_copy(src: Path, dst: Path) -> Path:
    for kind in COGNATE_KINDS:
        shutil.copytree(src / "artifacts" / kind, dst / "artifacts" / kind)
    return dst


def with_cluster(cpus: int, temp: Path, env: dict):
    """A Ray head on this machine with ``cpus`` worker cores; returns its address and how to stop it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run([RAY, "start", "--head", f"--port={port}", f"--num-cpus={cpus}", "--include-dashboard=false",
                    "--disable-usage-stats", f"--temp-dir={temp}"], env=env, check=True, capture_output=True)
    return f"127.0.0.1:{port}", lambda: subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ray-bench-"))
    env = {**os.environ, "WANDB_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "PREFECT_HOME": str(root / "prefect")}
    env.pop("PREFECT_API_URL", None)  # each process runs as a user's would: its own server when it needs one
    (root / "prefect").mkdir()
    times: dict[str, float] = {}
    for runner in ("local", "ray"):
        home = root / runner
        for flow in ("cognate", "evomerge"):
            times[f"{flow}_{runner}_s"] = run(flow, args.preset, home, env, "--task-runner", runner)
    same = champion(root / "local") == champion(root / "ray")
    for cpus in (1, 2):
        address, stop = with_cluster(cpus, root / f"ray-{cpus}", env)
        try:
            home = cognate_copy(root / "local", root / f"evomerge-{cpus}cpu")
            times[f"evomerge_ray_{cpus}cpu_s"] = run("evomerge", args.preset, home, env, "--task-runner", "ray",
                                                     "--address", address)
            same = same and champion(home) == champion(root / "local")
        finally:
            stop()
    shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({"bench": "ray_runner", "preset": args.preset, "cores": os.cpu_count(),
                      **{k: round(v, 1) for k, v in times.items()},
                      "ray_overhead_cognate": round(times["cognate_ray_s"] / times["cognate_local_s"], 3),
                      "ray_overhead_evomerge": round(times["evomerge_ray_s"] / times["evomerge_local_s"], 3),
                      "evomerge_speedup_2_vs_1_workers": round(times["evomerge_ray_1cpu_s"] / times["evomerge_ray_2cpu_s"], 3),
                      "same_champion_id_everywhere": same}))


if __name__ == "__main__":
    main()
