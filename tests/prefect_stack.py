"""A real Prefect stack for end-to-end tests: `prefect server start` on 127.0.0.1, a process worker, the
deployments of prefect.yaml; and the micro pipeline config they run."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
PREFECT = [sys.executable, "-m", "prefect"]
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
# The tiny preset made smaller still: the deployment machinery is under test here, not the models.
MICRO = {
    "preset": "tiny",
    "model": {"n_layers": 1, "d_model": 32, "n_heads": 2, "seq_len": 64},
    "data": {"train_per_stage": 150, "eval_per_stage": 15},
    "tokenizer": {"vocab_size": 400},
    "cognate": {"train": {"foundation_steps": 6, "stage_steps": 3, "batch_size": 2, "eval_every": 3, "niah_every": 3,
                          "eval_rows": 2},
                "eval": {"accuracy_per_skill": 1, "heldout_rows": 16}, "gates": {"mode": "lenient"},
                "diagnose": {"shards": 1, "inputs": 2, "span": 64, "trials": 8, "beyond": [16], "coupling_tokens": 32}},
    "evomerge": {"search": {"generations": 2}, "fitness": {"eval_rows": 2, "accuracy_problems": 3, "probe_rows": 1},
                 "gates": {"mode": "lenient"}},
    "quietstar": {"data": {"examples_per_pair": 4},
                  "bake": {"max_steps": 3, "batch_size": 2, "eval_every": 3, "heldout_examples": 3, "heldout_fraction": 0.2},
                  "rl": {"thought_count_cap": 2, "thought_length_cap": 2, "n_true": 2, "steps": 1, "batch_size": 2,
                         "seq_len": 16,
                         "theater": {"check_every": 1, "max_retries": 0, "problems": 2, "eval_thoughts": 2}},
                  "eval": {"problems": 2, "max_new_tokens": 8}, "gates": {"mode": "lenient"}},
    "bitnet": {"heldout": {"eval_rows": 2, "problems_per_skill": 2}, "quantize": {"calibration_rows": 2},
               "finetune": {"steps": 1, "eval_every": 1, "batch_size": 2},
               "evaluate": {"speed_tokens": 4, "speed_repeats": 1}, "gates": {"mode": "lenient"}},
}
PHASE_KINDS = ["bitnet-model", "bitnet-report", "bitnet-staged", "evomerge-champion", "quietstar-baked",
               "quietstar-model", "reasoning-data"]
SPECIALISTS = {"cognate-specialist:reasoning", "cognate-specialist:memory", "cognate-specialist:speed"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    def __init__(self, root: Path):
        self.root = root
        self.home = root / "home"
        self.port = _free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        (root / "prefect").mkdir(parents=True)
        self.env = {
            **os.environ,
            "PREFECT_HOME": str(root / "prefect"),
            "PREFECT_API_URL": self.api,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_LOGGING_LEVEL": "INFO",
            "AGENT_FORGE_HOME": str(self.home),
            "WANDB_MODE": "offline",
            "PWD": str(REPO),  # prefect.yaml's pull step runs flows from the checkout `prefect deploy` ran in
        }
        self.procs: list[subprocess.Popen] = []

    def spawn(self, name: str, *args: str, env: dict | None = None) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "w")
        p = subprocess.Popen([*PREFECT, *args], cwd=REPO, env=env or self.env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
        self.procs.append(p)
        return p

    def cli(self, *args: str) -> str:
        out = subprocess.run([*PREFECT, *args], cwd=REPO, env=self.env, capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, f"prefect {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        return out.stdout + out.stderr

    def _request(self, method: str, path: str, body: dict | None = None) -> list | dict:
        # The server answers 503 for errors a client may retry (a SQLite write lock held by the worker's runs),
        # and Prefect's own client retries them: so does this one
        for attempt in range(6):
            r = httpx.request(method, f"{self.api}{path}", json=body, timeout=30)
            if r.status_code != 503:
                break
            time.sleep(0.5 * 2**attempt)
        r.raise_for_status()
        return r.json()

    def post(self, path: str, body: dict) -> list | dict:
        return self._request("POST", path, body)

    def get(self, path: str) -> dict:
        return self._request("GET", path)

    def start(self) -> None:
        server_env = {k: v for k, v in self.env.items() if k != "PREFECT_API_URL"}
        self.spawn("server", "server", "start", "--host", "127.0.0.1", "--port", str(self.port), env=server_env)
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{self.api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not start:\n" + self.log("server")
            time.sleep(0.5)
        self.cli("work-pool", "create", "agent-forge", "--type", "process")
        self.cli("--no-prompt", "deploy", "--all")
        self.spawn("worker", "worker", "start", "--pool", "agent-forge", "--type", "process")

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text()[-6000:]

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)

    # ------------------------------------------------------------------ runs
    def deployment(self, name: str = "agent-forge/full") -> dict:
        return self.get(f"/deployments/name/{name}")

    def run_deployment(self, name: str = "agent-forge/full", job_variables: dict | None = None, **params) -> str:
        """A run of a deployment (agent-forge/full unless named) as the UI's run form submits it: the form's
        parameters (and job variables, the form's other tab), posted to the deployment's create_flow_run (the
        server checks them against the form's schema)."""
        run = self.post(f"/deployments/{self.deployment(name)['id']}/create_flow_run",
                        {"parameters": {"config": MICRO, **params}, "job_variables": job_variables or {}})
        return run["id"]

    def run_deployment_cli(self) -> str:
        """The same, as a user types it: `prefect deployment run agent-forge/full`."""
        out = self.cli("deployment", "run", "agent-forge/full", "--params", json.dumps({"config": MICRO}))
        return re.search(r"UUID:\s*([0-9a-f-]{36})", out).group(1)

    def retry(self, flow_run_id: str) -> None:
        """What the UI's Retry button posts: the run back to Scheduled, named AwaitingRetry, unforced."""
        self.post(f"/flow_runs/{flow_run_id}/set_state", {
            "state": {"type": "SCHEDULED", "name": "AwaitingRetry", "message": "Retry from the UI"}, "force": False})

    def wait(self, flow_run_id: str, timeout: float = 420) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.get(f"/flow_runs/{flow_run_id}")
            if run["state"]["type"] in TERMINAL and run["state"]["name"] != "AwaitingRetry":
                return run
            time.sleep(1)
        raise AssertionError(f"flow run {flow_run_id} did not finish; worker log:\n{self.log('worker')}")

    def artifacts(self, parent_id: str) -> list[dict]:
        """The UI artifacts of a run and of its subflows, newest first."""
        subflows = self.post("/flow_runs/filter", {"flow_runs": {"parent_flow_run_id": {"any_": [parent_id]}}})
        ids = [parent_id] + [s["id"] for s in subflows]
        return self.post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": ids}}, "sort": "CREATED_DESC"})

    def artifact_keys(self, parent_id: str) -> set[str]:
        return {a["key"] for a in self.artifacts(parent_id) if a.get("key")}

    def final_progress(self, parent_id: str) -> dict[str, float]:
        """Each progress bar's newest value."""
        out: dict[str, float] = {}
        for a in self.artifacts(parent_id):
            if a["type"] == "progress":
                out.setdefault(a["key"], float(a["data"]))
        return out

    def task_states(self, parent_id: str) -> dict[str, str]:
        """Final state name of each task (its newest run) in the parent and its subflows."""
        subflows = self.post("/flow_runs/filter", {
            "flow_runs": {"parent_flow_run_id": {"any_": [parent_id]}}, "sort": "EXPECTED_START_TIME_DESC"})
        ids = [parent_id] + [s["id"] for s in subflows]
        subflow_stubs = {s["parent_task_run_id"] for s in subflows}  # the task-run records that stand for subflows
        tasks = self.post("/task_runs/filter", {"flow_runs": {"id": {"any_": ids}}, "sort": "EXPECTED_START_TIME_DESC"})
        states: dict[str, str] = {}
        for t in tasks:
            if t["id"] in subflow_stubs:
                continue
            states.setdefault(t["name"].rsplit("-", 1)[0], t["state"]["name"])
        return states
