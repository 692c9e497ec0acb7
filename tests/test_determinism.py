"""Same recipe, same bytes: the micro pipeline run whole in one process, and phase by phase in fresh
processes, stores the same artifact ids holding the same files, byte for byte. The one exception is
what is a timing by nature: the BitNet report's decode speeds and durations."""

import json
import os
import subprocess
import sys
from pathlib import Path

from test_deployment import MICRO

from storage import ArtifactStore

REPO = Path(__file__).resolve().parents[1]
TIMINGS = {"speed", "seconds", "cpu_seconds"}  # report.json keys that hold wall or CPU time


def _run(flow: str, home: Path, config: Path, prefect_home: Path) -> None:
    env = {**os.environ, "AGENT_FORGE_HOME": str(home), "PREFECT_HOME": str(prefect_home), "WANDB_MODE": "disabled"}
    prefect_home.mkdir(exist_ok=True)
    done = subprocess.run([sys.executable, "-m", "flows.cli", "run", flow, "--config", str(config)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _contents(home: Path) -> dict[str, dict[str, str]]:
    store = ArtifactStore(home)
    out = {}
    for m in store.list():
        files = {name: meta["sha256"] for name, meta in m["files"].items()}
        if m["kind"] == "bitnet-report":
            report = json.loads((store.artifact_dir(m["kind"], m["id"]) / "report.json").read_text())
            files["report.json"] = json.dumps({k: v for k, v in report.items() if k not in TIMINGS}, sort_keys=True)
        out[f"{m['kind']}/{m['id']}"] = files
    return out


def test_one_process_and_phase_by_phase_store_the_same_bytes(tmp_path):
    config = tmp_path / "micro.json"
    config.write_text(json.dumps(MICRO))
    _run("full", tmp_path / "whole", config, tmp_path / "prefect-whole")
    for flow in ("cognate", "evomerge", "quietstar", "bitnet"):  # each pulls what it needs from the store
        _run(flow, tmp_path / "phased", config, tmp_path / "prefect-phased")
    whole, phased = _contents(tmp_path / "whole"), _contents(tmp_path / "phased")
    # the whole pipeline ends with its forging report, which no single flow writes
    assert [a for a in whole if a.startswith("forging-report")] and len(whole) == 17
    whole = {a: files for a, files in whole.items() if not a.startswith("forging-report")}
    assert sorted(whole) == sorted(phased)
    differ = {a: sorted(f for f in whole[a] if whole[a][f] != phased[a].get(f)) for a in whole if whole[a] != phased[a]}
    assert not differ, differ
