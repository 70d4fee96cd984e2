"""Speed and memory of the preparation on this machine, with random-weight CLIP models (nothing downloaded).

    python -m vmix_lib.prepare.bench --images 2000 --size 512                 # tiny CLIP
    python -m vmix_lib.prepare.bench --images 64 --size 512 --clip vit-l-14   # real-size ViT-L/14, random weights
    python -m vmix_lib.prepare.bench --images 100000 --size 32                # memory at scale
    python -m vmix_lib.prepare.bench --near-duplicates-only 100000            # worst case: no duplicates

Writes ``--images`` pictures (smooth colour fields with noise, JPEG) into a temporary folder, runs the
whole preparation twice (the second run reuses every cache) and prints the time of each stage, the
time per image and the peak memory (this process, and the image-decoding worker processes).
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time

import torch


def _pictures(folder: str, count: int, size: int, seed: int = 0) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        corners = rng.integers(0, 256, size=(2, 2, 3)).astype(np.float32)
        t = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
        u = np.linspace(0.0, 1.0, size, dtype=np.float32)[None, :, None]
        field = (corners[0, 0] * (1 - t) * (1 - u) + corners[0, 1] * (1 - t) * u + corners[1, 0] * t * (1 - u) + corners[1, 1] * t * u)
        field += rng.normal(0.0, 12.0, size=(size, size, 3)).astype(np.float32)
        sub = os.path.join(folder, f"{i // 1000:03d}")
        os.makedirs(sub, exist_ok=True)
        Image.fromarray(np.clip(field, 0, 255).astype(np.uint8)).save(os.path.join(sub, f"{i:06d}.jpg"), quality=90)
        with open(os.path.join(sub, f"{i:06d}.txt"), "w", encoding="utf-8") as f:
            f.write(f"picture {i}")


def write_vit_l14_clip(folder: str, seed: int = 0) -> str:
    """A CLIPModel with openai/clip-vit-large-patch14's configuration and random weights."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    from ..train.tiny_models import write_tokenizer

    os.makedirs(folder, exist_ok=True)
    write_tokenizer(folder)
    tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = CLIPConfig(
        text_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                         max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", **ids),
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                           image_size=224, patch_size=14, hidden_act="quick_gelu"),
        projection_dim=768,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(folder)
    return folder


class _StageTimer:
    """A tqdm stand-in that records how long each stage (progress bar) took."""

    stages: dict = {}

    def __init__(self, total=None, desc="", unit=""):
        self.desc, self.start = desc, time.perf_counter()

    def update(self, n=1):
        pass

    def close(self):
        _StageTimer.stages[self.desc] = _StageTimer.stages.get(self.desc, 0.0) + time.perf_counter() - self.start


def _peak_mib() -> tuple:
    kib = 1024.0  # ru_maxrss is in KiB on Linux
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / kib, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / kib)


def main(argv=None) -> int:
    from ..scoring.clip import load_clip
    from ..scoring.tiny import write_random_predictor, write_tiny_clip
    from .run import run_prepare
    from .settings import PrepareSettings

    parser = argparse.ArgumentParser(prog="python -m vmix_lib.prepare.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=512, help="side of the square test pictures")
    parser.add_argument("--clip", choices=("tiny", "vit-l-14"), default="tiny")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=-1)
    parser.add_argument("--keep", default="", help="keep the pictures and models in this folder (reused when it exists)")
    parser.add_argument("--near-duplicates-only", type=int, default=0, metavar="N",
                        help="time only the near-duplicate search on N random 768-wide unit vectors (all kept: the worst case)")
    args = parser.parse_args(argv)
    if args.near_duplicates_only:
        from .filters import near_duplicates

        g = torch.Generator().manual_seed(0)
        embeds = torch.nn.functional.normalize(torch.randn(args.near_duplicates_only, 768, generator=g), dim=-1)
        device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        started = time.perf_counter()
        found = near_duplicates(embeds, torch.rand(len(embeds), generator=g), 0.95, device=device)
        took = time.perf_counter() - started
        print(f"near duplicates among {len(embeds)} random embeddings on {device} (torch threads {torch.get_num_threads()}): "
              f"{took:.1f} s, {len(found)} found; peak memory {_peak_mib()[0]:.0f} MiB")
        return 0

    root = args.keep or tempfile.mkdtemp(prefix="vmix-prepare-bench-")
    try:
        pictures = os.path.join(root, f"pictures-{args.images}-{args.size}")
        if not os.path.isdir(pictures):
            started = time.perf_counter()
            _pictures(pictures, args.images, args.size)
            print(f"wrote {args.images} pictures of {args.size}x{args.size} px in {time.perf_counter() - started:.1f} s")
        clip_dir = os.path.join(root, f"clip-{args.clip}")
        if not os.path.isdir(clip_dir):
            (write_tiny_clip if args.clip == "tiny" else write_vit_l14_clip)(clip_dir)
        predictor = write_random_predictor(os.path.join(root, "aesthetic.pth"))
        device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        clip = load_clip(clip_dir, device=device, dtype=torch.float16 if device.startswith("cuda") else torch.float32)
        params = sum(p.numel() for p in clip.model.vision_model.parameters()) / 1e6
        print(f"CLIP {args.clip}: vision tower {params:.1f} M parameters, {device}, batch {args.batch_size}, "
              f"torch threads {torch.get_num_threads()}")
        out = os.path.join(root, f"dataset-{args.clip}-{args.images}-{args.size}")
        shutil.rmtree(out, ignore_errors=True)
        for attempt in ("first run", "rerun (everything cached)"):
            _StageTimer.stages = {}
            settings = PrepareSettings(input_dir=pictures, output_dir=out, clip=clip_dir, aesthetic_predictor=predictor, min_side=0,
                                       device=device, batch_size=args.batch_size, workers=args.workers)
            started = time.perf_counter()
            result = run_prepare(settings, log=lambda m: None, progress=_StageTimer, clip=clip)
            total = time.perf_counter() - started
            stages = ", ".join(f"{k} {v:.1f} s" for k, v in _StageTimer.stages.items())
            print(f"{attempt}: {total:.1f} s = {1000 * total / args.images:.2f} ms/image ({stages}); "
                  f"{len(result.names)} in the dataset")
            encode = _StageTimer.stages.get("CLIP image embeddings")
            if encode:
                print(f"  CLIP image embeddings (decode + preprocess + encode): {args.images / encode:.1f} images/s, "
                      f"{1000 * encode / args.images:.2f} ms/image")
        own, children = _peak_mib()
        print(f"peak memory: {own:.0f} MiB (this process), {children:.0f} MiB (largest child process: the decoding workers)")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
