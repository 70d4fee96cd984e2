"""One evaluation: plan the images, make the missing ones, score them all, write the report.

Output folder:
    images/<setting>/<prompt id>-s<seed>.png   generated images (a rerun makes only missing ones)
    images.jsonl                               one line per generated image (source, time, infotext, note)
    features/                                  cached image features per model (safe to delete)
    results/per_image.csv, per_setting.csv     every number, per image and per setting (95 % intervals)
    results/results.json                       the same, with the run's parameters and notes
    tradeoff.png                               Aes score against CLIP score, one point per λ (paper Fig. 7b;
                                               Options.tradeoff names other axes)
    grid.png                                   rows = prompts, columns = settings
    report.html                                everything above in one page
"""
from __future__ import annotations

import json
import os
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from .errors import EvaluationError
from .prompts import Prompt
from .settings import OFF, Setting, slugify


@dataclass
class ImageRow:
    setting: str
    group: str  # images of one group pair up with the group's baseline (one source's settings)
    prompt: Prompt
    seed: int
    path: str
    generated_by: Optional[Any] = None  # the source that makes it (None: an existing file)
    setting_obj: Optional[Setting] = None
    failure: str = ""
    info: Dict[str, Any] = field(default_factory=dict)

    @property
    def pair_key(self) -> Tuple[str, int]:
        return (self.prompt.id, self.seed)


@dataclass
class Options:
    out_dir: str
    prompts: List[Prompt] = field(default_factory=list)
    settings: List[Setting] = field(default_factory=list)
    sources: List[Any] = field(default_factory=list)  # image sources that generate (WebUI, offline, Python)
    folders: List[Tuple[str, str]] = field(default_factory=list)  # (setting name, folder) scored as they are
    seeds_per_prompt: int = 1
    seed: int = 0
    baseline: Optional[str] = None  # setting the shifts and content similarity compare with (default: off)
    clip: Optional[str] = "openai/clip-vit-large-patch14"  # None: no CLIP-based metric (image_metrics only)
    aesthetic: Optional[str] = None
    allow_download: bool = False
    reference: Optional[str] = None
    fid_features: str = "clip"  # clip | inception | none
    inception_weights: Optional[str] = None
    probes: Optional[list] = None  # DimensionProbe list; None: the defaults of the adapters' dimensions
    device: str = "auto"
    batch_size: int = 32
    workers: int = 0
    grid_prompts: int = 8
    cache_dir: Optional[str] = None
    resamples: int = 1000
    generate_only: bool = False
    image_metrics: List[Any] = field(default_factory=list)  # metrics.ImageMetric: numbers measured on the pictures
    tradeoff: Tuple[str, str] = ("clip_score", "aes")  # (x, y) metric keys of the λ trade-off plot


def seeds_for(index: int, opts: Options) -> List[int]:
    """Seeds of prompt ``index``: the same in every setting (so images pair up), different per prompt."""
    return [opts.seed + index * max(1, opts.seeds_per_prompt) + k for k in range(opts.seeds_per_prompt)]


def render_key(setting: Setting) -> Tuple:
    """Settings with the same key give the same images (e.g. λ=1 and dims=all λ=1): made once."""
    if setting.adapter is None:
        return (OFF,)
    alphas = setting.alphas
    if alphas is not None and all(v == 1.0 for _, v in alphas):
        alphas = None
    return (setting.adapter.name, setting.strength, alphas)


def plan(opts: Options) -> List[ImageRow]:
    rows: List[ImageRow] = []
    several = len(opts.sources) > 1
    taken: Dict[str, str] = {}
    for source in opts.sources:
        prefix = f"{source.kind} " if several else ""
        folder_of: Dict[Tuple, str] = {}
        for setting in opts.settings:
            slug = folder_of.setdefault(render_key(setting), slugify(prefix + setting.name))
            name = prefix + setting.name
            if name in taken:
                raise EvaluationError(f"two settings are both called {name!r}")
            taken[name] = name
            for i, prompt in enumerate(opts.prompts):
                for seed in seeds_for(i, opts):
                    path = os.path.join(opts.out_dir, "images", slug, f"{slugify(prompt.id)}-s{seed}.png")
                    rows.append(ImageRow(name, source.kind, prompt, seed, path, source, setting))
    from .sources import read_image_folder

    for name, folder in opts.folders:
        if name in taken:
            raise EvaluationError(f"--images name {name!r} is already the name of another setting; choose another NAME=")
        taken[name] = name
        setting = Setting(name, kind="folder", label=name)
        for image in read_image_folder(folder):
            rows.append(ImageRow(name, "folders", Prompt(image.key, image.prompt), 0, image.path, None, setting))
    return rows


