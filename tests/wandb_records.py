"""Read the records of a wandb offline run file (run-ID.wandb) to check what was logged.

The file is ':W&B' + magic + version, then LevelDB-log framed protobuf `Record`s in 32 KiB
blocks (wandb 0.31 ships no reader for it).
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768
HEADER = 7


def records(path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a wandb run file")
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a record header never straddles a block: the tail is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        payload = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind in (1, 4):  # full, or last chunk
            record = pb.Record()
            record.ParseFromString(pending + payload)
            pending = b""
            yield record
        elif kind in (2, 3):  # first or middle chunk
            pending += payload
        else:
            break  # zero padding after the last record


def logged_steps(path) -> list[int]:
    """The value of our `step` metric in each history row, in file order."""
    steps = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
            if "step" in items:
                steps.append(json.loads(items["step"]))
    return steps


def run_id(path) -> str:
    for record in records(path):
        if record.WhichOneof("record_type") == "run":
            return record.run.run_id
    raise ValueError(f"{path}: no run record")
