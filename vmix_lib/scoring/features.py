"""Image features cached per image file, streamed to disk in safetensors shards.

    cache = FeatureCache("out/features", clip.identity)
    result = embed_image_files(paths, cache, clip.pixel_values, clip.embed_pixels, batch_size=32)
    result.embeds            # [n_ok, D] float32, rows in the order of result.paths
    result.failures          # [(path, reason)] for files that cannot be decoded

A file is identified by its absolute path, size and modification time, so an edited or replaced image
is encoded again; a cache folder per model identity keeps features of other weights apart.  Shards
are written atomically every ``shard_size`` new features or ``flush_seconds`` after the last one,
whichever comes first, and when the encoding loop is left for any reason (Ctrl-C included): an
interruption keeps every finished feature, a killed process loses at most a minute of work, and a
rerun encodes only what is missing.  A file that cannot be decoded (truncated, corrupt) is recorded
in ``failures.jsonl`` under the same identity, so a rerun reports it again without decoding it
again.  Pixels never accumulate: each batch is decoded, encoded and dropped.
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .errors import ScoringError
from .images import file_key, read_image

_SHARD_RE = re.compile(r"^shard-(\d{6})\.safetensors$")
FAILURES = "failures.jsonl"
_clock = time.monotonic  # tests replace it


class FeatureCache:
    def __init__(self, folder: str, identity: str, shard_size: int = 1024, flush_seconds: float = 60.0):
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", identity):
            raise ValueError(f"cache identity {identity!r} must be a plain file name")
        self.folder = os.path.join(folder, identity)
        self.shard_size = shard_size
        self.flush_seconds = flush_seconds
        self._where: Dict[str, Tuple[str, int]] = {}  # key -> (shard file, row)
        self._loaded: Dict[str, torch.Tensor] = {}
        self._pending_keys: List[str] = []
        self._pending: List[torch.Tensor] = []
        self._next = 0
        self._flushed_at = _clock()
        self._failed: Dict[str, str] = {}  # key -> why the file cannot be decoded
        if os.path.isdir(self.folder):
            self._scan()
            self._read_failures()

    def _read_failures(self) -> None:
        path = os.path.join(self.folder, FAILURES)
        if not os.path.isfile(path):
            return
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                    self._failed[str(entry["key"])] = str(entry["reason"])
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by an interruption

    def failure(self, key: str) -> Optional[str]:
        """Why the file of ``key`` could not be decoded before (None: no failure recorded)."""
        return self._failed.get(key)

    def add_failure(self, key: str, reason: str) -> None:
        """Record that the file of ``key`` cannot be decoded (written at once: failures are few)."""
        self._failed[key] = reason
        os.makedirs(self.folder, exist_ok=True)
        path = os.path.join(self.folder, FAILURES)
        with open(path, "a+b") as f:
            f.seek(0, os.SEEK_END)
            if f.tell():
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # a line cut short by an interruption: start a new one
                    f.write(b"\n")
            f.write((json.dumps({"key": key, "reason": reason}, ensure_ascii=False) + "\n").encode("utf-8"))

    def _scan(self) -> None:
        from safetensors import safe_open

        for name in sorted(os.listdir(self.folder)):
            m = _SHARD_RE.match(name)
            if not m:
                continue
            path = os.path.join(self.folder, name)
            self._next = max(self._next, int(m.group(1)) + 1)
            try:
                with safe_open(path, "pt") as f:
                    keys = json.loads((f.metadata() or {})["keys"])
            except Exception as e:  # a damaged shard: its images are encoded again
                raise ScoringError(
                    f"feature cache shard {path} is damaged ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                    "delete it and run again (only its images are encoded again)"
                ) from None
            for row, key in enumerate(keys):
                self._where[key] = (path, row)

    def __contains__(self, key: str) -> bool:
        return key in self._where or key in self._pending_keys

    def __len__(self) -> int:
        return len(self._where) + len(self._pending_keys)

    def add(self, keys: Sequence[str], embeds: torch.Tensor) -> None:
        for key, row in zip(keys, embeds.detach().float().cpu()):
            self._pending_keys.append(key)
            self._pending.append(row)
        if len(self._pending_keys) >= self.shard_size or _clock() - self._flushed_at >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        self._flushed_at = _clock()
        if not self._pending_keys:
            return
        from safetensors.torch import save_file

        os.makedirs(self.folder, exist_ok=True)
        path = os.path.join(self.folder, f"shard-{self._next:06d}.safetensors")
        save_file({"embeds": torch.stack(self._pending).contiguous()}, path + ".tmp",
                  metadata={"keys": json.dumps(self._pending_keys)})
        os.replace(path + ".tmp", path)
        for row, key in enumerate(self._pending_keys):
            self._where[key] = (path, row)
        self._next += 1
        self._pending_keys, self._pending = [], []

    def get(self, keys: Sequence[str]) -> torch.Tensor:
        """[len(keys), D] for cached keys (KeyError for one that is not)."""
        from safetensors.torch import load_file

        self.flush()
        rows = []
        for key in keys:
            path, row = self._where[key]
            if path not in self._loaded:
                self._loaded[path] = load_file(path)["embeds"]
            rows.append(self._loaded[path][row])
        return torch.stack(rows) if rows else torch.zeros(0, 0)


class _Decode(torch.utils.data.Dataset):
    """Decodes and preprocesses one file per item; a failure is returned, not raised, with whether it
    belongs to the file's content (cached) or to its access (permissions, a file moved: not cached)."""

    def __init__(self, paths: Sequence[str], preprocess: Callable):
        self.paths, self.preprocess = list(paths), preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return i, self.preprocess([read_image(self.paths[i])])[0], None, False
        except Exception as e:  # PIL raises many kinds; the message is what the user needs
            access = isinstance(e, OSError) and e.errno is not None  # PIL's decode errors carry no errno
            return i, None, (str(e) or type(e).__name__).splitlines()[0], not access


