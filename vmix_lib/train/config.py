"""Trainer configuration: one table of settings, read from a TOML / JSON / YAML file and flags.

Precedence: built-in defaults < config file < command-line flags.  In a file, settings may sit at the
top level or in their section ([model], [data], [train], [lora], [preview]); relative paths in a file
are relative to that file's folder, relative paths in flags to the current folder.  Every flag is
the setting's name with dashes (``lora_rank`` -> ``--lora-rank``), ``dimensions`` included
(``--dimensions color,lighting``: built-in names, or names the config file defines).  A value of 0
for ``lr`` and ``resolution`` means the family default (1e-4 / 512 for SD1.5, 1e-5 / 1024 for SDXL,
paper §3).
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..dimensions import DEFAULT_DIMENSIONS, AestheticDimension, check_dimensions
from .errors import TrainError

FAMILY_DEFAULTS = {"sd15": {"lr": 1e-4, "resolution": 512}, "sdxl": {"lr": 1e-5, "resolution": 1024}}


@dataclass(frozen=True)
class Setting:
    name: str
    section: str
    kind: str  # str, path, int, float, bool, choice, floats, strs, pairs
    default: Any
    help: str
    choices: Tuple[str, ...] = ()
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    required: bool = False


SETTINGS: Tuple[Setting, ...] = (
    # model
    Setting("checkpoint", "model", "path", "", "single-file SD1.5/SDXL checkpoint (.safetensors)", required=True),
    Setting("family", "model", "choice", "auto", "model family (auto = read from the checkpoint)", ("auto", "sd15", "sdxl")),
    Setting("prediction", "model", "choice", "auto", "what the UNet predicts (auto = the checkpoint's v_pred marker, else epsilon)",
            ("auto", "epsilon", "v_prediction")),
    Setting("vae", "model", "path", "", "separate VAE .safetensors to use instead of the checkpoint's"),
    Setting("tokenizer_dir", "model", "path", "", "folder with CLIP vocab.json + merges.txt (or tokenizer/, tokenizer_2/)"),
    Setting("model_config_dir", "model", "path", "", "model configs to use instead of the shipped ones (unet.json, vae.json, ...)"),
    # data
    Setting("dataset_dir", "data", "path", "", "image folder with captions (name.txt) and labels (name.json / metadata.jsonl); "
            "required by objective data"),
    Setting("resolution", "data", "int", 0, "training size in pixels: squares of it, or buckets of about its area (0 = 512 SD1.5, 1024 SDXL)",
            minimum=0),
    Setting("bucket", "data", "bool", True, "aspect-ratio buckets: each image keeps its shape, resized to cover the closest bucket and "
            "centre-cropped (false = square centre crops)"),
    Setting("bucket_min", "data", "int", 0, "smallest bucket side in pixels (0 = resolution / 2)", minimum=0),
    Setting("bucket_max", "data", "int", 0, "largest bucket side in pixels (0 = 2 x resolution)", minimum=0),
    Setting("bucket_step", "data", "int", 0, "bucket sides are multiples of this (0 = the model's size multiple: 64 for SD1.5/SDXL)",
            minimum=0),
    Setting("caption_dropout", "data", "float", 0.05, "probability of training a sample with an empty caption", minimum=0, maximum=1),
    Setting("aesthetic_dropout", "data", "float", 0.0, "probability of replacing a sample's labels by all-inferior", minimum=0, maximum=1),
    Setting("cache_latents", "data", "bool", True, "VAE-encode every image once and reuse the latents"),
    Setting("cache_dir", "data", "path", "", "where cached latents go (default: <output_dir>/cache)"),
    Setting("skip_bad", "data", "bool", False, "train without the images the dataset check lists (printed), instead of stopping"),
    Setting("data_workers", "data", "int", 2, "DataLoader worker processes per training process that load batches ahead (0 = none)",
            minimum=0),
    # train
    Setting("output_dir", "train", "path", "", "folder for adapters, LoRA, state, logs and previews", required=True),
    Setting("name", "train", "str", "vmix", "file name stem of the outputs"),
    Setting("max_steps", "train", "int", 1000, "optimiser steps to train", minimum=1),
    Setting("objective", "train", "choice", "data", "what to train on: data = the dataset's labelled images (ε/v-prediction loss); "
            "distill = content prompts and phrase pairs, the base model's own predictions as the target ([distill])",
            ("data", "distill")),
    Setting("batch_size", "train", "int", 1, "images per micro-batch on each process (GPU)", minimum=1),
    Setting("grad_accum", "train", "int", 1, "micro-batches per optimiser step (global batch = batch_size x processes x grad_accum)",
            minimum=1),
    Setting("lr", "train", "float", 0.0, "AdamW learning rate (0 = 1e-4 SD1.5, 1e-5 SDXL)", minimum=0),
    Setting("weight_decay", "train", "float", 0.01, "AdamW weight decay", minimum=0),
    Setting("warmup_steps", "train", "int", 0, "linear learning-rate warm-up steps", minimum=0),
    Setting("lr_schedule", "train", "choice", "constant", "learning rate after the warm-up: constant, or decaying to 0 at max_steps",
            ("constant", "linear", "cosine")),
    Setting("max_grad_norm", "train", "float", 1.0, "gradient clipping norm (0 = off)", minimum=0),
    Setting("mixed_precision", "train", "choice", "auto", "autocast precision on CUDA (auto = bf16 if supported, else fp16; CPU: no)",
            ("auto", "no", "fp16", "bf16")),
    Setting("gradient_checkpointing", "train", "bool", False, "recompute UNet activations in the backward pass (less memory, slower)"),
    Setting("seed", "train", "int", 0, "seed for data order, noise, timesteps and dropout"),
    Setting("device", "train", "str", "auto", "auto = cuda if available, else cpu; several processes: each its LOCAL_RANK's GPU "
            "(cpu: torchrun processes train together over gloo)"),
    Setting("threads", "train", "int", 0, "torch CPU threads per process (0 = auto: 1 for a UNet under 10 M parameters, a test "
            "or smoke-run model, else torch's default; OMP_NUM_THREADS, when set, is kept)", minimum=0),
    Setting("ddp_timeout", "train", "int", 60, "minutes a process waits for the others (latent caching, saving) before giving up",
            minimum=1),
    Setting("save_every", "train", "int", 500, "save adapter (+LoRA, +resume state) every N steps (0 = only at the end)", minimum=0),
    Setting("save_precision", "train", "choice", "fp16", "precision of W_a and LoRA in saved files", ("fp32", "fp16", "bf16")),
    Setting("resume", "train", "str", "", "resume from a .state.pt file, or 'latest' in output_dir"),
    # distill (objective = "distill"; vmix_lib/train/distill.py)
    Setting("prompts_file", "distill", "path", "", "content prompts, one a line (# comments); empty = the built-in set of 60"),
    Setting("phrases", "distill", "pairs", {}, "per dimension the phrase added to the prompt and its contrast: in a file "
            "color = [\"vibrant colors\", \"dull colors\"]; as a flag NAME=POSITIVE or NAME=POSITIVE|CONTRAST, repeated "
            "(default: the dimension's label against the prompt alone)"),
    Setting("eta", "distill", "float", 1.0, "η, the weight of each superior dimension's difference in the target", minimum=0.01, maximum=10),
    Setting("superior_prob", "distill", "float", 0.5, "probability that a dimension is superior in a sample", minimum=0.01, maximum=1),
    Setting("xt_steps", "distill", "int", 25, "DDIM schedule the noisy state x_t is sampled on (the student, from noise)", minimum=2),
    Setting("xt_guidance", "distill", "float", 3.0, "classifier-free guidance while sampling x_t (1 = none)", minimum=1),
    Setting("min_timestep", "distill", "int", 0, "lowest timestep the loss is taken at", minimum=0, maximum=999),
    Setting("max_timestep", "distill", "int", 999, "highest timestep the loss is taken at", minimum=0, maximum=999),
    Setting("mirror", "distill", "bool", False, "also train lambda -1 towards the opposite direction on half the samples"),
    Setting("max_teacher_rows", "distill", "int", 0, "split the teacher's batched UNet call into calls of at most this many rows "
            "(0 = one call)", minimum=0),
    # lora
    Setting("lora_rank", "lora", "int", 0, "LoRA rank on the UNet's attention layers (0 = no LoRA)", minimum=0),
    Setting("lora_alpha", "lora", "float", 0.0, "LoRA alpha (0 = rank; scale = alpha / rank)", minimum=0),
    Setting("lora_targets", "lora", "choice", "attention", "attention: q/k/v/out of attn1+attn2; transformer: every linear layer of the transformer blocks",
            ("attention", "transformer")),
    Setting("lora_conv_rank", "lora", "int", 0, "LoRA rank on ResNet and sampler convolutions (0 = none)", minimum=0),
    Setting("lora_conv_alpha", "lora", "float", 0.0, "alpha of the convolution LoRA (0 = its rank)", minimum=0),
    # preview
    Setting("preview_every", "preview", "int", 500, "write a lambda-sweep grid every N steps and at the end (0 = never)", minimum=0),
    Setting("preview_prompts", "preview", "strs", [], "prompts of the preview rows (default: the first two captions)"),
    Setting("preview_lambdas", "preview", "floats", [0.0, 0.5, 1.0, 1.5, 2.0], "lambda of each preview column"),
    Setting("preview_steps", "preview", "int", 20, "DDIM steps per preview image", minimum=1),
    Setting("preview_cfg", "preview", "float", 7.5, "classifier-free guidance scale of the previews", minimum=0),
    Setting("preview_seed", "preview", "int", 0, "seed of the preview noise"),
    Setting("preview_dimensions", "preview", "bool", True, "also one row per dimension alone (the others at alpha 0) "
            "for the first prompt"),
    Setting("preview_resolution", "preview", "int", 0, "preview size in pixels (0 = training resolution)", minimum=0),
)
BY_NAME: Dict[str, Setting] = {s.name: s for s in SETTINGS}
SECTIONS = ("model", "data", "train", "distill", "lora", "preview")
FLAG_NAMES = {"preview_prompts": "--preview-prompt", "phrases": "--phrase"}  # repeated flags, one item each


class TrainConfig:
    """Resolved settings (attribute access) plus the aesthetic dimensions; ``origins`` says where a
    setting was given (a flag or the config file), for messages."""

    def __init__(self, values: Dict[str, Any], dimensions: Sequence[AestheticDimension], source: Optional[str] = None,
                 origins: Optional[Dict[str, str]] = None):
        self.values = dict(values)
        self.dimensions = list(dimensions)
        self.source = source
        self.origins = dict(origins or {})

    def origin(self, name: str) -> str:
        """Where a setting was given: its flag, the config file, or '' (the default)."""
        return self.origins.get(name, "")

    def __getattr__(self, name: str):
        values = self.__dict__.get("values", {})
        if name in values:
            return values[name]
        raise AttributeError(name)

    def family_default(self, name: str, family: str):
        value = self.values[name]
        return value if value else FAMILY_DEFAULTS[family][name]

    def to_json(self) -> Dict[str, Any]:
        out = {section: {} for section in SECTIONS}
        for s in SETTINGS:
            out[s.section][s.name] = self.values[s.name]
        out["dimensions"] = [d.to_json() for d in self.dimensions]
        return out


def _suggest(name: str) -> str:
    close = difflib.get_close_matches(name, list(BY_NAME) + ["dimensions"], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def read_config_file(path: str) -> Dict[str, Any]:
    """The file's raw mapping (TOML, JSON or YAML by extension)."""
    if not os.path.isfile(path):
        raise TrainError(f"config file {path} does not exist")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".toml":
            import tomllib

            with open(path, "rb") as f:
                data = tomllib.load(f)
        elif ext == ".json":
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        elif ext in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise TrainError(f"config file {path} is YAML, but PyYAML is not installed; pip install pyyaml or use TOML") from None
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f) or {}
        else:
            raise TrainError(f"config file {path} must end in .toml, .json, .yaml or .yml")
    except TrainError:
        raise
    except Exception as e:  # tomllib/json/yaml errors carry line numbers in their text
        raise TrainError(f"config file {path} cannot be parsed ({e})") from None
    if not isinstance(data, dict):
        raise TrainError(f"config file {path} must hold a table of settings at the top level")
    return data


