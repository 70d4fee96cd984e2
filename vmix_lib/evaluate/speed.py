"""Per-image scoring time on this machine with a real-size CLIP ViT-L/14 (random weights, nothing
downloaded) and the LAION predictor's layout: ``python -m vmix_lib.evaluate.speed``.

What is timed is what an evaluation does per new image: decode and preprocess (CLIP's own image
processor, 224 px), the CLIP-L image tower, the predictor, the probes and the CLIP score on the
cached embedding.  Random weights cost exactly what trained ones cost.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch


def clip_l_config():
    """openai/clip-vit-large-patch14's architecture (its config.json values)."""
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                         max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768),
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                           image_size=224, patch_size=14, hidden_act="quick_gelu", projection_dim=768),
        projection_dim=768,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vmix_lib.evaluate.speed", description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=512, help="side of the test images (default: 512, an SD1.5 image)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import numpy as np
    from PIL import Image
    from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    from ..scoring.aesthetic import AestheticPredictor
    from ..scoring.clip import ClipModel
    from ..scoring.features import embed_image_files
    from ..scoring.probes import DEFAULT_PROBES, probe_scores
    from ..train.tiny_models import write_tokenizer
    from . import metrics

    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        paths = []
        for i in range(args.images):
            path = f"{tmp}/{i:04d}.png"
            Image.fromarray(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)).save(path)
            paths.append(path)
        tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer(f"{tmp}/tok"), local_files_only=True)
        torch.manual_seed(0)
        model = CLIPModel(clip_l_config()).to(args.device).eval().requires_grad_(False)
        processor = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
        clip = ClipModel(model, tokenizer, processor, "random CLIP ViT-L/14", "speed")
        predictor = AestheticPredictor(768).to(args.device).eval()
        prompt = clip.embed_texts(["a lighthouse on a cliff above the sea"])
        embed_image_files(paths[: args.batch_size], None, clip.pixel_values, clip.embed_pixels, args.batch_size, progress=_quiet)
        started = time.perf_counter()
        result = embed_image_files(paths, None, clip.pixel_values, clip.embed_pixels, args.batch_size, progress=_quiet)
        encoded = time.perf_counter()
        with torch.no_grad():
            predictor(result.embeds.to(args.device))
        probe_scores(clip, result.embeds, DEFAULT_PROBES)
        metrics.clip_scores(result.embeds, prompt.expand(len(paths), -1))
        done = time.perf_counter()
    per_image = (done - started) / len(paths)
    print(f"{len(paths)} images of {args.size}x{args.size}, batch {args.batch_size}, {args.threads} thread(s), {args.device}: "
          f"{per_image * 1000:.0f} ms per image ({(encoded - started) / len(paths) * 1000:.0f} ms decoding + CLIP-L image tower, "
          f"{(done - encoded) / len(paths) * 1000:.2f} ms predictor + probes + CLIP score)")
    return 0


def _quiet(*args, **kwargs):
    from tqdm import tqdm

    return tqdm(*args, **dict(kwargs, disable=True))


if __name__ == "__main__":
    raise SystemExit(main())
