"""CLIP zero-shot probes per aesthetic dimension: antonym prompt pairs, CLIP-IQA style.

For each pair (positive, negative) the probability of the positive pole is the softmax of the two
scaled cosine similarities (``logit_scale · cos``, as CLIP's own zero-shot classifier); a dimension's
score is that probability averaged over its phrasings, in [0, 1].  Several phrasings per pole make
the score less sensitive to one prompt's wording (pyiqa assembles prompts the same way).

The defaults cover the adapter's six dimensions; a user can define others as
``name=positive|negative;positive|negative``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch

from .errors import ScoringError


@dataclass(frozen=True)
class DimensionProbe:
    name: str
    pairs: Tuple[Tuple[str, str], ...]  # (positive pole, negative pole) prompts


def _pairs(*items: Tuple[str, str]) -> Tuple[Tuple[str, str], ...]:
    return tuple(items)


DEFAULT_PROBES: Tuple[DimensionProbe, ...] = (
    DimensionProbe("color", _pairs(
        ("a photo with vibrant colors.", "a photo with dull colors."),
        ("a colorful image with rich, saturated colors.", "a colorless image with muted, washed-out colors."),
        ("an image with a beautiful color palette.", "an image with a drab color palette."),
    )),
    DimensionProbe("lighting", _pairs(
        ("a photo with beautiful lighting.", "a photo with bad lighting."),
        ("a well-lit image with natural light.", "a poorly lit image with flat, dim light."),
        ("an image with dramatic, pleasing light.", "an image with harsh, unflattering light."),
    )),
    DimensionProbe("composition", _pairs(
        ("a photo with a well-balanced composition.", "a photo with an unbalanced composition."),
        ("a carefully composed, harmonious image.", "a cluttered, awkwardly framed image."),
        ("an image with proportional composition.", "an image with a messy composition."),
    )),
    DimensionProbe("focus", _pairs(
        ("a sharp photo in focus.", "a blurry photo out of focus."),
        ("an image with crisp, clear details.", "an image with soft, smeared details."),
        ("a photo with sharp focus on the subject.", "a photo where the subject is blurred."),
    )),
    DimensionProbe("texture", _pairs(
        ("a photo with detailed textures.", "a photo with plain, smooth textures."),
        ("an image with fine, intricate surface detail.", "an image with flat surfaces and no detail."),
        ("a richly textured image.", "a plastic-looking image without texture."),
    )),
    DimensionProbe("emotion", _pairs(
        ("an evocative, emotional photo.", "an emotionless, bland photo."),
        ("an image with a striking, moving atmosphere.", "an image with a boring, lifeless atmosphere."),
        ("an expressive image full of mood.", "an expressionless image without mood."),
    )),
)


def default_probes(names: Sequence[str] = ()) -> List[DimensionProbe]:
    """The built-in probes, all or the named ones (in the order named)."""
    table = {p.name: p for p in DEFAULT_PROBES}
    if not names:
        return list(DEFAULT_PROBES)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ScoringError(
            f"no built-in probe phrases for dimension {unknown[0]!r} (built in: {', '.join(table)}); "
            f"define it as '{unknown[0]}=positive phrase|negative phrase'"
        )
    return [table[n] for n in names]


def parse_probe(spec: str) -> DimensionProbe:
    """``name=positive|negative;positive|negative`` -> a probe (one sentence on a malformed spec)."""
    name, sep, rest = spec.partition("=")
    name = name.strip()
    if not sep or not name or not rest.strip():
        raise ScoringError(f"dimension {spec!r} must look like 'name=positive phrase|negative phrase;positive|negative'")
    pairs = []
    for part in rest.split(";"):
        if not part.strip():
            continue
        pos, bar, neg = part.partition("|")
        if not bar or not pos.strip() or not neg.strip():
            raise ScoringError(f"dimension {name!r}: {part.strip()!r} is not a 'positive phrase|negative phrase' pair")
        pairs.append((pos.strip(), neg.strip()))
    return DimensionProbe(name, tuple(pairs))


def encode_probes(clip, probes: Sequence[DimensionProbe]) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """name -> (positive text embeddings [P, D], negative [P, D]), unit length; one text batch for all."""
    texts = [t for p in probes for pair in p.pairs for t in pair]
    embeds = clip.embed_texts(texts)
    out, i = {}, 0
    for p in probes:
        block = embeds[i:i + 2 * len(p.pairs)]
        out[p.name] = (block[0::2], block[1::2])
        i += 2 * len(p.pairs)
    return out


def antonym_probability(image_embeds: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """[N] mean over pairs of softmax(scale·[cos(img, pos), cos(img, neg)])[0]; all inputs unit length."""
    image_embeds = image_embeds.float()
    pos = logit_scale * image_embeds @ positive.float().T  # [N, P]
    neg = logit_scale * image_embeds @ negative.float().T
    return torch.sigmoid(pos - neg).mean(dim=1)  # the 2-way softmax's first entry, computed stably


def probe_scores(clip, image_embeds: torch.Tensor, probes: Sequence[DimensionProbe], encoded=None) -> Dict[str, torch.Tensor]:
    """name -> [N] scores in [0, 1] for the given unit-length image embeddings."""
    encoded = encoded or encode_probes(clip, probes)
    return {p.name: antonym_probability(image_embeds, *encoded[p.name], clip.logit_scale) for p in probes}
