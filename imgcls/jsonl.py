"""JSON Lines: one reader for metrics.jsonl, attempts.jsonl, resumes.jsonl, ...

A process killed mid-append (or an object store rewrite cut short) can leave one torn
line. A torn line is skipped with a warning naming the file and line, never a crash: the
records around it are still good, and a resume must not die on a log file.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from shardio import storage

log = logging.getLogger(__name__)


def parse_jsonl(text: str, source: str) -> tuple[list[dict], list[int]]:
    """(records, numbers of the lines that are not a JSON object) of JSONL `text`."""
    records, torn = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            torn.append(number)
    if torn:
        log.warning("%s: skipped %d line(s) that are not JSON records (a torn write?): line %s",
                    source, len(torn), ", ".join(map(str, torn)))
    return records, torn


def read_jsonl(url: str | Path) -> list[dict]:
    """The records of a JSONL file (path or URL; [] when it does not exist), torn lines skipped."""
    url = str(url)
    if not storage.exists(url):
        return []
    return parse_jsonl(storage.read_bytes(url).decode(errors="replace"), url)[0]
