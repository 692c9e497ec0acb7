import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from storage import ArtifactError, ArtifactNotFound, ArtifactStore, CorruptArtifact, Recipe


def _write(out: Path, payload: bytes = b"weights" * 1000) -> dict:
    (out / "model.bin").write_bytes(payload)
    (out / "sub").mkdir()
    (out / "sub" / "config.json").write_text('{"a": 1}')
    return {"loss": 1.5}


def test_recipe_key_is_stable_and_sensitive():
    a = Recipe(kind="model", inputs=("x",), config={"lr": 1e-3, "n": 2})
    same = Recipe(kind="model", inputs=("x",), config={"n": 2, "lr": 1e-3})
    assert a.key == same.key
    assert a.key != Recipe(kind="model", inputs=("y",), config={"lr": 1e-3, "n": 2}).key
    assert a.key != Recipe(kind="model", inputs=("x",), config={"lr": 2e-3, "n": 2}).key
    assert a.key != Recipe(kind="model", inputs=("x",), config={"lr": 1e-3, "n": 2}, code_version="2").key


def test_manifest_holds_lineage_config_producer_metrics_hashes(tmp_path):
    st = ArtifactStore(tmp_path)
    parent = st.get_or_create(Recipe(kind="data", config={"s": 1}), _write)
    ref = st.get_or_create(Recipe(kind="model", inputs=(parent.id,), config={"lr": 0.1}), _write, {"task": "t"})
    m = st.manifest(ref)
    assert m["inputs"] == [parent.id] and m["config"] == {"lr": 0.1} and m["metrics"] == {"loss": 1.5}
    assert m["producer"]["task"] == "t" and m["producer"]["pid"] == os.getpid()
    assert set(m["files"]) == {"model.bin", "sub/config.json"}
    assert all(len(f["sha256"]) == 64 for f in m["files"].values())
    assert st.lineage(ref.id)["inputs"][0]["id"] == parent.id


def test_same_recipe_is_built_once(tmp_path):
    st, calls = ArtifactStore(tmp_path), []
    r = Recipe(kind="model", config={"a": 1})
    first = st.get_or_create(r, lambda out: calls.append(1) or _write(out))
    second = st.get_or_create(r, lambda out: calls.append(1) or _write(out))
    assert first == second and calls == [1]


def test_flipped_byte_is_detected_by_verify_and_load(tmp_path):
    st = ArtifactStore(tmp_path)
    ref = st.get_or_create(Recipe(kind="model"), _write)
    f = Path(ref.path) / "model.bin"
    data = bytearray(f.read_bytes())
    data[100] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifact, match=rf"model/{ref.id}.*model.bin: sha256 mismatch"):
        st.verify(ref.id)
    with pytest.raises(CorruptArtifact, match=ref.id):
        st.load(ref)
    # a corrupt artifact is never silently rebuilt over: it is moved aside, kept, and reported
    told = []
    ArtifactStore(tmp_path, on_repair=told.append).get_or_create(Recipe(kind="model"), _write)
    assert told and (tmp_path / "quarantine" / f"model-{ref.id}.0" / "model.bin").read_bytes() == bytes(data)


def test_missing_and_extra_files_and_missing_artifact(tmp_path):
    st = ArtifactStore(tmp_path)
    ref = st.get_or_create(Recipe(kind="model"), _write)
    (Path(ref.path) / "sub" / "config.json").unlink()
    (Path(ref.path) / "stray.txt").write_text("x")
    with pytest.raises(CorruptArtifact, match=r"sub/config.json: missing.*stray.txt: not in the manifest"):
        st.verify(ref)
    with pytest.raises(ArtifactNotFound, match="deadbeef"):
        st.load("deadbeef")
    (Path(ref.path) / "manifest.json").write_text("{not json")
    with pytest.raises(CorruptArtifact, match="not valid JSON"):
        st.verify(ref)


@pytest.mark.parametrize("kind", ["../evil", "a/b", "..", "/abs", "UPPER", ""])
def test_names_cannot_escape_the_root(tmp_path, kind):
    st = ArtifactStore(tmp_path)
    with pytest.raises(ArtifactError, match="invalid artifact kind"):
        st.get_or_create(Recipe(kind=kind), _write)
    assert not (tmp_path.parent / "evil").exists()


def test_lookup_and_file_access_cannot_escape(tmp_path):
    st = ArtifactStore(tmp_path)
    ref = st.get_or_create(Recipe(kind="model"), _write)
    with pytest.raises(ArtifactError):
        st.load("../../etc")
    with pytest.raises(ArtifactError, match="escapes"):
        st.file(ref, "../../../../etc/passwd")


