"""The preparation run: scan, check, filter, score, label, caption, write, review.

Every slow result is cached under ``OUTPUT/prepare/cache`` per image file (content hashes, CLIP image
embeddings in safetensors shards, classifier probabilities, captions), so a rerun - after an
interruption, or with other thresholds, rules or overrides - computes only what is missing.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..cpu_threads import apply_threads
from ..scoring.aesthetic import load_aesthetic_predictor
from ..scoring.clip import _short, load_clip
from ..scoring.device import resolve_device
from ..scoring.features import FeatureCache, embed_image_files
from ..scoring.images import IMAGE_EXTENSIONS, describe_skipped, read_image
from ..scoring.probes import antonym_probability, encode_probes
from .errors import PrepareError
from .filters import aesthetic_cut, exact_duplicates, near_duplicates
from .labels import read_overrides, threshold, write_overrides_template
from .models import check_path_like, load_captioner, load_image_classifier
from .output import DatasetFolder, dataset_names, write_atomic
from .records import RecordFile
from .review import DimensionReview, FilterReport, ReviewItem, Thumbnails, histogram_png, write_dimension_page, write_index
from .settings import PrepareSettings
from .sources import SourceImage, read_facts, scan_input

# Filters in the order they run: (id, title in reports)
FILTERS = (
    ("unreadable", "unreadable or truncated"),
    ("small", "too small"),
    ("duplicate", "exact duplicates"),
    ("watermark", "watermark / text"),
    ("near_duplicate", "near duplicates"),
    ("aesthetic", "aesthetic score"),
    ("excluded", "excluded by overrides"),
    ("no_caption", "no caption"),
)
# What an override "keep" can undo: judgements, not broken files or missing captions.
_SOFT = {"small", "duplicate", "watermark", "near_duplicate", "aesthetic"}


@dataclass
class PrepareResult:
    output_dir: str
    names: List[str]  # images in the dataset
    dropped: Dict[str, List[Tuple[str, str]]]  # filter id -> [(input path, reason)]
    thresholds: Dict[str, Optional[float]]
    superior: Dict[str, int]
    encoded: int  # CLIP image embeddings computed in this run (the rest came from the cache)
    captioned: int  # captions generated in this run
    review: str  # path of review/index.html
    notes: List[str] = field(default_factory=list)


def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([os.path.realpath(path), os.path.realpath(folder)]) == os.path.realpath(folder)


def _batched(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _log_default(message: str) -> None:
    print(message, flush=True)


def run_prepare(settings: PrepareSettings, log: Callable[[str], None] = _log_default, progress=None,
                clip=None, classifier=None, captioner=None) -> PrepareResult:
    """Run the whole preparation.  ``clip``, ``classifier``, ``captioner``: already loaded models
    (tests and callers that hold them); otherwise they are loaded from the settings."""
    if progress is None:
        from tqdm import tqdm as progress
    s = settings
    source_dir, out = os.path.abspath(s.input_dir), os.path.abspath(s.output_dir)
    if not os.path.isdir(source_dir):
        raise PrepareError(f"input folder {source_dir} does not exist or is not a folder")
    if _inside(out, source_dir) or _inside(source_dir, out):
        raise PrepareError(
            f"the output folder {out} and the input folder {source_dir} must not contain each other "
            "(the output would be read back as input); choose an output folder elsewhere"
        )
    folder = DatasetFolder(out, s.link_mode)
    folder.check()
    # Everything a user named is loaded and checked before any long work starts.
    overrides = read_overrides(s.overrides_path, s.dimension_names)
    device = resolve_device(s.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if clip is None:
        check_path_like("CLIP", s.clip)
        log(f"Loading CLIP {s.clip} ({device}) ...")
        clip = load_clip(s.clip, device=device, dtype=dtype, allow_download=s.allow_download)
    predictor = load_aesthetic_predictor(s.aesthetic_predictor, device=device, expected_dim=clip.dim) if s.aesthetic_predictor else None
    if s.watermark_model and classifier is None:
        log(f"Loading watermark model {s.watermark_model} ...")
        classifier = load_image_classifier(s.watermark_model, device=device, dtype=dtype, allow_download=s.allow_download)
    reject_columns = classifier.resolve_reject_labels(s.watermark_labels) if classifier is not None else []
    if s.captioner and captioner is None:
        log(f"Loading captioner {s.captioner} ...")
        captioner = load_captioner(s.captioner, device=device, dtype=dtype, allow_download=s.allow_download)
    models = [getattr(m, "model", None) for m in (clip, classifier, captioner)]
    parameters = [sum(p.numel() for p in m.parameters()) for m in models if isinstance(m, torch.nn.Module)]
    if parameters or s.threads:  # the largest model decides (stand-ins without a torch model: only --threads)
        threads = apply_threads(s.threads, max(parameters, default=0), "largest model", device.type)
        if threads:
            log(threads)
    folder.claim()
    cache_dir = os.path.join(folder.work, "cache")
    workers = s.worker_count()

    notes: List[str] = []
    skipped: Dict[str, int] = {}
    images = scan_input(source_dir, notes, skipped)
    formats = ", ".join(IMAGE_EXTENSIONS)
    if not images:
        raise PrepareError(f"no images ({formats}) under {source_dir}"
                           + (f"; skipped {sum(skipped.values())} other file(s): {describe_skipped(skipped)}" if skipped else ""))
    log(f"vmix prepare: {len(images)} images under {source_dir}")
    if skipped:
        notes.insert(0, f"skipped {sum(skipped.values())} file(s) that are not in an image format the trainer reads "
                        f"({formats}): {describe_skipped(skipped)}; convert them to include them")
    n = len(images)
    status: Dict[int, Tuple[str, str]] = {}  # image index -> (filter id, reason)

    def alive() -> List[int]:
        return [i for i in range(n) if i not in status]

    # -- checks that need no model ----------------------------------------------------------------
    facts = RecordFile(os.path.join(cache_dir, "files.jsonl"))
    read_facts(images, facts, max(1, workers), progress)
    for i, im in enumerate(images):
        if im.error or im.key is None:
            status[i] = ("unreadable", im.error or "cannot be read")
        elif s.min_side and min(im.width, im.height) < s.min_side:
            status[i] = ("small", f"{im.width}x{im.height} px, short side below {s.min_side}")
    live = alive()
    for d, k in exact_duplicates([images[i].sha256 for i in live], [bool(images[i].caption) for i in live]):
        status[live[d]] = ("duplicate", f"same content as {images[live[k]].rel}")

    # -- CLIP image embeddings (cached per file), scores ------------------------------------------
    names = dataset_names([im.rel for im in images])
    lookup = {}
    for i, im in enumerate(images):
        lookup[im.rel] = i
        lookup[names[im.rel]] = i
    # An image that 'keep' brings back after a check above (too small, an exact duplicate) needs its
    # scores too: it is embedded with the others, and stays out of the filters below.
    kept_back = {lookup[key] for key, action in overrides.actions.items() if action == "keep" and key in lookup}
    live = sorted(alive() + [i for i in kept_back if i in status and status[i][0] in _SOFT])
    features = FeatureCache(os.path.join(cache_dir, "clip"), clip.identity, shard_size=s.shard_size)
    index_of = {images[i].path: i for i in live}
    embedded = embed_image_files([images[i].path for i in live], features, clip.pixel_values, clip.embed_pixels,
                                 batch_size=s.batch_size, workers=workers, progress=progress, desc="CLIP image embeddings")
    for path, reason in embedded.failures:
        status[index_of[path]] = ("unreadable", reason)
    rows = [index_of[p] for p in embedded.paths]  # image index of each embedding row
    row_of = {i: r for r, i in enumerate(rows)}
    embeds = embedded.embeds.float() if rows else torch.zeros(0, clip.dim)
    del features  # it keeps the shards it read; the stacked copy in embeds is enough
    aesthetic = torch.empty(0)
    if predictor is not None:
        with torch.no_grad():
            aesthetic = torch.cat([predictor(chunk.to(device)).float().cpu() for chunk in embeds.split(4096)]) if rows else torch.zeros(0)
    encoded = encode_probes(clip, s.probes)
    dim_scores: Dict[str, torch.Tensor] = {}
    for probe in s.probes:
        pos, neg = encoded[probe.name]
        parts = [antonym_probability(chunk, pos, neg, clip.logit_scale) for chunk in embeds.split(4096)]
        dim_scores[probe.name] = torch.cat(parts) if parts else torch.zeros(0)
    rank_score = aesthetic if predictor is not None else (
        torch.stack([dim_scores[p.name] for p in s.probes]).mean(0) if rows else torch.zeros(0))
    rank_name = "aesthetic score" if predictor is not None else "mean dimension score"

    # -- watermark / text (optional model) ----------------------------------------------------------
    reject: Dict[int, float] = {}
    if classifier is not None:
        columns = reject_columns
        live = alive()
        probs = embed_image_files([images[i].path for i in live], FeatureCache(os.path.join(cache_dir, "watermark"), classifier.identity),
                                  classifier.pixel_values, classifier.probabilities, batch_size=s.batch_size, workers=workers,
                                  progress=progress, desc="watermark model")
        labels = "+".join(classifier.labels[c] for c in columns)
        for path, p in zip(probs.paths, probs.embeds[:, columns].sum(1).tolist() if probs.paths else []):
            i = index_of[path]
            reject[i] = p
            if p >= s.watermark_threshold:
                status[i] = ("watermark", f"P({labels}) = {p:.3f} >= {s.watermark_threshold:g}")
        for path, reason in probs.failures:
            status[index_of[path]] = ("unreadable", reason)

    # -- near duplicates, aesthetic ----------------------------------------------------------------
    live = alive()
    near_pairs: Dict[int, Tuple[int, float]] = {}  # dropped -> (kept, cosine)
    if s.near_duplicate is not None and len(live) > 1:
        pos = torch.tensor([row_of[i] for i in live])
        for d, k, cos in near_duplicates(embeds, rank_score[pos], s.near_duplicate, device=device, progress=progress, rows=pos):
            status[live[d]] = ("near_duplicate", f"cosine {cos:.4f} with {images[live[k]].rel}, which has the higher {rank_name}")
            near_pairs[live[d]] = (live[k], cos)
    live = alive()
    aesthetic_threshold = None
    if predictor is not None and live:
        pos = torch.tensor([row_of[i] for i in live])
        cut, aesthetic_threshold = aesthetic_cut(aesthetic[pos], s.min_aesthetic, s.top_aesthetic)
        for d in cut:
            rule = f"below {s.min_aesthetic:g}" if s.min_aesthetic is not None else f"outside the top {s.top_aesthetic:g} (cut at {aesthetic_threshold:.3f})"
            status[live[d]] = ("aesthetic", f"aesthetic score {float(aesthetic[row_of[live[d]]]):.3f}, {rule}")

    # -- overrides: exclude / keep -----------------------------------------------------------------
    override_file = os.path.basename(s.overrides_path)
    for key in sorted(set(overrides.actions) | {f for f, _ in overrides.labels}):
        if key not in lookup:
            notes.append(f"{override_file} names {key}, which is not an image of the input folder; ignored")
    for key, action in overrides.actions.items():
        i = lookup.get(key)
        if i is None:
            continue
        if action == "exclude" and i not in status:
            status[i] = ("excluded", f"excluded in {override_file}")
        elif action == "keep" and i in status and status[i][0] in _SOFT:
            del status[i]  # every soft-dropped image with a 'keep' was embedded above

    # -- captions ----------------------------------------------------------------------------------
    need = [i for i in alive() if not images[i].caption]
    captioned = 0
    if need and captioner is not None:
        tag = hashlib.sha1(f"{s.caption_prompt}\n{s.caption_max_tokens}".encode()).hexdigest()[:8]
        records = RecordFile(os.path.join(cache_dir, f"captions-{captioner.identity}-{tag}.jsonl"), flush_every=32)
        todo = [i for i in need if images[i].key not in records]
        if todo:
            bar = progress(total=len(todo), desc="captions", unit="img")
            try:
                for batch in _batched(todo, s.batch_size):
                    pictures = []
                    for i in batch:
                        try:
                            pictures.append(read_image(images[i].path))
                        except Exception:  # it decoded for CLIP a moment ago; treat as uncaptionable
                            pictures.append(None)
                    good = [(i, p) for i, p in zip(batch, pictures) if p is not None]
                    try:
                        texts = captioner.caption([p for _, p in good], s.caption_prompt, s.caption_max_tokens) if good else []
                    except (RuntimeError, ValueError, TypeError, KeyError) as e:  # e.g. a checkpoint that needs a chat template
                        raise PrepareError(
                            f"the captioner {captioner.source} failed on {images[batch[0]].rel} ({_short(e)}); it may need a prompt "
                            "(--caption-prompt) or not be an image-captioning model (captions written so far are kept)"
                        ) from None
                    for (i, _), text in zip(good, texts):
                        records.put(images[i].key, text.strip())
                    captioned += len(good)
                    bar.update(len(batch))
            finally:  # also on an error or Ctrl-C: the captions written so far are kept
                records.flush()
            bar.close()
        for i in need:
            text = (records.get(images[i].key) or "").strip()
            if text:
                images[i].caption, images[i].caption_source = text, "captioner"
    for i in alive():
        if not images[i].caption:
            if s.default_caption:
                images[i].caption, images[i].caption_source = s.default_caption, "default"
            else:
                status[i] = ("no_caption", "no caption (no NAME.txt or metadata.jsonl entry; use --captioner or --default-caption)")

    # -- labels --------------------------------------------------------------------------------------
    kept = alive()
    kept_rows = torch.tensor([row_of[i] for i in kept], dtype=torch.long)
    thresholds: Dict[str, Optional[float]] = {}
    labels: Dict[str, Dict[int, str]] = {}
    overridden: Dict[str, set] = {}
    for probe in s.probes:
        scores = dim_scores[probe.name][kept_rows] if len(kept) else torch.zeros(0)
        t = threshold(scores, s.rule(probe.name))
        thresholds[probe.name] = t
        labels[probe.name] = {i: ("superior" if t is not None and float(v) >= t else "inferior") for i, v in zip(kept, scores.tolist())}
        overridden[probe.name] = set()
    for (key, dim), label in overrides.labels.items():
        i = lookup.get(key)
        if i is None or i not in labels[dim]:
            if i is not None:
                notes.append(f"{override_file}: {key} is not in the dataset ({status.get(i, ('', 'dropped'))[1]}); its {dim} label was not applied")
            continue
        if labels[dim][i] != label:
            labels[dim][i] = label
            overridden[dim].add(i)

    # -- the dataset folder ------------------------------------------------------------------------
    wanted = {names[images[i].rel]: (images[i].path, images[i].key) for i in kept}
    placed, removed = folder.sync_images(wanted, progress)
    folder.write_metadata(
        {"file_name": names[images[i].rel], "text": images[i].caption, "labels": {p.name: labels[p.name][i] for p in s.probes}}
        for i in sorted(kept, key=lambda i: names[images[i].rel])
    )
    created_template = write_overrides_template(s.overrides_path) if not s.overrides else False

    # -- scores, report, review --------------------------------------------------------------------
    dropped = {fid: [(images[i].rel, status[i][1]) for i in range(n) if i in status and status[i][0] == fid] for fid, _ in FILTERS}
    _write_scores(os.path.join(folder.work, "scores.csv"), images, names, status, row_of, aesthetic if predictor is not None else None,
                  reject, dim_scores, labels, s)
    missing = dropped["no_caption"]
    write_atomic(os.path.join(folder.work, "missing_captions.txt"), "".join(f"{rel}\n" for rel, _ in missing))
    superior = {p.name: sum(1 for v in labels[p.name].values() if v == "superior") for p in s.probes}
    trainer_hint = _trainer_hint(s)
    report = {
        "format": "vmix-prepare/1",
        "input_dir": source_dir, "output_dir": out, "link_mode": s.link_mode,
        "clip": s.clip, "clip_identity": clip.identity, "aesthetic_predictor": s.aesthetic_predictor or None,
        "near_duplicate_threshold": s.near_duplicate, "min_side": s.min_side,
        "aesthetic_rule": {"min": s.min_aesthetic, "top_fraction": s.top_aesthetic, "threshold": aesthetic_threshold},
        "watermark_model": s.watermark_model or None, "watermark_threshold": s.watermark_threshold if classifier is not None else None,
        "captioner": s.captioner or None,
        "counts": {"found": n, "in_dataset": len(kept), **{fid: len(v) for fid, v in dropped.items()}},
        "skipped_files": skipped,
        "dropped": {fid: [{"source": rel, "reason": reason} for rel, reason in v] for fid, v in dropped.items()},
        "dimensions": {
            p.name: {"rule": s.rule(p.name).describe(), "threshold": thresholds[p.name], "superior": superior[p.name],
                     "inferior": len(kept) - superior[p.name], "overridden": len(overridden[p.name]), "phrasings": [list(x) for x in p.pairs]}
            for p in s.probes
        },
        "captions": _caption_counts(images, kept),
        "notes": notes,
        "trainer": trainer_hint,
    }
    write_atomic(os.path.join(folder.work, "report.json"), json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    review = _write_review(folder, s, images, names, kept, labels, overridden, thresholds, dim_scores, row_of, aesthetic if predictor is not None else None,
                           aesthetic_threshold, dropped, status, near_pairs, notes, trainer_hint, len(images))

    log("  " + ", ".join(f"{title}: {len(dropped[fid])}" for fid, title in FILTERS))
    log(f"  dataset: {len(kept)} images in {out} ({s.link_mode}; {placed} placed, {removed} removed now); "
        f"CLIP embeddings computed now: {embedded.computed} (the rest from the cache)" + (f"; captions written now: {captioned}" if captioned else ""))
    if kept:
        log("  superior/inferior: " + ", ".join(
            f"{p.name} {superior[p.name]}/{len(kept) - superior[p.name]} (threshold {'n/a' if thresholds[p.name] is None else format(thresholds[p.name], '.4f')})"
            for p in s.probes))
    for note in notes[:20]:
        log(f"  note: {note}")
    if len(notes) > 20:
        log(f"  ... {len(notes) - 20} more notes in {os.path.join(folder.work, 'report.json')}")
    log(f"  review: {review}")
    log(f"  label overrides: {s.overrides_path}" + (" (created empty)" if created_template else "") + "; rerun the same command to apply them")
    if not kept:
        raise PrepareError(f"no image is left in the dataset: all {n} were dropped (the counts above; {review} shows why each one was)")
    log(f"  trainer: {trainer_hint}")
    return PrepareResult(out, sorted(wanted), dropped, thresholds, superior, embedded.computed, captioned, review, notes)


def _caption_counts(images: Sequence[SourceImage], kept: Sequence[int]) -> Dict[str, int]:
    counts = {"txt": 0, "metadata": 0, "captioner": 0, "default": 0}
    for i in kept:
        counts[images[i].caption_source] = counts.get(images[i].caption_source, 0) + 1
    return counts


def trainer_settings(s: PrepareSettings) -> Tuple[Optional[List[str]], str]:
    """What the trainer needs to read this dataset: its flags (None when a dimension is not built in:
    a new one needs a table in the config file) and the same as config-file lines (TOML)."""
    from ..dimensions import DEFAULT_DIMENSIONS

    builtin = {d.name for d in DEFAULT_DIMENSIONS}
    parts = [json.dumps(p.name) if p.name in builtin else
             f'{{ name = "{p.name}", positive = "<label phrase>", negative = "<rare token>" }}' for p in s.probes]
    toml = f"dataset_dir = {json.dumps(s.output_dir, ensure_ascii=False)}\ndimensions = [{', '.join(parts)}]"
    if all(p.name in builtin for p in s.probes):
        return ["--dataset-dir", s.output_dir, "--dimensions", ",".join(p.name for p in s.probes)], toml
    return None, toml


def _trainer_hint(s: PrepareSettings) -> str:
    flags, toml = trainer_settings(s)
    in_file = "; ".join(toml.splitlines())
    if flags is None:
        return f"python -m vmix_lib.train with these lines in its config file: {in_file}"
    quoted = " ".join(f'"{f}"' if " " in f or not f else f for f in flags)
    return f"python -m vmix_lib.train --config YOUR.toml {quoted} (or in the config file: {in_file})"


def _write_scores(path, images, names, status, row_of, aesthetic, reject, dim_scores, labels, s) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    dims = s.dimension_names
    writer.writerow(["source", "file_name", "status", "reason", "width", "height", "sha256", "aesthetic", "watermark"]
                    + [f"score_{d}" for d in dims] + [f"label_{d}" for d in dims] + ["caption_source"])
    for i, im in enumerate(images):
        r = row_of.get(i)
        fid, reason = status.get(i, ("kept", ""))
        writer.writerow(
            [im.rel, names[im.rel], fid, reason, im.width or "", im.height or "", im.sha256,
             "" if aesthetic is None or r is None else f"{float(aesthetic[r]):.5f}",
             "" if i not in reject else f"{reject[i]:.5f}"]
            + ["" if r is None else f"{float(dim_scores[d][r]):.5f}" for d in dims]
            + [labels[d].get(i, "") for d in dims] + [im.caption_source if i not in status else ""]
        )
    write_atomic(path, buf.getvalue())


def _write_review(folder, s, images, names, kept, labels, overridden, thresholds, dim_scores, row_of, aesthetic,
                  aesthetic_threshold, dropped, status, near_pairs, notes, trainer_hint, found) -> str:
    os.makedirs(folder.review, exist_ok=True)
    thumbs = Thumbnails()
    reviews = []
    for probe in s.probes:
        items = [ReviewItem(names[images[i].rel], images[i].path, float(dim_scores[probe.name][row_of[i]]), labels[probe.name][i],
                            i in overridden[probe.name]) for i in kept]
        hist = histogram_png([it.score for it in items], thresholds[probe.name], f"{probe.name} score",
                             os.path.join(folder.review, f"hist-{probe.name}.png"))
        reviews.append(DimensionReview(probe.name, s.rule(probe.name).describe(), thresholds[probe.name], probe.pairs, items, hist))
    histograms = [r.histogram for r in reviews]
    if aesthetic is not None:
        scored = [float(aesthetic[row_of[i]]) for i in range(len(images)) if i in row_of and status.get(i, ("kept",))[0] in ("kept", "aesthetic")]
        histograms.insert(0, histogram_png(scored, aesthetic_threshold, "aesthetic score", os.path.join(folder.review, "hist-aesthetic.png"),
                                           above="kept", below="dropped"))
    for review in reviews:
        write_dimension_page(os.path.join(folder.review, f"{review.name}.html"), review, s.dimension_names, thumbs,
                             s.review_limit, s.overrides_path)
    pairs = [(names[images[i].rel], names[images[j].rel], cos, images[i].path, images[j].path)
             for i, (j, cos) in sorted(near_pairs.items()) if status.get(i, ("",))[0] == "near_duplicate"]
    counts = [("images found", found)] + [(title, len(dropped[fid])) for fid, title in FILTERS] + [("in the dataset", len(kept))]
    filters = [FilterReport(fid, title, dropped[fid]) for fid, title in FILTERS]
    caption_counts = _caption_counts(images, kept)
    captions = [("from NAME.txt", caption_counts["txt"]), ("from the input's metadata.jsonl", caption_counts["metadata"]),
                ("written by the captioner", caption_counts["captioner"]), ("default caption", caption_counts["default"]),
                ("left out: no caption", len(dropped["no_caption"]))]
    return write_index(os.path.join(folder.review, "index.html"), title=f"VMix dataset: {os.path.basename(folder.folder)}",
                       counts=counts, filters=filters, dimensions=reviews, histograms=histograms, near_pairs=pairs,
                       captions=captions, notes=notes, overrides_path=s.overrides_path, thumbs=thumbs, limit=s.review_limit,
                       trainer_hint=trainer_hint)
