"""Infotext: the VMix keys written into ``p.extra_generation_params`` and read back when pasting.

Keys (the WebUI's key rule: letters, digits, spaces, '-' and '/'; no ':' '(' ')'):

    VMix                 True, or "skipped (<reason>)" when the job ran without VMix
    VMix adapter         name and short hash: "my_adapter (0123456789)"
    VMix strength        λ, e.g. 1.4
    VMix dimensions      α of the dimensions that are not 1, e.g. "lighting=0.5 emotion=0" (omitted: all 1)
    VMix range           start-end, e.g. 0-1 (fractions of the denoising: arguments.RANGE_MEANING)
    VMix uncond          True / False: applied to the unconditional (negative) pass
    VMix block weights   the block-weight text (omitted when empty)
    VMix note            only when part of the job ran without VMix (e.g. an SDXL refiner)
    VMix version         the extension's version

The paste functions below turn a parsed infotext dict into control values.  They are module-level
objects shared by the txt2img and img2img tabs, so the same objects can be both ``infotext_fields``
targets and ``paste_field_names`` entries ("Send to" copies fields whose target is in that list).
They return None for "leave the control as it is" and never raise.
"""
from __future__ import annotations

import json
import re
from typing import Callable, Dict, List, Mapping, MutableMapping, Optional, Sequence, Tuple

from ..dimensions import DEFAULT_DIMENSIONS
from .arguments import MAX_DIMENSION_SLOTS, VMixSettings

KEY_ENABLED = "VMix"
KEY_ADAPTER = "VMix adapter"
KEY_STRENGTH = "VMix strength"
KEY_DIMENSIONS = "VMix dimensions"
KEY_RANGE = "VMix range"
KEY_UNCOND = "VMix uncond"
KEY_BLOCK_WEIGHTS = "VMix block weights"
KEY_NOTE = "VMix note"
KEY_VERSION = "VMix version"
KEYS = (KEY_ENABLED, KEY_ADAPTER, KEY_STRENGTH, KEY_DIMENSIONS, KEY_RANGE, KEY_UNCOND, KEY_BLOCK_WEIGHTS,
        KEY_NOTE, KEY_VERSION)

_ADAPTER_RE = re.compile(r"^(?P<name>.*?)\s*\((?P<hash>[0-9a-fA-F]{10})\)$")
_FALSE_TEXT = ("false", "no", "off", "0")


def number(value: float) -> str:
    """Short text for a float, never in exponent form: 1 -> "1", 0.05 -> "0.05", 1/3 -> "0.333333"."""
    text = f"{float(value):.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def clear(params: MutableMapping) -> None:
    """Remove every VMix key (p.extra_generation_params is shared by X/Y/Z cells and batch img2img)."""
    for key in KEYS:
        params.pop(key, None)


def adapter_value(name: str, short_hash: Optional[str]) -> str:
    return f"{name} ({short_hash})" if short_hash else name


def dimensions_value(alphas: Mapping[str, float], dimension_names: Sequence[str]) -> Optional[str]:
    parts = [f"{name}={number(alphas.get(name, 1.0))}" for name in dimension_names if float(alphas.get(name, 1.0)) != 1.0]
    return " ".join(parts) or None


def build(
    settings: VMixSettings,
    *,
    adapter_name: Optional[str],
    short_hash: Optional[str],
    alphas: Mapping[str, float],
    dimension_names: Sequence[str],
    version: str,
    skipped: Optional[str] = None,
) -> Dict[str, str]:
    """The VMix infotext entries for one generation (values are strings; absent keys are omitted)."""
    out: Dict[str, str] = {KEY_ENABLED: f"skipped ({skipped})" if skipped else "True"}
    if adapter_name:
        out[KEY_ADAPTER] = adapter_value(adapter_name, short_hash)
    out[KEY_STRENGTH] = number(settings.strength)
    dims = dimensions_value(alphas, dimension_names)
    if dims:
        out[KEY_DIMENSIONS] = dims
    out[KEY_RANGE] = f"{number(settings.start)}-{number(settings.end)}"
    out[KEY_UNCOND] = str(bool(settings.uncond))
    if settings.block_weights:
        out[KEY_BLOCK_WEIGHTS] = settings.block_weights
    out[KEY_VERSION] = version
    return out


# ---------------------------------------------------------------- reading values back


def parse_adapter(value) -> Tuple[Optional[str], Optional[str]]:
    """("name", "hash") from "name (hash)"; the hash is None when absent."""
    if not isinstance(value, str) or not value.strip():
        return None, None
    m = _ADAPTER_RE.match(value.strip())
    if m:
        return m.group("name").strip() or None, m.group("hash").lower()
    return value.strip(), None


