"""Settings of ``python -m vmix_lib.prepare``: the command line, validated into one dataclass.

Label rules per dimension: ``--quantile 0.7`` (superior = the top 30 % of the kept images on that
dimension's score) or ``--margin 0.1`` (superior when P(positive pole) - P(negative pole) >= 0.1,
i.e. score >= 0.55); either flag also takes ``DIM=VALUE`` for one dimension.  A dimension's own rule
beats the global one; giving one dimension both kinds is an error.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from ..dimensions import NAME_RE
from ..scoring import ScoringError
from ..scoring.clip import DEFAULT_CLIP
from ..scoring.images import IMAGE_EXTENSIONS
from ..scoring.probes import DEFAULT_PROBES, DimensionProbe, default_probes, parse_probe
from .errors import PrepareError

LINK_MODES = ("symlink", "hardlink", "copy")
DEFAULT_QUANTILE = 0.7


@dataclass(frozen=True)
class Rule:
    kind: str  # "quantile" or "margin"
    value: float

    def describe(self) -> str:
        if self.kind == "quantile":
            return f"quantile {self.value:g} (top {100 * (1 - self.value):.3g} %)"
        return f"margin {self.value:g} (score >= {(1 + self.value) / 2:.4g})"


@dataclass
class PrepareSettings:
    input_dir: str
    output_dir: str
    clip: str = DEFAULT_CLIP
    allow_download: bool = False
    aesthetic_predictor: str = ""
    min_aesthetic: Optional[float] = None
    top_aesthetic: Optional[float] = None  # fraction of the images kept, by aesthetic score
    probes: List[DimensionProbe] = field(default_factory=lambda: list(DEFAULT_PROBES))
    rules: Dict[str, Rule] = field(default_factory=dict)  # per dimension; missing = quantile 0.7
    min_side: int = 256
    near_duplicate: Optional[float] = 0.95  # cosine of CLIP image embeddings; None = off
    watermark_model: str = ""
    watermark_labels: Tuple[str, ...] = ()
    watermark_threshold: float = 0.5
    captioner: str = ""
    caption_prompt: str = ""
    caption_max_tokens: int = 40
    default_caption: str = ""
    link_mode: str = "symlink"
    overrides: str = ""  # default: <output>/prepare/overrides.csv
    device: str = "auto"
    batch_size: int = 32
    workers: int = -1  # -1: min(4, cpus - 1)
    threads: int = 0  # torch CPU threads; 0 = auto (vmix_lib/cpu_threads.py)
    review_limit: int = 400  # thumbnails per column of a review page
    shard_size: int = 1024  # embeddings per cache shard (also written every minute and on Ctrl-C)

    @property
    def dimension_names(self) -> List[str]:
        return [p.name for p in self.probes]

    def rule(self, name: str) -> Rule:
        return self.rules.get(name, Rule("quantile", DEFAULT_QUANTILE))

    @property
    def overrides_path(self) -> str:
        return self.overrides or os.path.join(self.output_dir, "prepare", "overrides.csv")

    def worker_count(self) -> int:
        return self.workers if self.workers >= 0 else min(4, max(0, (os.cpu_count() or 1) - 1))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vmix_lib.prepare",
        description="Turn a folder of pictures into a labelled VMix training dataset (captions, per-dimension "
        "superior/inferior labels, filters, review pages).  The originals are never changed or moved.",
        epilog="Rerun the same command to continue an interrupted run, or with new thresholds: "
        "everything already computed is reused.",
    )
    p.add_argument("input_dir", help="folder of images (searched recursively: "
                   + ", ".join(e.lstrip(".") for e in IMAGE_EXTENSIONS) + "; other files are counted and skipped)")
    p.add_argument("output_dir", help="the dataset folder to write (new or written by this tool before)")
    m = p.add_argument_group("models")
    m.add_argument("--clip", default=DEFAULT_CLIP, help="CLIP folder or hub id (default: %(default)s, the predictor's CLIP)")
    m.add_argument("--allow-download", action="store_true", help="let transformers download hub ids that are not cached")
    m.add_argument("--aesthetic-predictor", default="", metavar="FILE",
                   help="LAION improved aesthetic predictor (.pth or .safetensors, e.g. sac+logos+ava1-l14-linearMSE.pth)")
    m.add_argument("--device", default="auto", help="torch device (auto = cuda if available, else cpu)")
    m.add_argument("--batch-size", type=int, default=32)
    m.add_argument("--workers", type=int, default=-1, help="image decoding processes (default: min(4, CPUs - 1))")
    m.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (default 0 = auto: 1 when the models are tiny, under 10 M parameters; "
                   "else torch's default; OMP_NUM_THREADS, when set, is kept)")
    f = p.add_argument_group("filters")
    f.add_argument("--min-side", type=int, default=256, help="drop images whose short side is smaller (default %(default)s; 0 = off)")
    f.add_argument("--near-duplicates", default="0.95", metavar="COSINE",
                   help="drop the lower-scored of two images whose CLIP image embeddings have a cosine above this (default %(default)s; 'off')")
    g = f.add_mutually_exclusive_group()
    g.add_argument("--min-aesthetic", type=float, default=None, metavar="SCORE", help="keep images with an aesthetic score at least this (e.g. 5.5)")
    g.add_argument("--top-aesthetic", type=float, default=None, metavar="FRACTION", help="keep this fraction of the images, best aesthetic scores first")
    f.add_argument("--watermark-model", default="", metavar="MODEL",
                   help="transformers image-classification model (folder or hub id) that flags watermarks or text")
    f.add_argument("--watermark-labels", default="", metavar="A,B",
                   help="the model's labels that mean 'reject' (default: labels naming a watermark, logo or text)")
    f.add_argument("--watermark-threshold", type=float, default=0.5, help="drop images whose reject probability is at least this")
    lab = p.add_argument_group("labels")
    lab.add_argument("--dimensions", default="", metavar="A,B",
                     help="dimensions to label, in order (default: " + ", ".join(pr.name for pr in DEFAULT_PROBES)
                     + ", then every --probe dimension); a name that is not built in needs a --probe")
    lab.add_argument("--probe", action="append", default=[], metavar="NAME=POS|NEG;POS|NEG",
                     help="define a dimension (or replace a built-in one's phrasings) by antonym phrasings; repeatable")
    lab.add_argument("--quantile", action="append", default=[], metavar="[DIM=]Q",
                     help=f"superior = score at or above the Q quantile of the kept images (default {DEFAULT_QUANTILE})")
    lab.add_argument("--margin", action="append", default=[], metavar="[DIM=]M",
                     help="superior = P(positive) - P(negative) at least M, averaged over phrasings")
    lab.add_argument("--overrides", default="", metavar="FILE",
                     help="label overrides CSV (default: OUTPUT/prepare/overrides.csv; written empty on the first run)")
    c = p.add_argument_group("captions")
    c.add_argument("--captioner", default="", metavar="MODEL",
                   help="transformers image-to-text model (folder or hub id, e.g. Salesforce/blip-image-captioning-large) for images without a caption")
    c.add_argument("--caption-prompt", default="", help="text the captioner continues (BLIP: e.g. 'a photography of')")
    c.add_argument("--caption-max-tokens", type=int, default=40)
    c.add_argument("--default-caption", default="", help="caption for images that have none (instead of leaving them out)")
    o = p.add_argument_group("output")
    o.add_argument("--link-mode", choices=LINK_MODES, default="symlink",
                   help="how images enter the dataset: symbolic link (default), hard link or copy")
    o.add_argument("--review-limit", type=int, default=400, help="thumbnails per column of a review page (more are sampled evenly by rank)")
    return p


def _number(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise PrepareError(f"{what} must be a number, got {text!r}") from None


def _rules(quantiles: Sequence[str], margins: Sequence[str], names: Sequence[str]) -> Dict[str, Rule]:
    global_rule: Optional[Rule] = None
    own: Dict[str, Rule] = {}
    for kind, items in (("quantile", quantiles), ("margin", margins)):
        for item in items:
            dim, sep, value = item.partition("=")
            if not sep:
                dim, value = "", item
            dim = dim.strip()
            number = _number(value.strip(), f"--{kind} {item}")
            if kind == "quantile" and not 0.0 <= number < 1.0:
                raise PrepareError(f"--quantile {item}: the quantile must be at least 0 and below 1 (0.7 = the top 30 % are superior)")
            if kind == "margin" and not -1.0 < number < 1.0:
                raise PrepareError(f"--margin {item}: the margin must lie between -1 and 1 (it is P(positive) - P(negative))")
            rule = Rule(kind, number)
            if not dim:
                if global_rule is not None and global_rule != rule:
                    raise PrepareError("give one global rule (--quantile Q or --margin M); other values need a dimension, e.g. --margin focus=0.2")
                global_rule = rule
                continue
            if dim not in names:
                raise PrepareError(f"--{kind} {item}: {dim!r} is not a dimension being labelled ({', '.join(names)})")
            if dim in own and own[dim] != rule:
                raise PrepareError(f"dimension {dim!r} has two rules (--{own[dim].kind} and --{kind}); give it one")
            own[dim] = rule
    return {n: own.get(n, global_rule) for n in names if own.get(n, global_rule) is not None}


def _probes(dimensions: str, specs: Sequence[str]) -> List[DimensionProbe]:
    names = [n.strip() for n in dimensions.split(",") if n.strip()]
    custom = []
    for spec in specs:
        try:
            probe = parse_probe(spec)
        except ScoringError as e:
            raise PrepareError(str(e)) from None
        if not NAME_RE.match(probe.name):
            raise PrepareError(f"dimension name {probe.name!r} must be a short lowercase identifier (letters, digits, _), as the trainer requires")
        custom.append(probe)
    by_name = {p.name: p for p in custom}
    if len(by_name) != len(custom):
        raise PrepareError("a dimension is defined twice with --probe")
    if not names:  # the six built-in dimensions, then the new ones
        names = [p.name for p in DEFAULT_PROBES] + [p.name for p in custom if p.name not in {d.name for d in DEFAULT_PROBES}]
    if len(set(names)) != len(names):
        raise PrepareError("--dimensions names a dimension twice")
    unlisted = [n for n in by_name if n not in names]
    if unlisted:
        raise PrepareError(f"--probe defines {unlisted[0]!r}, which --dimensions does not list; add it there")
    try:
        return [by_name.get(n) or default_probes([n])[0] for n in names]
    except ScoringError as e:
        raise PrepareError(str(e)) from None


def settings_from_args(argv: Optional[Sequence[str]] = None) -> PrepareSettings:
    args = build_parser().parse_args(argv)
    probes = _probes(args.dimensions, args.probe)
    names = [p.name for p in probes]
    near = args.near_duplicates.strip().lower()
    if near in ("off", "none", "no"):
        near_value = None
    else:
        near_value = _number(near, "--near-duplicates")
        if not 0.0 < near_value <= 1.0:
            raise PrepareError("--near-duplicates must be a cosine between 0 and 1 (e.g. 0.95), or 'off'")
    if args.top_aesthetic is not None and not 0.0 < args.top_aesthetic <= 1.0:
        raise PrepareError("--top-aesthetic is the fraction of images to keep: above 0 and at most 1 (e.g. 0.8)")
    if (args.min_aesthetic is not None or args.top_aesthetic is not None) and not args.aesthetic_predictor:
        raise PrepareError("--min-aesthetic/--top-aesthetic need the predictor: pass --aesthetic-predictor sac+logos+ava1-l14-linearMSE.pth")
    if not 0.0 < args.watermark_threshold <= 1.0:
        raise PrepareError("--watermark-threshold is a probability: above 0 and at most 1")
    if args.watermark_labels and not args.watermark_model:
        raise PrepareError("--watermark-labels needs --watermark-model")
    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--min-side", args.min_side, 0), ("--threads", args.threads, 0),
                             ("--caption-max-tokens", args.caption_max_tokens, 1), ("--review-limit", args.review_limit, 1)):
        if value < low:
            raise PrepareError(f"{flag} must be at least {low}")
    if args.caption_prompt and not args.captioner:
        raise PrepareError("--caption-prompt needs --captioner")
    return PrepareSettings(
        input_dir=os.path.abspath(args.input_dir), output_dir=os.path.abspath(args.output_dir),
        clip=args.clip, allow_download=args.allow_download, aesthetic_predictor=args.aesthetic_predictor,
        min_aesthetic=args.min_aesthetic, top_aesthetic=args.top_aesthetic, probes=probes,
        rules=_rules(args.quantile, args.margin, names), min_side=args.min_side, near_duplicate=near_value,
        watermark_model=args.watermark_model,
        watermark_labels=tuple(x.strip() for x in args.watermark_labels.split(",") if x.strip()),
        watermark_threshold=args.watermark_threshold, captioner=args.captioner, caption_prompt=args.caption_prompt,
        caption_max_tokens=args.caption_max_tokens, default_caption=args.default_caption.strip(),
        link_mode=args.link_mode, overrides=os.path.abspath(args.overrides) if args.overrides else "",
        device=args.device, batch_size=args.batch_size, workers=args.workers, threads=args.threads, review_limit=args.review_limit,
    )
