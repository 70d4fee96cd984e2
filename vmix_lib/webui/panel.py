"""What the VMix accordion shows: the info line, the α slider labels and the hover hints (no gradio here).

The accordion always has MAX_DIMENSION_SLOTS α sliders, so the positional API arguments never move;
the selected adapter decides how many are visible and what they are called.  Slider labels are short
(``α color``); the dimension's label phrase and what α means are in the slider's hover hint.

Hover hints: the WebUI shows a control's ``title`` on hover (its javascript/hints.js sets them from a
table keyed by the control's text).  VMix's hints depend on the selected adapter, so they travel with
the info line: a hidden element whose ``data-vmix-hints`` attribute holds {element id suffix: text},
and javascript/vmix.js sets those titles on the VMix elements of the same tab (ids
``script_<tab>_vmix_<suffix>``) and on nothing else.

Marks in the adapter list: files that fail the full check are marked in the dropdown's list
("name ⚠ damaged").  The choices stay the plain names, so the value the panel, the infotext, "Send
to", ui-config.json, the API and X/Y/Z see is always the name: gradio 3.41 (A1111) has no
(label, value) choices (gradio/components/dropdown.py:84 makes every choice a string), and with
gradio 4.40's labels (dropdown.py:83-87) the box would show, and a blur send, the label.  So the
marks travel with the hints ({name: mark} in ``data-vmix-marks``) and javascript/vmix.js turns them
into CSS ``::after`` text on the list items whose ``aria-label`` is the name (both versions render
``<li class="item" aria-label="<name>">``: js/dropdown/shared/DropdownOptions.svelte).
"""
from __future__ import annotations

import html
import json
from typing import Dict, List, Optional, Sequence

from ..adapter_file import AdapterError, AdapterInfo
from ..dimensions import AestheticDimension
from ..layers import FAMILY_TITLES, LAYOUTS, FamilyReport
from .arguments import MAX_DIMENSION_SLOTS, RANGE_MEANING
from .library import NO_OFFICIAL_WEIGHTS, AdapterLibrary

HINTS_ATTRIBUTE = "data-vmix-hints"
MARKS_ATTRIBUTE = "data-vmix-marks"
DAMAGED_MARK = "⚠ damaged"  # the header reads, a tensor does not (NaN, a broken copy): the info line says what
UNUSABLE_MARK = "⚠ not usable"  # not a VMix adapter, truncated, another format: the info line says what
_RANGE = f"Start and End are {RANGE_MEANING}."

# The adapter box accepts typed values (so pasted infotexts with unknown names can show), and gradio
# 3.41 (A1111) sends a change on every keystroke there while gradio 4.40 (Forge) sends one when the
# box is left or Enter pressed.  So the panel acts on a change only when the box does not have the
# focus (a choice from the list, a paste, "Read generation parameters", a restored ui-config), and
# on leaving the box with the text it shows then; while the user types, the change carries TYPING,
# which is never an adapter name (names have no '/'), and is ignored.
TYPING = "vmix/typing"


def _box_js(elem_id: str) -> str:
    return f"gradioApp().getElementById({json.dumps(elem_id)})?.querySelector('input')"


def settled_js(elem_id: str) -> str:
    """Event preprocessor for the adapter dropdown's change: the value, or TYPING while it has the focus."""
    return (f"(name) => {{ const box = {_box_js(elem_id)}; "
            f"return [box && box.getRootNode().activeElement === box ? {json.dumps(TYPING)} : name]; }}")


def left_js(elem_id: str) -> str:
    """Event preprocessor for the dropdown's blur: the text the box shows once gradio has settled it."""
    return (f"async (name) => {{ await new Promise((done) => setTimeout(done, 0)); const box = {_box_js(elem_id)}; "
            "return [box ? box.value : name]; }")


def slider_updates(dimensions: Optional[Sequence[AestheticDimension]]) -> List[Dict[str, object]]:
    """gr.update(**d) arguments for the α sliders: labelled and visible for the adapter's dimensions."""
    dims = list(dimensions or [])[:MAX_DIMENSION_SLOTS]
    updates = []
    for i in range(MAX_DIMENSION_SLOTS):
        if i < len(dims):
            updates.append({"label": f"α {dims[i].name}", "visible": True})
        else:
            updates.append({"label": f"α {i + 1}", "visible": False})
    return updates


def alpha_hint(dimension: AestheticDimension) -> str:
    return (
        f"α of {dimension.name}: how much of its label “{dimension.positive}” the aesthetic input holds. "
        f"1 = the label (the paper's default), 0 = its negative “{dimension.negative}” (a rare token: "
        f"no label), values between mix the two. Acts only while the strength λ is above 0."
    )


