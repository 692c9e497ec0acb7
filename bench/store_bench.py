"""Artifact store overhead against plain file I/O, measured in the same run.

    python bench/store_bench.py [--mb 256]

Prints the time to write and to verify-load an artifact of MB bytes through the store, next to the
baselines of writing the same bytes with fsync and of reading them back through sha256, and the ratios.
The last line is one JSON object (``overhead``: store time / baseline time per operation).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

from storage import ArtifactStore, Recipe


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=256)
    args = ap.parse_args()
    payload = os.urandom(args.mb * 1024 * 1024)

    with tempfile.TemporaryDirectory() as d:
        root = Path(d)

        def plain_write() -> None:
            with open(root / "plain.bin", "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())

        def hash_read() -> None:  # what any integrity check must at least do: read and hash once
            h = hashlib.sha256()
            with open(root / "plain.bin", "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)

        st = ArtifactStore(root / "store")
        ref = None

        def store_write() -> None:
            nonlocal ref

            def build(out: Path) -> None:
                with open(out / "weights.bin", "wb") as f:
                    f.write(payload)
                    f.flush()
                    os.fsync(f.fileno())

            ref = st.get_or_create(Recipe(kind="bench", config={"mb": args.mb}), build)

        rows = [
            ("write", _timed(plain_write), _timed(store_write)),
            ("verified load", _timed(hash_read), _timed(lambda: st.load(ref))),
        ]
    print(f"{'operation':<22}{'baseline s':>12}{'store s':>10}{'ratio':>8}   ({args.mb} MB)")
    for name, base, ours in rows:
        print(f"{name:<22}{base:>12.3f}{ours:>10.3f}{ours / base:>8.2f}x")
    print(json.dumps({"bench": "store", "mb": args.mb, "baseline_s": {n: round(b, 4) for n, b, _ in rows},
                      "store_s": {n: round(o, 4) for n, _, o in rows},
                      "overhead": {n: round(o / b, 3) for n, b, o in rows}}))


if __name__ == "__main__":
    main()
