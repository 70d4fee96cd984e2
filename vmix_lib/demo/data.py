"""Synthetic data and measurements for the VMix demonstration (``python -m vmix_lib.demo``).

Each image is one filled shape on black, drawn with torch alone.  The caption names the content:
hue, shape and position ("a red circle at the top left"); the size varies and is not captioned.
Two appearance properties play the aesthetic dimensions:

    color     HSV saturation   any image 0.15–1.00   labelled "vibrant color"     0.85–1.00
    lighting  HSV value        any image 0.45–1.00   labelled "natural lighting"  0.90–1.00

The base model learns from captioned pictures: a share of them is drawn superior per dimension,
and their captions end with that dimension's phrase ("a red circle at the top, vibrant color"), so
the base model knows the words; the others are ordinary, with plain captions (an ordinary picture
may be vivid all the same: captions are incomplete, as on the web).  The data-trained adapter
learns from a set in which each image is, independently per dimension, either labelled superior
(and then vivid, or bright) or not labelled (then an ordinary image; "missing = inferior" as in the
paper), captioned with its content only.  So the positive label asks for more than usual, the
negative one for what is usual.  The distilled adapter sees no picture: only the content captions
and the phrases.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..layers import TOKENS
from ..train.distill import join_prompt

SHAPES = ("circle", "square", "triangle")
# Position words -> centre in units of the image side (x right, y down).
POSITIONS: Dict[str, Tuple[float, float]] = {
    "top left": (0.27, 0.27), "top": (0.5, 0.27), "top right": (0.73, 0.27),
    "left": (0.27, 0.5), "center": (0.5, 0.5), "right": (0.73, 0.5),
    "bottom left": (0.27, 0.73), "bottom": (0.5, 0.73), "bottom right": (0.73, 0.73),
}
POSITION_NAMES = tuple(POSITIONS)
HUES: Dict[str, float] = {"red": 0.0, "yellow": 1 / 6, "green": 2 / 6, "cyan": 3 / 6, "blue": 4 / 6, "magenta": 5 / 6}
HUE_NAMES = tuple(HUES)



@dataclass(frozen=True)
class Appearance:
    """The HSV ranges pictures are drawn from: any picture (ordinary) and labelled superior."""

    ordinary_saturation: Tuple[float, float] = (0.15, 1.0)
    superior_saturation: Tuple[float, float] = (0.85, 1.0)
    ordinary_value: Tuple[float, float] = (0.45, 1.0)
    superior_value: Tuple[float, float] = (0.9, 1.0)

    def __post_init__(self):
        for name, (lo, hi) in vars(self).items():
            if not 0.0 <= lo <= hi <= 1.0:
                raise ValueError(f"{name} must be a range (low, high) within 0..1, got ({lo}, {hi})")


DEFAULT_APPEARANCE = Appearance()
RADIUS = (0.18, 0.24)  # of the image side; the shapes have the area of a circle of this radius
JITTER = 0.04  # of the image side, around the named position
# A pixel is foreground when its HSV value exceeds half the image's brightest pixel (the
# background is black); relative, so that a brighter or duller shape keeps the same outline.
FOREGROUND_FRACTION = 0.5
FOREGROUND_FLOOR = 0.1


def caption(hue: int, shape: int, position: int) -> str:
    return f"a {HUE_NAMES[hue]} {SHAPES[shape]} at the {POSITION_NAMES[position]}"


def all_captions() -> List[str]:
    """Every caption, in the order of ImageSet.caption_index()."""
    return [caption(h, s, p) for h in range(len(HUE_NAMES)) for s in range(len(SHAPES)) for p in range(len(POSITION_NAMES))]


def caption_with_phrases(caption_text: str, superior: Sequence[bool], phrases: Sequence[str]) -> str:
    """The caption, then the phrase of each superior dimension ("a red circle at the top, vibrant color")."""
    for on, phrase in zip(superior, phrases):
        if on:
            caption_text = join_prompt(caption_text, phrase)
    return caption_text


def caption_parts(index: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hue, shape, position) indices of caption indices."""
    p, s = len(POSITION_NAMES), len(SHAPES)
    return index // (s * p), index // p % s, index % p