def parse_range(value) -> Optional[Tuple[float, float]]:
    if not isinstance(value, str):
        return None
    start, sep, end = value.strip().partition("-")
    try:
        return (float(start), float(end)) if sep else None
    except ValueError:
        return None


def parse_dimensions(value) -> Dict[str, float]:
    out: Dict[str, float] = {}
    if not isinstance(value, str):
        return out
    for part in value.split():
        name, sep, weight = part.partition("=")
        try:
            if sep:
                out[name.strip()] = float(weight)
        except ValueError:
            continue
    return out


def _is_on(params: Mapping) -> bool:
    value = params.get(KEY_ENABLED)
    return value is not None and str(value).strip().lower() not in _FALSE_TEXT


# What the paste functions need from the WebUI: the installed name for a pasted name/hash, and an
# installed adapter's dimension names.  Set by the WebUI glue; tests inject their own.
AdapterResolver = Callable[[Optional[str], Optional[str]], Tuple[Optional[str], Optional[List[str]]]]


def _no_resolver(name, short_hash):
    return name, None


_resolver: List[AdapterResolver] = [_no_resolver]


def set_adapter_resolver(resolver: Optional[AdapterResolver]) -> None:
    _resolver[0] = resolver or _no_resolver


def _resolved(params: Mapping) -> Tuple[Optional[str], Optional[List[str]]]:
    name, short_hash = parse_adapter(params.get(KEY_ADAPTER))
    try:
        return _resolver[0](name, short_hash)
    except Exception:  # a paste must never fail because of a file problem
        return name, None


def paste_enabled(params: Mapping) -> bool:
    return _is_on(params)


def paste_adapter(params: Mapping) -> Optional[str]:
    if not _is_on(params):
        return None
    name, _ = _resolved(params)
    return name


def paste_strength(params: Mapping) -> Optional[float]:
    if not _is_on(params):
        return None
    try:
        return float(params.get(KEY_STRENGTH, 1.0))
    except (TypeError, ValueError):
        return None


def _make_paste_alpha(slot: int):
    def paste_alpha(params: Mapping) -> Optional[float]:
        if not _is_on(params):
            return None
        _, names = _resolved(params)
        if not names:
            names = [d.name for d in DEFAULT_DIMENSIONS]
        if slot >= len(names):
            return 1.0
        return float(parse_dimensions(params.get(KEY_DIMENSIONS)).get(names[slot], 1.0))

    paste_alpha.__name__ = f"paste_alpha_{slot + 1}"
    return paste_alpha


PASTE_ALPHAS = tuple(_make_paste_alpha(i) for i in range(MAX_DIMENSION_SLOTS))


def paste_start(params: Mapping) -> Optional[float]:
    if not _is_on(params):
        return None
    rng = parse_range(params.get(KEY_RANGE))
    return rng[0] if rng else 0.0


def paste_end(params: Mapping) -> Optional[float]:
    if not _is_on(params):
        return None
    rng = parse_range(params.get(KEY_RANGE))
    return rng[1] if rng else 1.0


def paste_uncond(params: Mapping) -> Optional[bool]:
    if not _is_on(params) or KEY_UNCOND not in params:
        return None
    return str(params[KEY_UNCOND]).strip().lower() not in _FALSE_TEXT


def paste_block_weights(params: Mapping) -> Optional[str]:
    if not _is_on(params):
        return None
    value = params.get(KEY_BLOCK_WEIGHTS, "")
    return value if isinstance(value, str) else ""


# In UI order (same as the positional arguments).
PASTE_FUNCTIONS = (paste_enabled, paste_adapter, paste_strength, *PASTE_ALPHAS, paste_start, paste_end,
                   paste_uncond, paste_block_weights)


def quote(value: str) -> str:
    """How the WebUI writes a value: JSON-quoted when it holds ',', ':' or a new line."""
    text = str(value)
    if "," not in text and ":" not in text and "\n" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def library_resolver(library) -> AdapterResolver:
    """Resolve a pasted adapter against an AdapterLibrary: the name if installed (and its hash
    matches, when the infotext has one), else the installed file with that hash (a renamed copy)."""

    def resolve(name: Optional[str], short_hash: Optional[str]):
        installed = None
        if name:
            try:
                installed = library.validate(name)
            except ValueError:
                installed = None
        if short_hash and (installed is None or library.short_hash(installed) != short_hash):
            installed = library.find_by_hash(short_hash) or installed
        if installed is None:
            return name, None
        try:
            return installed, [d.name for d in library.info(installed).dimensions]
        except Exception:
            return installed, None

    return resolve