def _coerce(setting: Setting, value: Any, where: str, base_dir: Optional[str]) -> Any:
    what = f"{setting.name} in {where}"
    kind = setting.kind
    if kind in ("str", "path", "choice"):
        if not isinstance(value, str):
            raise TrainError(f"{what} must be a string, got {value!r}")
        if kind == "choice" and value not in setting.choices:
            raise TrainError(f"{what} must be one of {', '.join(setting.choices)}, got {value!r}")
        if kind == "path" and value and base_dir is not None:
            value = os.path.normpath(os.path.join(base_dir, os.path.expanduser(value)))
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise TrainError(f"{what} must be true or false, got {value!r}")
        return value
    if kind in ("int", "float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind == "int" and not float(value).is_integer()):
            raise TrainError(f"{what} must be {'an integer' if kind == 'int' else 'a number'}, got {value!r}")
        value = int(value) if kind == "int" else float(value)
        if value != value:  # NaN
            raise TrainError(f"{what} must be a number, got {value!r}")
        if setting.minimum is not None and value < setting.minimum:
            raise TrainError(f"{what} must be at least {setting.minimum:g}, got {value:g}")
        if setting.maximum is not None and value > setting.maximum:
            raise TrainError(f"{what} must be at most {setting.maximum:g}, got {value:g}")
        return value
    if kind == "floats":
        if not isinstance(value, list) or not value or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value):
            raise TrainError(f"{what} must be a non-empty list of numbers, got {value!r}")
        return [float(v) for v in value]
    if kind == "strs":
        if not isinstance(value, list) or any(not isinstance(v, str) or not v.strip() for v in value):
            raise TrainError(f"{what} must be a list of non-empty strings, got {value!r}")
        return list(value)
    if kind == "pairs":
        return _pairs(value, what)
    raise AssertionError(kind)