def _collate(items):
    return items


@dataclass
class EmbedResult:
    paths: List[str]  # the files that were read, in input order
    embeds: torch.Tensor  # [len(paths), D]
    failures: List[Tuple[str, str]] = field(default_factory=list)  # (path, reason)
    computed: int = 0  # how many were encoded in this call (the rest came from the cache)


def embed_image_files(
    paths: Sequence[str],
    cache: Optional[FeatureCache],
    preprocess: Callable,
    embed: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int = 32,
    workers: int = 0,
    progress=None,
    desc: str = "encoding images",
) -> EmbedResult:
    """Features of every file, from ``cache`` where present, else decoded and encoded in batches.

    ``preprocess(list of PIL images) -> tensor [B, ...]`` runs in DataLoader workers;
    ``embed(tensor) -> [B, D]`` on the model's device.
    """
    if progress is None:
        from tqdm import tqdm as progress
    keys: List[Optional[str]] = []
    failures: Dict[int, str] = {}
    for i, path in enumerate(paths):
        try:
            keys.append(file_key(path))
        except OSError as e:
            keys.append(None)
            failures[i] = e.strerror or str(e)
    if cache is not None:  # files that failed to decode before, with the same identity
        for i, k in enumerate(keys):
            if k is not None and cache.failure(k) is not None:
                failures[i] = cache.failure(k)
    todo = [i for i, k in enumerate(keys) if k is not None and i not in failures and (cache is None or k not in cache)]
    fresh: Dict[int, torch.Tensor] = {}
    computed = 0
    if todo:
        loader = torch.utils.data.DataLoader(
            _Decode([paths[i] for i in todo], preprocess), batch_size=batch_size, num_workers=workers,
            collate_fn=_collate, pin_memory=torch.cuda.is_available(), persistent_workers=False,
        )
        bar = progress(total=len(todo), desc=desc, unit="img")
        try:
            for batch in loader:
                ok = [(todo[j], pixels) for j, pixels, error, _ in batch if error is None]
                for j, _, error, lasting in batch:
                    if error is not None:
                        failures[todo[j]] = error
                        if cache is not None and lasting:
                            cache.add_failure(keys[todo[j]], error)
                if ok:
                    computed += len(ok)
                    out = embed(torch.stack([p for _, p in ok])).float().cpu()
                    if cache is not None:
                        cache.add([keys[i] for i, _ in ok], out)
                    else:
                        fresh.update({i: row for (i, _), row in zip(ok, out)})
                bar.update(len(batch))
        finally:  # also on Ctrl-C: every feature computed so far is kept
            if cache is not None:
                cache.flush()
        bar.close()
    good = [i for i in range(len(paths)) if i not in failures]
    if cache is not None:
        embeds = cache.get([keys[i] for i in good])
    else:
        embeds = torch.stack([fresh[i] for i in good]) if good else torch.zeros(0, 0)
    return EmbedResult([paths[i] for i in good], embeds, [(paths[i], failures[i]) for i in sorted(failures)], computed)
