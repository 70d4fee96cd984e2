"""X/Y/Z plot axes for VMix, in AUTOMATIC1111 and Forge, in the UI and in API-only mode.

The axes write per-cell overrides; scripts/vmix.py reads them.  Contract:

- ``apply`` runs on the shallow per-cell copy ``pc = copy(p)`` made by xyz_grid, and always assigns
  a NEW dict: ``pc.vmix_overrides = {**old, key: value}``.  Nothing shared between cells (``p``,
  ``p.extra_generation_params``, an earlier cell's dict) is ever mutated, so a cell's values never
  reach the next cell, and a failed cell leaves nothing behind.
- Keys: "enabled" (bool), "adapter" (str), "strength" (float), "alphas" (dict), "start" (float),
  "end" (float), "uncond" (bool).  Any key but "enabled" switches VMix on for the cell; an
  "enabled": False (the [VMix] Enabled axis) switches it off and wins: see ``vmix_enabled_for``.
- "alphas" REPLACES the accordion's per-dimension weights.  Its key "*" (``ALL_DIMENSIONS``) is the
  weight of every dimension not named, because the adapter (and so its dimension list) may be
  chosen by another axis of the same cell: ``expand_alphas(alphas, adapter_dimension_names)`` turns
  it into a plain name -> α dict for ``vmix_lib.dimensions.resolve_alphas``.

Registration finds xyz_grid in ``modules.scripts.scripts_data`` (scripts are loaded under their file
name, "xyz_grid.py"; A1111 1.9.0 briefly used "scripts.xyz_grid") and extends its ``axis_options``
once per label.  The script calls ``register_xyz_axes()`` both when it is imported (needed: with
``--nowebui`` the API snapshots the axis list before ``on_before_ui`` runs) and from
``script_callbacks.on_before_ui``.

WebUI modules are imported only inside functions, so this file imports without a WebUI.
"""
from __future__ import annotations

import math
import sys
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence

from ..dimensions import DEFAULT_DIMENSIONS
from .arguments import RANGE_MEANING

OVERRIDES_ATTR = "vmix_overrides"
ALL_DIMENSIONS = "*"  # key in an "alphas" override: the weight of every dimension not named
XYZ_MODULE_NAMES = ("xyz_grid.py", "scripts.xyz_grid")

LABEL_STRENGTH = "[VMix] Strength"
LABEL_ENABLED = "[VMix] Enabled"
LABEL_ADAPTER = "[VMix] Adapter"
LABEL_DIMENSIONS = "[VMix] Dimensions"
LABEL_START = "[VMix] Start"
LABEL_END = "[VMix] End"
LABEL_UNCOND = "[VMix] Uncond"
AXIS_LABELS = (LABEL_STRENGTH, LABEL_ENABLED, LABEL_ADAPTER, LABEL_DIMENSIONS, LABEL_START, LABEL_END, LABEL_UNCOND)

STRENGTH_RANGE = (0.0, 3.0)  # the paper sweeps 0..2; a little headroom, nothing absurd
FRACTION_RANGE = (0.0, 1.0)  # start/end: see arguments.RANGE_MEANING
FLOAT_DIGITS = 8  # xyz_grid rounds float labels to 8 digits; values match the labels (0.1 steps)

# An adapter switch loads a file, so iterate that axis outside cheaper ones (checkpoint is 1.0).
ADAPTER_AXIS_COST = 0.3

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")

# Helpers the other half of vmix_lib.webui provides; looked up lazily by name when not injected.
HELPER_LIST_ADAPTERS = "list_adapter_names"  # () -> list[str]
HELPER_VALIDATE_ADAPTER = "validate_adapter_name"  # (name) -> canonical str, ValueError otherwise
HELPER_LIST_DIMENSIONS = "list_adapter_dimension_names"  # () -> names used by installed adapters


# ---------------------------------------------------------------- overrides (shared with the script)


def overrides_of(p) -> Dict[str, object]:
    """The overrides the X/Y/Z cell set on ``p`` (a fresh dict, empty outside a grid)."""
    return dict(getattr(p, OVERRIDES_ATTR, None) or {})


