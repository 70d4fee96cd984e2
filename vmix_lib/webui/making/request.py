"""What the VMix tab (or ``POST /vmix/v1/make``) asks for, checked, and turned into the trainer's TrainConfig.

The same settings as ``python -m vmix_lib.train --objective distill``; the tab names them as its
controls do ("Steps", "Batch size", ...) and every mistake is one sentence naming the control and
the value (HTTP 422 for the API).  Pure: no WebUI import.

JSON body of the API (every key optional; the tab sends the same through ``from_form``)::

    {"name": "vmix-myckpt", "overwrite": false, "resume": false,
     "dimensions": [{"name": "color", "phrase": "vibrant colors", "contrast": "dull colors"}, ...],
     "prompts": ["a cat on a windowsill", ...],          # omitted or []: the 60 built-in prompts
     "steps": 1000, "batch_size": 2, "learning_rate": 0, "eta": 1.0, "resolution": 0, "xt_steps": 25,
     "seed": 0, "save_every": 250, "preview_every": 250, "gradient_checkpointing": true, "unload_vae": true}
"""
from __future__ import annotations

import difflib
import math
import os
import re
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ...dimensions import DEFAULT_DIMENSIONS, NAME_RE, AestheticDimension
from ...train.distill import SUGGESTED_PHRASES

MAX_DIMENSIONS = 8  # the panel has 8 α sliders
FAMILY_RESOLUTION = {"sd15": 512, "sdxl": 1024}
# Rare-token negative labels (DESIGN §2) for dimensions the user adds; the built-in ones keep theirs.
SPARE_TOKENS = ("qzt", "bnx", "wkr", "fjv", "yxq", "mzp", "dqh", "kvb")
_BAD_NAME_CHARS = re.compile(r'[\\/:*?"<>|\x00-\x1f]')
WORK_SUFFIX = "-training"  # models/VMix/<name>-training/: resume state, loss log, previews, prompts


class MakeError(ValueError):
    """A setting of the VMix tab that cannot be used: one sentence; HTTP 422 for the API."""

    status_code = 422

    def __init__(self, message: str):
        super().__init__(message)
        self.detail = message


@dataclass(frozen=True)
class PhraseRow:
    name: str  # dimension key, e.g. "color"
    phrase: str  # added to the content prompt for the teacher ("vibrant colors")
    contrast: str = ""  # what it is compared with ("" = the prompt alone)


DEFAULT_ROWS: Tuple[PhraseRow, ...] = tuple(PhraseRow(d.name, *SUGGESTED_PHRASES.get(d.name, (d.positive, "")))
                                            for d in DEFAULT_DIMENSIONS)


@dataclass(frozen=True)
class Field:
    key: str  # API key
    label: str  # the tab's control
    kind: type
    default: Any
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    hint: str = ""


FIELDS: Tuple[Field, ...] = (
    Field("steps", "Steps", int, 1000, 1, 1_000_000, "optimiser steps (the paper trains 50 000 steps of 256 images on data)"),
    Field("batch_size", "Batch size", int, 2, 1, 64, "content prompts per step; more is smoother and needs more memory"),
    Field("learning_rate", "Learning rate", float, 0.0, 0.0, 0.01, "AdamW learning rate; 0 = 1e-4 for SD1.5, 1e-5 for SDXL"),
    Field("eta", "η", float, 1.0, 0.01, 10.0, "weight of each phrase's effect in the target: 1 = what the phrase does in the prompt"),
    Field("resolution", "Resolution", int, 0, 0, 4096, "square training size in pixels, a multiple of 64; 0 = 512 for SD1.5, 1024 for SDXL"),
    Field("xt_steps", "x_t steps", int, 25, 2, 1000, "DDIM steps of the schedule the noisy training states are sampled on"),
    Field("seed", "Seed", int, 0, 0, 2**63 - 1, "seed of prompts, labels, steps and noise: the same seed gives the same adapter"),
    Field("save_every", "Save every", int, 250, 0, 1_000_000, "save the adapter and its resume state every N steps (0 = only at the end)"),
    Field("preview_every", "Preview every", int, 250, 0, 1_000_000, "draw a λ-sweep preview every N steps (0 = never)"),
    Field("gradient_checkpointing", "Gradient checkpointing", bool, True, hint="recompute the UNet's activations in the backward pass: much less memory, more time per step"),
    Field("unload_vae", "Unload VAE while training", bool, True, hint="keep the VAE in RAM while training (it is needed only for previews), as A1111's own training option"),
)
BY_KEY = {f.key: f for f in FIELDS}
OTHER_KEYS = ("name", "overwrite", "resume", "dimensions", "prompts")


