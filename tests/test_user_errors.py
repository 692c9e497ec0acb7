"""Every user-fixable mistake ends on one line that names the thing and the fix (exit 2 for usage), fast,
before Prefect starts, and leaves the store as it was."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str, home: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "AGENT_FORGE_HOME": str(home), "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _files(home: Path) -> list[str]:
    """Everything under home but the error log, which is where the traceback goes."""
    return sorted(str(p.relative_to(home)) for p in home.rglob("*") if p.parts[len(home.parts)] != "logs") \
        if home.exists() else []


CASES = {
    # name: (argv after "run prepare", what the one line must name, exit code)
    "missing config file": (["--config", "{dir}/nope.json"], "no such file", 2),
    "config is not JSON or YAML": (["--config", "{dir}/broken.txt"], "neither JSON nor YAML", 2),
    "config is a list": (["--config", "{dir}/list.json"], "holds a list", 2),
    "unknown field": (["--set", "data.sed=7"], "data.sed", 2),
    "inf learning rate": (["--set", "cognate.train.optim.adam_lr=inf"], "cognate.train.optim.adam_lr", 2),
    "infinite budget": (["--set", "quietstar.data.budget_usd=Infinity"], "quietstar.data.budget_usd", 2),
    "nan timeout": (["--set", "quietstar.data.timeout_s=NaN"], "quietstar.data.timeout_s", 2),
    "--set without a value": (["--set", "data.seed"], "KEY=VALUE", 2),
    "home under a file": (["--home", "{dir}/a_file/home"], "not writable", 2),
    "a Ray address without Ray": (["--address", "127.0.0.1:6379"], "goes with --task-runner ray", 2),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_ends_on_one_line_and_leaves_the_store_alone(case, tmp_path):
    argv, names, code = CASES[case]
    (tmp_path / "broken.txt").write_text("{not: [valid")
    (tmp_path / "list.json").write_text('[{"preset": "tiny"}]')
    (tmp_path / "a_file").write_text("a file, not a directory")
    home = tmp_path / "home"
    home.mkdir()
    (home / "keep.txt").write_text("what was here stays")
    before = _files(home)
    start = time.perf_counter()
    out = _cli("run", "prepare", *[a.format(dir=tmp_path) for a in argv], home=home)
    lines = [x for x in out.stderr.splitlines() if x.strip()]
    assert out.returncode == code, out.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and names in lines[0], out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    assert time.perf_counter() - start < 30  # refused before Prefect or any work starts
    assert _files(home) == before
    if "traceback: " in lines[0]:  # where home can hold it, the full traceback is kept for a bug report
        assert "Traceback" in Path(lines[0].rsplit("traceback: ", 1)[1].rstrip(")")).read_text()


def test_yaml_configs_are_read_and_debug_shows_the_traceback(tmp_path):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"preset": "tiny", "data": {"sed": 1}}))
    out = _cli("run", "prepare", "--config", str(tmp_path / "c.yaml"), home=tmp_path / "home")
    assert out.returncode == 2 and "data.sed" in out.stderr  # parsed as YAML, then validated
    debug = _cli("--debug", "run", "prepare", "--config", str(tmp_path / "c.yaml"), home=tmp_path / "home")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_merge_on_a_truncated_safetensors_is_one_line(tmp_path):
    import torch
    from safetensors.torch import save_file

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        save_file({"w": torch.ones(64, 64)}, str(tmp_path / name / "model.safetensors"))
        shutil.copy(REPO / "pyproject.toml", tmp_path / name / "unused.txt")
    data = (tmp_path / "b" / "model.safetensors").read_bytes()
    (tmp_path / "b" / "model.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "m.yaml").write_text("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\n"
                                     "  - model: b\n    parameters: {weight: 1}\n")
    out = _cli("merge", str(tmp_path / "m.yaml"), str(tmp_path / "out"), home=tmp_path / "home")
    lines = [x for x in out.stderr.splitlines() if x.strip()]
    assert out.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert "Traceback" not in out.stderr


def test_a_full_disk_is_recognised_under_the_errors_that_carry_it():
    import errno

    from flows.cli import _disk_full

    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    try:
        raise RuntimeError("saving the checkpoint failed") from full
    except RuntimeError as e:
        wrapped = e
    assert _disk_full(full) and _disk_full(wrapped)
    # safetensors reports it in an error of its own (the run below meets the real one)
    assert _disk_full(RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert not _disk_full(PermissionError(errno.EACCES, "Permission denied")) and not _disk_full(ValueError("nan"))


def test_a_disk_that_fills_mid_run_ends_on_one_line_and_keeps_what_was_finished(tmp_path):
    """A real full disk: the run's home on an 8 MB tmpfs (in a mount namespace of its own), which a second file fills
    once the foundation starts training, past the preflight check that passed."""
    from prefect_stack import MICRO

    config, mnt, keep = tmp_path / "micro.yaml", tmp_path / "mnt", tmp_path / "kept"
    config.write_text(yaml.safe_dump(MICRO))
    mnt.mkdir()
    script = f"""
mount -t tmpfs -o size=24m tmpfs {mnt} || exit 77
fallocate -l 16M {mnt}/fill
AGENT_FORGE_HOME={mnt}/home PREFECT_HOME={tmp_path} WANDB_MODE=disabled {sys.executable} -m flows.cli run cognate \\
    --config {config} --set preflight.disk_headroom_gb=0 > {tmp_path}/out.txt 2> {tmp_path}/err.txt &
run=$!
until grep -qs cognate-foundation {mnt}/home/executions.jsonl || ! kill -0 $run 2>/dev/null; do sleep 0.05; done
fallocate -l $(( $(df -k --output=avail {mnt} | tail -1) - 4 ))K {mnt}/fill2
wait $run
echo $? > {tmp_path}/rc
cp -r {mnt}/home {keep}
"""
    try:
        out = subprocess.run(["unshare", "--mount", "--map-root-user", "sh", "-c", script], cwd=REPO, timeout=300,
                             capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no unshare(1) here to mount a small disk")
    if out.returncode == 77 or "unshare:" in out.stderr:
        pytest.skip(f"this machine lets no test mount a small disk: {out.stderr.strip()[-300:]}")
    assert out.returncode == 0, out.stderr
    err = (tmp_path / "err.txt").read_text()
    assert (tmp_path / "rc").read_text().strip() == "1", err[-3000:]
    [last] = [x for x in err.splitlines() if "cognate failed after" in x]  # the run's last word, one line
    assert "cognate failed after" in last and f"the disk holding {mnt}/home is full" in last, last
    assert "No space left on device" in last and "AGENT_FORGE_HOME" in last
    # what was finished before the disk filled is whole, and no half-written artifact is left behind
    from storage import ArtifactStore

    store = ArtifactStore(keep)
    kinds = sorted(m["kind"] for m in store.list())
    assert kinds[:2] == ["curriculum", "tokenizer"], kinds
    for m in store.list():
        store.verify(m["id"])
    assert not list((keep / "tmp").iterdir())
