"""Same recipe, same bytes, whatever happens to the process. The micro pipeline runs whole, unbroken, as a
deployment on a worker (the ``deployed`` fixture); then again with `agent-forge run`, phase by phase in fresh
processes, SIGKILLed (the whole process group) at startup and in every phase along the way. Both stores must
hold the same artifact ids with the same files, byte for byte; no task body whose artifact was already stored
may run again; no process may outlive its run. Timings (the BitNet report's decode speeds) are measurements of
a copy, kept in its manifest's metrics, never in the files an artifact id names."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from prefect_stack import MICRO

from storage import ArtifactStore
from tasks.runtime import read_journal

REPO = Path(__file__).resolve().parents[1]

# (flow, journal task to wait for, seconds after it starts). None: seconds after the process starts.
# Each restart resumes, so a plan's later kills land further into the phase. One kill per way a phase can be
# cut short: at startup, in checkpointed training, inside worker processes, inside the EvoMerge search, while a
# champion is being written, in the OpenRouter-free data generation, in REINFORCE and in QAT. (The other
# resumes, baking's included, have unit tests of their own; each kill here costs a fresh process.)
KILLS = [
    ("prepare", None, 2.0),
    ("cognate", "cognate-foundation", 0.3),
    ("cognate", "cognate-specialist", 2.0),
    ("evomerge", "evomerge-fitness", 0.5),
    ("evomerge", "evomerge-champion", 0.0),
    ("quietstar", "quietstar-data", 0.1),
    ("quietstar", "quietstar-reinforce", 0.3),
    ("bitnet", "bitnet-finetune", 0.2),
]


def _command(flow: str, config: Path) -> list[str]:
    return [sys.executable, "-m", "flows.cli", "run", flow, "--config", str(config)]


def _contents(home: Path) -> dict[str, dict[str, str]]:
    store = ArtifactStore(home)
    out = {}
    for m in store.list():
        out[f"{m['kind']}/{m['id']}"] = {name: meta["sha256"] for name, meta in m["files"].items()}
    return out


def _stored(home: Path) -> set[str]:
    return {f"{m['kind']}/{m['id']}" for m in ArtifactStore(home).list()} if home.exists() else set()


def _survivors(home: Path) -> list[int]:
    """Processes still carrying this run's home in their environment: the CLI's Prefect server, workers,
    W&B's helpers would all inherit it."""
    tag = f"AGENT_FORGE_HOME={home}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if tag in (proc / "environ").read_bytes().split(b"\0"):
                    found.append(int(proc.name))
            except OSError:  # gone meanwhile, or not ours
                pass
    return found


class KilledRun:
    """Runs flows in fresh processes against one home, SIGKILLing the process group where a plan says."""

    def __init__(self, home: Path, prefect_home: Path, config: Path, api: str):
        prefect_home.mkdir()
        # the stack's server: a process that starts its own temporary one pays 6 s more per start
        self.env = {**os.environ, "AGENT_FORGE_HOME": str(home), "PREFECT_HOME": str(prefect_home),
                    "PREFECT_API_URL": api, "WANDB_MODE": "disabled"}
        self.home, self.config = home, config
        self.kills: list[str] = []  # "flow/task+delay" for each kill that landed while the process ran
        self.rerun: list[str] = []  # task bodies that built an artifact already stored when their process began

    def _journal(self) -> int:
        return len(read_journal(str(self.home)))

    def _process(self, flow: str, trigger: str | None = None, delay: float = 0.0) -> bool:
        """One process of ``flow``; killed once ``trigger`` (a journal task prefix) started ``delay`` s ago,
        or run to its end when ``trigger`` is None and ``delay`` 0. True when it was killed."""
        before, seen = _stored(self.home), self._journal()
        proc = subprocess.Popen(_command(flow, self.config), cwd=REPO, env=self.env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True)
        started, killed = time.monotonic(), False
        if trigger is not None or delay:
            while proc.poll() is None:
                new = read_journal(str(self.home))[seen:]
                if trigger is None or any(e["task"].startswith(trigger) for e in new):
                    time.sleep(delay if trigger is not None else max(0.0, delay - (time.monotonic() - started)))
                    if proc.poll() is None:
                        os.killpg(proc.pid, signal.SIGKILL)
                        killed = True
                    break
                assert time.monotonic() - started < 300, f"{flow}: {trigger} never started"
                time.sleep(0.02)
        _, err = proc.communicate(timeout=600)
        assert killed or proc.returncode == 0, f"{flow} failed:\n{err.decode()[-3000:]}"
        print(f"{flow} {trigger}+{delay}: {'killed' if killed else 'finished'} after {time.monotonic() - started:.1f} s")
        if killed:
            self.kills.append(f"{flow}/{trigger or 'startup'}+{delay}")
        self.rerun += [e["artifact"] for e in read_journal(str(self.home))[seen:] if e.get("artifact") in before]
        deadline = time.monotonic() + 10  # a killed group's members may take a moment to be reaped
        while _survivors(self.home) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _survivors(self.home), f"processes outlived {flow}: {_survivors(self.home)}"
        return killed


def test_killed_in_every_phase_and_resumed_phase_by_phase_stores_the_same_bytes(stack, deployed, tmp_path):
    config = tmp_path / "micro.json"
    config.write_text(json.dumps(MICRO))
    run = KilledRun(tmp_path / "killed", tmp_path / "prefect-killed", config, stack.api)
    for i, (flow, trigger, delay) in enumerate(KILLS):
        run._process(flow, trigger, delay)
        # a phase's flow takes the newest model of the phase before it from the store: that phase ends first
        if flow in ("cognate", "evomerge", "quietstar") and KILLS[i + 1][0] != flow:
            run._process(flow)
    run._process("full")  # finishes BitNet, and adds the forging report

    phases = {k.split("/")[0] for k in run.kills}
    assert len(run.kills) >= 7 and phases == {"prepare", "cognate", "evomerge", "quietstar", "bitnet"}, run.kills
    assert not run.rerun, f"finished work ran again: {run.rerun}"
    whole, killed = _contents(stack.home), _contents(run.home)
    assert [a for a in whole if a.startswith("forging-report")] and len(whole) == 17
    assert sorted(whole) == sorted(killed)
    differ = {a: sorted(f for f in whole[a] if whole[a][f] != killed[a].get(f)) for a in whole if whole[a] != killed[a]}
    assert not differ, differ
