"""The VMix script's arguments: positional (UI order), a single dict (HTTP API), X/Y/Z overrides.

Positional order (what ``ui()`` returns, and ``alwayson_scripts: {"VMix": {"args": [...]}}``):

    0  enabled        bool   the accordion's checkbox
    1  adapter        str    adapter name (file name without .safetensors) in the model folder
    2  strength       float  λ, 0 to 3
    3..10 alpha 1..8  float  α of the adapter's dimensions 1..8 in the adapter's order, 0 to 1
                             (slots beyond the adapter's dimension count are ignored)
    11 start          float  where VMix begins acting, 0 to 1 (RANGE_MEANING)
    12 end            float  where VMix stops acting, 0 to 1, above start
    13 uncond         bool   also apply to the unconditional (negative) pass
    14 block weights  str    see vmix_lib.webui.blocks

Or one dict as the first argument (other arguments are then ignored):

    {"enabled": true, "adapter": "name", "strength": 1.4, "dimensions": {"color": 1, "lighting": 0.5},
     "start": 0, "end": 1, "uncond": true, "block_weights": ""}

Missing keys take their defaults (a dict means "use VMix": "enabled" defaults to true; "adapter" to
the first installed adapter).  Unknown keys, wrong types and out-of-range values raise
VMixArgumentError with one sentence naming the argument.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

MAX_DIMENSION_SLOTS = 8
STRENGTH_RANGE = (0.0, 3.0)
ALPHA_RANGE = (0.0, 1.0)
FRACTION_RANGE = (0.0, 1.0)
# What start and end measure, in the words every place uses (the 422 message, the hover hints, the
# X/Y/Z axes, the README).  A1111: the fraction of the sampler's denoiser calls so far
# (denoiser.step / denoiser.total_steps); Forge: a sigma window from the model's percent_to_sigma,
# i.e. a fraction of its 1000-step noise schedule (see vmix_lib.webui.lifecycle).
RANGE_MEANING = ("fractions of the denoising from 0 (most noise) to 1 (no noise left), counted in the sampler's "
                 "steps on A1111 and along the model's noise schedule on Forge")
ALL_DIMENSIONS = "*"  # in an "alphas" override: the weight of every dimension not named

POSITIONAL_NAMES: Tuple[str, ...] = (
    ("enabled", "adapter", "strength")
    + tuple(f"alpha {i + 1}" for i in range(MAX_DIMENSION_SLOTS))
    + ("start", "end", "uncond", "block weights")
)
ARG_COUNT = len(POSITIONAL_NAMES)
DICT_KEYS = ("enabled", "adapter", "strength", "dimensions", "start", "end", "uncond", "block_weights")
OVERRIDE_KEYS = ("enabled", "adapter", "strength", "alphas", "start", "end", "uncond")

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


class VMixArgumentError(ValueError):
    """An argument of the VMix script is invalid; the message is one sentence naming it."""


@dataclass(frozen=True)
class VMixSettings:
    """What the user asked for, before the adapter is known (alphas are not yet bound to names)."""

    enabled: bool = False
    adapter: Optional[str] = None  # None: the first installed adapter
    strength: float = 1.0
    alpha_slots: Tuple[float, ...] = (1.0,) * MAX_DIMENSION_SLOTS  # positional α, adapter order
    alphas: Optional[Dict[str, float]] = None  # α by name (dict API, X/Y/Z); wins over alpha_slots
    start: float = 0.0
    end: float = 1.0
    uncond: bool = True
    block_weights: str = ""
    source: str = field(default="positional", compare=False)  # "positional" / "dict", for messages

    def alphas_for(self, dimension_names: Sequence[str]) -> Dict[str, float]:
        """α by dimension name for an adapter with these dimensions (missing names mean 1).

        Names not in the adapter are kept, so vmix_lib.dimensions.resolve_alphas reports them.
        """
        if self.alphas is not None:
            rest = dict(self.alphas)
            default = rest.pop(ALL_DIMENSIONS, None)
            out = {name: float(default) for name in dimension_names} if default is not None else {}
            out.update(rest)
            return out
        slots = self.alpha_slots
        return {name: float(slots[i]) for i, name in enumerate(dimension_names[:len(slots)])}


@dataclass(frozen=True)
class ArgumentDefaults:
    """Defaults the WebUI settings provide (Settings > VMix)."""

    strength: float = 1.0
    uncond: bool = True


# ---------------------------------------------------------------- value checks


def _label(name: str, source: str) -> str:
    return f"VMix argument {name!r}" if source == "dict" else f"VMix argument {name}"


def as_bool(value: Any, name: str, source: str = "positional") -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise VMixArgumentError(f"{_label(name, source)} must be true or false, got {value!r}.")


def as_number(value: Any, name: str, low: float, high: float, source: str = "positional") -> float:
    if isinstance(value, bool) or value is None:
        raise VMixArgumentError(f"{_label(name, source)} must be a number from {low:g} to {high:g}, got {value!r}.")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise VMixArgumentError(f"{_label(name, source)} must be a number from {low:g} to {high:g}, got {value!r}.") from None
    if not (math.isfinite(number) and low <= number <= high):
        raise VMixArgumentError(f"{_label(name, source)} must be from {low:g} to {high:g}, got {value!r}.")
    return number


def as_adapter(value: Any, name: str = "adapter", source: str = "positional") -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, str):
        raise VMixArgumentError(f"{_label(name, source)} must be an adapter name (a string), got {value!r}.")
    value = value.strip()
    return value or None


def as_text(value: Any, name: str, source: str = "positional") -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise VMixArgumentError(f"{_label(name, source)} must be a string, got {value!r}.")
    return value.strip()


def as_alpha_dict(value: Any, name: str, source: str) -> Dict[str, float]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise VMixArgumentError(
            f"{_label(name, source)} must be an object mapping dimension names to weights, e.g. "
            f'{{"color": 1, "lighting": 0.5}}, got {value!r}.'
        )
    out = {}
    for key, weight in value.items():
        if not isinstance(key, str) or not key.strip():
            raise VMixArgumentError(f"{_label(name, source)} has a dimension name that is not a string: {key!r}.")
        out[key.strip()] = as_number(weight, f"{name}.{key.strip()}", *ALPHA_RANGE, source=source)
    return out


def check_range(settings: VMixSettings) -> VMixSettings:
    if not settings.start < settings.end:
        raise VMixArgumentError(
            f"VMix start ({settings.start:g}) must be below end ({settings.end:g}); both are {RANGE_MEANING}."
        )
    return settings


# ---------------------------------------------------------------- parsing


def parse_positional(args: Sequence[Any], defaults: ArgumentDefaults = ArgumentDefaults()) -> VMixSettings:
    """Arguments in UI order; missing trailing ones take their defaults."""
    args = list(args)
    if len(args) > ARG_COUNT:
        args = args[:ARG_COUNT]  # the WebUI never passes more; ignore rather than misread

    def get(index, fallback):
        return args[index] if index < len(args) and args[index] is not None else fallback

    slots = []
    for i in range(MAX_DIMENSION_SLOTS):
        slots.append(as_number(get(3 + i, 1.0), f"alpha {i + 1}", *ALPHA_RANGE))
    settings = VMixSettings(
        enabled=as_bool(get(0, False), "enabled"),
        adapter=as_adapter(args[1] if len(args) > 1 else None),
        strength=as_number(get(2, defaults.strength), "strength", *STRENGTH_RANGE),
        alpha_slots=tuple(slots),
        alphas=None,
        start=as_number(get(11, 0.0), "start", *FRACTION_RANGE),
        end=as_number(get(12, 1.0), "end", *FRACTION_RANGE),
        uncond=as_bool(get(13, defaults.uncond), "uncond"),
        block_weights=as_text(get(14, ""), "block weights"),
        source="positional",
    )
    return check_range(settings)


def parse_dict(data: Mapping[str, Any], defaults: ArgumentDefaults = ArgumentDefaults()) -> VMixSettings:
    """The single-dict form of the arguments (HTTP API)."""
    unknown = [key for key in data if key not in DICT_KEYS]
    if unknown:
        raise VMixArgumentError(
            f"VMix argument {unknown[0]!r} is not known; the keys are: {', '.join(DICT_KEYS)}."
        )
    src = "dict"
    settings = VMixSettings(
        enabled=as_bool(data.get("enabled", True), "enabled", src),
        adapter=as_adapter(data.get("adapter"), "adapter", src),
        strength=as_number(data.get("strength", defaults.strength), "strength", *STRENGTH_RANGE, source=src),
        alphas=as_alpha_dict(data.get("dimensions"), "dimensions", src),
        start=as_number(data.get("start", 0.0), "start", *FRACTION_RANGE, source=src),
        end=as_number(data.get("end", 1.0), "end", *FRACTION_RANGE, source=src),
        uncond=as_bool(data.get("uncond", defaults.uncond), "uncond", src),
        block_weights=as_text(data.get("block_weights", ""), "block_weights", src),
        source=src,
    )
    return check_range(settings)


def parse_script_args(args: Sequence[Any], defaults: ArgumentDefaults = ArgumentDefaults()) -> VMixSettings:
    """The script's ``*args``: a dict as the first argument, or the positional UI values."""
    args = list(args or ())
    if args and isinstance(args[0], Mapping):
        return parse_dict(args[0], defaults)
    return parse_positional(args, defaults)


