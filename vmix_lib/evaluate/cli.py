"""``python -m vmix_lib.evaluate``: judge VMix adapters the way the paper does."""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Sequence

from ..scoring.paths import DEFAULT_CLIP

EXAMPLES = """examples:
  # a running AUTOMATIC1111/Forge (started with --api) with the VMix extension, the built-in prompts
  python -m vmix_lib.evaluate --webui http://127.0.0.1:7860 --checkpoint v1-5-pruned-emaonly \\
      --adapter my_adapter.safetensors --aesthetic-predictor sac+logos+ava1-l14-linearMSE.pth --out out/eval

  # offline, no WebUI: the single-file checkpoint, DDIM 25 steps, CFG 7.5
  python -m vmix_lib.evaluate --offline models/v1-5-pruned-emaonly.safetensors \\
      --adapter my_adapter.safetensors --aesthetic-predictor sac+logos+ava1-l14-linearMSE.pth --out out/eval

  # MJHQ-30K: 500 prompts of two categories, FID/KID against the category images
  python -m vmix_lib.evaluate --offline model.safetensors --adapter a.safetensors --aesthetic-predictor aes.pth \\
      --prompts mjhq/meta_data.json --category people,animals --limit 500 --reference mjhq/people --out out/mjhq

  # score existing folders only (NAME.png + NAME.txt per image, or metadata.jsonl)
  python -m vmix_lib.evaluate --images off=out/base --images vmix=out/vmix --aesthetic-predictor aes.pth --out out/folders

  # without CLIP: FID/KID on Inception features only
  python -m vmix_lib.evaluate --offline model.safetensors --adapter a.safetensors --no-clip --reference mjhq/people \\
      --fid-features inception --inception-weights weights-inception-2015-12-05-6726825d.pth --out out/fid
"""