# -- text ---------------------------------------------------------------------------------------
def _words(text: str) -> List[str]:
    """Lower-case words, a comma being a word of its own (as CLIP's tokenizer splits it off)."""
    return re.findall(r"[^\s,]+|,", text.lower())


class WordTokenizer:
    """Word-level tokenizer with CLIP's layout: [BOS] words [EOS] padded with EOS to 77 tokens."""

    BOS, EOS = 0, 1
    SPECIAL = ("<|startoftext|>", "<|endoftext|>")

    def __init__(self, texts: Sequence[str], length: int = TOKENS):
        words = sorted({w for t in texts for w in _words(t)})
        self.vocab: Dict[str, int] = {w: i + len(self.SPECIAL) for i, w in enumerate(words)}
        self.length = length

    @property
    def vocab_size(self) -> int:
        return len(self.SPECIAL) + len(self.vocab)

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        ids = torch.full((len(texts), self.length), self.EOS, dtype=torch.long)
        for row, text in enumerate(texts):
            words = _words(text)
            unknown = [w for w in words if w not in self.vocab]
            if unknown:
                raise ValueError(f"word {unknown[0]!r} is not in the demonstration's vocabulary")
            if len(words) + 2 > self.length:
                raise ValueError(f"text {text!r} is longer than {self.length - 2} words")
            ids[row, 0] = self.BOS
            ids[row, 1 : 1 + len(words)] = torch.tensor([self.vocab[w] for w in words], dtype=torch.long)
        return ids


# -- drawing ------------------------------------------------------------------------------------
def hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """h, s, v [...] in [0, 1] -> rgb [..., 3]."""
    k = torch.tensor([5.0, 3.0, 1.0], dtype=h.dtype, device=h.device)
    k = (k + h.unsqueeze(-1) * 6.0) % 6.0
    f = torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)
    return v.unsqueeze(-1) - v.unsqueeze(-1) * s.unsqueeze(-1) * f


def shape_masks(shape: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, radius: torch.Tensor, size: int, supersample: int = 4) -> torch.Tensor:
    """Anti-aliased coverage [B, size, size] of each shape; coordinates in pixels."""
    n = size * supersample
    grid = (torch.arange(n, dtype=torch.float32) + 0.5) / supersample
    y = grid.view(1, n, 1)
    x = grid.view(1, 1, n)
    cx, cy, r = cx.view(-1, 1, 1), cy.view(-1, 1, 1), radius.view(-1, 1, 1)
    dx, dy = x - cx, y - cy
    circle = dx * dx + dy * dy <= r * r
    half = r * math.sqrt(math.pi) / 2  # square of the circle's area
    square = (dx.abs() <= half) & (dy.abs() <= half)
    big = r * math.sqrt(4 * math.pi / (3 * math.sqrt(3)))  # equilateral triangle of the same area
    inside = torch.ones_like(circle)
    for angle in (-90.0, 30.0, 150.0):  # the triangle points up (y grows downwards)
        a = math.radians(angle + 180.0)  # outward normal of the edge opposite each vertex
        inside &= dx * math.cos(a) + dy * math.sin(a) <= big / 2
    triangle = inside
    pick = shape.view(-1, 1, 1)
    hard = torch.where(pick == 0, circle, torch.where(pick == 1, square, triangle)).float()
    return F.avg_pool2d(hard.unsqueeze(1), supersample).squeeze(1)