def apply_overrides(settings: VMixSettings, overrides: Optional[Mapping[str, Any]]) -> VMixSettings:
    """Apply X/Y/Z per-cell overrides (``p.vmix_overrides``) on top of the script's arguments.

    Any key but "enabled" switches VMix on for the cell unless "enabled" is explicitly False.
    "alphas" replaces the per-dimension weights: {} means all 1; the key "*" is the weight of every
    dimension not named.
    """
    if not overrides:
        return settings
    unknown = [key for key in overrides if key not in OVERRIDE_KEYS]
    if unknown:
        raise VMixArgumentError(f"X/Y/Z override {unknown[0]!r} is not known; the keys are: {', '.join(OVERRIDE_KEYS)}.")
    src = "dict"
    changes: Dict[str, Any] = {}
    if "adapter" in overrides:
        changes["adapter"] = as_adapter(overrides["adapter"], "adapter", src)
    if "strength" in overrides:
        changes["strength"] = as_number(overrides["strength"], "strength", *STRENGTH_RANGE, source=src)
    if "alphas" in overrides:
        alphas = overrides["alphas"]
        if alphas is None:
            alphas = {}
        if not isinstance(alphas, Mapping):
            raise VMixArgumentError(f"X/Y/Z override 'alphas' must map dimension names to weights, got {alphas!r}.")
        changes["alphas"] = {
            (k if k == ALL_DIMENSIONS else str(k).strip()): as_number(v, f"alphas.{k}", *ALPHA_RANGE, source=src)
            for k, v in alphas.items()
        }
    if "start" in overrides:
        changes["start"] = as_number(overrides["start"], "start", *FRACTION_RANGE, source=src)
    if "end" in overrides:
        changes["end"] = as_number(overrides["end"], "end", *FRACTION_RANGE, source=src)
    if "uncond" in overrides:
        changes["uncond"] = as_bool(overrides["uncond"], "uncond", src)
    if "enabled" in overrides:
        changes["enabled"] = as_bool(overrides["enabled"], "enabled", src)
    elif any(key != "enabled" for key in overrides):
        changes["enabled"] = True
    return check_range(replace(settings, **changes))


def to_positional(settings: VMixSettings, dimension_names: Sequence[str] = ()) -> List[Any]:
    """The positional argument list that reproduces ``settings`` (UI order)."""
    slots = list(settings.alpha_slots)
    if settings.alphas is not None:
        alphas = settings.alphas_for(dimension_names)
        slots = [float(alphas.get(name, 1.0)) for name in dimension_names[:MAX_DIMENSION_SLOTS]]
        slots += [1.0] * (MAX_DIMENSION_SLOTS - len(slots))
    return [
        settings.enabled, settings.adapter, settings.strength, *slots,
        settings.start, settings.end, settings.uncond, settings.block_weights,
    ]
