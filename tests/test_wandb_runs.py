"""A W&B run its process never finished (SIGKILL between init and finish) is marked crashed by the next
logging, and left out of `wandb sync .../offline-run-*`."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from tasks.tracking import mark_crashed_runs

REPO = Path(__file__).resolve().parents[1]


def test_a_run_killed_before_finishing_is_marked_crashed_and_a_finished_one_is_not(tmp_path):
    wandb_dir = tmp_path / "wandb"
    wandb_dir.mkdir()
    script = textwrap.dedent(f"""
        import os, signal, sys, wandb
        from pathlib import Path
        from tasks.tracking import _open_run
        kill = sys.argv[1] == "kill"
        run = wandb.init(project="p", dir={str(wandb_dir)!r}, mode="offline",
                         settings=wandb.Settings(console="off", silent=True, x_disable_stats=True))
        marker = _open_run(Path({str(wandb_dir)!r}), Path(run.dir).parent)
        run.summary["loss"] = 1.0
        if kill:
            os.kill(os.getpid(), signal.SIGKILL)
        run.finish()
        marker.unlink()
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"}
    finished = subprocess.run([sys.executable, "-c", script, "finish"], env=env, capture_output=True, timeout=120)
    assert finished.returncode == 0, finished.stderr.decode()[-2000:]
    killed = subprocess.run([sys.executable, "-c", script, "kill"], env=env, capture_output=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL

    runs = sorted((wandb_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    marked = mark_crashed_runs(wandb_dir)
    assert len(marked) == 1 and marked[0].name.startswith("crashed-offline-run-")
    assert "killed" in (marked[0] / "CRASHED.txt").read_text()
    left = sorted((wandb_dir / "wandb").glob("offline-run-*"))
    assert len(left) == 1 and left[0] in runs  # the finished run, still what `wandb sync offline-run-*` takes
    assert mark_crashed_runs(wandb_dir) == []  # marked once