@dataclass
class ImageSet:
    images: torch.Tensor  # [B, 3, S, S] in [0, 1]
    hue: torch.Tensor  # [B] index into HUE_NAMES
    shape: torch.Tensor  # [B] index into SHAPES
    position: torch.Tensor  # [B] index into POSITION_NAMES
    labels: torch.Tensor  # [B, 2] (color, lighting): 1 superior, 0 ordinary
    saturation: torch.Tensor  # [B] drawn HSV saturation
    value: torch.Tensor  # [B] drawn HSV value

    @property
    def captions(self) -> List[str]:
        return [caption(int(h), int(s), int(p)) for h, s, p in zip(self.hue, self.shape, self.position)]

    def caption_index(self) -> torch.Tensor:
        """[B] index into all_captions()."""
        return (self.hue * len(SHAPES) + self.shape) * len(POSITION_NAMES) + self.position


def _uniform(n: int, bounds: Tuple[float, float], g: torch.Generator) -> torch.Tensor:
    lo, hi = bounds
    return lo + (hi - lo) * torch.rand(n, generator=g)


def make_images(
    count: int,
    size: int,
    generator: torch.Generator,
    superior_fraction: Optional[Tuple[float, float]] = None,
    appearance: Appearance = DEFAULT_APPEARANCE,
) -> ImageSet:
    """``count`` random images.  ``superior_fraction`` = (color, lighting) share of superior
    images, each drawn independently; None = ordinary images only (the base model's data)."""
    a = appearance
    g = generator
    shape = torch.randint(0, len(SHAPES), (count,), generator=g)
    position = torch.randint(0, len(POSITION_NAMES), (count,), generator=g)
    centres = torch.tensor([POSITIONS[p] for p in POSITION_NAMES])[position]
    jitter = (torch.rand(count, 2, generator=g) * 2 - 1) * JITTER
    cx, cy = ((centres + jitter) * size).unbind(-1)
    radius = _uniform(count, RADIUS, g) * size
    hue = torch.randint(0, len(HUE_NAMES), (count,), generator=g)
    labels = torch.zeros(count, 2)
    if superior_fraction is not None:
        labels = (torch.rand(count, 2, generator=g) < torch.tensor(superior_fraction)).float()
    saturation = torch.where(labels[:, 0] > 0, _uniform(count, a.superior_saturation, g), _uniform(count, a.ordinary_saturation, g))
    value = torch.where(labels[:, 1] > 0, _uniform(count, a.superior_value, g), _uniform(count, a.ordinary_value, g))
    coverage = shape_masks(shape, cx, cy, radius, size)
    colour = hsv_to_rgb(torch.tensor(list(HUES.values()))[hue], saturation, value)  # [B, 3]
    images = coverage.unsqueeze(1) * colour.view(count, 3, 1, 1)
    return ImageSet(images, hue, shape, position, labels, saturation, value)