def _layer_counts(family: Optional[str]) -> str:
    if family in LAYOUTS:
        return f"{len(LAYOUTS[family])} for this {FAMILY_TITLES[family]} adapter"
    return ", ".join(f"{len(LAYOUTS[f])} for {FAMILY_TITLES[f]}" for f in LAYOUTS)


def hints(dimensions: Optional[Sequence[AestheticDimension]] = None, family: Optional[str] = None,
          train_lambda: Optional[float] = None, folder: Optional[str] = None) -> Dict[str, str]:
    """Hover hints by element id suffix.  α hints only for a known adapter's dimensions (an unknown
    name keeps the sliders, and their hints, of the last adapter)."""
    trained = f"{train_lambda:g}" if train_lambda is not None else "1"
    where = f" in {folder}" if folder else ""
    out = {
        "enabled": "Turn VMix on for this tab: the adapter adds its aesthetic value branch to every "
                   "cross-attention layer of the UNet. Off, images are exactly those without VMix.",
        "adapter": f"The VMix adapter (a .safetensors file{where}). Pick one from the list or paste a name; "
                   "the panel follows once the name is chosen, pasted or the box is left. "
                   f"{NO_OFFICIAL_WEIGHTS}",
        "refresh": "Read the adapter folder again, e.g. after copying a new adapter into it.",
        "strength": "Strength λ: how strongly the adapter's aesthetic values are added in every cross-attention "
                    f"layer (softmax(QKᵀ/√d)·(V + λ·V_a)). 0 = the base model, bit for bit; {trained} = the strength "
                    "it was trained at; the paper shows 0 to 2.",
        "start": f"Start: where VMix begins acting (0 = from the first step). {_RANGE}",
        "end": f"End: where VMix stops acting, above Start (1 = until the last step). {_RANGE}",
        "uncond": "On: the same λ on the unconditional pass (the negative prompt, which CFG pushes away from). "
                  "Off: only the prompt pass gets VMix. The paper does not say; the default is in Settings > VMix.",
        "block_weights": "Scales λ per cross-attention layer; empty = 1 everywhere. Comma-separated key:weight "
                         "entries, weights 0 to 2, later entries win. Keys: ALL; IN, MID, OUT; one block (IN4, "
                         "OUT3); layer numbers (5, 0-5); or a bare list of one weight per layer "
                         f"({_layer_counts(family)}). Example: IN:1, MID:0.5, OUT:1 or ALL:0, OUT:1",
    }
    for i, d in enumerate(list(dimensions or [])[:MAX_DIMENSION_SLOTS]):
        out[f"alpha_{i + 1}"] = alpha_hint(d)
    return out


def _hints_carrier(hint_map: Dict[str, str], selected: Optional[str], marks: Optional[Dict[str, str]] = None) -> str:
    """The hidden element javascript/vmix.js reads; it also names the adapter the line describes
    (so the line changes with the name even where two adapters read the same)."""
    data = html.escape(json.dumps(hint_map, ensure_ascii=False), quote=True)
    name = html.escape(selected or "", quote=True)
    marked = html.escape(json.dumps(marks or {}, ensure_ascii=False), quote=True)
    return (f"<span class='vmix-hints' hidden data-vmix-adapter=\"{name}\" {HINTS_ATTRIBUTE}=\"{data}\" "
            f"{MARKS_ATTRIBUTE}=\"{marked}\"></span>")


def list_marks(library: AdapterLibrary) -> Dict[str, str]:
    """{name: mark} for the installed files that fail the full check (cached per file version)."""
    marks: Dict[str, str] = {}
    try:
        verdicts = library.verdicts()
    except Exception:  # never break the panel over a mark
        return marks
    for name, problem in verdicts.items():
        if problem is None:
            continue
        try:
            library.info(name)
            marks[name] = DAMAGED_MARK
        except Exception:
            marks[name] = UNUSABLE_MARK
    return marks


def fit_text(info: AdapterInfo, model: Optional[FamilyReport]) -> str:
    if model is None:
        return "fit: unknown until a checkpoint is loaded"
    if model.family == info.family:
        return "fits the loaded checkpoint"
    return f"does not fit the loaded checkpoint, which is {model.description}"


