"""Write a small example dataset in the trainer's format (see examples/dataset/README.md).

    python examples/make_example_dataset.py OUT_DIR [--count 24] [--size 64] [--seed 0] [--mixed-shapes]

Each image is one shape (circle or square) on a light background.  Half the images have vivid
colours and are labelled {"color": "superior"}; the others are washed out and carry no label file
(no label = inferior).  Captions name the shape and colour, so content and aesthetics are separate.
``--mixed-shapes`` makes landscape, portrait and square images (2:1, 3:2, 1:1, 2:3, 1:2) for the
trainer's aspect-ratio buckets.
"""
import argparse
import colorsys
import json
import os
import random

from PIL import Image, ImageDraw

HUES = {"red": 0.0, "orange": 0.08, "yellow": 0.15, "green": 0.33, "blue": 0.6, "purple": 0.78}
ASPECTS = [(2, 1), (3, 2), (1, 1), (2, 3), (1, 2)]  # width : height with --mixed-shapes


def make(out_dir: str, count: int = 24, size: int = 64, seed: int = 0, mixed_shapes: bool = False) -> None:
    rng = random.Random(seed)
    os.makedirs(out_dir, exist_ok=True)
    for i in range(count):
        colour = rng.choice(sorted(HUES))
        shape = rng.choice(["circle", "square"])
        vivid = i % 2 == 0
        saturation = rng.uniform(0.85, 1.0) if vivid else rng.uniform(0.05, 0.25)
        r, g, b = (round(255 * c) for c in colorsys.hsv_to_rgb(HUES[colour], saturation, 0.85))
        aw, ah = ASPECTS[i % len(ASPECTS)] if mixed_shapes else (1, 1)
        width, height = size * aw // min(aw, ah), size * ah // min(aw, ah)  # the short side is ``size``
        img = Image.new("RGB", (width, height), (235, 235, 230))
        draw = ImageDraw.Draw(img)
        extent = rng.randint(size // 4, size // 2)
        x, y = rng.randint(2, width - extent - 2), rng.randint(2, height - extent - 2)
        (draw.ellipse if shape == "circle" else draw.rectangle)((x, y, x + extent, y + extent), fill=(r, g, b))
        stem = f"img{i:03d}"
        img.save(os.path.join(out_dir, stem + ".png"))
        with open(os.path.join(out_dir, stem + ".txt"), "w", encoding="utf-8") as f:
            f.write(f"a {colour} {shape} on a light background")
        if vivid:
            with open(os.path.join(out_dir, stem + ".json"), "w", encoding="utf-8") as f:
                json.dump({"color": "superior"}, f)
    print(f"wrote {count} images with captions and labels to {out_dir}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--count", type=int, default=24)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mixed-shapes", action="store_true", help="landscape, portrait and square images")
    args = parser.parse_args()
    make(args.out_dir, args.count, args.size, args.seed, args.mixed_shapes)