def set_override(p, key: str, value) -> None:
    # A new dict every time: p is a shallow copy, so mutating the old dict would leak into other cells.
    setattr(p, OVERRIDES_ATTR, {**(getattr(p, OVERRIDES_ATTR, None) or {}), key: value})


def vmix_enabled_for(ui_enabled: bool, overrides: Mapping[str, object]) -> bool:
    """Whether VMix runs for this cell: [VMix] Enabled decides if set, else any override switches it on."""
    if "enabled" in overrides:
        return bool(overrides["enabled"])
    return bool(ui_enabled) or any(key != "enabled" for key in overrides)


def expand_alphas(alphas: Optional[Mapping[str, float]], dimension_names: Sequence[str]) -> Dict[str, float]:
    """Resolve the "*" key of an alphas override against the adapter's dimensions.

    ``{"*": 0.0, "color": 1.0}`` with dimensions (color, lighting) -> ``{"color": 1.0, "lighting": 0.0}``.
    Explicit names are kept as they are, so an unknown one still reaches ``resolve_alphas``'s error.
    """
    rest = dict(alphas or {})
    default = rest.pop(ALL_DIMENSIONS, None)
    out = {name: float(default) for name in dimension_names} if default is not None else {}
    out.update({name: float(value) for name, value in rest.items()})
    return out


# ---------------------------------------------------------------- value parsing


