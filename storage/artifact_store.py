"""The local artifact store.

Layout under the root (``AGENT_FORGE_HOME``, default ``./.agent-forge``)::

    artifacts/<kind>/<id>/           the files and manifest.json
    tmp/<kind>-<id>.<pid>.<nonce>/   a write in progress (never looks whole)
    locks/<id>.lock                  flock held while one process builds an id
    quarantine/<kind>-<id>.<n>/      a corrupt artifact moved aside (NOTE.txt says why), never reused

The id is the recipe key (kind, input ids, config, code version), so the same recipe always lands on
the same directory and a finished step is found instead of recomputed. A write builds everything in
``tmp/``, hashes it, writes ``manifest.json`` last and renames the directory into place: a reader
sees either nothing or a whole artifact. A manifest lists every file with size and sha256, and a
load re-hashes them, so a flipped byte is an error naming the artifact, never silently used. Asked to
reuse a corrupt artifact, ``get_or_create`` moves it to ``quarantine/`` and builds the recipe again.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import socket
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from storage.durable import fsync_dir, pid_alive, write_durably
from storage.hashing import canonical_json, recipe_key, sha256_file

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


def default_home() -> Path:
    return Path(os.environ.get("AGENT_FORGE_HOME", "./.agent-forge")).expanduser().resolve()


class ArtifactError(RuntimeError):
    """Base class: anything wrong with an artifact or the store."""


class ArtifactNotFound(ArtifactError):
    pass


class CorruptArtifact(ArtifactError):
    pass


class Recipe(BaseModel):
    """What an artifact is made from. Its key is the artifact's id."""

    model_config = ConfigDict(frozen=True)

    kind: str
    inputs: tuple[str, ...] = ()
    config: dict[str, Any] = Field(default_factory=dict)
    code_version: str = "1"

    @property
    def key(self) -> str:
        return recipe_key(self.kind, list(self.inputs), _jsonable(self.config), self.code_version)


class ArtifactRef(BaseModel):
    """The small handle tasks return to Prefect; the bytes stay in the store."""

    model_config = ConfigDict(frozen=True)

    kind: str
    id: str
    path: str
    manifest_sha256: str

    def __str__(self) -> str:
        return f"{self.kind}/{self.id}"


def _jsonable(obj: Any) -> Any:
    return json.loads(canonical_json(obj))