def _pairs(value: Any, what: str) -> Dict[str, Tuple[str, str]]:
    """{dimension: (positive, contrast)} from a table ({name: "pos"} or {name: ["pos", "contrast"]})
    or from flags (["name=pos|contrast", ...])."""
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        table = {}
        for item in value:
            name, sep, phrases = item.partition("=")
            if not sep or not name.strip():
                raise TrainError(f"{what} must look like NAME=POSITIVE or NAME=POSITIVE|CONTRAST, got {item!r}")
            positive, _, contrast = phrases.partition("|")
            table[name.strip()] = [positive, contrast]
        value = table
    if not isinstance(value, dict):
        raise TrainError(f"{what} must be a table of dimension = [positive, contrast], got {value!r}")
    out = {}
    for name, pair in value.items():
        if isinstance(pair, str):
            pair = [pair, ""]
        if not (isinstance(pair, list) and len(pair) in (1, 2) and all(isinstance(p, str) for p in pair)):
            raise TrainError(f"{what}: {name} must be a phrase or [positive, contrast], got {pair!r}")
        positive, contrast = pair[0].strip(), (pair[1].strip() if len(pair) == 2 else "")
        if not positive:
            raise TrainError(f"{what}: {name} has an empty positive phrase")
        out[str(name)] = (positive, contrast)
    return out