@dataclass(frozen=True)
class MakeRequest:
    name: str = ""  # "" = from the checkpoint's name (default_name)
    overwrite: bool = False
    resume: bool = False
    rows: Tuple[PhraseRow, ...] = DEFAULT_ROWS
    prompts: Tuple[str, ...] = ()  # () = the built-in prompts
    values: Dict[str, Any] = field(default_factory=lambda: {f.key: f.default for f in FIELDS})

    def __getattr__(self, key: str):
        values = self.__dict__.get("values", {})
        if key in values:
            return values[key]
        raise AttributeError(key)

    # -- what it means for the trainer ---------------------------------------------------------
    def dimensions(self) -> List[AestheticDimension]:
        """The adapter's dimensions: built-in names keep their AesEmb labels; new ones take their phrase."""
        builtin = {d.name: d for d in DEFAULT_DIMENSIONS}
        spare = iter(t for t in SPARE_TOKENS if t not in {d.negative for d in DEFAULT_DIMENSIONS})
        dims = []
        for row in self.rows:
            dims.append(builtin[row.name] if row.name in builtin else AestheticDimension(row.name, row.phrase, next(spare)))
        return dims

    def resolution_for(self, family: str) -> int:
        return self.resolution or FAMILY_RESOLUTION[family]

    def to_json(self) -> Dict[str, Any]:
        return {"name": self.name, "overwrite": self.overwrite, "resume": self.resume,
                "dimensions": [{"name": r.name, "phrase": r.phrase, "contrast": r.contrast} for r in self.rows],
                "prompts": list(self.prompts), **self.values}


def default_name(checkpoint_title: Optional[str]) -> str:
    """'vmix-<checkpoint file stem>' ("v1-5-pruned-emaonly [6ce0161689]" -> "vmix-v1-5-pruned-emaonly")."""
    stem = (checkpoint_title or "").split(" [")[0]
    stem = os.path.splitext(os.path.basename(stem.replace("\\", "/")))[0]
    stem = _BAD_NAME_CHARS.sub("_", stem).strip(" .") or "model"
    return f"vmix-{stem}"[:100]


def check_name(name: str) -> str:
    name = (name or "").strip()
    if not name:
        raise MakeError("Adapter name is empty; give the adapter a file name, e.g. vmix-mymodel.")
    if "/" in name or "\\" in name or name in (".", "..") or ".." in name.split("."):
        raise MakeError(f"Adapter name {name!r} has a path in it; give a plain file name (it is saved in the VMix adapter folder).")
    if _BAD_NAME_CHARS.search(name) or name.startswith("."):
        raise MakeError(f"Adapter name {name!r} cannot be a file name (no leading dot, none of \\ / : * ? \" < > |).")
    if name.lower().endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    if len(name) > 100:
        raise MakeError(f"Adapter name is {len(name)} characters long; keep it to 100.")
    if name.endswith(WORK_SUFFIX):
        raise MakeError(f"Adapter name {name!r} ends in {WORK_SUFFIX!r}, which names the training folders; choose another.")
    return name


