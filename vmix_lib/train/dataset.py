"""The training dataset: an image folder with captions and per-image aesthetic labels.

    my_dataset/
        cat.png          an image (.png .jpg .jpeg .webp .bmp)
        cat.txt          its caption (UTF-8 text, required)
        cat.json         optional labels: {"color": "superior", "lighting": "inferior"}
        metadata.jsonl   optional instead of sidecar .json files, one line per image:
                         {"file_name": "cat.png", "labels": {"color": "superior"}}
                         (a line may carry "text" as the caption instead of cat.txt)

Per dimension the label is "superior" or "inferior"; a dimension that is not mentioned is inferior,
as in the paper (§3.2).  Everything wrong is collected first and reported together, one line per
problem; nothing is skipped silently (``skip_bad`` skips the listed images and prints them).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from ..scoring.images import IMAGE_EXTENSIONS  # the formats vmix_lib.prepare reads too: one list
from .errors import TrainError
METADATA_FILE = "metadata.jsonl"
LABEL_VALUES = {"superior": 1.0, "inferior": 0.0}
_EXIF_ORIENTATION = 0x0112
_TRANSPOSED = (5, 6, 7, 8)  # orientations that swap width and height


@dataclass(frozen=True)
class DatasetItem:
    image: str  # absolute path
    caption: str
    labels: Tuple[float, ...]  # per dimension, in the adapter's order: 1 superior, 0 inferior
    size: Tuple[int, int] = (0, 0)  # (width, height) as shown (EXIF orientation applied)

    @property
    def name(self) -> str:
        return os.path.basename(self.image)


@dataclass
class DatasetReport:
    items: List[DatasetItem]
    problems: List[str] = field(default_factory=list)  # one line each
    bad_images: List[str] = field(default_factory=list)  # images a problem makes unusable
    label_counts: Dict[str, int] = field(default_factory=dict)  # superior count per dimension


class DatasetError(TrainError):
    def __init__(self, folder: str, problems: Sequence[str]):
        self.folder = folder
        self.problems = list(problems)
        lines = "\n".join(f"  {p}" for p in self.problems)
        noun = "problem" if len(self.problems) == 1 else "problems"
        super().__init__(
            f"the dataset in {folder} has {len(self.problems)} {noun}:\n{lines}\n"
            "Fix them, or run with --skip-bad to train without the affected images."
        )


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


def _parse_labels(raw, where: str, dimension_names: Sequence[str], problems: List[str]) -> Optional[Tuple[float, ...]]:
    if not isinstance(raw, dict):
        problems.append(f"labels in {where} are not an object like {{\"color\": \"superior\"}}")
        return None
    values = [0.0] * len(dimension_names)
    ok = True
    for key, value in raw.items():
        if key not in dimension_names:
            problems.append(f"unknown dimension {key!r} in {where} (known: {', '.join(dimension_names)})")
            ok = False
            continue
        label = value.strip().lower() if isinstance(value, str) else None
        if label not in LABEL_VALUES:
            problems.append(f"label {value!r} for {key!r} in {where} is not \"superior\" or \"inferior\"")
            ok = False
            continue
        values[dimension_names.index(key)] = LABEL_VALUES[label]
    return tuple(values) if ok else None


def _check_image(path: str) -> Tuple[Optional[Tuple[int, int]], Optional[str]]:
    from PIL import Image

    try:
        with Image.open(path) as img:
            size = img.size
            img.verify()  # reads the whole file; catches truncated PNGs and most corrupt files
        with Image.open(path) as img:  # verify() leaves the image unusable: reopen for the header
            if img.getexif().get(_EXIF_ORIENTATION) in _TRANSPOSED:  # shown rotated by 90°, as load_image sees it
                size = size[::-1]
        return size, None
    except Exception as e:  # PIL raises many types; the message is what the user needs
        return None, str(e) or type(e).__name__


def _read_metadata(folder: str, problems: List[str]) -> Dict[str, Tuple[int, dict]]:
    path = os.path.join(folder, METADATA_FILE)
    entries: Dict[str, Tuple[int, dict]] = {}
    if not os.path.isfile(path):
        return entries
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{METADATA_FILE} line {number}"
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"{where} is not valid JSON ({e.msg})")
                continue
            if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str):
                problems.append(f"{where} has no \"file_name\"")
                continue
            unknown = sorted(set(entry) - {"file_name", "labels", "text"})
            if unknown:
                problems.append(f"{where} has unknown field {unknown[0]!r} (allowed: file_name, labels, text)")
                continue
            name = entry["file_name"]
            if name in entries:
                problems.append(f"{where} repeats {name} (first on line {entries[name][0]})")
                continue
            entries[name] = (number, entry)
    return entries


def scan_dataset(folder: str, dimension_names: Sequence[str], check_images: bool = True) -> DatasetReport:
    """Read and validate the whole folder; problems are listed in the report, never raised here."""
    folder = os.path.abspath(folder)
    if not os.path.isdir(folder):
        raise TrainError(f"dataset folder {folder} does not exist")
    files = sorted(os.listdir(folder))
    problems: List[str] = []
    bad: List[str] = []
    metadata = _read_metadata(folder, problems)
    images = [f for f in files if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, f))]
    stems: Dict[str, str] = {}
    for name in images:
        stem = os.path.splitext(name)[0]
        if stem in stems:
            problems.append(f"two images share the name {stem!r}: {stems[stem]} and {name} (captions and labels would be ambiguous)")
            bad.extend([stems[stem], name])
        stems[stem] = name
    for name in files:
        stem, ext = os.path.splitext(name)
        if ext.lower() in (".txt", ".json") and stem not in stems:
            problems.append(f"{name} belongs to no image (no {stem}.png/.jpg/...)")
    for name in metadata:
        if name not in images:
            problems.append(f"{METADATA_FILE} line {metadata[name][0]} names {name}, which is not an image in the folder")

    items: List[DatasetItem] = []
    counts = {d: 0 for d in dimension_names}
    for name in images:
        if name in bad:
            continue
        stem = os.path.splitext(name)[0]
        path = os.path.join(folder, name)
        before = len(problems)
        entry = metadata.get(name, (0, {}))[1]
        caption_file = os.path.join(folder, stem + ".txt")
        caption = None
        if os.path.isfile(caption_file):
            try:
                caption = _read_text(caption_file)
            except (OSError, UnicodeDecodeError) as e:
                problems.append(f"caption {stem}.txt cannot be read as UTF-8 text ({e})")
            if "text" in entry:
                problems.append(f"{name} has a caption both in {stem}.txt and in {METADATA_FILE}")
        elif "text" in entry:
            caption = entry["text"].strip() if isinstance(entry["text"], str) else None
            if caption is None:
                problems.append(f"\"text\" for {name} in {METADATA_FILE} is not a string")
        else:
            problems.append(f"missing caption: {name} (expected {stem}.txt)")
        if caption == "" and len(problems) == before:
            problems.append(f"empty caption: {stem}.txt")

        labels: Optional[Tuple[float, ...]] = (0.0,) * len(dimension_names)
        sidecar = os.path.join(folder, stem + ".json")
        if os.path.isfile(sidecar):
            if "labels" in entry:
                problems.append(f"{name} has labels both in {stem}.json and in {METADATA_FILE}")
                labels = None
            else:
                try:
                    with open(sidecar, encoding="utf-8") as f:
                        raw = json.load(f)
                except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                    problems.append(f"labels file {stem}.json is not valid JSON ({getattr(e, 'msg', e)})")
                    raw = None
                labels = _parse_labels(raw, f"{stem}.json", dimension_names, problems) if raw is not None else None
        elif "labels" in entry:
            labels = _parse_labels(entry["labels"], f"{METADATA_FILE} line {metadata[name][0]}", dimension_names, problems)

        size: Optional[Tuple[int, int]] = (0, 0)
        if check_images:
            size, error = _check_image(path)
            if error:
                problems.append(f"unreadable image: {name} ({error})")
        if len(problems) > before:
            bad.append(name)
            continue
        for dim, value in zip(dimension_names, labels):
            counts[dim] += int(value == 1.0)
        items.append(DatasetItem(path, caption, labels, size))
    if not images:
        problems.append(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in the folder")
    return DatasetReport(items, problems, bad, counts)


def load_dataset(folder: str, dimension_names: Sequence[str], skip_bad: bool = False, log=print) -> List[DatasetItem]:
    """Validated items; raises DatasetError listing every problem unless ``skip_bad``."""
    report = scan_dataset(folder, dimension_names)
    if report.problems and not skip_bad:
        raise DatasetError(os.path.abspath(folder), report.problems)
    if report.problems:
        log(f"--skip-bad: ignoring these {len(report.problems)} problem(s); skipped images: {', '.join(report.bad_images) or 'none'}")
        for p in report.problems:
            log(f"  {p}")
    if not report.items:
        raise TrainError(f"the dataset in {os.path.abspath(folder)} has no usable images")
    return report.items


def load_image(path: str, size):
    """RGB image resized to cover ``size`` and centre-cropped to it (never padded).

    ``size`` is a bucket (width, height), or one number for a square.  Returns (tensor [3, h, w] in
    [-1, 1], original (h, w), crop top-left (top, left)) - the last two are SDXL's size/crop
    conditioning (see buckets.py).
    """
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    from .buckets import fit_to_bucket

    bucket = (size, size) if isinstance(size, int) else tuple(size)
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, rgba)
        img = img.convert("RGB")
    width, height = img.size
    resized, (top, left) = fit_to_bucket((width, height), bucket)
    img = img.resize(resized, Image.LANCZOS)
    img = img.crop((left, top, left + bucket[0], top + bucket[1]))
    array = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous(), (height, width), (top, left)
