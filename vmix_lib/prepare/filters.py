"""Duplicate and score filters.  Each returns what it drops, with the reason, and keeps the rest."""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch

# Similarities computed per block of images: block × N floats stay under this (128 MB in float32).
_BLOCK_ELEMENTS = 32 * 1024 * 1024


def exact_duplicates(hashes: Sequence[str], prefer: Sequence[bool]) -> List[Tuple[int, int]]:
    """(dropped, kept) index pairs among equal content hashes; within a group the first index with
    ``prefer`` (e.g. the one that has a caption) is kept, else the first index."""
    groups: Dict[str, List[int]] = {}
    for i, h in enumerate(hashes):
        groups.setdefault(h, []).append(i)
    pairs = []
    for members in groups.values():
        if len(members) < 2:
            continue
        keep = next((i for i in members if prefer[i]), members[0])
        pairs.extend((i, keep) for i in members if i != keep)
    return sorted(pairs)


def near_duplicates(
    embeds: torch.Tensor, scores: torch.Tensor, threshold: float, device="cpu", progress=None, block: Optional[int] = None,
    rows: Optional[torch.Tensor] = None,
) -> List[Tuple[int, int, float]]:
    """(dropped, kept, cosine) for images whose unit-length embedding has a cosine above ``threshold``
    with a better-scored image that is kept.

    Greedy in score order (ties: lower index first): an image is kept unless it is a near duplicate of
    an image kept before it, so of every group the best-scored survives.  The N×N similarity matrix is
    never built: each block of images is compared with the images kept so far, which are gathered at
    the front of one score-ordered copy of the embeddings, so memory stays at that copy plus
    block × kept similarities.  ``rows``: the images are these rows of ``embeds`` (the indices
    returned are positions in ``rows``).
    """
    n = embeds.shape[0] if rows is None else rows.shape[0]
    if n < 2:
        return []
    order = torch.sort(-scores.double(), stable=True).indices
    ranked = embeds.index_select(0, order if rows is None else rows[order]).float().to(device)
    kept_order: List[int] = []  # rank of the image at each kept slot ranked[:len(kept_order)]
    block = block or int(min(4096, max(64, _BLOCK_ELEMENTS // n)))
    dropped: List[Tuple[int, int, float]] = []
    bar = progress(total=n, desc="near duplicates", unit="img") if progress else None
    for start in range(0, n, block):
        stop = min(n, start + block)
        current = ranked[start:stop].clone()  # the kept slots below may overwrite these rows
        k = len(kept_order)
        if k:
            best_before, arg_before = (current @ ranked[:k].T).max(dim=1)  # [b] against every kept image
            best_before, arg_before = best_before.cpu(), arg_before.cpu()
        inner = (current @ current.T).cpu()  # [b, b]: the block's own order decides within it
        kept_inner: List[int] = []
        for i in range(stop - start):
            cos, partner = (float(best_before[i]), kept_order[int(arg_before[i])]) if k else (-2.0, -1)
            if kept_inner:
                within = inner[i, kept_inner]
                j = int(within.argmax())
                if float(within[j]) > cos:
                    cos, partner = float(within[j]), start + kept_inner[j]
            if cos > threshold:
                dropped.append((int(order[start + i]), int(order[partner]), cos))
            else:
                kept_inner.append(i)
        if kept_inner:
            ranked[k:k + len(kept_inner)] = current[kept_inner]
            kept_order.extend(start + i for i in kept_inner)
        if bar:
            bar.update(stop - start)
    if bar:
        bar.close()
    return sorted(dropped)


def aesthetic_cut(scores: torch.Tensor, minimum: Optional[float], top_fraction: Optional[float]) -> Tuple[List[int], Optional[float]]:
    """Indices dropped by the aesthetic rule and the score threshold it amounts to."""
    n = scores.shape[0]
    if n == 0 or (minimum is None and top_fraction is None):
        return [], None
    if minimum is not None:
        return [i for i in range(n) if float(scores[i]) < minimum], minimum
    keep = max(1, math.ceil(top_fraction * n))
    order = torch.sort(-scores.double(), stable=True).indices
    dropped = sorted(int(i) for i in order[keep:])
    return dropped, float(scores[order[keep - 1]])