def _number(f: Field, value: Any) -> Any:
    if f.kind is bool:
        if isinstance(value, bool):
            return value
        raise MakeError(f"{f.label} must be true or false, got {value!r}.")
    if isinstance(value, bool) or value is None:
        raise MakeError(f"{f.label} must be a number, got {value!r}.")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise MakeError(f"{f.label} must be a number, got {value!r}.") from None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise MakeError(f"{f.label} must be a number, got {value!r}.") from None
    if not math.isfinite(number):
        raise MakeError(f"{f.label} must be a finite number, got {value!r}.")
    if f.kind is int:
        if not number.is_integer():
            raise MakeError(f"{f.label} must be a whole number, got {value!r}.")
        number = int(number)
    if (f.minimum is not None and number < f.minimum) or (f.maximum is not None and number > f.maximum):
        bound = (lambda v: f"{int(v)}") if f.kind is int else (lambda v: f"{v:g}")
        raise MakeError(f"{f.label} must be from {bound(f.minimum)} to {bound(f.maximum)}, got {value!r}.")
    return number


def parse_rows(items: Any) -> Tuple[PhraseRow, ...]:
    """Dimension rows from the API ([{"name", "phrase", "contrast"}]) or the tab's table ([[name, phrase, contrast]]);
    rows left all blank are dropped."""
    if not isinstance(items, (list, tuple)):
        raise MakeError(f"Dimensions must be a list of rows (name, phrase, contrast), got {type(items).__name__}.")
    rows: List[PhraseRow] = []
    for i, item in enumerate(items, 1):
        if isinstance(item, Mapping):
            unknown = sorted(set(item) - {"name", "phrase", "contrast"})
            if unknown:
                raise MakeError(f"Dimension row {i} has the unknown key {unknown[0]!r}; use name, phrase and contrast.")
            cells = [item.get("name", ""), item.get("phrase", ""), item.get("contrast", "")]
        elif isinstance(item, (list, tuple)) and 1 <= len(item) <= 3:
            cells = list(item) + [""] * (3 - len(item))
        else:
            raise MakeError(f"Dimension row {i} must be a name, a phrase and a contrast, got {item!r}.")
        cells = ["" if c is None or (isinstance(c, float) and math.isnan(c)) else c for c in cells]
        if not all(isinstance(c, str) for c in cells):
            raise MakeError(f"Dimension row {i} must hold text only, got {item!r}.")
        name, phrase, contrast = (c.strip() for c in cells)
        if not (name or phrase or contrast):
            continue
        if not name:
            raise MakeError(f"Dimension row {i} has no name; name it, e.g. color, or clear the whole row.")
        if not NAME_RE.match(name):
            raise MakeError(f"Dimension name {name!r} (row {i}) must be a short lowercase word: letters, digits, _ (e.g. color).")
        if not phrase:
            raise MakeError(f"Dimension {name!r} has an empty phrase; write what it adds to the prompt, e.g. vibrant colors.")
        if phrase == contrast:
            raise MakeError(f"Dimension {name!r} has the same phrase and contrast ({phrase!r}); give a different contrast, or none.")
        if any(r.name == name for r in rows):
            raise MakeError(f"Dimension {name!r} appears twice; each dimension needs its own name.")
        rows.append(PhraseRow(name, phrase, contrast))
    if not rows:
        raise MakeError("No dimension is given; keep at least one row (name, phrase, contrast).")
    if len(rows) > MAX_DIMENSIONS:
        raise MakeError(f"{len(rows)} dimensions are given; the VMix panel has {MAX_DIMENSIONS} α sliders, so keep at most {MAX_DIMENSIONS}.")
    return tuple(rows)


def parse_prompts(prompts: Any) -> Tuple[str, ...]:
    """Content prompts: a list, or text with one prompt a line (# comments); empty = the built-in set."""
    if prompts is None:
        return ()
    if isinstance(prompts, str):
        lines = prompts.splitlines()
    elif isinstance(prompts, (list, tuple)) and all(isinstance(p, str) for p in prompts):
        lines = list(prompts)
    else:
        raise MakeError(f"Content prompts must be text with one prompt a line (or a list of strings), got {type(prompts).__name__}.")
    return tuple(p.strip() for p in lines if p.strip() and not p.lstrip().startswith("#"))