def _parse_dimensions(raw: Any, where: str) -> List[AestheticDimension]:
    defaults = {d.name: d for d in DEFAULT_DIMENSIONS}
    if not isinstance(raw, list) or not raw:
        raise TrainError(f"dimensions in {where} must be a non-empty list")
    dims = []
    for i, item in enumerate(raw, 1):
        if isinstance(item, str):
            if item not in defaults:
                raise TrainError(
                    f"dimension {item!r} in {where} is not a built-in one ({', '.join(defaults)}); "
                    "give it as a table with name, positive and negative"
                )
            dims.append(defaults[item])
        elif isinstance(item, dict) and set(item) == {"name", "positive", "negative"} and all(isinstance(v, str) for v in item.values()):
            dims.append(AestheticDimension(item["name"], item["positive"], item["negative"]))
        else:
            raise TrainError(f"dimension {i} in {where} must be a built-in name or a table with name, positive and negative strings")
    problem = check_dimensions(dims)
    if problem:
        raise TrainError(f"the dimensions in {where}: {problem}")
    return dims


def _dimensions_flag(text: str, file_dims: Optional[List[AestheticDimension]], where: str) -> List[AestheticDimension]:
    """``--dimensions a,b``: built-in names, or names the config file defines (a new dimension needs
    its positive phrase and rare token, which only a table in the file can give)."""
    names = [n.strip() for n in text.split(",")]
    if not text.strip() or not all(names):
        raise TrainError(f"--dimensions {text!r} must be dimension names separated by commas, e.g. --dimensions color,lighting")
    known = {d.name: d for d in DEFAULT_DIMENSIONS}
    known.update({d.name: d for d in file_dims or []})
    dims = []
    for name in names:
        if name not in known:
            raise TrainError(
                f"--dimensions names {name!r}, which is neither built in ({', '.join(d.name for d in DEFAULT_DIMENSIONS)}) "
                f"nor defined in {where}; define it there as a table: dimensions = [{{ name = \"{name}\", "
                "positive = \"<label phrase>\", negative = \"<rare token>\" }]"
            )
        dims.append(known[name])
    problem = check_dimensions(dims)
    if problem:
        raise TrainError(f"--dimensions {text}: {problem}")
    return dims


