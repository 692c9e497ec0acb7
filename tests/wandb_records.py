"""Read back what W&B wrote offline: the records of a run-*.wandb file (a LevelDB-style log of
protobuf Records), so tests check W&B's own file, not our memory of what we sent."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2 as pb

_HEADER = 7  # ":W&B" ident, 2-byte magic, 1-byte version
_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def records(path: Path) -> list[pb.Record]:
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B transaction log")
    out, pos, pending = [], _HEADER, b""
    while pos + 7 <= len(data):
        left_in_block = _BLOCK - (pos % _BLOCK)
        if left_in_block < 7:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        payload = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == _FULL:
            pending = payload
        elif kind == _FIRST:
            pending = payload
            continue
        elif kind == _MIDDLE:
            pending += payload
            continue
        elif kind == _LAST:
            pending += payload
        else:
            break
        rec = pb.Record()
        rec.ParseFromString(pending)
        out.append(rec)
        pending = b""
    return out


def summary(path: Path) -> dict[str, Any]:
    """The run summary as W&B recorded it (later updates win)."""
    out: dict[str, Any] = {}
    for rec in records(path):
        if rec.WhichOneof("record_type") == "summary":
            for item in rec.summary.update:
                key = item.key or "/".join(item.nested_key)
                out[key] = json.loads(item.value_json)
    return out


def run_info(path: Path) -> dict[str, str]:
    for rec in records(path):
        if rec.WhichOneof("record_type") == "run":
            return {"group": rec.run.run_group, "job_type": rec.run.job_type, "project": rec.run.project}
    return {}
