"""What the VMix accordion shows: the info line and the per-dimension slider labels (no gradio here).

The accordion always has MAX_DIMENSION_SLOTS α sliders, so the positional API arguments never move;
the selected adapter decides how many are visible and what they are called.
"""
from __future__ import annotations

import html
from typing import Dict, List, Optional, Sequence

from ..adapter_file import AdapterError, AdapterInfo
from ..dimensions import AestheticDimension
from ..layers import FamilyReport
from .arguments import MAX_DIMENSION_SLOTS
from .library import NO_OFFICIAL_WEIGHTS, AdapterLibrary


def slider_updates(dimensions: Optional[Sequence[AestheticDimension]]) -> List[Dict[str, object]]:
    """gr.update(**d) arguments for the α sliders: labelled and visible for the adapter's dimensions."""
    dims = list(dimensions or [])[:MAX_DIMENSION_SLOTS]
    updates = []
    for i in range(MAX_DIMENSION_SLOTS):
        if i < len(dims):
            d = dims[i]
            updates.append({"label": f"α {d.name} ({d.positive})", "visible": True})
        else:
            updates.append({"label": f"α {i + 1}", "visible": False})
    return updates


def fit_text(info: AdapterInfo, model: Optional[FamilyReport]) -> str:
    if model is None:
        return "fit: unknown until a checkpoint is loaded"
    if model.family == info.family:
        return "fits the loaded checkpoint"
    return f"does not fit the loaded checkpoint, which is {model.description}"


def info_html(library: AdapterLibrary, selected: Optional[str], model: Optional[FamilyReport]) -> str:
    """One line: where adapters go when there are none, else family, dimensions and fit of ``selected``."""
    esc = html.escape
    folder = library.folder()
    names = library.names()
    if folder is None:
        return f"<span class='vmix-info vmix-empty'>{esc(library.no_adapter_message())}</span>"
    if not names:
        return (
            f"<span class='vmix-info vmix-empty'>No VMix adapter found in <code>{esc(folder)}</code>. "
            f"Put a VMix adapter (.safetensors) there and press 🔄. {esc(NO_OFFICIAL_WEIGHTS)}</span>"
        )
    if not selected:
        return f"<span class='vmix-info'>Pick an adapter ({len(names)} in <code>{esc(folder)}</code>).</span>"
    try:
        name = library.validate(selected)
        info = library.info(name)
    except (ValueError, AdapterError, OSError) as e:
        return f"<span class='vmix-info vmix-warning'>⚠ {esc(str(e))}</span>"
    dims = [d.name for d in info.dimensions]
    shown = ", ".join(dims[:MAX_DIMENSION_SLOTS])
    if len(dims) > MAX_DIMENSION_SLOTS:
        shown += f" (+{len(dims) - MAX_DIMENSION_SLOTS} more, API and X/Y/Z only)"
    fit = fit_text(info, model)
    css = "vmix-info" if model is None or model.family == info.family else "vmix-info vmix-warning"
    return (
        f"<span class='{css}'>{esc(info.family_title)} adapter · {len(dims)} dimensions: {esc(shown)} · "
        f"trained at λ {info.train_lambda:g} · {esc(fit)}</span>"
    )


def dimensions_of(library: AdapterLibrary, selected: Optional[str]) -> Optional[List[AestheticDimension]]:
    if not selected:
        return None
    try:
        return list(library.info(library.validate(selected)).dimensions)
    except (ValueError, AdapterError, OSError):
        return None


def describe_on_components(library: AdapterLibrary, selected: Optional[str], model: Optional[FamilyReport],
                           info, sliders: Sequence) -> None:
    """Set the info line's value and the α sliders' labels/visibility for ``selected`` on the
    components themselves, before the page is built.

    A1111's ui-config.json (modules/ui_loadsave.py) replaces the adapter dropdown's value with the
    one saved at the first start and then calls the dropdown's ``init_field(value)``; without this
    the page showed that adapter in the dropdown but the info line and α sliders of another one.
    """
    info.value = info_html(library, selected, model)
    for slider, update in zip(sliders, slider_updates(dimensions_of(library, selected))):
        slider.label = update["label"]
        slider.visible = update["visible"]