def not_a_multiple(name: str, value: int, multiple: int, where: str = "") -> str:
    """'resolution 30 (--resolution) must be a multiple of 64 for this model, e.g. 64': the sentence
    for a pixel size the model cannot use, with the nearest sizes it can."""
    below, above = value // multiple * multiple, (value // multiple + 1) * multiple
    nearest = f"{below} or {above}" if below > 0 else f"{above}"
    return f"{name} {value}{f' ({where})' if where else ''} must be a multiple of {multiple} for this model, e.g. {nearest}"


def settings_from_mapping(data: Dict[str, Any], where: str, base_dir: Optional[str]) -> Tuple[Dict[str, Any], Optional[List[AestheticDimension]]]:
    """Validated {setting: value} and dimensions (None if absent) from a config mapping."""
    values: Dict[str, Any] = {}
    dims = None
    for key, value in data.items():
        if key in SECTIONS and isinstance(value, dict):
            for inner, inner_value in value.items():
                setting = BY_NAME.get(inner)
                if setting is None:
                    raise TrainError(f"unknown setting {inner!r} in [{key}] of {where}{_suggest(inner)}")
                if setting.section != key:
                    raise TrainError(f"setting {inner!r} belongs in [{setting.section}], not [{key}], in {where}")
                values[inner] = _coerce(setting, inner_value, where, base_dir)
        elif key == "dimensions":
            dims = _parse_dimensions(value, where)
        elif key in BY_NAME:
            values[key] = _coerce(BY_NAME[key], value, where, base_dir)
        else:
            raise TrainError(f"unknown setting {key!r} in {where}{_suggest(key)}")
    return values, dims