def _check_name(what: str, name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise ArtifactError(
            f"invalid artifact {what} {name!r}: use 1-64 characters of a-z, 0-9, '_', '.', '-' "
            "(no path separators, no '..')"
        )
    return name


class ArtifactStore:
    def __init__(self, root: str | os.PathLike[str] | None = None, on_repair: Callable[[str], None] | None = None):
        self.on_repair = on_repair  # told, in one line, of every corrupt artifact moved aside
        self.root = Path(root).expanduser().resolve() if root is not None else default_home()
        self.artifacts_dir = self.root / "artifacts"
        self.tmp_dir = self.root / "tmp"
        self.locks_dir = self.root / "locks"
        self.quarantine_dir = self.root / "quarantine"

    # ---------------------------------------------------------------- paths
    def _inside(self, path: Path) -> Path:
        resolved = path.resolve()
        if not resolved.is_relative_to(self.root):
            raise ArtifactError(f"path {path} escapes the store root {self.root}")
        return resolved

    def artifact_dir(self, kind: str, artifact_id: str) -> Path:
        return self._inside(self.artifacts_dir / _check_name("kind", kind) / _check_name("id", artifact_id))

    def _ensure_dirs(self) -> None:
        for d in (self.artifacts_dir, self.tmp_dir, self.locks_dir):
            try:
                d.mkdir(parents=True, exist_ok=True)
            except (FileExistsError, NotADirectoryError) as e:
                raise ArtifactError(f"cannot use store root {self.root}: {d} is not a directory") from e

    # ---------------------------------------------------------------- lookup
    def _find_dir(self, artifact_id: str) -> Path:
        """An artifact's directory from its id, or a unique id prefix (as git allows)."""
        if not self.artifacts_dir.is_dir():
            raise ArtifactNotFound(f"artifact {artifact_id!r} not found: the store {self.root} is empty")
        prefix = artifact_id.split("/")[-1]
        _check_name("id", prefix)
        hits = [d for d in self.artifacts_dir.glob(f"*/{prefix}*") if d.is_dir()]
        exact = [d for d in hits if d.name == prefix]
        if exact:
            hits = exact
        if not hits:
            raise ArtifactNotFound(f"artifact {artifact_id!r} not found in {self.artifacts_dir}")
        if len(hits) > 1:
            names = ", ".join(f"{d.parent.name}/{d.name}" for d in hits[:5])
            raise ArtifactError(f"artifact id {artifact_id!r} is ambiguous: {names}")
        return hits[0]

    def find(self, recipe: Recipe) -> ArtifactRef | None:
        """The finished artifact for this recipe, verified, or None if it was never made."""
        d = self.artifact_dir(recipe.kind, recipe.key)
        if not d.exists():
            return None
        return self._verified_ref(d)

    def manifest(self, ref_or_id: ArtifactRef | str) -> dict[str, Any]:
        d = self._dir_of(ref_or_id)
        return self._read_manifest(d)

    def _dir_of(self, ref_or_id: ArtifactRef | str) -> Path:
        if isinstance(ref_or_id, ArtifactRef):
            d = self.artifact_dir(ref_or_id.kind, ref_or_id.id)
            if not d.exists():
                raise ArtifactNotFound(
                    f"artifact {ref_or_id} is missing: expected at {d} (was the store moved or cleaned?)"
                )
            return d
        return self._find_dir(ref_or_id)

    def _read_manifest(self, d: Path) -> dict[str, Any]:
        name = f"{d.parent.name}/{d.name}"
        try:
            text = (d / MANIFEST).read_text()
        except FileNotFoundError:
            raise CorruptArtifact(f"artifact {name} at {d} has no {MANIFEST}") from None
        try:
            manifest = json.loads(text)
        except json.JSONDecodeError as e:
            raise CorruptArtifact(f"artifact {name} at {d}: {MANIFEST} is not valid JSON ({e})") from None
        if manifest.get("id") != d.name or manifest.get("kind") != d.parent.name:
            raise CorruptArtifact(f"artifact {name} at {d}: manifest names {manifest.get('kind')}/{manifest.get('id')}")
        return manifest

    # ---------------------------------------------------------------- verify / load
    def verify(self, ref_or_id: ArtifactRef | str) -> dict[str, Any]:
        """Re-hash every file against the manifest. Raises CorruptArtifact naming the artifact."""
        return self._verify_dir(self._dir_of(ref_or_id))

    def _verify_dir(self, d: Path) -> dict[str, Any]:
        manifest = self._read_manifest(d)
        name = f"{manifest['kind']}/{manifest['id']}"
        listed = manifest.get("files", {})
        present = {p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file() or p.is_symlink()}
        present.discard(MANIFEST)
        problems = []
        for rel in sorted(set(listed) - present):
            problems.append(f"{rel}: missing")
        for rel in sorted(present - set(listed)):
            problems.append(f"{rel}: not in the manifest")
        for rel in sorted(set(listed) & present):
            p = d / rel
            if p.is_symlink():
                problems.append(f"{rel}: is a symlink")
                continue
            meta = listed[rel]
            size = p.stat().st_size
            if size != meta["size"]:
                problems.append(f"{rel}: size {size} != {meta['size']}")
            elif sha256_file(p) != meta["sha256"]:
                problems.append(f"{rel}: sha256 mismatch")
        if problems:
            raise CorruptArtifact(f"artifact {name} at {d} is corrupt: " + "; ".join(problems))
        return manifest

    def load(self, ref_or_id: ArtifactRef | str, verify: bool = True) -> Path:
        """The artifact's directory, after checking its hashes."""
        d = self._dir_of(ref_or_id)
        if verify:
            self._verify_dir(d)
        return d

    def _verified_ref(self, d: Path) -> ArtifactRef:
        return self._ref(d, self._verify_dir(d))

    def _ref(self, d: Path, manifest: dict[str, Any]) -> ArtifactRef:
        return ArtifactRef(
            kind=manifest["kind"], id=manifest["id"], path=str(d), manifest_sha256=sha256_file(d / MANIFEST)
        )

    def ref(self, artifact_id: str) -> ArtifactRef:
        d = self._find_dir(artifact_id)
        return self._ref(d, self._read_manifest(d))

    # ---------------------------------------------------------------- write
    @contextlib.contextmanager
    def _lock(self, artifact_id: str) -> Iterator[None]:
        """Serialise builders of one id across processes; the kernel drops it if the holder dies."""
        with open(self.locks_dir / f"{artifact_id}.lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _sweep_stale_tmp(self, kind: str, artifact_id: str) -> None:
        """Remove temp dirs of this id left by writers that died (e.g. SIGKILL)."""
        for t in self.tmp_dir.glob(f"{kind}-{artifact_id}.*"):
            try:
                pid = int(t.name.split(".")[1])
            except (IndexError, ValueError):
                continue
            if not pid_alive(pid):
                shutil.rmtree(t, ignore_errors=True)

    def get_or_create(
        self,
        recipe: Recipe,
        build: Callable[[Path], dict[str, Any] | None],
        producer: dict[str, Any] | None = None,
        on_repair: Callable[[str], None] | None = None,
    ) -> ArtifactRef:
        """Return the artifact for ``recipe``, building it with ``build(tmp_dir) -> metrics`` if absent.

        ``build`` writes its files into the directory it is given and returns metrics for the manifest.
        A stored artifact that fails verification is quarantined (``on_repair`` gets one line saying so)
        and built again: the recipe is all it takes, so a corrupt copy never has to be reused.
        """
        kind, artifact_id = _check_name("kind", recipe.kind), recipe.key
        final = self.artifact_dir(kind, artifact_id)
        if final.exists() and (ref := self.verified_or_quarantined(final, on_repair)) is not None:
            return ref
        self._ensure_dirs()
        with self._lock(artifact_id):
            if final.exists() and (ref := self.verified_or_quarantined(final, on_repair)) is not None:
                return ref  # another process finished it while we waited
            self._sweep_stale_tmp(kind, artifact_id)
            tmp = self.tmp_dir / f"{kind}-{artifact_id}.{os.getpid()}.{secrets.token_hex(4)}"
            tmp.mkdir()
            try:
                metrics = build(tmp) or {}
                manifest = self._manifest(recipe, tmp, metrics, producer)
                write_durably(tmp / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True, default=str))
                try:
                    final.parent.mkdir(parents=True, exist_ok=True)
                except (FileExistsError, NotADirectoryError):
                    raise ArtifactError(
                        f"cannot write artifact {kind}/{artifact_id}: {final.parent} exists and is not a "
                        "directory; remove or rename it, or point AGENT_FORGE_HOME elsewhere"
                    ) from None
                try:
                    os.rename(tmp, final)
                except OSError as e:
                    if e.errno in (errno.ENOTEMPTY, errno.EEXIST) and final.exists():
                        shutil.rmtree(tmp, ignore_errors=True)  # a writer without our lock won the race
                        return self._verified_ref(final)
                    raise ArtifactError(f"cannot move artifact {kind}/{artifact_id} into {final}: {e}") from e
                fsync_dir(final.parent)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        return self._ref(final, manifest)

    # ---------------------------------------------------------------- repair
    def verified_or_quarantined(self, d: Path, on_repair: Callable[[str], None] | None = None) -> ArtifactRef | None:
        """``d``'s verified ref, or None after moving a corrupt ``d`` to quarantine."""
        try:
            return self._verified_ref(d)
        except CorruptArtifact as e:
            moved = self.quarantine(d, str(e))
            on_repair = on_repair or self.on_repair
            if on_repair is not None:
                on_repair(f"{e}; moved to {moved}; building it again from its recipe")
            return None

    def quarantine(self, d: Path, reason: str) -> Path:
        """Move artifact directory ``d`` aside, with a NOTE.txt saying why; the next build makes it anew."""
        self.quarantine_dir.mkdir(parents=True, exist_ok=True)
        n = len(list(self.quarantine_dir.glob(f"{d.parent.name}-{d.name}.*")))
        target = self.quarantine_dir / f"{d.parent.name}-{d.name}.{n}"
        os.rename(d, target)
        write_durably(target / "NOTE.txt", f"quarantined {datetime.now(UTC).isoformat()}: {reason}\n")
        fsync_dir(d.parent)
        return target

    def times_quarantined(self, kind: str, artifact_id: str) -> int:
        return len(list(self.quarantine_dir.glob(f"{kind}-{artifact_id}.*"))) if self.quarantine_dir.exists() else 0

    def _manifest(
        self, recipe: Recipe, tmp: Path, metrics: dict[str, Any], producer: dict[str, Any] | None
    ) -> dict[str, Any]:
        files = {}
        for p in sorted(tmp.rglob("*")):
            if p.is_symlink():
                raise ArtifactError(f"artifact {recipe.kind}/{recipe.key}: {p.name} is a symlink; store real files")
            if p.is_file():
                files[p.relative_to(tmp).as_posix()] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
        return {
            "schema": SCHEMA_VERSION,
            "id": recipe.key,
            "kind": recipe.kind,
            "inputs": list(recipe.inputs),
            "config": _jsonable(recipe.config),
            "code_version": recipe.code_version,
            "producer": {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "created_at": datetime.now(UTC).isoformat(),
                **(producer or {}),
            },
            "metrics": _jsonable(metrics),
            "files": files,
        }

    # ---------------------------------------------------------------- listing
    def list(self, kind: str | None = None) -> list[dict[str, Any]]:
        """Manifests of all artifacts (oldest first); unreadable ones are listed with an error field."""
        if not self.artifacts_dir.is_dir():
            return []
        pattern = f"{_check_name('kind', kind)}/*" if kind else "*/*"
        out = []
        for d in self.artifacts_dir.glob(pattern):
            if not d.is_dir():
                continue
            try:
                out.append(self._read_manifest(d))
            except CorruptArtifact as e:
                out.append({"id": d.name, "kind": d.parent.name, "error": str(e), "producer": {}})
        return sorted(out, key=lambda m: (m.get("producer", {}).get("created_at", ""), m["kind"], m["id"]))

    def lineage(self, artifact_id: str) -> dict[str, Any]:
        """The tree of inputs this artifact was made from, read from manifests (never from W&B)."""

        def walk(aid: str, seen: frozenset[str]) -> dict[str, Any]:
            try:
                m = self.manifest(aid)
            except ArtifactError as e:
                return {"id": aid, "error": str(e), "inputs": []}
            node = {"id": m["id"], "kind": m["kind"], "inputs": []}
            if m["id"] in seen:
                node["cycle"] = True
                return node
            node["inputs"] = [walk(i, seen | {m["id"]}) for i in m.get("inputs", [])]
            return node

        return walk(artifact_id, frozenset())

    def read_json(self, ref: ArtifactRef, relpath: str) -> Any:
        return json.loads(self.file(ref, relpath).read_text())

    def file(self, ref: ArtifactRef, relpath: str) -> Path:
        d = self._dir_of(ref)
        p = self._inside(d / relpath)
        if not p.is_relative_to(d.resolve()):
            raise ArtifactError(f"{relpath!r} escapes artifact {ref}")
        if not p.exists():
            raise ArtifactNotFound(f"artifact {ref} has no file {relpath!r}")
        return p