# -- measurements -------------------------------------------------------------------------------
def saturation_value(images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """HSV saturation and value [B, S, S] of rgb images [B, 3, S, S] in [0, 1]."""
    images = images.clamp(0, 1)
    top = images.amax(1)
    bottom = images.amin(1)
    sat = torch.where(top > 1e-6, (top - bottom) / top.clamp_min(1e-6), torch.zeros_like(top))
    return sat, top


def mean_hue(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """[B] circular mean hue in [0, 1) of each image's foreground, weighted by chroma."""
    r, g, b = images.clamp(0, 1).unbind(1)
    # Hue angle from the opponent axes (the hexagonal hue of HSV, smoothed): exact at the six named hues.
    x = r - (g + b) / 2
    y = (g - b) * math.sqrt(3) / 2
    w = masks.float()
    angle = torch.atan2((y * w).flatten(1).sum(1), (x * w).flatten(1).sum(1))
    return (angle / (2 * math.pi)) % 1.0


def nearest_hue(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """[B] index into HUE_NAMES of the named hue nearest the foreground's mean hue."""
    names = torch.tensor(list(HUES.values()))
    d = (mean_hue(images, masks).unsqueeze(-1) - names).abs()
    return torch.minimum(d, 1 - d).argmin(-1)


def hue_correct(images: torch.Tensor, masks: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """[B] bool: the foreground's mean hue is nearest the captioned hue."""
    return nearest_hue(images, masks) == hue


def foreground(images: torch.Tensor) -> torch.Tensor:
    """Boolean foreground mask [B, S, S]."""
    value = saturation_value(images)[1]
    peak = value.flatten(1).amax(1).view(-1, 1, 1)
    return value > torch.clamp(peak * FOREGROUND_FRACTION, min=FOREGROUND_FLOOR)


@dataclass
class Measures:
    saturation: float  # mean HSV saturation over all foreground pixels
    brightness: float  # mean HSV value over all foreground pixels
    masks: torch.Tensor  # [B, S, S] bool


def measure(images: torch.Tensor) -> Measures:
    sat, val = saturation_value(images)
    masks = foreground(images)
    m = masks.float()
    total = m.sum().clamp_min(1.0)
    return Measures(float((sat * m).sum() / total), float((val * m).sum() / total), masks)


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image IoU [B] of boolean masks [B, S, S]; two empty masks count as 1."""
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def centroids(masks: torch.Tensor) -> torch.Tensor:
    """[B, 2] (x, y) centre of each mask in pixels (NaN for an empty mask)."""
    _, h, w = masks.shape
    m = masks.float()
    area = m.flatten(1).sum(1)
    ys = torch.arange(h, dtype=torch.float32).view(1, h, 1) + 0.5
    xs = torch.arange(w, dtype=torch.float32).view(1, 1, w) + 0.5
    return torch.stack([(m * xs).flatten(1).sum(1) / area, (m * ys).flatten(1).sum(1) / area], -1)


def nearest_position(masks: torch.Tensor) -> torch.Tensor:
    """[B] index into POSITION_NAMES of the named position nearest the mask's centre."""
    centres = torch.tensor([POSITIONS[p] for p in POSITION_NAMES]) * masks.shape[-1]  # [P, 2]
    return torch.cdist(centroids(masks).nan_to_num(-1e3), centres).argmin(-1)


def position_correct(masks: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """[B] bool: the mask's centre is nearer the captioned position than any other position."""
    return nearest_position(masks) == position


def fill_ratio(masks: torch.Tensor) -> torch.Tensor:
    """[B] mask area over its bounding-box area: about 0.8 circle, 1.0 square, 0.6 triangle."""
    rows, cols = masks.any(2), masks.any(1)
    height = _extent(rows)
    width = _extent(cols)
    area = masks.flatten(1).sum(1).float()
    return area / (height * width).clamp_min(1)


def _extent(occupied: torch.Tensor) -> torch.Tensor:
    idx = torch.arange(occupied.shape[1]).expand_as(occupied)
    first = torch.where(occupied, idx, occupied.shape[1]).amin(1)
    last = torch.where(occupied, idx, -1).amax(1)
    return (last - first + 1).clamp_min(0).float()


_PROTOTYPES: Dict[int, torch.Tensor] = {}


def nearest_shape(masks: torch.Tensor) -> torch.Tensor:
    """[B] index into SHAPES of the shape whose fill ratio (as drawn here) is nearest the mask's."""
    size = masks.shape[-1]
    if size not in _PROTOTYPES:
        drawn = make_images(600, size, torch.Generator().manual_seed(0))
        ratio = fill_ratio(foreground(drawn.images))
        _PROTOTYPES[size] = torch.stack([ratio[drawn.shape == k].mean() for k in range(len(SHAPES))])
    return (fill_ratio(masks).unsqueeze(-1) - _PROTOTYPES[size]).abs().argmin(-1)


def shape_correct(masks: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """[B] bool: the mask's fill ratio is nearest that of the captioned shape (as drawn here)."""
    return nearest_shape(masks) == shape


def content_classes(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """[B, 3] (hue, shape, position) indices as read off the pictures, in caption_parts' order."""
    return torch.stack([nearest_hue(images, masks), nearest_shape(masks), nearest_position(masks)], -1)