def from_json(data: Any) -> MakeRequest:
    """The API's JSON body (missing keys take the tab's defaults)."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise MakeError(f"The request body must be a JSON object of settings, got {type(data).__name__}.")
    known = list(OTHER_KEYS) + list(BY_KEY)
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            raise MakeError(f"Unknown setting {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                            + f"; the settings are {', '.join(known)}.")
    values = {f.key: _number(f, data[f.key]) if f.key in data else f.default for f in FIELDS}
    flags = {}
    for key in ("overwrite", "resume"):
        value = data.get(key, False)
        if not isinstance(value, bool):
            raise MakeError(f"{key} must be true or false, got {value!r}.")
        flags[key] = value
    name = data.get("name", "")
    if not isinstance(name, str):
        raise MakeError(f"name must be text, got {name!r}.")
    rows = parse_rows(data["dimensions"]) if "dimensions" in data else DEFAULT_ROWS
    return _checked(MakeRequest(name.strip(), flags["overwrite"], flags["resume"], rows, parse_prompts(data.get("prompts")), values))


def from_form(name: str, overwrite: bool, table: Any, use_builtin_prompts: bool, prompts_text: str, **values) -> MakeRequest:
    """The tab's controls (``values``: FIELDS keys)."""
    rows = parse_rows(_table_rows(table))
    prompts = () if use_builtin_prompts else parse_prompts(prompts_text or "")
    if not use_builtin_prompts and not prompts:
        raise MakeError("Content prompts are set to 'my prompts', but the box holds none; write one prompt a line, or use the built-in set.")
    parsed = {f.key: _number(f, values[f.key]) if f.key in values else f.default for f in FIELDS}
    return _checked(MakeRequest((name or "").strip(), bool(overwrite), False, rows, prompts, parsed))


def _table_rows(table: Any) -> List[Any]:
    """gradio's Dataframe value: a pandas DataFrame (type 'pandas'), a list of lists, or {"data": ...}."""
    if hasattr(table, "values") and hasattr(table, "columns"):  # pandas, without importing it
        return [list(r) for r in table.values.tolist()]
    if isinstance(table, Mapping) and "data" in table:
        return list(table["data"])
    return list(table or [])


def _checked(request: MakeRequest) -> MakeRequest:
    if request.name:
        request = replace(request, name=check_name(request.name))
    if request.resolution and request.resolution % 8:
        raise MakeError(f"Resolution must be a multiple of 64 (0 = 512 for SD1.5, 1024 for SDXL), got {request.resolution}.")
    if request.resume and request.overwrite:
        raise MakeError("resume and overwrite exclude each other: resume continues the run of that name, overwrite starts it anew.")
    return request


def check_resolution_for(request: MakeRequest, family: str, multiple: int) -> None:
    """The picture size must fit the UNet's downsampling (64 px steps for SD1.5 and SDXL)."""
    res = request.resolution_for(family)
    if res % multiple or res < multiple:
        raise MakeError(f"Resolution must be a multiple of {multiple} (0 = {FAMILY_RESOLUTION[family]} for this model), got {res}.")


def train_settings(request: MakeRequest, checkpoint_title: str, work_folder: str, prompts_file: str) -> Dict[str, Any]:
    """The trainer's settings (vmix_lib.train.config names) for this request; ``prompts_file`` holds the
    request's prompts when it has any."""
    return {
        "checkpoint": checkpoint_title,
        "objective": "distill",
        "output_dir": work_folder,
        "name": request.name,
        "max_steps": request.steps,
        "batch_size": request.batch_size,
        "grad_accum": 1,
        "lr": request.learning_rate,
        "eta": request.eta,
        "resolution": request.resolution,
        "xt_steps": request.xt_steps,
        "seed": request.seed,
        "save_every": request.save_every,
        "preview_every": request.preview_every,
        "gradient_checkpointing": request.gradient_checkpointing,
        "prompts_file": prompts_file if request.prompts else "",
        "phrases": {r.name: (r.phrase, r.contrast) for r in request.rows},
        "preview_lambdas": [0.0, 1.0, 2.0],
        "preview_dimensions": True,
        "save_precision": "fp16",
        "mixed_precision": "auto",
    }
