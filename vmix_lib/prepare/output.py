"""The dataset folder: unique flat names, images linked or copied, metadata.jsonl, scores and report.

    OUTPUT/
      metadata.jsonl           what the trainer reads: file_name, text (caption), labels
      NAME.png ...             the images: symbolic links (default), hard links or copies
      prepare/                 raw scores (scores.csv), report.json, overrides.csv, the caches
      review/                  index.html, one page per dimension, histograms (PNG)

The output folder belongs to this tool: a first run needs it new or empty, later runs refuse it if
files appeared that the tool did not write.  Every image the tool places is recorded first in
``prepare/written.jsonl``, so an interrupted run is tidied up by the next one; only images the tool
placed are ever replaced or removed, and the originals are never touched.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Dict, Iterable, Sequence, Tuple

from .errors import PrepareError

WORK = "prepare"
REVIEW = "review"
METADATA = "metadata.jsonl"
MANIFEST = "written.jsonl"
_PARTIAL = ".partial"


def dataset_names(rels: Sequence[str]) -> Dict[str, str]:
    """input path -> a unique flat name: 'a/b/c.png' -> 'a__b__c.png'; clashing stems (also across
    letter case and extensions: the trainer pairs NAME.txt/NAME.json by stem) get -2, -3, ..."""
    names: Dict[str, str] = {}
    used = set()
    for rel in sorted(rels):
        flat = rel.replace("/", "__")
        stem, ext = os.path.splitext(flat)
        candidate, k = flat, 2
        while os.path.splitext(candidate)[0].lower() in used:
            candidate = f"{stem}-{k}{ext}"
            k += 1
        used.add(os.path.splitext(candidate)[0].lower())
        names[rel] = candidate
    return names


def _read_manifest(path: str) -> Dict[str, dict]:
    entries: Dict[str, dict] = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    record = json.loads(line)
                    name = record["name"]
                except (ValueError, KeyError, TypeError):
                    continue
                if record.get("removed"):
                    entries.pop(name, None)
                else:
                    entries[name] = record
    return entries


class DatasetFolder:
    def __init__(self, folder: str, link_mode: str):
        self.folder = folder
        self.link_mode = link_mode
        self.work = os.path.join(folder, WORK)
        self.review = os.path.join(folder, REVIEW)
        self.manifest_path = os.path.join(self.work, MANIFEST)
        self.written = _read_manifest(self.manifest_path)

    # -- ownership ---------------------------------------------------------------------------
    def claim(self) -> None:
        """Refuse a folder that holds anything this tool did not write; then mark it as ours."""
        self.check()
        os.makedirs(self.work, exist_ok=True)
        if not os.path.isfile(self.manifest_path):
            open(self.manifest_path, "a").close()

    def check(self) -> None:
        """Refuse a folder that holds anything this tool did not write (writes nothing)."""
        if os.path.exists(self.folder) and not os.path.isdir(self.folder):
            raise PrepareError(f"output {self.folder} is a file; name a folder")
        entries = sorted(os.listdir(self.folder)) if os.path.isdir(self.folder) else []
        ours = os.path.isfile(self.manifest_path)
        if entries and not ours:
            raise PrepareError(
                f"output folder {self.folder} is not empty and was not written by vmix prepare ({entries[0]}, ...); "
                "choose a new or empty folder (nothing was changed)"
            )
        foreign = [e for e in entries if not self._is_ours(e)]
        if foreign:
            raise PrepareError(
                f"output folder {self.folder} holds {len(foreign)} file(s) this tool did not write ({', '.join(foreign[:3])}); "
                "move them away or choose another folder (nothing was changed)"
            )

    def _is_ours(self, entry: str) -> bool:
        if entry in (WORK, REVIEW, METADATA, "." + METADATA + ".tmp") or entry in self.written:
            return True
        if entry.startswith(".") and entry.endswith(_PARTIAL):
            return entry[1:-len(_PARTIAL)] in self.written
        return False

    # -- images --------------------------------------------------------------------------------
    def _record(self, record: dict) -> None:
        with open(self.manifest_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")

    def _intact(self, name: str, source: str, key: str) -> bool:
        record = self.written.get(name)
        target = os.path.join(self.folder, name)
        if not record or record.get("key") != key or record.get("mode") != self.link_mode or record.get("source") != source:
            return False
        try:
            if self.link_mode == "symlink":
                return os.path.islink(target) and os.readlink(target) == source
            if self.link_mode == "hardlink":
                return not os.path.islink(target) and os.path.samefile(target, source)
            return not os.path.islink(target) and os.path.getsize(target) == os.path.getsize(source)
        except OSError:
            return False

    def _place(self, name: str, source: str) -> None:
        target = os.path.join(self.folder, name)
        if os.path.lexists(target):
            os.remove(target)  # one the tool placed before (the manifest says so)
        try:
            if self.link_mode == "symlink":
                os.symlink(source, target)
            elif self.link_mode == "hardlink":
                os.link(source, target)
            else:
                partial = os.path.join(self.folder, "." + name + _PARTIAL)
                shutil.copy2(source, partial)
                os.replace(partial, target)
        except OSError as e:
            hint = {
                "symlink": "this system does not allow symbolic links here (on Windows enable developer mode); use --link-mode copy or hardlink",
                "hardlink": "hard links need the input and output on the same file system; use --link-mode symlink or copy",
                "copy": "check the free space and permissions of the output folder",
            }[self.link_mode]
            raise PrepareError(f"cannot place {name} in {self.folder} ({e.strerror or e}); {hint}") from None

    def sync_images(self, wanted: Dict[str, Tuple[str, str]], progress) -> Tuple[int, int]:
        """Make the folder's images exactly ``wanted`` (name -> (source path, file identity)).

        Returns (placed, removed).  Unchanged images are left alone.
        """
        removed = 0
        for name in sorted(set(self.written) - set(wanted)):
            target = os.path.join(self.folder, name)
            if os.path.lexists(target):
                os.remove(target)
            for stale in (os.path.join(self.folder, "." + name + _PARTIAL),):
                if os.path.lexists(stale):
                    os.remove(stale)
            self._record({"name": name, "removed": True})
            del self.written[name]
            removed += 1
        todo = [n for n in sorted(wanted) if not self._intact(n, *wanted[n])]
        bar = progress(total=len(todo), desc=f"{self.link_mode} images", unit="img") if todo else None
        for name in todo:
            source, key = wanted[name]
            record = {"name": name, "source": source, "key": key, "mode": self.link_mode}
            self._record(record)  # before the file exists: an interruption leaves only files we know
            self.written[name] = record
            self._place(name, source)
            bar.update(1)
        if bar:
            bar.close()
        self._compact()
        return len(todo), removed

    def _compact(self) -> None:
        tmp = self.manifest_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for name in sorted(self.written):
                f.write(json.dumps(self.written[name], ensure_ascii=False) + "\n")
        os.replace(tmp, self.manifest_path)

    # -- files ---------------------------------------------------------------------------------
    def write_metadata(self, entries: Iterable[dict]) -> str:
        path = os.path.join(self.folder, METADATA)
        tmp = os.path.join(self.folder, "." + METADATA + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for entry in entries:
                f.write(json.dumps(entry, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
        return path


def write_atomic(path: str, text: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    os.replace(tmp, path)
    return path
