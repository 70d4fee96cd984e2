"""Where images come from besides a WebUI and the offline sampler: existing folders (score only)
and any Python function (the Python API: e.g. a research model held in memory).

An image folder holds images with their prompts: ``NAME.png|jpg|webp`` with a caption ``NAME.txt``
beside it (the trainer's dataset layout), or one ``metadata.jsonl`` with ``{"file_name": ...,
"prompt"|"text"|"caption": ...}`` per line.  Images of several folders pair up by their path inside
the folder (same name = same prompt and seed), which is what the shifts from the baseline use.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from .errors import EvaluationError
from .settings import Setting

_PROMPT_KEYS = ("prompt", "text", "caption")


@dataclass(frozen=True)
class FolderImage:
    path: str  # absolute
    key: str  # path inside the folder without extension: pairs images across folders
    prompt: str


def read_image_folder(folder: str) -> List[FolderImage]:
    """Every image of ``folder`` (recursive) with its prompt; one sentence when prompts are missing."""
    from ..scoring import ScoringError
    from ..scoring.images import find_images

    try:
        files = find_images(folder)
    except ScoringError as e:
        raise EvaluationError(str(e)) from None
    if not files:
        raise EvaluationError(f"image folder {folder} holds no .png, .jpg or .webp images")
    prompts: Dict[str, str] = {}
    meta = os.path.join(folder, "metadata.jsonl")
    if os.path.isfile(meta):
        with open(meta, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    text = next(row[k] for k in _PROMPT_KEYS if isinstance(row.get(k), str))
                    prompts[str(row["file_name"]).replace("\\", "/")] = text
                except (ValueError, KeyError, StopIteration, TypeError, AttributeError):
                    raise EvaluationError(
                        f"{meta} line {number} is not a JSON object with file_name and prompt (or text, caption)"
                    ) from None
    images, missing = [], []
    for rel in files:
        text = prompts.get(rel)
        if text is None:
            caption = os.path.join(folder, os.path.splitext(rel)[0] + ".txt")
            if os.path.isfile(caption):
                with open(caption, encoding="utf-8", errors="replace") as f:
                    text = f.read().strip()
        if text is None:
            missing.append(rel)
            continue
        images.append(FolderImage(os.path.abspath(os.path.join(folder, rel)), os.path.splitext(rel)[0], text))
    if missing:
        raise EvaluationError(
            f"{len(missing)} image(s) in {folder} have no prompt (first: {missing[0]}); put NAME.txt beside each image "
            "or list them in metadata.jsonl"
        )
    return images


def parse_folder_spec(spec: str) -> Tuple[str, str]:
    """``--images NAME=DIR`` (or just DIR: the folder's name) -> (setting name, folder)."""
    name, sep, folder = spec.partition("=")
    if not sep:
        folder, name = spec, os.path.basename(os.path.normpath(spec))
    name, folder = name.strip(), folder.strip()
    if not name or not folder:
        raise EvaluationError(f"--images {spec!r} must look like NAME=FOLDER (or just FOLDER)")
    return name, folder


class CallableSource:
    """ImageSource for the Python API: ``generate(prompt, seed, setting) -> PIL image``.

    The function must give the same image for the same arguments (a seeded sampler), so that
    images pair up across settings and a rerun could make them again.
    """

    kind = "python"

    def __init__(self, generate: Callable[[str, int, Setting], Any], name: str = "python", description: Optional[Dict[str, Any]] = None):
        self._generate = generate
        self.name = name
        self._description = dict(description or {})

    def prepare(self, settings) -> None:
        pass

    def describe(self) -> Dict[str, Any]:
        return {"source": self.name, **self._description}

    def generate(self, prompt: str, seed: int, setting: Setting):
        return self._generate(prompt, seed, setting), {}

    def close(self) -> None:
        pass