# -- generation --------------------------------------------------------------------------------
def _image_ok(path: str) -> bool:
    return os.path.isfile(path) and os.path.getsize(path) > 0


def _write_image(path: str, image) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    if isinstance(image, (bytes, bytearray)):  # a WebUI PNG, kept as sent (with its infotext)
        with open(tmp, "wb") as f:
            f.write(image)
    else:
        image.save(tmp, format="PNG")
    os.replace(tmp, path)  # never a half-written image under the real name: a rerun trusts what exists


def generate(rows: List[ImageRow], opts: Options, log: Callable[[str], None], progress) -> Dict[str, Any]:
    """Make every missing image; one sentence per failed request, the run goes on."""
    from .webui_client import RequestFailed

    todo: Dict[str, ImageRow] = {}
    for row in rows:
        if row.generated_by is not None and not _image_ok(row.path) and row.path not in todo:
            todo[row.path] = row
    stats = {"made": 0, "failed": 0, "existing": sum(1 for r in rows if r.generated_by is not None) - len(todo)}
    if not todo:
        return stats
    manifest = os.path.join(opts.out_dir, "images.jsonl")
    prepared = set()
    by_source: Dict[int, List[ImageRow]] = {}
    for row in todo.values():
        by_source.setdefault(id(row.generated_by), []).append(row)
    failures: Dict[str, str] = {}
    bar = None
    try:
        for group in by_source.values():  # checks and model loading first: a bad server or file fails fast
            group[0].generated_by.prepare(opts.settings)
            prepared.add(id(group[0].generated_by))
            if getattr(group[0].generated_by, "threads_line", None):
                log(group[0].generated_by.threads_line)
        bar = progress(total=len(todo), desc="generating", unit="img", dynamic_ncols=True)
        for group in by_source.values():
            source = group[0].generated_by
            for row in group:
                started = time.monotonic()
                try:
                    image, info = source.generate(row.prompt.text, row.seed, row.setting_obj)
                except torch.cuda.OutOfMemoryError:
                    raise EvaluationError(
                        "the GPU ran out of memory while sampling; lower --width/--height, use --precision fp16, or close "
                        "other GPU programs (images made so far are kept)"
                    ) from None
                except RequestFailed as e:
                    failures[row.path] = str(e)
                    stats["failed"] += 1
                    bar.write(f"failed: {row.setting} · {row.prompt.id} · seed {row.seed}: {e}")
                    bar.update(1)
                    continue
                seconds = time.monotonic() - started
                _write_image(row.path, image)
                record = {
                    "file": os.path.relpath(row.path, opts.out_dir), "setting": row.setting, "prompt_id": row.prompt.id,
                    "prompt": row.prompt.text, "seed": row.seed, "source": source.kind, "seconds": round(seconds, 3), **info,
                }
                with open(manifest, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
                if info.get("note"):
                    bar.write(f"note: {row.setting} · {row.prompt.id}: {info['note']}")
                stats["made"] += 1
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        for source in opts.sources:
            if id(source) in prepared:
                source.close()
    for row in rows:
        if row.path in failures:
            row.failure = failures[row.path]
    return stats


def read_manifest(out_dir: str) -> Dict[str, Dict[str, Any]]:
    """file (relative) -> its newest line in images.jsonl."""
    path = os.path.join(out_dir, "images.jsonl")
    records: Dict[str, Dict[str, Any]] = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                    records[record["file"]] = record
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut by an interruption
    return records


# -- scoring -----------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    from ..scoring import ScoringError, device

    try:
        return device.resolve_device(name)
    except ScoringError as e:
        raise EvaluationError(str(e)) from None


def _probes_for(opts: Options):
    from ..scoring.probes import DEFAULT_PROBES

    if opts.probes is not None:
        return list(opts.probes)
    names = []
    for s in opts.settings:
        if s.adapter is not None:
            names.extend(n for n in s.adapter.dimensions if n not in names)
    known = {p.name: p for p in DEFAULT_PROBES}
    picked = [known[n] for n in names if n in known]
    return picked or list(DEFAULT_PROBES)


@dataclass
class Scorers:
    clip: Optional[Any]
    predictor: Optional[Any]
    device: torch.device
    reference: Optional[Any] = None  # sources.ReferenceSet: the images FID/KID compare with
    inception: Optional[Any] = None  # metrics.InceptionFeatures for --fid-features inception


def load_scorers(opts: Options) -> Scorers:
    """CLIP, the aesthetic predictor, the reference images and the Inception weights, checked and
    loaded before any image is made: a wrong file or an empty folder fails in seconds."""
    from ..scoring import ScoringError
    from ..scoring.aesthetic import load_aesthetic_predictor
    from ..scoring.clip import load_clip
    from . import metrics
    from .sources import read_reference_folder

    device = resolve_device(opts.device)
    fid = bool(opts.reference) and opts.fid_features != "none"
    reference = read_reference_folder(opts.reference) if fid else None
    if opts.clip is None:
        if opts.aesthetic:
            raise EvaluationError("the Aes score is computed on CLIP ViT-L/14 image embeddings, so --aesthetic-predictor needs CLIP: "
                                  "give a CLIP model (--clip) instead of --no-clip, or drop --aesthetic-predictor")
        if opts.probes:
            raise EvaluationError("probes are CLIP zero-shot scores, so --probe needs CLIP; drop --no-clip or --probe")
        if fid and opts.fid_features == "clip":
            raise EvaluationError("FID/KID on CLIP features needs CLIP; with --no-clip use --fid-features inception (and --inception-weights)")
        if not opts.image_metrics and not fid:
            raise EvaluationError("nothing to measure without CLIP: give --reference with --fid-features inception for FID/KID, "
                                  "or make the images alone with --generate-only")
    inception = metrics.InceptionFeatures(opts.inception_weights, device) if fid and opts.fid_features == "inception" else None
    if opts.clip is None:
        return Scorers(None, None, device, reference, inception)
    try:
        predictor = load_aesthetic_predictor(opts.aesthetic, device=device) if opts.aesthetic else None
        clip = load_clip(opts.clip, device=device, allow_download=opts.allow_download)
        if predictor is not None:
            load_aesthetic_predictor(opts.aesthetic, expected_dim=clip.dim)  # its sentence when the widths differ
    except ScoringError as e:
        raise EvaluationError(str(e)) from None
    return Scorers(clip, predictor, device, reference, inception)


def score(rows: List[ImageRow], opts: Options, scorers: Scorers, log: Callable[[str], None], progress) -> Dict[str, Any]:
    from ..scoring import ScoringError
    from ..scoring.features import FeatureCache, embed_image_files
    from ..scoring.probes import encode_probes, probe_scores
    from . import metrics

    notes: List[str] = []
    clip, predictor, device = scorers.clip, scorers.predictor, scorers.device
    if clip is None:
        notes.append("scored without CLIP (--no-clip): CLIP score, Aes score, probes and content kept were not computed")
    elif predictor is None:
        notes.append("no aesthetic predictor was given (--aesthetic-predictor sac+logos+ava1-l14-linearMSE.pth), so there is no Aes score")
    cache_root = opts.cache_dir or os.path.join(opts.out_dir, "features")

    ready = [r for r in rows if not r.failure and os.path.isfile(r.path)]
    missing = [r for r in rows if not r.failure and not os.path.isfile(r.path)]
    for r in missing:
        r.failure = "image file is missing"
    paths = list(dict.fromkeys(r.path for r in ready))
    embeds: Dict[str, torch.Tensor] = {}
    failures: List[Tuple[str, str]] = []
    computed = 0
    if clip is not None:
        try:
            cache = FeatureCache(cache_root, clip.identity)
            result = embed_image_files(paths, cache, clip.pixel_values, clip.embed_pixels, opts.batch_size, opts.workers, progress,
                                       desc="CLIP image features")
        except ScoringError as e:
            raise EvaluationError(str(e)) from None
        embeds = dict(zip(result.paths, result.embeds))
        failures += result.failures
        computed = result.computed
    measured, measure_failures = measure_images(paths, opts.image_metrics, opts.batch_size, progress)
    failures += measure_failures
    for path, reason in dict(failures).items():
        for r in ready:
            if r.path == path:
                r.failure = f"cannot be decoded ({reason})"
    ready = [r for r in ready if not r.failure]

    probes = _probes_for(opts) if clip is not None else []
    values: Dict[int, Dict[str, float]] = {id(r): dict(measured.get(r.path, {})) for r in ready}
    if ready and clip is not None:
        texts = list(dict.fromkeys(r.prompt.text for r in ready))
        text_embeds = dict(zip(texts, clip.embed_texts(texts)))
        encoded = encode_probes(clip, probes)
        img = torch.stack([embeds[r.path] for r in ready])
        txt = torch.stack([text_embeds[r.prompt.text] for r in ready])
        cs = metrics.clip_scores(img, txt)
        aes = predictor(img.to(device)).float().cpu() if predictor is not None else None
        pr = probe_scores(clip, img, probes, encoded)
        for i, r in enumerate(ready):
            v = values[id(r)]
            v["clip_score"] = float(cs[i])
            if aes is not None:
                v["aes"] = float(aes[i])
            for p in probes:
                v[f"probe_{p.name}"] = float(pr[p.name][i])

    # Pairing with the baseline of each group: shifts and content kept.
    groups: Dict[str, List[ImageRow]] = {}
    for r in ready:
        groups.setdefault(r.group, []).append(r)
    baselines: Dict[str, str] = {}
    for group, members in groups.items():
        names = list(dict.fromkeys(r.setting for r in members))
        wanted = [opts.baseline, f"{group} {opts.baseline}"] if opts.baseline else []  # several sources: "offline λ=1"
        wanted += [n for n in names if n == OFF or n.endswith(f" {OFF}")]
        base = next((n for n in wanted if n in names), None)
        if opts.baseline and base not in wanted[:2]:  # named for another source's images: say what these compare with
            notes.append(f"--baseline {opts.baseline!r} is not a setting of the {group} images; "
                         + (f"they are compared with {base!r}" if base else "no shifts for them"))
        if base:
            baselines[group] = base
            ref = {r.pair_key: r for r in members if r.setting == base}
            pairs = []
            for r in members:
                b = ref.get(r.pair_key)
                if b is None or r.setting == base:
                    continue
                pairs.append((r, b))
                v = values[id(r)]
                for key in measured.get(r.path, {}):
                    if key in values[id(b)]:
                        v[f"{key}_shift"] = v[key] - values[id(b)][key]
                if clip is None:
                    continue
                v["content_similarity"] = float(metrics.cosine(embeds[r.path], embeds[b.path]))
                for p in probes:
                    v[f"shift_{p.name}"] = v[f"probe_{p.name}"] - values[id(b)][f"probe_{p.name}"]
                if "aes" in v:
                    v["aes_shift"] = v["aes"] - values[id(b)]["aes"]
                v["clip_score_shift"] = v["clip_score"] - values[id(b)]["clip_score"]
            for (r, _), found in zip(pairs, compare_images([(r.path, b.path) for r, b in pairs], opts.image_metrics, opts.batch_size)):
                values[id(r)].update(found)

    # Distances to a reference set.
    distances: Dict[str, Dict[str, Any]] = {}
    if scorers.reference is not None and ready:
        ref_paths = scorers.reference.paths  # listed (and checked) before any image was made
        if opts.fid_features == "inception":
            net = scorers.inception
            feat_cache = FeatureCache(cache_root, net.identity)
            pre, emb, kind = net.pixel_values, net.embed_pixels, "Inception-v3 pool (torch-fidelity inception-v3-compat)"
        else:
            feat_cache, pre, emb, kind = cache, clip.pixel_values, clip.embed_pixels, f"CLIP image embeddings ({opts.clip})"
        ref_result = embed_image_files(ref_paths, feat_cache, pre, emb, opts.batch_size, opts.workers, progress, desc="reference features")
        if ref_result.failures:
            notes.append(f"{len(ref_result.failures)} reference image(s) could not be decoded and were left out (first: {ref_result.failures[0][0]})")
        if opts.fid_features == "inception":
            gen = embed_image_files(paths, feat_cache, pre, emb, opts.batch_size, opts.workers, progress, desc="Inception features")
            feats = dict(zip(gen.paths, gen.embeds))
        else:
            feats = embeds
        for name in dict.fromkeys(r.setting for r in ready):
            fake = torch.stack([feats[r.path] for r in ready if r.setting == name and r.path in feats])
            distances[name] = dict(metrics.distances(ref_result.embeds, fake, seed=opts.seed), features=kind)
        if ref_result.embeds.shape[0] < metrics.FID_MIN_IMAGES:
            notes.append(f"the reference set has {ref_result.embeds.shape[0]} images; FID needs thousands (≥ {metrics.FID_MIN_IMAGES}) to mean much: read KID")

    # The field's own CLIPScore on a few images, against the numbers above.
    check = None
    if ready and clip is not None:
        from ..scoring.images import read_image

        sample = ready[: min(8, len(ready))]
        tm = metrics.torchmetrics_clip_score(clip)
        tm.update([metrics.pil_to_uint8(read_image(r.path)).to(clip.device) for r in sample], [r.prompt.text for r in sample])
        ours = metrics.clip_score_of_mean(sum(values[id(r)]["clip_score"] for r in sample) / len(sample))
        check = {"images": len(sample), "torchmetrics": round(float(tm.compute()), 6), "ours": round(ours, 6)}
        check["agree"] = abs(check["torchmetrics"] - ours) < 1e-3 * max(1.0, abs(ours))
        if not check["agree"]:
            notes.append(f"CLIP score cross-check with torchmetrics' CLIPScore disagrees ({check})")

    return {
        "values": values, "ready": ready, "baselines": baselines, "distances": distances, "probes": [p.name for p in probes],
        "notes": notes, "clip_identity": clip.identity if clip is not None else None, "clip_check": check,
        "computed_features": computed,
    }


def _batches(items: List[Any], size: int):
    for start in range(0, len(items), max(1, size)):
        yield items[start : start + max(1, size)]


def _checked(metric, found, count: int) -> List[Dict[str, float]]:
    found = list(found)
    if len(found) != count or not all(isinstance(d, dict) for d in found):
        raise EvaluationError(f"image metric {metric.name!r} must return one dict of numbers per image ({count}), got {len(found)} item(s)")
    return [{k: float(v) for k, v in d.items()} for d in found]


def measure_images(paths: List[str], image_metrics: List[Any], batch_size: int, progress) -> Tuple[Dict[str, Dict[str, float]], List[Tuple[str, str]]]:
    """Every ImageMetric's ``measure`` on every file: ({path: {key: value}}, [(path, why it failed)])."""
    from ..scoring.images import read_image

    wanted = [m for m in image_metrics if m.measure is not None]
    out: Dict[str, Dict[str, float]] = {}
    failures: List[Tuple[str, str]] = []
    if not wanted or not paths:
        return out, failures
    bar = progress(total=len(paths), desc="image metrics", unit="img", dynamic_ncols=True)
    try:
        for chunk in _batches(paths, batch_size):
            images, ok = [], []
            for path in chunk:
                try:
                    images.append(read_image(path))
                    ok.append(path)
                except (OSError, ValueError) as e:
                    failures.append((path, str(e) or type(e).__name__))
            for path in ok:
                out[path] = {}
            for metric in wanted:
                for path, found in zip(ok, _checked(metric, metric.measure(images), len(images))):
                    out[path].update(found)
            bar.update(len(chunk))
    finally:
        bar.close()
    return out, failures


def compare_images(pairs: List[Tuple[str, str]], image_metrics: List[Any], batch_size: int) -> List[Dict[str, float]]:
    """Every ImageMetric's ``compare`` on (image, baseline image) file pairs, one dict per pair."""
    from ..scoring.images import read_image

    wanted = [m for m in image_metrics if m.compare is not None]
    out: List[Dict[str, float]] = [{} for _ in pairs]
    if not wanted or not pairs:
        return out
    for start, chunk in zip(range(0, len(pairs), max(1, batch_size)), _batches(pairs, batch_size)):
        images = [read_image(a) for a, _ in chunk]  # decoded once already by measure_images or CLIP
        baselines = [read_image(b) for _, b in chunk]
        for metric in wanted:
            for i, found in enumerate(_checked(metric, metric.compare(images, baselines), len(chunk))):
                out[start + i].update(found)
    return out


def identical_images(a: str, b: str) -> bool:
    import numpy as np

    from ..scoring.images import read_image

    return np.array_equal(np.asarray(read_image(a)), np.asarray(read_image(b)))


def summarise(rows: List[ImageRow], scored: Dict[str, Any], opts: Options) -> List[Dict[str, Any]]:
    """Per setting: means with bootstrap 95 % intervals, FID/KID, failures."""
    from . import metrics

    values = scored["values"]
    out = []
    for name in dict.fromkeys(r.setting for r in rows):
        members = [r for r in rows if r.setting == name]
        done = [r for r in members if id(r) in values]
        setting = members[0].setting_obj
        entry: Dict[str, Any] = {
            "setting": name, **(setting.to_json() if setting else {}), "name": name, "group": members[0].group,
            "images": len(done), "failed": len(members) - len(done),
        }
        keys = sorted({k for r in done for k in values[id(r)]})
        for key in keys:  # the same resampling seed for a metric in every setting
            entry[key] = metrics.bootstrap([values[id(r)].get(key, float("nan")) for r in done], opts.resamples,
                                           seed=opts.seed + zlib.crc32(key.encode()), clamp_at_zero=(key == "clip_score")).to_json()
        if name in scored["distances"]:
            entry["distance"] = scored["distances"][name]
        out.append(entry)
    return out


def lambda0_check(rows: List[ImageRow], scored: Dict[str, Any], limit: int = 256) -> List[Dict[str, Any]]:
    """λ = 0 against VMix off, pixel for pixel (the extension promises identical images), on up to ``limit`` pairs."""
    checks = []
    ready = scored["ready"]
    for group, base in scored["baselines"].items():
        ref = {r.pair_key: r for r in ready if r.group == group and r.setting == base}
        zero = [r for r in ready if r.group == group and r.setting_obj is not None and r.setting_obj.kind == "lambda"
                and r.setting_obj.strength == 0.0]
        for name in dict.fromkeys(r.setting for r in zero):
            pairs = [(r, ref[r.pair_key]) for r in zero if r.setting == name and r.pair_key in ref][:limit]
            same = sum(identical_images(a.path, b.path) for a, b in pairs)
            checks.append({"setting": name, "baseline": base, "identical": same, "pairs": len(pairs)})
    return checks


def _check_writable_folder(path: str, flag: str) -> None:
    """``path`` is, or can become, a folder this user may write in (nothing is made yet)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise EvaluationError(f"{flag} {path} is a file; name a folder")
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise EvaluationError(f"{flag} {path} cannot be made, because {parent} is a file; name another folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise EvaluationError(f"{flag} {path}: this user may not write in {parent}; name another folder")


def _folders_under(path: str) -> set:
    return {root for root, _, _ in os.walk(path)} if os.path.isdir(path) else set()


def _missing_ancestors(path: str) -> List[str]:
    """``path`` and the folders above it that do not exist yet, deepest first."""
    missing, path = [], os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def _remove_new_empty_folders(out_dir: str, before: set, ancestors: List[str]) -> None:
    """After a failed run: the folders it made and left empty go; os.rmdir removes empty folders only,
    so no file and no folder that was there before is touched."""
    for root, _, _ in os.walk(out_dir, topdown=False):
        if root not in before:
            try:
                os.rmdir(root)
            except OSError:
                pass
    for folder in ancestors:  # deepest first; out_dir itself may be gone already
        try:
            if os.path.isdir(folder):
                os.rmdir(folder)
        except OSError:
            break


def evaluate(opts: Options, log: Callable[[str], None] = print, progress=None) -> Dict[str, Any]:
    """The whole evaluation; returns what results.json holds (and writes every output).

    Every input is checked before the output folder is made and any image is generated; a run that
    stops on an error leaves no folder it made empty (a rerun continues from the images it made)."""
    before, ancestors = _folders_under(opts.out_dir), _missing_ancestors(opts.out_dir)
    try:
        return _evaluate(opts, log, progress)
    except BaseException:
        _remove_new_empty_folders(opts.out_dir, before, ancestors)
        raise


def _evaluate(opts: Options, log: Callable[[str], None], progress) -> Dict[str, Any]:
    if progress is None:
        from tqdm import tqdm as progress
    from . import report

    _check_writable_folder(opts.out_dir, "--out")
    if opts.cache_dir:
        _check_writable_folder(opts.cache_dir, "--cache-dir")
    rows = plan(opts)
    if not rows:
        raise EvaluationError("nothing to evaluate: give an image source (--webui, --offline or --images)")
    names = list(dict.fromkeys(r.setting for r in rows))
    if opts.baseline and not {opts.baseline, *(f"{r.group} {opts.baseline}" for r in rows)} & set(names):  # several sources prefix names
        raise EvaluationError(f"--baseline {opts.baseline!r} is not a setting of this run (settings: {', '.join(names)})")
    pending = {id(r.generated_by): r.generated_by for r in rows if r.generated_by is not None and not _image_ok(r.path)}
    for source in pending.values():  # checkpoint, adapters, sizes: seconds, before the models load
        if hasattr(source, "check"):
            source.check(opts.settings)
    scorers = None if opts.generate_only else load_scorers(opts)
    if scorers is not None and scorers.reference is not None:
        log(scorers.reference.description)
    os.makedirs(opts.out_dir, exist_ok=True)
    started = time.monotonic()
    stats = generate(rows, opts, log, progress)
    generation_seconds = time.monotonic() - started
    if stats["made"] or stats["failed"]:
        log(f"images: {stats['made']} made, {stats['existing']} already there, {stats['failed']} failed")
    if opts.generate_only:
        return {"generation": stats}
    started = time.monotonic()
    scored = score(rows, opts, scorers, log, progress)
    scoring_seconds = time.monotonic() - started
    manifest = read_manifest(opts.out_dir)
    for r in rows:
        r.info = manifest.get(os.path.relpath(r.path, opts.out_dir), {}) if r.generated_by is not None else {}
    summary = summarise(rows, scored, opts)
    results = {
        "format": "vmix-evaluation", "version": 1,
        "sources": [s.describe() for s in opts.sources] + [{"source": "folder", "name": n, "folder": os.path.abspath(f)} for n, f in opts.folders],
        "clip": opts.clip, "aesthetic_predictor": os.path.basename(opts.aesthetic) if opts.aesthetic else None,
        "reference": os.path.abspath(opts.reference) if opts.reference else None, "fid_features": opts.fid_features,
        "reference_images": scorers.reference.description if scorers.reference is not None else None,
        "prompts": len(opts.prompts), "seeds_per_prompt": opts.seeds_per_prompt, "seed": opts.seed,
        "probes": scored["probes"], "baselines": scored["baselines"],
        "settings": summary,
        "lambda0_equals_off": lambda0_check(rows, scored),
        "clip_score_check": scored["clip_check"],
        "generation": stats,
        "timing": {"generation_s": round(generation_seconds, 2), "scoring_s": round(scoring_seconds, 2),
                   "images_scored": len(scored["ready"]), "features_computed": scored["computed_features"]},
        "notes": scored["notes"],
        "failures": [{"setting": r.setting, "prompt_id": r.prompt.id, "seed": r.seed, "error": r.failure} for r in rows if r.failure],
    }
    files = report.write_all(opts.out_dir, rows, scored, results, opts)
    results["files"] = files
    return results
