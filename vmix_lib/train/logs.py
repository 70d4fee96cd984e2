"""Loss log (CSV) and loss plot (PNG; matplotlib if installed, otherwise drawn with PIL)."""
from __future__ import annotations

import csv
import math
import os
from typing import List, Optional, Sequence, Tuple

FIELDS = ("step", "loss", "lr", "seconds")


class LossLog:
    """Appends one row per optimiser step to ``path``; on resume keeps only rows up to that step."""

    def __init__(self, path: str, resume_step: Optional[int] = None):
        self.path = path
        rows = read_loss_log(path) if (resume_step is not None and os.path.isfile(path)) else []
        rows = [r for r in rows if r[0] <= (resume_step or 0)]
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(FIELDS)
            for step, loss, lr, seconds in rows:
                writer.writerow([step, repr(loss), repr(lr), f"{seconds:.3f}"])

    def append(self, step: int, loss: float, lr: float, seconds: float) -> None:
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            csv.writer(f).writerow([step, repr(float(loss)), repr(float(lr)), f"{seconds:.3f}"])


def read_loss_log(path: str) -> List[Tuple[int, float, float, float]]:
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            rows.append((int(row["step"]), float(row["loss"]), float(row["lr"]), float(row["seconds"])))
    return rows


def smooth(values: Sequence[float], weight: float = 0.9) -> List[float]:
    """Exponential moving average with bias correction (TensorBoard-style)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** i))
    return out


def plot_loss(log_path: str, png_path: str, title: str = "VMix training loss") -> str:
    rows = read_loss_log(log_path)
    steps = [r[0] for r in rows]
    losses = [r[1] for r in rows]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _plot_with_pil(steps, losses, png_path, title)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.plot(steps, losses, color="#9ab", linewidth=0.8, label="loss")
    if len(losses) > 1:
        ax.plot(steps, smooth(losses), color="#c33", linewidth=1.5, label="smoothed")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return png_path


def _plot_with_pil(steps, losses, png_path, title, size=(800, 450)) -> str:
    from PIL import Image, ImageDraw

    from ..scoring.images import label_font

    img = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    draw.font = label_font(12, title)  # the one font of the pictures the tools draw
    left, top, right, bottom = 60, 30, size[0] - 20, size[1] - 40
    draw.rectangle((left, top, right, bottom), outline=(0, 0, 0))
    draw.text((left, 8), title, fill=(0, 0, 0))
    if steps:
        lo, hi = min(losses), max(losses)
        if not math.isfinite(lo) or not math.isfinite(hi) or hi == lo:
            hi = lo + 1.0
        s0, s1 = steps[0], max(steps[-1], steps[0] + 1)

        def xy(s, v):
            return (left + (s - s0) / (s1 - s0) * (right - left), bottom - (v - lo) / (hi - lo) * (bottom - top))

        for series, color, width in ((losses, (150, 170, 190), 1), (smooth(losses), (200, 50, 50), 2)):
            points = [xy(s, v) for s, v in zip(steps, series)]
            if len(points) > 1:
                draw.line(points, fill=color, width=width)
            else:
                draw.ellipse((points[0][0] - 2, points[0][1] - 2, points[0][0] + 2, points[0][1] + 2), fill=color)
        draw.text((4, top), f"{hi:.4g}", fill=(0, 0, 0))
        draw.text((4, bottom - 10), f"{lo:.4g}", fill=(0, 0, 0))
        draw.text((left, bottom + 8), f"step {s0}", fill=(0, 0, 0))
        draw.text((right - 80, bottom + 8), f"step {steps[-1]}", fill=(0, 0, 0))
    img.save(png_path)
    return png_path
