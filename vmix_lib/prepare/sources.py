"""The input folder: images (recursive), their captions, and per-file facts (content hash, size).

Captions are read from ``NAME.txt`` beside an image, else from a ``metadata.jsonl`` in the image's
folder or any folder above it (``{"file_name": "sub/NAME.png", "text": "..."}``, the Hugging Face
imagefolder layout; ``"caption"`` is read too).  Nothing in the input folder is ever written.
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from ..scoring.images import file_key, find_images
from .records import RecordFile

METADATA_FILE = "metadata.jsonl"


@dataclass
class SourceImage:
    rel: str  # path inside the input folder, '/'-separated
    path: str  # absolute
    key: Optional[str] = None  # file identity for caches (None: the file cannot be read at all)
    caption: str = ""
    caption_source: str = ""  # "txt", "metadata" (the input's), "captioner", "default" or ""
    sha256: str = ""
    width: int = 0
    height: int = 0
    error: str = ""  # why the file is unreadable ("" if it is readable so far)


def _read_caption_file(path: str, notes: List[str], rel: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        notes.append(f"caption file {rel} cannot be read as UTF-8 text ({getattr(e, 'reason', None) or e}); ignored")
        return ""


def _metadata_captions(input_dir: str, folders, notes: List[str]) -> Dict[str, str]:
    """rel image path -> caption, from every metadata.jsonl in the given folders (deepest wins)."""
    captions: Dict[str, Tuple[int, str]] = {}
    for folder in sorted(folders):
        path = os.path.join(input_dir, folder, METADATA_FILE) if folder else os.path.join(input_dir, METADATA_FILE)
        if not os.path.isfile(path):
            continue
        where = f"{folder}/{METADATA_FILE}" if folder else METADATA_FILE
        depth = folder.count("/") + 1 if folder else 0
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                except ValueError:
                    notes.append(f"{where} line {number} is not valid JSON; ignored")
                    continue
                if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str):
                    notes.append(f"{where} line {number} has no \"file_name\"; ignored")
                    continue
                text = entry.get("text", entry.get("caption"))
                if text is None:
                    continue
                if not isinstance(text, str):
                    notes.append(f"{where} line {number}: the caption is not a string; ignored")
                    continue
                rel = os.path.normpath(os.path.join(folder, entry["file_name"])).replace(os.sep, "/")
                if rel not in captions or captions[rel][0] <= depth:
                    captions[rel] = (depth, text.strip())
    return {rel: text for rel, (_, text) in captions.items()}


def scan_input(input_dir: str, notes: List[str], skipped: Optional[Dict[str, int]] = None) -> List[SourceImage]:
    """Every image under ``input_dir`` with its caption (if any), sorted by relative path;
    ``skipped`` receives the count per extension of the other files (see find_images)."""
    rels = find_images(input_dir, skipped=skipped)
    folders = set()
    for rel in rels:
        parts = rel.split("/")[:-1]
        for i in range(len(parts) + 1):
            folders.add("/".join(parts[:i]))
    from_metadata = _metadata_captions(input_dir, folders, notes)
    images = []
    for rel in rels:
        path = os.path.join(input_dir, *rel.split("/"))
        image = SourceImage(rel, path)
        txt = os.path.splitext(path)[0] + ".txt"
        if os.path.isfile(txt):
            image.caption = _read_caption_file(txt, notes, os.path.splitext(rel)[0] + ".txt")
            image.caption_source = "txt" if image.caption else ""
        if not image.caption and from_metadata.get(rel):
            image.caption, image.caption_source = from_metadata[rel], "metadata"
        images.append(image)
    return images


def _facts(path: str) -> dict:
    """Content hash and header size; {"error": reason} if the file is not an image."""
    from PIL import Image

    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        with Image.open(path) as img:
            width, height = img.size
    except Exception as e:  # PIL raises many kinds; the message is what the user needs
        return {"error": (str(e) or type(e).__name__).splitlines()[0]}
    return {"sha256": digest.hexdigest(), "width": width, "height": height}


def read_facts(images: List[SourceImage], records: RecordFile, workers: int, progress) -> int:
    """Fill key, sha256 and size of every image (cached per file identity); returns how many were read now."""
    todo = []
    for image in images:
        try:
            image.key = file_key(image.path)
        except OSError as e:
            image.error = e.strerror or str(e)
            continue
        if image.key not in records:
            todo.append(image)
    if todo:
        bar = progress(total=len(todo), desc="hashing images", unit="img")
        try:
            with ThreadPoolExecutor(max(1, workers)) as pool:  # hashing and header reads release the GIL
                for image, facts in zip(todo, pool.map(_facts, [i.path for i in todo], chunksize=16)):
                    records.put(image.key, facts)
                    bar.update(1)
        finally:  # also on Ctrl-C: the files hashed so far are kept
            records.flush()
        bar.close()
    for image in images:
        if image.key is None:
            continue
        facts = records.get(image.key)
        if "error" in facts:
            image.error = facts["error"]
        else:
            image.sha256, image.width, image.height = facts["sha256"], facts["width"], facts["height"]
    return len(todo)
