"""The VMix accordion for txt2img and img2img (gradio 3.41 in A1111, gradio 4.40 in Forge).

Only APIs both have: InputAccordion used as a context manager (a class in A1111, a factory
function in Forge: never subclassed nor used with isinstance), create_refresh_button, gr.update,
no ``.style()``, ``_js=`` on events (Forge's gradio shim renames it ``js=``).  ``build`` has no side
effects: the WebUI calls ``ui()`` again for API defaults.  Every control has an elem_id
``script_<tab>_vmix_<name>`` (javascript/vmix.js sets the hover hints on those ids only) and the
α sliders sit in a ``vmix-dimensions`` row that style.css lays out as an even grid.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import gradio as gr

from ..layers import FamilyReport
from . import infotext, panel
from .arguments import MAX_DIMENSION_SLOTS
from .library import AdapterLibrary
from .runner import RunnerOptions


_dropdowns: Dict[bool, gr.components.Component] = {}  # is_img2img -> the panel's adapter dropdown on the page


def adapter_dropdowns() -> List[gr.components.Component]:
    """The panels' adapter dropdowns of the page being built (the VMix tab refreshes them after a job)."""
    return list(_dropdowns.values())


def _in_blocks() -> bool:
    try:
        from gradio.context import Context

        return Context.block is not None
    except Exception:
        return False


def build(script, library: AdapterLibrary, model_report: Callable[[], Optional[FamilyReport]],
          options: RunnerOptions) -> List[gr.components.Component]:
    from modules.ui_common import create_refresh_button
    from modules.ui_components import InputAccordion

    names = library.names()
    selected = library.default_name()
    updates = panel.slider_updates(panel.dimensions_of(library, selected))

    adapter_id = script.elem_id("adapter")
    with InputAccordion(False, label="VMix", elem_id=script.elem_id("enabled")) as enabled:
        with gr.Row(elem_classes=["vmix-adapter-row"]):
            # Choices are the plain names, the value everywhere (infotext, API, X/Y/Z, ui-config); files
            # that fail the full check are marked in the list by javascript/vmix.js (see panel.py).
            adapter = gr.Dropdown(label="Adapter", choices=names, value=selected, allow_custom_value=True,
                                  elem_id=adapter_id)
            refresh = create_refresh_button(adapter, library.refresh, lambda: {"choices": library.names()},
                                            script.elem_id("refresh"))
        info = gr.HTML(value=panel.info_html(library, selected, model_report()), elem_id=script.elem_id("info"))
        strength = gr.Slider(label="Strength λ", minimum=0.0, maximum=3.0, step=0.05,
                             value=float(options.default_strength), elem_id=script.elem_id("strength"))
        alphas = []
        with gr.Row(elem_classes=["vmix-dimensions"]):
            for i, update in enumerate(updates):
                alphas.append(gr.Slider(minimum=0.0, maximum=1.0, step=0.05, value=1.0,
                                        elem_id=script.elem_id(f"alpha_{i + 1}"), elem_classes=["vmix-alpha"],
                                        **update))
        with gr.Row(elem_classes=["vmix-range"]):
            start = gr.Slider(label="Start", minimum=0.0, maximum=1.0, step=0.01, value=0.0,
                              elem_id=script.elem_id("start"))
            end = gr.Slider(label="End", minimum=0.0, maximum=1.0, step=0.01, value=1.0,
                            elem_id=script.elem_id("end"))
        uncond = gr.Checkbox(label="Apply to the unconditional (negative) pass", value=bool(options.uncond_default),
                             elem_id=script.elem_id("uncond"))
        block_weights = gr.Textbox(label="Block weights", value="", lines=1, max_lines=1,
                                   placeholder="empty = 1 everywhere; e.g. IN:1, MID:0.5, OUT:1 or OUT3:0, 5:0.5",
                                   elem_id=script.elem_id("block_weights"))

    def on_adapter(name):
        if name == panel.TYPING:
            return [gr.update() for _ in range(1 + len(alphas))]
        line, updates = panel.describe(library, name, model_report())
        if updates is None:  # unknown or unusable: the sliders keep the last adapter's dimensions
            return [line, *[gr.update() for _ in alphas]]
        return [line, *[gr.update(**u) for u in updates]]

    # Not on every keystroke: see panel.TYPING.
    adapter.change(fn=on_adapter, _js=panel.settled_js(adapter_id), inputs=[adapter], outputs=[info, *alphas],
                   show_progress=False)
    adapter.blur(fn=on_adapter, _js=panel.left_js(adapter_id), inputs=[adapter], outputs=[info, *alphas],
                 show_progress=False)
    refresh.click(fn=on_adapter, inputs=[adapter], outputs=[info, *alphas], show_progress=False)
    # The checkpoint usually loads after the page is built ("fit: unknown"): say whether it fits
    # when the user turns VMix on.
    enabled.change(fn=on_adapter, inputs=[adapter], outputs=[info, *alphas], show_progress=False)
    # A1111 restores the dropdown from ui-config.json after this returns and then calls init_field.
    adapter.init_field = lambda name: panel.describe_on_components(library, name, model_report(), info, alphas)

    if _in_blocks():  # not the calls that only collect API defaults
        _dropdowns[bool(getattr(script, "is_img2img", False))] = adapter
    controls = [enabled, adapter, strength, *alphas, start, end, uncond, block_weights]
    assert len(controls) == 3 + MAX_DIMENSION_SLOTS + 4
    # Shared module-level paste functions: the same objects in both tabs, so "Send to" (which
    # copies the fields whose target is in paste_field_names) pairs txt2img's and img2img's controls.
    script.infotext_fields = list(zip(controls, infotext.PASTE_FUNCTIONS))
    script.paste_field_names = list(infotext.PASTE_FUNCTIONS)
    return controls