def _csv(text: str) -> List[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vmix_lib.evaluate",
        description="Evaluate VMix adapters as the paper does: Aes score, CLIP score, FID/KID, per-dimension probes, "
        "content kept, the λ trade-off. A rerun with the same --out continues where it stopped.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default=os.path.join("out", "vmix-eval"), help="output folder (default: out/vmix-eval)")
    src = p.add_argument_group("where images come from (one run can mix them)")
    src.add_argument("--webui", metavar="URL", help="a running AUTOMATIC1111/Forge started with --api, e.g. http://127.0.0.1:7860")
    src.add_argument("--checkpoint", help="WebUI: the checkpoint to use, by name (default: the loaded one)")
    src.add_argument("--api-auth", metavar="USER:PASSWORD", help="WebUI: credentials of --api-auth")
    src.add_argument("--timeout", type=float, default=600.0, help="WebUI: seconds to wait for one image (default: 600)")
    src.add_argument("--offline", metavar="CHECKPOINT", help="a single-file SD1.5/SDXL .safetensors checkpoint, sampled in this process")
    src.add_argument("--model-config-dir", help="offline: model configs for a non-standard checkpoint (as the trainer's)")
    src.add_argument("--tokenizer-dir", help="offline: CLIP vocabulary folder (as the trainer's; default: found offline)")
    src.add_argument("--vae", help="offline: a separate VAE .safetensors file")
    src.add_argument("--scheduler", default="ddim", choices=("ddim", "euler", "dpm++"), help="offline sampler (default: ddim, the paper's)")
    src.add_argument("--precision", default="auto", choices=("auto", "fp32", "fp16", "bf16"), help="offline: UNet precision on CUDA (default: bf16 if supported, else fp16; fp32 on CPU)")
    src.add_argument("--images", action="append", default=[], metavar="NAME=DIR", help="score an existing folder of images with prompts (repeatable)")
    what = p.add_argument_group("what is compared")
    what.add_argument("--adapter", action="append", default=[], help="an adapter file (.safetensors) or its name in the WebUI (repeatable: side by side)")
    what.add_argument("--lambdas", default="0,0.5,1,1.5,2", help="strengths λ to sweep, all labels positive (default: 0,0.5,1,1.5,2)")
    what.add_argument("--dimensions", default="", help="per-dimension settings: all, none, each, or dimension names, comma-separated (paper Fig. 8)")
    what.add_argument("--dimension-strength", type=float, default=1.0, help="λ of the per-dimension settings (default: 1)")
    what.add_argument("--dimension-names", default="", help="dimensions of an adapter named only by its WebUI name (default: read from the file)")
    what.add_argument("--no-off", action="store_true", help="do not render VMix off (the baseline of shifts and content kept)")
    what.add_argument("--baseline", help="the setting that shifts and content kept compare with (default: off)")
    what.add_argument("--uncond", choices=("on", "off"), help="VMix on the negative (unconditional) pass (default: the WebUI setting; on offline)")
    gen = p.add_argument_group("prompts and sampling")
    gen.add_argument("--prompts", default="builtin", help="builtin (40 prompts over the MJHQ categories), MJHQ-30K's meta_data.json, or a text file")
    gen.add_argument("--category", default="", help="MJHQ/built-in categories to keep, comma-separated")
    gen.add_argument("--limit", type=int, help="sample this many prompts (seeded by --prompt-seed)")
    gen.add_argument("--prompt-seed", type=int, default=0, help="seed of the prompt sample (default: 0)")
    gen.add_argument("--seeds", type=int, default=1, help="images per prompt and setting (default: 1)")
    gen.add_argument("--seed", type=int, default=0, help="first image seed (default: 0)")
    gen.add_argument("--steps", type=int, default=25)
    gen.add_argument("--cfg", type=float, default=7.5)
    gen.add_argument("--width", type=int, default=512)
    gen.add_argument("--height", type=int, default=512)
    gen.add_argument("--sampler", default="DDIM", help="WebUI sampler name (default: DDIM, the paper's)")
    gen.add_argument("--schedule-type", default="", help="WebUI schedule type (A1111 1.9+/Forge), e.g. Karras")
    gen.add_argument("--negative-prompt", default="", help="(default: none, as the paper)")
    sc = p.add_argument_group("scoring")
    sc.add_argument("--clip", help=f"CLIP ViT-L/14: a local folder or a hub id in the local cache (default: {DEFAULT_CLIP})")
    sc.add_argument("--no-clip", action="store_true", help="score without CLIP: no CLIP score, Aes score, probes or content kept "
                    "(the report names them as not computed); FID/KID then need --fid-features inception")
    sc.add_argument("--aesthetic-predictor", metavar="FILE", help="the LAION predictor: sac+logos+ava1-l14-linearMSE.pth (or .safetensors)")
    sc.add_argument("--aesthetic", dest="aesthetic_predictor", help=argparse.SUPPRESS)  # the old name, as prepare's is this one
    sc.add_argument("--allow-download", action="store_true", help="let transformers download a hub id that is not cached")
    sc.add_argument("--reference", metavar="DIR", help="reference images for FID/KID (e.g. MJHQ-30K's images of the chosen categories): "
                    "every image under DIR, or those its metadata.jsonl lists (a dataset, e.g. vmix prepare's output, "
                    "whose review/ pictures are not counted)")
    sc.add_argument("--fid-features", default="clip", choices=("clip", "inception", "none"), help="features of FID/KID (default: clip)")
    sc.add_argument("--inception-weights", help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth (for --fid-features inception)")
    sc.add_argument("--probe", action="append", default=[], metavar="NAME=POS|NEG;POS|NEG", help="a user-defined probe (repeatable)")
    sc.add_argument("--device", default="auto", help="scoring device (default: cuda if available; offline sampling uses it too)")
    sc.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 0 = auto: 1 for an offline UNet under 10 M "
                    "parameters, where one thread is fastest; otherwise torch's default)")
    sc.add_argument("--batch-size", type=int, default=32)
    sc.add_argument("--workers", type=int, default=0, help="image decoding worker processes (default: 0)")
    sc.add_argument("--cache-dir", help="feature cache (default: OUT/features)")
    sc.add_argument("--grid-prompts", type=int, default=8, help="prompts shown in the grid and the report (default: 8)")
    sc.add_argument("--generate-only", action="store_true", help="make the images, score nothing")
    return p


def options_from_args(args) -> "object":
    from .errors import EvaluationError
    from .offline import OfflineSource
    from .prompts import load_prompts
    from .run import Options
    from .settings import adapter_ref, build_settings, distinct_adapters, parse_lambdas
    from .sources import parse_folder_spec
    from .webui_client import GenerationParams, WebUISource

    for name in ("seeds", "steps", "width", "height", "batch_size", "grid_prompts"):
        if getattr(args, name) < 1:
            raise EvaluationError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.threads < 0:
        raise EvaluationError(f"--threads must be 0 (auto) or more, got {args.threads}")
    if args.threads and not args.offline:  # scoring only: no model decides, the number given does
        import torch

        torch.set_num_threads(args.threads)
    if args.workers < 0:
        raise EvaluationError(f"--workers must be 0 or more, got {args.workers}")
    if args.checkpoint and not args.webui:
        raise EvaluationError("--checkpoint chooses the WebUI's checkpoint; offline, give the file with --offline")
    if args.no_clip and args.clip:
        raise EvaluationError(f"--no-clip and --clip {args.clip} contradict each other; give one of them")
    adapters = distinct_adapters([adapter_ref(a) for a in args.adapter], webui=bool(args.webui))
    generating = bool(args.webui or args.offline)  # without --adapter: VMix off alone, a baseline run
    lambdas = parse_lambdas(args.lambdas) if adapters else []
    settings = build_settings(
        adapters, lambdas, _csv(args.dimensions), include_off=not args.no_off,
        dimension_strength=args.dimension_strength, default_dimensions=_csv(args.dimension_names),
    ) if generating else []
    if generating and not settings:
        raise EvaluationError("nothing to generate: --no-off and no --adapter")
    params = GenerationParams(
        steps=args.steps, cfg=args.cfg, width=args.width, height=args.height, sampler=args.sampler,
        scheduler=args.schedule_type, negative_prompt=args.negative_prompt,
        uncond=None if args.uncond is None else args.uncond == "on",
    )
    sources = []
    if args.webui:
        sources.append(WebUISource(args.webui, args.checkpoint, params, args.timeout, args.api_auth))
    if args.offline:
        sources.append(OfflineSource(args.offline, params, args.scheduler, args.model_config_dir, args.tokenizer_dir,
                                     args.vae, args.device, args.precision, args.threads))
    folders = [parse_folder_spec(s) for s in args.images]
    if not sources and not folders:
        raise EvaluationError("no image source: give --webui URL, --offline CHECKPOINT or --images NAME=DIR")
    if not sources and adapters:
        raise EvaluationError("--adapter needs an image source that generates (--webui or --offline); --images are scored as they are")
    probes = None
    if args.probe:
        from ..scoring import ScoringError
        from ..scoring.probes import parse_probe

        try:
            probes = [parse_probe(s) for s in args.probe]
        except ScoringError as e:
            raise EvaluationError(str(e)) from None
    prompts = load_prompts(args.prompts, _csv(args.category), args.limit, args.prompt_seed) if sources else []
    return Options(
        out_dir=args.out, prompts=prompts, settings=settings, sources=sources, folders=folders,
        seeds_per_prompt=args.seeds, seed=args.seed, baseline=args.baseline,
        clip=None if args.no_clip else args.clip or DEFAULT_CLIP, aesthetic=args.aesthetic_predictor,
        allow_download=args.allow_download, reference=args.reference, fid_features=args.fid_features,
        inception_weights=args.inception_weights, probes=probes, device=args.device, batch_size=args.batch_size,
        workers=args.workers, grid_prompts=args.grid_prompts, cache_dir=args.cache_dir, generate_only=args.generate_only,
    )


def print_summary(results, out=None, keys=("aes", "clip_score", "content_similarity"), titles=None) -> None:
    """The per-setting table: each of ``keys`` (metric keys; ``titles`` names other than the default ones) with its interval."""
    out = out or sys.stdout
    rows = results.get("settings") or []
    if not rows:
        return
    width = max(len(s["setting"]) for s in rows)
    keys = [k for k in keys if any(k in s for s in rows)]
    head = {"aes": "Aes score", "clip_score": "CLIP score", "content_similarity": "content kept", **(titles or {})}
    print(f"{'setting':<{width}}  {'n':>4}  " + "  ".join(f"{head.get(k, k):>24}" for k in keys) + "  FID (KID)", file=out)
    for s in rows:
        cells = []
        for k in keys:
            m = s.get(k)
            cells.append(f"{m['mean']:8.3f} [{m['ci95'][0]:7.3f},{m['ci95'][1]:7.3f}]" if m and m["mean"] is not None else f"{'–':>24}")
        d = s.get("distance") or {}
        dist = f"{d['fid']:.3f} ({d['kid']:.4f})" if d.get("fid") is not None else "–"
        print(f"{s['setting']:<{width}}  {s['images']:>4}  " + "  ".join(f"{c:>24}" for c in cells) + f"  {dist}", file=out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .errors import EvaluationError
    from .run import evaluate

    args = build_parser().parse_args(argv)
    try:  # our own bars say what happens; transformers' per-file weight bars would only clutter them
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    log = lambda message: print(message, file=sys.stderr, flush=True)
    try:
        opts = options_from_args(args)
        results = evaluate(opts, log)
    except EvaluationError as e:
        print(f"VMix evaluation: {e}.".replace("..", "."), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nVMix evaluation: interrupted; rerun the same command to continue (images already made are kept).", file=sys.stderr)
        return 130
    except OSError as e:
        print(f"VMix evaluation: {e.filename or args.out}: {e.strerror or e}.", file=sys.stderr)
        return 1
    if args.generate_only:
        return 0
    print_summary(results)
    for note in results.get("notes", []):
        print(f"note: {note}", file=sys.stderr)
    for c in results.get("lambda0_equals_off", []):
        print(f"{c['setting']} vs {c['baseline']}: {c['identical']}/{c['pairs']} images identical pixel for pixel")
    failed = len(results.get("failures", []))
    print(f"report: {results['files']['html']}" + (f" ({failed} image(s) failed; see the report)" if failed else ""))
    return 0
