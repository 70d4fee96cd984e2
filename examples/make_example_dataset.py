"""Write a small example dataset in the trainer's format (see examples/dataset/README.md).

    python examples/make_example_dataset.py OUT_DIR [--count 24] [--size 64] [--seed 0]

Each image is one shape (circle or square) on a light background.  Half the images have vivid
colours and are labelled {"color": "superior"}; the others are washed out and carry no label file
(no label = inferior).  Captions name the shape and colour, so content and aesthetics are separate.
"""
import argparse
import colorsys
import json
import os
import random

from PIL import Image, ImageDraw

HUES = {"red": 0.0, "orange": 0.08, "yellow": 0.15, "green": 0.33, "blue": 0.6, "purple": 0.78}


def make(out_dir: str, count: int = 24, size: int = 64, seed: int = 0) -> None:
    rng = random.Random(seed)
    os.makedirs(out_dir, exist_ok=True)
    for i in range(count):
        colour = rng.choice(sorted(HUES))
        shape = rng.choice(["circle", "square"])
        vivid = i % 2 == 0
        saturation = rng.uniform(0.85, 1.0) if vivid else rng.uniform(0.05, 0.25)
        r, g, b = (round(255 * c) for c in colorsys.hsv_to_rgb(HUES[colour], saturation, 0.85))
        img = Image.new("RGB", (size, size), (235, 235, 230))
        draw = ImageDraw.Draw(img)
        extent = rng.randint(size // 4, size // 2)
        x, y = rng.randint(2, size - extent - 2), rng.randint(2, size - extent - 2)
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
    args = parser.parse_args()
    make(args.out_dir, args.count, args.size, args.seed)
