"""Aesthetic dimensions: each a positive label phrase and a rare-token negative label (paper §3.2)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Sequence


@dataclass(frozen=True)
class AestheticDimension:
    name: str  # short key used in settings, infotext and the API, e.g. "color"
    positive: str  # label phrase for "superior", e.g. "vibrant color"
    negative: str  # DreamBooth-style rare token for "not labelled", so no semantics leak in

    def to_json(self) -> Dict[str, str]:
        return {"name": self.name, "positive": self.positive, "negative": self.negative}


# The paper names colour, lighting, composition, focus, texture and emotion; it never released
# its label strings, so these are ours.  One distinct rare token per dimension.
DEFAULT_DIMENSIONS: Sequence[AestheticDimension] = (
    AestheticDimension("color", "vibrant color", "sks"),
    AestheticDimension("lighting", "natural lighting", "ohwx"),
    AestheticDimension("composition", "proportional composition", "zwx"),
    AestheticDimension("focus", "sharp focus", "phol"),
    AestheticDimension("texture", "detailed texture", "tqz"),
    AestheticDimension("emotion", "evocative emotion", "vkp"),
)

NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


def check_dimensions(dimensions: Sequence[AestheticDimension]) -> Optional[str]:
    """Return a problem description, or None if the list is usable."""
    if not dimensions:
        return "it defines no aesthetic dimensions"
    seen = set()
    for d in dimensions:
        if not NAME_RE.match(d.name):
            return f"dimension name {d.name!r} is not a short lowercase identifier"
        if d.name in seen:
            return f"dimension {d.name!r} appears twice"
        if not d.positive.strip() or not d.negative.strip():
            return f"dimension {d.name!r} has an empty label"
        seen.add(d.name)
    return None


def resolve_alphas(
    dimensions: Sequence[AestheticDimension], alphas: Optional[Mapping[str, float]] = None
) -> List[float]:
    """Per-dimension α in adapter order.  Missing names mean 1 (the paper's all-positive default).

    Raises ValueError naming an unknown dimension or an α outside [0, 1].
    """
    names = [d.name for d in dimensions]
    values = [1.0] * len(names)
    for key, value in (alphas or {}).items():
        if key not in names:
            raise ValueError(f"unknown aesthetic dimension {key!r}; this adapter has: {', '.join(names)}")
        try:
            value = float(value)
        except (TypeError, ValueError):
            value = None
        if value is None or not 0.0 <= value <= 1.0:  # also rejects NaN
            raise ValueError(
                f"weight for aesthetic dimension {key!r} must be a number between 0 and 1, got {alphas[key]!r}"
            )
        values[names.index(key)] = value
    return values


def dimensions_from_json(items: Iterable[Mapping[str, str]]) -> List[AestheticDimension]:
    return [AestheticDimension(str(i["name"]), str(i["positive"]), str(i["negative"])) for i in items]
