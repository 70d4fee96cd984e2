"""Superior/inferior labels per dimension from the probe scores, and the overrides a person writes.

The overrides file is CSV with the columns ``file_name,dimension,label``:

    file_name,dimension,label
    beach.jpg,color,superior          # flip (or pin) one label
    holiday__street.png,focus,inferior
    blurry.jpg,*,exclude              # leave the image out of the dataset
    twin.jpg,*,keep                   # keep an image a filter dropped (not an unreadable one)

``file_name`` is the image's name in the dataset or its path inside the input folder.  Lines that
start with ``#`` are comments; a later line for the same image and dimension wins (so rows copied
from the review pages can simply be appended).
"""
from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

import torch

from .errors import PrepareError
from .settings import Rule

HEADER = ("file_name", "dimension", "label")
LABELS = ("superior", "inferior")
ACTIONS = ("exclude", "keep")


def threshold(scores: torch.Tensor, rule: Rule) -> Optional[float]:
    """The score at or above which an image is superior (None for an empty set)."""
    if rule.kind == "margin":
        return (1.0 + rule.value) / 2.0  # P(pos) - P(neg) = 2·score - 1 >= margin
    if scores.numel() == 0:
        return None
    return float(torch.quantile(scores.double(), rule.value))


@dataclass
class Overrides:
    labels: Dict[Tuple[str, str], str] = field(default_factory=dict)  # (file, dimension) -> superior/inferior
    actions: Dict[str, str] = field(default_factory=dict)  # file -> exclude/keep
    rows: int = 0


def write_overrides_template(path: str) -> bool:
    """An empty overrides file with its header (never overwrites one that exists)."""
    if os.path.exists(path):
        return False
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write("# Label overrides for python -m vmix_lib.prepare, applied on the next run.\n"
                "# One row per change: file_name (dataset name or input path), dimension, label\n"
                "# label: superior or inferior; with dimension * : exclude (leave out) or keep (undo a filter)\n")
        f.write(",".join(HEADER) + "\n")
    return True


def read_overrides(path: str, dimension_names: Sequence[str]) -> Overrides:
    result = Overrides()
    if not path or not os.path.isfile(path):
        return result
    name = os.path.basename(path)
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise PrepareError(f"overrides file {path} cannot be read as UTF-8 text ({e})") from None
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip() and not line.lstrip().startswith("#")]
    rows = list(csv.reader(io.StringIO("\n".join(line for _, line in numbered))))
    if rows and [c.strip().lower() for c in rows[0]] == list(HEADER):
        rows, numbered = rows[1:], numbered[1:]
    for (number, _), row in zip(numbered, rows):
        cells = [c.strip() for c in row]
        if len(cells) != 3 or not cells[0]:
            raise PrepareError(f"{name} line {number} must have three columns: file_name,dimension,label")
        file_name, dimension, label = cells[0], cells[1], cells[2].lower()
        if dimension == "*":
            if label not in ACTIONS:
                raise PrepareError(f"{name} line {number}: with dimension * the label must be exclude or keep, not {cells[2]!r}")
            result.actions[file_name] = label
        else:
            if dimension not in dimension_names:
                raise PrepareError(f"{name} line {number}: {dimension!r} is not a dimension being labelled ({', '.join(dimension_names)})")
            if label not in LABELS:
                raise PrepareError(f"{name} line {number}: the label must be superior or inferior, not {cells[2]!r}")
            result.labels[(file_name, dimension)] = label
        result.rows += 1
    return result
