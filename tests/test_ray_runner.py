"""Fan-out on Ray: a real local Ray cluster (`ray start --head`), joined by `agent-forge run cognate --task-runner
ray --address ADDR`, then by the `evomerge` deployment told to use it through its job variables, as the README
says. The Cognate specialists and EvoMerge's fitness evaluations run in Ray's worker processes, one of them
is SIGKILLed mid-training, and the store ends with the bytes the unbroken local deployment stored."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prefect_stack import MICRO
from test_determinism import _contents

from tasks.runtime import read_journal

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """The address of a one-node Ray cluster on this machine's cores, started as a user would start a head."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    temp = tmp_path_factory.mktemp("ray")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run([RAY, "start", "--head", f"--port={port}", "--num-cpus=2",
                    "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"],
                   env=env, check=True, capture_output=True, timeout=180)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)


def _run(flow: str, config: Path, home: Path, env: dict, address: str, kill: str | None = None) -> tuple[int, list[int]]:
    """`agent-forge run FLOW` on Ray; with ``kill``, the Ray worker running that journal task is SIGKILLed once it
    has trained for a second. Returns the CLI's pid and the pids killed."""
    seen = len(read_journal(str(home)))
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", flow, "--config", str(config), "--task-runner",
                             "ray", "--address", address], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    killed: list[int] = []
    while kill and not killed and proc.poll() is None:
        started = [e for e in read_journal(str(home))[seen:] if e["task"] == kill]
        if started:
            time.sleep(1.0)
            os.kill(started[0]["pid"], signal.SIGKILL)
            killed.append(started[0]["pid"])
        time.sleep(0.05)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"{flow} on Ray failed:\n{err.decode()[-4000:]}"
    return proc.pid, killed


def test_specialists_and_fitness_run_in_ray_workers_survive_a_killed_one_and_store_the_local_bytes(
        stack, deployed, ray_cluster, tmp_path):
    config, home = tmp_path / "micro.json", tmp_path / "home"
    config.write_text(json.dumps(MICRO))
    (tmp_path / "prefect").mkdir()
    env = {**os.environ, "AGENT_FORGE_HOME": str(home), "PREFECT_HOME": str(tmp_path / "prefect"),
           "PREFECT_API_URL": stack.api, "WANDB_MODE": "disabled"}

    cli, killed = _run("cognate", config, home, env, ray_cluster, kill="cognate-specialist:memory")
    seen = len(read_journal(str(home)))
    # EvoMerge as a deployment run whose job variables put it on the cluster; its tasks that do not fan out run
    # in the flow run's own process
    run_id = stack.run_deployment("evomerge/evomerge", home=str(home), job_variables={"env": {
        "AGENT_FORGE_TASK_RUNNER": "ray", "AGENT_FORGE_RAY_ADDRESS": ray_cluster}})
    done = stack.wait(run_id)
    assert done["state"]["type"] == "COMPLETED", stack.log("worker")

    journal = read_journal(str(home))
    flow_process = {e["pid"] for e in journal[seen:] if e["task"] in ("preflight", "evomerge-measure-inputs")}
    fanned = [e for e in journal if e["task"].startswith(("cognate-specialist:", "evomerge-fitness:"))]
    assert {e["host"] for e in journal} == {socket.gethostname()} and len(flow_process) == 1
    assert fanned and not {e["pid"] for e in fanned} & ({cli} | flow_process)  # in Ray's workers, not the flows'
    memory = [e["pid"] for e in journal if e["task"] == "cognate-specialist:memory"]
    assert len(memory) == 2 and memory[0] == killed[0] != memory[1]  # Ray ran the killed task again elsewhere
    assert sum(e["task"].startswith("evomerge-fitness:") for e in journal) >= 8
    # no model trained twice (the evaluation, which stores nothing, is Prefect's to cache, per result storage)
    assert not [e for e in journal[seen:] if e["task"].startswith(("cognate-foundation", "cognate-specialist"))]

    # determinism across runners, through a worker's death: the unbroken local deployment's bytes
    local, on_ray = _contents(stack.home), _contents(home)
    assert set(on_ray) <= set(local), sorted(set(on_ray) - set(local))
    assert {k.split("/")[0] for k in on_ray} >= {"cognate-model", "cognate-diagnosis", "evomerge-champion"}
    assert {k: local[k] for k in on_ray} == on_ray