def parse_bool(value, label: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{label} value {value!r} is not True or False; use True or False.")


def _finite_in_range(value, label: str, low: float, high: float, hint: str) -> float:
    try:
        number = round(float(value), FLOAT_DIGITS)
    except (TypeError, ValueError):
        raise ValueError(f"{label} value {value!r} is not a number; {hint}.") from None
    if not (math.isfinite(number) and low <= number <= high):
        raise ValueError(f"{label} value {value!r} is outside {low:g} to {high:g}; {hint}.")
    return number


def parse_dimensions(value, vocabulary: Optional[Iterable[str]] = None) -> Dict[str, float]:
    """A Dimensions axis value -> an "alphas" override.

    "all" -> every dimension 1; "none" -> every dimension 0 (no aesthetic labels); "color" or
    "color+lighting" -> those at 1, the rest 0; "color=0.5+lighting" gives a weight in [0, 1].
    Names are checked against ``vocabulary`` when one is given.
    """
    text = str(value).strip().lower()
    vocabulary = list(vocabulary) if vocabulary is not None else None
    names_hint = ", ".join(vocabulary) if vocabulary is not None else "the adapter's dimension names"
    hint = f"use all, none, or dimension names joined with + (e.g. color+lighting) from: {names_hint}"
    if text == "all":
        return {ALL_DIMENSIONS: 1.0}
    if text == "none":
        return {ALL_DIMENSIONS: 0.0}
    alphas: Dict[str, float] = {ALL_DIMENSIONS: 0.0}
    known = set(vocabulary) if vocabulary is not None else None
    for part in text.split("+"):
        name, sep, weight_text = (s.strip() for s in part.partition("="))
        if not name:
            raise ValueError(f"{LABEL_DIMENSIONS} value {value!r} has an empty dimension name; {hint}.")
        if name in (ALL_DIMENSIONS, "all", "none"):
            raise ValueError(f"{LABEL_DIMENSIONS} value {value!r} combines {name!r} with other names; {hint}.")
        if known is not None and name not in known:
            raise ValueError(f"{LABEL_DIMENSIONS} value {value!r} names an unknown aesthetic dimension {name!r}; {hint}.")
        if name in alphas:
            raise ValueError(f"{LABEL_DIMENSIONS} value {value!r} names {name!r} twice; {hint}.")
        weight = 1.0
        if sep:
            try:
                weight = round(float(weight_text), FLOAT_DIGITS)
            except ValueError:
                weight = math.nan
            if not 0.0 <= weight <= 1.0:  # also rejects NaN
                raise ValueError(f"{LABEL_DIMENSIONS} value {value!r} gives {name!r} the weight {weight_text!r}; "
                                 f"a weight after = must be a number between 0 and 1.")
        alphas[name] = weight
    return alphas


# ---------------------------------------------------------------- WebUI helper lookup


def _default_dimension_vocabulary() -> List[str]:
    return [d.name for d in DEFAULT_DIMENSIONS]


def find_webui_helper(name: str) -> Optional[Callable]:
    """The callable ``name`` from the vmix_lib.webui package (looked up at call time)."""
    package = sys.modules.get(__package__)
    found = getattr(package, name, None) if package is not None else None
    return found if callable(found) else None


def _lazy(helper_name: str, fallback: Callable) -> Callable:
    """Resolve the helper when called, not at registration: the script may define it later."""
    def call(*args):
        helper = find_webui_helper(helper_name)
        return (helper or fallback)(*args)
    call.__name__ = f"lazy_{helper_name}"
    return call


# ---------------------------------------------------------------- axis callbacks


def format_value_add_label(p, opt, x) -> str:
    # Same text as xyz_grid's default ("Label: value", floats rounded to 8 digits).
    if type(x) == float:
        x = round(x, FLOAT_DIGITS)
    return f"{opt.label}: {x}"


def _float_axis(key: str, label: str, low: float, high: float, hint: str):
    def apply(p, x, xs):
        set_override(p, key, round(float(x), FLOAT_DIGITS))

    def confirm(p, xs):
        for x in xs:
            _finite_in_range(x, label, low, high, hint)

    return apply, confirm


def _bool_axis(key: str, label: str):
    def apply(p, x, xs):
        set_override(p, key, parse_bool(x, label))

    def confirm(p, xs):
        for x in xs:
            parse_bool(x, label)

    return apply, confirm


def _boolean_choices(xyz) -> Callable[[], List[str]]:
    make = getattr(xyz, "boolean_choice", None)
    if callable(make):
        return make(reverse=True)
    return lambda: ["False", "True"]


def build_axis_options(
    xyz,
    list_adapters: Callable[[], Iterable[str]],
    validate_adapter: Optional[Callable[[str], str]] = None,
    list_dimensions: Optional[Callable[[], Iterable[str]]] = None,
) -> list:
    """The seven VMix AxisOption objects, built with ``xyz.AxisOption``.

    ``list_adapters()`` gives the Adapter axis's choices; ``validate_adapter(name)`` returns the
    canonical name or raises ValueError (None: names are checked by the script at generation);
    ``list_dimensions()`` adds installed adapters' dimension names to the built-in ones.
    """
    AxisOption = xyz.AxisOption

    def dimension_vocabulary() -> List[str]:
        names = _default_dimension_vocabulary()
        extra = list_dimensions() if list_dimensions is not None else None
        for name in extra or ():
            if name not in names:
                names.append(name)
        return names

    def adapter_choices() -> List[str]:
        return list(list_adapters() or [])

    def canonical_adapter(x) -> str:
        name = str(x).strip()
        if not name:
            raise ValueError(f"{LABEL_ADAPTER} has an empty adapter name; pick an installed adapter.")
        if validate_adapter is None:
            return name
        try:
            return validate_adapter(name) or name
        except ValueError as e:
            raise ValueError(f"{LABEL_ADAPTER}: {e}") from None

    def apply_adapter(p, x, xs):
        # confirm already validated every value; apply runs outside xyz's per-cell try, so it must
        # not raise: on a surprise the script reports the name at generation, for this cell only.
        try:
            name = canonical_adapter(x)
        except ValueError:
            name = str(x).strip()
        set_override(p, "adapter", name)

    def confirm_adapter(p, xs):
        for x in xs:
            canonical_adapter(x)

    def apply_dimensions(p, x, xs):
        set_override(p, "alphas", parse_dimensions(x))

    def confirm_dimensions(p, xs):
        vocabulary = dimension_vocabulary()
        for x in xs:
            parse_dimensions(x, vocabulary)

    def dimension_choices() -> List[str]:
        return ["all", "none", *dimension_vocabulary()]

    strength_apply, strength_confirm = _float_axis(
        "strength", LABEL_STRENGTH, *STRENGTH_RANGE, "use values between 0 and 3, e.g. 0-2 [5] (the paper sweeps 0 to 2)")
    start_apply, start_confirm = _float_axis(
        "start", LABEL_START, *FRACTION_RANGE, f"use {RANGE_MEANING}")
    end_apply, end_confirm = _float_axis(
        "end", LABEL_END, *FRACTION_RANGE, f"use {RANGE_MEANING}")
    enabled_apply, enabled_confirm = _bool_axis("enabled", LABEL_ENABLED)
    uncond_apply, uncond_confirm = _bool_axis("uncond", LABEL_UNCOND)
    booleans = _boolean_choices(xyz)

    return [
        AxisOption(LABEL_STRENGTH, float, strength_apply, format_value=format_value_add_label, confirm=strength_confirm),
        AxisOption(LABEL_ENABLED, str, enabled_apply, format_value=format_value_add_label, confirm=enabled_confirm,
                   choices=booleans),
        AxisOption(LABEL_ADAPTER, str, apply_adapter, format_value=format_value_add_label, confirm=confirm_adapter,
                   cost=ADAPTER_AXIS_COST, choices=adapter_choices),
        AxisOption(LABEL_DIMENSIONS, str, apply_dimensions, format_value=format_value_add_label,
                   confirm=confirm_dimensions, choices=dimension_choices),
        AxisOption(LABEL_START, float, start_apply, format_value=format_value_add_label, confirm=start_confirm),
        AxisOption(LABEL_END, float, end_apply, format_value=format_value_add_label, confirm=end_confirm),
        AxisOption(LABEL_UNCOND, str, uncond_apply, format_value=format_value_add_label, confirm=uncond_confirm,
                   choices=booleans),
    ]


# ---------------------------------------------------------------- registration


def find_xyz_module(scripts_data: Iterable) -> Optional[object]:
    """The loaded xyz_grid module from ``modules.scripts.scripts_data``, or None if it is not loaded."""
    for entry in scripts_data:
        script_class = getattr(entry, "script_class", None)
        if getattr(script_class, "__module__", None) not in XYZ_MODULE_NAMES:
            continue
        module = getattr(entry, "module", None)
        if hasattr(module, "AxisOption") and isinstance(getattr(module, "axis_options", None), list):
            return module
    return None


def register_axes(
    xyz,
    list_adapters: Callable[[], Iterable[str]],
    validate_adapter: Optional[Callable[[str], str]] = None,
    list_dimensions: Optional[Callable[[], Iterable[str]]] = None,
) -> List[str]:
    """Append the VMix axes missing from ``xyz.axis_options`` (matched by label); return the labels added."""
    present = {getattr(option, "label", None) for option in xyz.axis_options}
    if all(label in present for label in AXIS_LABELS):
        return []
    options = build_axis_options(xyz, list_adapters, validate_adapter, list_dimensions)
    added = [option for option in options if option.label not in present]
    xyz.axis_options.extend(added)
    return [option.label for option in added]


def _webui_scripts_data():
    from modules import scripts  # WebUI only

    return scripts.scripts_data


def register_xyz_axes(
    scripts_data: Optional[Iterable] = None,
    list_adapters: Optional[Callable[[], Iterable[str]]] = None,
    validate_adapter: Optional[Callable[[str], str]] = None,
    list_dimensions: Optional[Callable[[], Iterable[str]]] = None,
) -> bool:
    """Entry point for scripts/vmix.py: at import and in ``on_before_ui``.  Safe to call any number of times.

    Returns True when the VMix axes are in xyz_grid's list, False when xyz_grid is not loaded or
    registration failed (one warning line, never an exception).  Helpers not given are looked up by
    name in vmix_lib.webui each time they are needed.
    """
    try:
        xyz = find_xyz_module(_webui_scripts_data() if scripts_data is None else scripts_data)
        if xyz is None:
            return False
        register_axes(
            xyz,
            list_adapters or _lazy(HELPER_LIST_ADAPTERS, lambda: []),
            validate_adapter or _lazy(HELPER_VALIDATE_ADAPTER, lambda name: name),
            list_dimensions or _lazy(HELPER_LIST_DIMENSIONS, lambda: []),
        )
        return True
    except Exception as e:  # never break the WebUI's script loading or UI build for optional axes
        print(f"[VMix] X/Y/Z plot axes not registered: {type(e).__name__}: {e}", file=sys.stderr)
        return False