def _flag(setting: Setting) -> str:
    return FLAG_NAMES.get(setting.name, "--" + setting.name.replace("_", "-"))


def _floats(text: str) -> List[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vmix_lib.train",
        description="Train a VMix aesthetics adapter (and optionally a LoRA) for an SD1.5 or SDXL checkpoint, offline.",
        epilog="Settings come from --config (TOML, JSON or YAML); any flag overrides the file.",
    )
    parser.add_argument("--config", help="config file (.toml, .json, .yaml)")
    parser.add_argument("--dry-run", action="store_true", help="check the config, dataset and checkpoint, then stop")
    parser.add_argument("--dimensions", metavar="A,B,...",
                        help="the aesthetic dimensions to train, in order: built-in names (" + ", ".join(d.name for d in DEFAULT_DIMENSIONS)
                        + ") or names the config file's dimensions define (default: the file's, else all built-in ones)")
    groups = {s: parser.add_argument_group(s) for s in SECTIONS}
    for s in SETTINGS:
        flag = _flag(s)
        kwargs: Dict[str, Any] = {"dest": s.name, "default": None, "help": s.help}
        if s.kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif s.kind == "int":
            kwargs["type"] = int
        elif s.kind == "float":
            kwargs["type"] = float
        elif s.kind == "floats":
            kwargs["type"] = _floats
            kwargs["metavar"] = "A,B,..."
        elif s.kind in ("strs", "pairs"):
            kwargs["action"] = "append"
            kwargs["metavar"] = "PROMPT" if s.kind == "strs" else "NAME=POSITIVE[|CONTRAST]"
        elif s.kind == "choice":
            kwargs["choices"] = s.choices
        groups[s.section].add_argument(flag, **kwargs)
    return parser


def resolve_config(argv: Optional[Sequence[str]] = None) -> Tuple[TrainConfig, argparse.Namespace]:
    """Parse flags, read the config file, validate; raises TrainError with one sentence."""
    parser = build_parser()
    args = parser.parse_args(argv)
    values = {s.name: (type(s.default)(s.default) if isinstance(s.default, (list, dict)) else s.default) for s in SETTINGS}
    dims: List[AestheticDimension] = list(DEFAULT_DIMENSIONS)
    source = None
    origins: Dict[str, str] = {}
    file_dims = None
    if args.config:
        source = os.path.abspath(args.config)
        file_values, file_dims = settings_from_mapping(read_config_file(source), args.config, os.path.dirname(source))
        values.update(file_values)
        origins.update({name: args.config for name in file_values})
        dims = file_dims or dims
    if args.dimensions is not None:
        dims = _dimensions_flag(args.dimensions, file_dims, args.config or "a config file")
    for s in SETTINGS:
        flag_value = getattr(args, s.name)
        if flag_value is not None:
            values[s.name] = _coerce(s, flag_value, _flag(s), os.getcwd() if s.kind == "path" else None)
            origins[s.name] = _flag(s)
    for s in SETTINGS:
        if s.required and not values[s.name]:
            raise TrainError(f"no {s.name} given; set {s.name} in the config file or pass {_flag(s)}")
    if values["objective"] == "data" and not values["dataset_dir"]:
        raise TrainError("no dataset_dir given; set dataset_dir in the config file or pass --dataset-dir "
                         "(or train without pictures: objective = \"distill\")")
    if values["min_timestep"] > values["max_timestep"]:
        raise TrainError(f"min_timestep {values['min_timestep']} is above max_timestep {values['max_timestep']}")
    name = values["name"]
    if not name or any(c in name for c in '/\\:*?"<>|') or name.startswith("."):
        raise TrainError(f"name {name!r} cannot be used as a file name stem")
    # resolution and preview_resolution: their multiple depends on the model, checked once it is known (run.py)
    return TrainConfig(values, dims, source, origins), args
