"""Per-file results that are slow to compute (content hashes, classifier probabilities, captions),
kept in append-only JSON Lines files keyed by the image file's identity (path, size, mtime).

An interrupted run loses at most the unflushed tail; a line cut short by the interruption is
ignored on reading.  An edited image has a new identity, so it is computed again.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional


class RecordFile:
    def __init__(self, path: str, flush_every: int = 256):
        self.path = path
        self.flush_every = flush_every
        self.records: Dict[str, dict] = {}
        self._pending: List[str] = []
        if os.path.isfile(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    try:
                        entry = json.loads(line)
                        self.records[entry["key"]] = entry["value"]
                    except (ValueError, KeyError, TypeError):
                        continue  # the last line of an interrupted run

    def get(self, key: str) -> Optional[dict]:
        return self.records.get(key)

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def put(self, key: str, value) -> None:
        self.records[key] = value
        self._pending.append(json.dumps({"key": key, "value": value}, ensure_ascii=False))
        if len(self._pending) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "a+b") as f:
            f.seek(0, os.SEEK_END)
            if f.tell():
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # a line cut short by an interruption: start a new one
                    f.write(b"\n")
            f.write(("\n".join(self._pending) + "\n").encode("utf-8"))
        self._pending = []
