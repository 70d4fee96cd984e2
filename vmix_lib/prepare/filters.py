"""Duplicate and score filters.  Each returns what it drops, with the reason, and keeps the rest."""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch

# Similarities computed per block of rows: block × N floats stay under this (128 MB in float32).
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
) -> List[Tuple[int, int, float]]:
    """(dropped, kept, cosine) for images whose unit-length embedding has a cosine above ``threshold``
    with a better-scored image that is kept.

    Greedy in score order (ties: lower index first): an image is kept unless it is a near duplicate of
    an image kept before it, so of every group the best-scored survives.  The N×N similarity matrix is
    never built: rows are compared block by block with the images before them, so memory stays at
    block × N similarities.
    """
    n = embeds.shape[0]
    if n < 2:
        return []
    order = torch.sort(-scores.double(), stable=True).indices
    ranked = embeds.float()[order].to(device)
    kept = torch.zeros(n, dtype=torch.bool, device=device)
    block = block or int(min(4096, max(64, _BLOCK_ELEMENTS // n)))
    dropped: List[Tuple[int, int, float]] = []
    bar = progress(total=n, desc="near duplicates", unit="img") if progress else None
    for start in range(0, n, block):
        stop = min(n, start + block)
        rows = ranked[start:stop]
        if start:
            earlier = rows @ ranked[:start].T  # [b, start]
            earlier.masked_fill_(~kept[:start], -2.0)  # only kept images count
            best_before, arg_before = earlier.max(dim=1)
            best_before, arg_before = best_before.cpu(), arg_before.cpu()
        else:
            best_before = torch.full((stop - start,), -2.0)
            arg_before = torch.zeros(stop - start, dtype=torch.long)
        inner = (rows @ rows.T).cpu()  # [b, b]: the block's own order decides within it
        kept_inner = torch.zeros(stop - start, dtype=torch.bool)
        for i in range(stop - start):
            cos, partner = float(best_before[i]), int(arg_before[i])
            if i:
                within = inner[i, :i].masked_fill(~kept_inner[:i], -2.0)
                j = int(within.argmax())
                if float(within[j]) > cos:
                    cos, partner = float(within[j]), start + j
            if cos > threshold:
                dropped.append((int(order[start + i]), int(order[partner]), cos))
            else:
                kept_inner[i] = True
        kept[start:stop] = kept_inner.to(device)
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