def info_html(library: AdapterLibrary, selected: Optional[str], model: Optional[FamilyReport]) -> str:
    """One line: where adapters go when there are none, else family, dimensions and fit of ``selected``;
    "damaged: ..." as soon as a selected file fails the full check.  Followed by the hints carrier
    (with the marks of the adapter list)."""
    folder = library.shown_folder()
    line, hint_map = _line(library, selected, model, folder)
    return line + _hints_carrier(hint_map, selected, list_marks(library) if folder is not None else None)


def _line(library: AdapterLibrary, selected: Optional[str], model: Optional[FamilyReport], folder: Optional[str]):
    esc = html.escape
    plain = hints(folder=folder)
    names = library.names()
    if folder is None:
        return f"<span class='vmix-info vmix-empty'>{esc(library.no_adapter_message())}</span>", plain
    if not names:
        return (
            f"<span class='vmix-info vmix-empty'>No VMix adapter found in <code>{esc(folder)}</code>. "
            f"Put a VMix adapter (.safetensors) there and press 🔄. {esc(NO_OFFICIAL_WEIGHTS)}</span>"
        ), plain
    if not selected:
        return f"<span class='vmix-info'>Pick an adapter ({len(names)} in <code>{esc(folder)}</code>).</span>", plain
    try:
        name = library.validate(selected)
        info = library.info(name)
    except (ValueError, AdapterError, OSError) as e:
        return f"<span class='vmix-info vmix-warning'>⚠ {esc(str(e))}</span>", plain
    hint_map = hints(info.dimensions, info.family, info.train_lambda, folder)
    try:
        damage = library.check(name)
    except (ValueError, OSError) as e:  # the file vanished or became unreadable since info()
        return f"<span class='vmix-info vmix-warning'>⚠ {esc(str(e))}</span>", hint_map
    except Exception as e:  # a bug or an odd environment: say so, never break the panel
        return (f"<span class='vmix-info vmix-warning'>⚠ VMix could not check {esc(name)}: "
                f"{esc(type(e).__name__)}: {esc(str(e))}</span>"), hint_map
    if damage is not None:
        return (
            f"<span class='vmix-info vmix-warning vmix-damaged'>{DAMAGED_MARK}: {esc(str(damage))} "
            "Copy it again or export it again with the trainer.</span>"
        ), hint_map
    dims = [d.name for d in info.dimensions]
    shown = ", ".join(dims[:MAX_DIMENSION_SLOTS])
    if len(dims) > MAX_DIMENSION_SLOTS:
        shown += f" (+{len(dims) - MAX_DIMENSION_SLOTS} more, API and X/Y/Z only)"
    fit = fit_text(info, model)
    css = "vmix-info" if model is None or model.family == info.family else "vmix-info vmix-warning"
    made = training_text(info.training)
    return (
        f"<span class='{css}'>{esc(info.family_title)} adapter · {len(dims)} dimensions: {esc(shown)} · "
        f"trained at λ {info.train_lambda:g}{' · ' + esc(made) if made else ''} · {esc(fit)}</span>"
    ), hint_map


def training_text(training: Dict) -> str:
    """How the file's adapter was made, from its training metadata: the objective, and for a
    distilled adapter η and each dimension's phrase pair ("" when the file does not say)."""
    objective = training.get("objective") if isinstance(training, dict) else None
    if objective == "data" and isinstance(training.get("images"), int):
        return f"trained on {training['images']} labelled images"
    if objective != "distill":
        return ""
    phrases = training.get("phrases") if isinstance(training.get("phrases"), dict) else {}
    pairs = []
    for name, pair in phrases.items():
        if isinstance(pair, dict):
            positive, contrast = str(pair.get("positive", "")), str(pair.get("contrast", ""))
            pairs.append(f"{name}: '{positive}'" + (f" vs '{contrast}'" if contrast else ""))
    eta = training.get("eta")
    head = "distilled from prompt pairs" + (f" (η {eta:g})" if isinstance(eta, (int, float)) else "")
    return head + (": " + ", ".join(pairs) if pairs else "")


def dimensions_of(library: AdapterLibrary, selected: Optional[str]) -> Optional[List[AestheticDimension]]:
    if not selected:
        return None
    try:
        return list(library.info(library.validate(selected)).dimensions)
    except (ValueError, AdapterError, OSError):
        return None


def describe(library: AdapterLibrary, selected: Optional[str], model: Optional[FamilyReport]):
    """(info line, α slider updates or None) for ``selected``.  None: the name is unknown or unusable,
    so the sliders keep showing the last adapter's dimensions until a valid one is chosen."""
    dims = dimensions_of(library, selected)
    return info_html(library, selected, model), (slider_updates(dims) if dims is not None else None)


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
