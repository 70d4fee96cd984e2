"""Per-block weights: a short text that scales λ per cross-attention layer.

Syntax (case-insensitive; entries separated by commas, semicolons or new lines; ':' or '='):

    empty                   1 everywhere
    IN:0.5, MID:1, OUT:1    groups: IN (input blocks), MID (middle block), OUT (output blocks), ALL
    IN4:0, OUT3:0.5         one block by its WebUI index: IN4 = input_blocks.4, OUT3 = output_blocks.3
                            (IN04 / OUT03 also accepted); MID is the middle block
    5:0.5   0-5:0           layers by number, or an inclusive range of numbers, in the order
                            input -> middle -> output (SD1.5: 0-15, 6 = middle; SDXL: 0-69, 24-33 = middle)
    1,1,0.5,...             a bare list of one number per layer (16 for SD1.5, 70 for SDXL)

Later entries override earlier ones ("ALL:0, OUT:1" = output blocks only).  Weights are 0 to 2.
Note: the layer numbers are not IP-Adapter's (which puts the middle block last).
"""
from __future__ import annotations

import math
import re
from typing import Dict, List, Sequence, Tuple

WEIGHT_RANGE = (0.0, 2.0)
SYNTAX_HINT = "write e.g. IN:1, MID:0.5, OUT:1 (see the README for block and layer numbers)"

_SPLIT_RE = re.compile(r"[,;\n]+")
_BLOCK_RE = re.compile(r"^(IN|OUT)0*(\d+)$")
_RANGE_RE = re.compile(r"^(\d+)\s*-\s*(\d+)$")


def layer_group(name: str) -> Tuple[str, int]:
    """("IN", 4) for input_blocks.4...., ("MID", 0) for the middle block, ("OUT", 3) for output_blocks.3."""
    parts = name.split(".")
    if parts[0] == "input_blocks":
        return "IN", int(parts[1])
    if parts[0] == "output_blocks":
        return "OUT", int(parts[1])
    if parts[0] == "middle_block":
        return "MID", 0
    raise ValueError(f"not a WebUI cross-attention layer name: {name}")


def block_keys(layer_names: Sequence[str]) -> List[str]:
    """The block keys that exist for these layers, in layer order (e.g. IN1, IN2, ..., MID, OUT3, ...)."""
    keys: List[str] = []
    for name in layer_names:
        group, index = layer_group(name)
        key = "MID" if group == "MID" else f"{group}{index}"
        if key not in keys:
            keys.append(key)
    return keys


def _weight(text: str, entry: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    low, high = WEIGHT_RANGE
    if not (math.isfinite(value) and low <= value <= high):
        raise ValueError(f"VMix block weights: {entry.strip()!r} needs a weight from {low:g} to {high:g}; {SYNTAX_HINT}.")
    return value


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def parse_block_weights(text: str, layer_names: Sequence[str], family_title: str = "this") -> Dict[str, float]:
    """Layer name -> factor for every layer whose factor is not 1 (empty text: {}).

    Raises ValueError with one sentence naming the bad entry and the valid keys.
    """
    text = (text or "").strip()
    if not text:
        return {}
    layer_names = list(layer_names)
    count = len(layer_names)
    entries = [e.strip() for e in _SPLIT_RE.split(text) if e.strip()]
    factors = [1.0] * count

    if all(_is_number(e) for e in entries):  # a bare per-layer list
        if len(entries) != count:
            raise ValueError(
                f"VMix block weights: a list of plain numbers needs one weight per layer, {count} for {family_title} "
                f"adapters, got {len(entries)}; or {SYNTAX_HINT}."
            )
        factors = [_weight(e, e) for e in entries]
        return {name: f for name, f in zip(layer_names, factors) if f != 1.0}

    groups = [layer_group(name) for name in layer_names]
    valid = ", ".join(block_keys(layer_names))
    for entry in entries:
        key, sep, value_text = entry.replace("=", ":").partition(":")
        key = key.strip().upper().replace(" ", "")
        if not sep:
            raise ValueError(f"VMix block weights: {entry!r} has no weight; {SYNTAX_HINT}.")
        weight = _weight(value_text.strip(), entry)
        if key == "ALL":
            selected = range(count)
        elif key in ("IN", "OUT", "MID", "M"):
            group = "MID" if key == "M" else key
            selected = [i for i, (g, _) in enumerate(groups) if g == group]
        elif key.isdigit() or _RANGE_RE.match(key):
            m = _RANGE_RE.match(key)
            first, last = (int(m.group(1)), int(m.group(2))) if m else (int(key), int(key))
            if first > last or last >= count:
                raise ValueError(
                    f"VMix block weights: layer number {key} is outside 0-{count - 1} ({family_title} adapters have {count} layers)."
                )
            selected = range(first, last + 1)
        else:
            m = _BLOCK_RE.match(key)
            if not m:
                raise ValueError(f"VMix block weights: {key!r} is not a block key; use ALL, IN, MID, OUT, one of {valid}, or layer numbers.")
            group, index = m.group(1), int(m.group(2))
            selected = [i for i, g in enumerate(groups) if g == (group, index)]
            if not selected:
                raise ValueError(
                    f"VMix block weights: {key} has no cross-attention in {family_title} adapters; blocks with it are: {valid}."
                )
        for i in selected:
            factors[i] = weight
    return {name: f for name, f in zip(layer_names, factors) if f != 1.0}
