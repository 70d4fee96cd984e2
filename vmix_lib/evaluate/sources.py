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


@dataclass(frozen=True)
class ReferenceSet:
    folder: str
    paths: List[str]  # the images FID/KID compare with
    description: str  # one line: what was counted and what was skipped


# What vmix prepare writes beside the dataset's images (review pages with their histograms, caches).
_PREPARE_EXTRAS = ("review", "prepare")


def read_reference_folder(folder: str) -> ReferenceSet:
    """The dataset images of a reference folder: those its ``metadata.jsonl`` lists when it has one
    (a dataset, e.g. vmix prepare's output), else every image under it except vmix prepare's
    ``review/`` and ``prepare/`` folders; one sentence when none is left."""
    from ..scoring import ScoringError
    from ..scoring.images import IMAGE_EXTENSIONS, find_images

    if not os.path.isdir(folder):
        raise EvaluationError(f"--reference {folder} is not a folder; name the folder of the reference images")
    try:
        found = find_images(folder)
    except ScoringError as e:
        raise EvaluationError(str(e)) from None
    meta = os.path.join(folder, "metadata.jsonl")
    if os.path.isfile(meta):
        listed: List[str] = []
        with open(meta, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    name = json.loads(line)["file_name"]
                except (ValueError, KeyError, TypeError):
                    raise EvaluationError(f"{meta} line {number} is not a JSON object with file_name") from None
                listed.append(os.path.normpath(str(name).replace("\\", "/")).replace(os.sep, "/"))
        listed = [n for n in dict.fromkeys(listed) if n.lower().endswith(IMAGE_EXTENSIONS)]
        present = [n for n in listed if os.path.isfile(os.path.join(folder, n))]
        absent = sorted(set(listed) - set(present))
        wanted = set(listed)
        skipped = [n for n in found if n not in wanted]
        what = f"{len(present)} image(s) that metadata.jsonl lists"
        if skipped:
            what += f"; skipped {len(skipped)} image file(s) it does not list ({_by_folder(skipped)})"
        if absent:
            what += f"; {len(absent)} listed file(s) are missing (first: {absent[0]})"
        if not present:
            raise EvaluationError(f"reference folder {folder}: metadata.jsonl lists no image that is there ({what})")
        return ReferenceSet(folder, [os.path.join(folder, n) for n in present], f"reference {folder}: {what}")
    ours = os.path.isfile(os.path.join(folder, "prepare", "written.jsonl"))  # vmix prepare's output, metadata not yet written
    skipped = [n for n in found if ours and n.split("/", 1)[0] in _PREPARE_EXTRAS]
    kept = [n for n in found if not (ours and n.split("/", 1)[0] in _PREPARE_EXTRAS)]
    if not kept:
        raise EvaluationError(f"reference folder {folder} holds no .png, .jpg or .webp images" + (
            f" besides vmix prepare's review pictures ({_by_folder(skipped)})" if skipped else ""))
    what = f"{len(kept)} image(s)" + (f"; skipped {len(skipped)} image file(s) of vmix prepare's own folders ({_by_folder(skipped)})" if skipped else "")
    return ReferenceSet(folder, [os.path.join(folder, n) for n in kept], f"reference {folder}: {what}")


def _by_folder(names: List[str]) -> str:
    """'review/: 14, top level: 2'"""
    counts: Dict[str, int] = {}
    for n in names:
        key = n.split("/", 1)[0] + "/" if "/" in n else "top level"
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{k}: {v}" for k, v in counts.items())


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