def test_symlinks_are_refused(tmp_path):
    st = ArtifactStore(tmp_path / "store")
    (tmp_path / "secret").write_text("s")

    def build(out: Path) -> None:
        (out / "link").symlink_to(tmp_path / "secret")

    with pytest.raises(ArtifactError, match="symlink"):
        st.get_or_create(Recipe(kind="model"), build)
    assert st.list() == []


_SLOW_WRITER = """
import sys, time
from pathlib import Path
from storage import ArtifactStore, Recipe
def build(out):
    (out / "part1.bin").write_bytes(b"a" * 100000)
    Path(sys.argv[2]).write_text("started")
    time.sleep(60)
    (out / "part2.bin").write_bytes(b"b")
ArtifactStore(sys.argv[1]).get_or_create(Recipe(kind="model", config={"k": 1}), build)
"""


def test_sigkill_mid_write_leaves_nothing_that_looks_whole(tmp_path):
    root, flag = tmp_path / "store", tmp_path / "started"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(root), str(flag)])
    deadline = time.monotonic() + 60
    while not flag.exists():
        assert time.monotonic() < deadline and proc.poll() is None, "writer never started"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    st = ArtifactStore(root)
    recipe = Recipe(kind="model", config={"k": 1})
    assert st.find(recipe) is None and st.list() == []
    assert any(root.joinpath("tmp").iterdir())  # the half-write is in tmp/, never in artifacts/
    ref = st.get_or_create(recipe, lambda out: (out / "part1.bin").write_bytes(b"ok") and None)
    assert st.verify(ref)["files"]["part1.bin"]["size"] == 2
    assert not any(root.joinpath("tmp").iterdir())  # the dead writer's temp dir was swept


def _concurrent_writer(root: str, barrier, out_q) -> None:
    st = ArtifactStore(root)
    barrier.wait()

    def build(out: Path) -> dict:
        (out / "w.bin").write_bytes(os.urandom(50000))
        (out / "pid").write_text(str(os.getpid()))
        return {"pid": os.getpid()}

    out_q.put(st.get_or_create(Recipe(kind="model", config={"same": True}), build).model_dump())


def test_concurrent_writers_of_one_recipe_end_with_one_artifact(tmp_path):
    ctx = mp.get_context("spawn")
    barrier, q = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_concurrent_writer, args=(str(tmp_path), barrier, q)) for _ in range(4)]
    for p in procs:
        p.start()
    refs = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert len({json.dumps(r, sort_keys=True) for r in refs}) == 1
    st = ArtifactStore(tmp_path)
    assert len(st.list()) == 1
    st.verify(refs[0]["id"])
    assert not any((tmp_path / "tmp").iterdir())


def test_unwritable_location_is_a_clear_error_and_recoverable(tmp_path):
    st = ArtifactStore(tmp_path)
    st._ensure_dirs()
    (tmp_path / "artifacts" / "model").write_text("a file where a directory belongs")
    with pytest.raises(ArtifactError, match="exists and is not a directory"):
        st.get_or_create(Recipe(kind="model"), _write)
    (tmp_path / "artifacts" / "model").unlink()
    assert st.get_or_create(Recipe(kind="model"), _write).kind == "model"


def test_failed_build_leaves_nothing(tmp_path):
    st = ArtifactStore(tmp_path)

    def boom(out: Path) -> None:
        (out / "half").write_text("x")
        raise RuntimeError("NaN loss")

    with pytest.raises(RuntimeError, match="NaN loss"):
        st.get_or_create(Recipe(kind="model"), boom)
    assert st.list() == [] and not any((tmp_path / "tmp").iterdir())


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_corrupt_artifact_is_quarantined_with_a_note_and_built_again(tmp_path, damage):
    told = []
    st = ArtifactStore(tmp_path, on_repair=told.append)
    recipe = Recipe(kind="model", config={"n": 1})
    ref = st.get_or_create(recipe, _write)
    weights = Path(ref.path) / "model.bin"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else bytes([data[0] ^ 1]) + data[1:])

    builds = []
    again = st.get_or_create(recipe, lambda out: builds.append(1) or _write(out))
    assert builds == [1] and again.id == ref.id
    assert (Path(again.path) / "model.bin").read_bytes() == data and st.verify(again.id)
    assert len(told) == 1 and "\n" not in told[0] and f"model/{ref.id}" in told[0] and "quarantine" in told[0]
    [moved] = (tmp_path / "quarantine").iterdir()
    assert moved.name == f"model-{ref.id}.0" and "corrupt" in (moved / "NOTE.txt").read_text()
    assert st.times_quarantined("model", ref.id) == 1
    assert [m["id"] for m in st.list()] == [ref.id]  # the quarantined copy is not an artifact any more
