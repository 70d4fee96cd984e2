"""Aspect-ratio buckets (kohya-ss/sd-scripts' algorithm) and the plan of batches over them.

Instead of cropping every image to a square, each image goes to the bucket whose aspect ratio is
closest to its own; it is resized to *cover* the bucket and centre-cropped, never padded.

    make_bucket_resolutions  the bucket list: the square of the training area, then for each width
                             from min to max in steps, the height that keeps the area (both ways)
    select_bucket            an exact bucket if one exists, else the smallest aspect-ratio error
    fit_to_bucket            resize to cover, centre crop: the resized size and the crop's top-left
    BatchPlan                per epoch: each bucket's images shuffled and cut into global
                             micro-batches, the micro-batches shuffled; one bucket per batch

SDXL's size conditioning comes from the real crop, in diffusers' (h, w) order: original size = the
image before resizing, crop top-left = (top, left) in the resized image, target size = the bucket.
(kohya writes a "letterbox" top-left instead; diffusers' SDXL training script, like ours, the crop.)
With ``bucket = false`` the list is the one square bucket, which is the trainer's square crop.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch

Size = Tuple[int, int]  # (width, height), as PIL reports sizes


def make_bucket_resolutions(max_reso: Size, min_size: int = 256, max_size: int = 1024, divisible: int = 64) -> List[Size]:
    """kohya's ``make_bucket_resolutions``: sorted (w, h) buckets of about max_reso's area."""
    max_width, max_height = max_reso
    max_area = max_width * max_height
    resos = set()
    width = int(math.sqrt(max_area) // divisible) * divisible
    resos.add((width, width))
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible
    return sorted(resos)


def select_bucket(image_size: Size, buckets: Sequence[Size]) -> Size:
    """The bucket for an image of ``image_size`` (w, h): the same size if it is a bucket, else the
    first bucket (in sorted order) with the smallest aspect-ratio error (kohya's BucketManager)."""
    if tuple(image_size) in buckets:
        return tuple(image_size)
    aspect = image_size[0] / image_size[1]
    errors = [abs(w / h - aspect) for w, h in buckets]
    return tuple(buckets[errors.index(min(errors))])


def fit_to_bucket(image_size: Size, bucket: Size) -> Tuple[Size, Tuple[int, int]]:
    """(resized (w, h), crop top-left (top, left)): scale so the image covers the bucket, then
    centre-crop the overflow (kohya's select_bucket + trim_and_resize_if_required)."""
    width, height = image_size
    bucket_w, bucket_h = bucket
    if width / height > bucket_w / bucket_h:  # wider than the bucket: match heights, crop the sides
        scale = bucket_h / height
    else:
        scale = bucket_w / width
    resized = (max(bucket_w, int(width * scale + 0.5)), max(bucket_h, int(height * scale + 0.5)))
    return resized, ((resized[1] - bucket_h) // 2, (resized[0] - bucket_w) // 2)


@dataclass(frozen=True)
class BucketSettings:
    resolution: int  # the training area is resolution²
    enabled: bool = True
    min_size: int = 0  # 0: resolution / 2
    max_size: int = 0  # 0: 2 · resolution
    step: int = 64

    def resolved(self) -> "BucketSettings":
        step = self.step
        low = self.min_size or max(step, (self.resolution // 2) // step * step)
        high = self.max_size or -(-2 * self.resolution // step) * step
        return BucketSettings(self.resolution, self.enabled, low, high, step)

    def problem(self) -> str:
        """One sentence if the settings cannot make buckets, else ''."""
        s = self.resolved()
        if not s.enabled:
            return ""
        if s.resolution % s.step:
            return f"resolution {s.resolution} is not a multiple of bucket_step {s.step}"
        for name, value in (("bucket_min", s.min_size), ("bucket_max", s.max_size)):
            if value % s.step:
                return f"{name} {value} is not a multiple of bucket_step {s.step}"
        if not s.min_size <= s.resolution <= s.max_size:
            return f"bucket_min {s.min_size} and bucket_max {s.max_size} must enclose the resolution {s.resolution}"
        return ""

    def buckets(self) -> List[Size]:
        s = self.resolved()
        if not s.enabled:
            return [(s.resolution, s.resolution)]
        return make_bucket_resolutions((s.resolution, s.resolution), s.min_size, s.max_size, s.step)

    def to_json(self) -> Dict:
        s = self.resolved()
        return {"enabled": s.enabled, "resolution": s.resolution, "min": s.min_size, "max": s.max_size, "step": s.step}


def assign_buckets(sizes: Sequence[Size], buckets: Sequence[Size]) -> List[Size]:
    """The bucket of each image size (w, h)."""
    return [select_bucket(size, buckets) for size in sizes]


def bucket_summary(assigned: Sequence[Size]) -> str:
    """'512x512: 120, 448x576: 31, ...' from the most to the least used bucket."""
    counts: Dict[Size, int] = {}
    for bucket in assigned:
        counts[bucket] = counts.get(bucket, 0) + 1
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return ", ".join(f"{w}x{h}: {n}" for (w, h), n in ordered)


# -- the plan ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlannedBatch:
    bucket: Size
    items: Tuple[int, ...]  # dataset indices, all in ``bucket``
    serials: Tuple[int, ...]  # unique sample numbers of the run (they seed each sample's draws)


class BatchPlan:
    """Global micro-batches of ``global_batch`` images, one bucket each, epoch after epoch.

    Epoch e: every bucket's images in a seeded random order, cut into batches of ``global_batch``
    (a bucket's last batch may be smaller), then all batches in a seeded random order (kohya's
    shuffle).  Batch number i of the run is ``batch(i)``: a pure function of (images, buckets,
    global batch, seed), so any process computes any batch, and a resumed run continues exactly.
    """

    def __init__(self, buckets: Sequence[Size], global_batch: int, seed: int):
        if global_batch < 1 or not buckets:
            raise ValueError("a batch plan needs images and a global batch of at least 1")
        self.buckets = [tuple(b) for b in buckets]
        self.global_batch = int(global_batch)
        self.seed = int(seed)
        self.images = len(self.buckets)
        members: Dict[Size, List[int]] = {}
        for i, bucket in enumerate(self.buckets):
            members.setdefault(bucket, []).append(i)
        self._keys = sorted(members)
        self._members = [members[key] for key in self._keys]
        self.per_epoch = sum(-(-len(m) // self.global_batch) for m in self._members)
        self._cached: Tuple[int, List[PlannedBatch]] = (-1, [])

    def epoch(self, epoch: int) -> List[PlannedBatch]:
        if self._cached[0] == epoch:
            return self._cached[1]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        cut = []
        for key, members in zip(self._keys, self._members):
            order = [members[i] for i in torch.randperm(len(members), generator=generator).tolist()]
            cut.extend((key, order[s:s + self.global_batch]) for s in range(0, len(order), self.global_batch))
        batches, serial = [], epoch * self.images
        for index in torch.randperm(len(cut), generator=generator).tolist():
            key, items = cut[index]
            batches.append(PlannedBatch(key, tuple(items), tuple(range(serial, serial + len(items)))))
            serial += len(items)
        self._cached = (epoch, batches)
        return batches

    def batch(self, index: int) -> PlannedBatch:
        epoch, position = divmod(index, self.per_epoch)
        return self.epoch(epoch)[position]

    def continue_from(self, epoch: int, fraction: float) -> int:
        """Batch index at ``fraction`` of ``epoch`` (resuming a run saved with another plan)."""
        return epoch * self.per_epoch + min(self.per_epoch - 1, max(0, round(fraction * self.per_epoch)))
