"""The VMix tab (on_ui_tabs): make an adapter from the loaded checkpoint.  gradio 3.41 (A1111) and 4.40 (Forge).

Wired like A1111's own Train tab: Train/Resume run through ``wrap_gradio_gpu_call`` (queue lock,
``shared.state``, the task id) with ``_js="make_vmix_start"`` (javascript/vmix.js), which draws the
WebUI's progress bar and live preview (``requestProgress``) while the job runs; the job itself is
service.ui_job.  Every control has a ``make_vmix_<key>`` id and a hover hint (the hidden carrier in
``make_vmix_info``, read by javascript/vmix.js as the panel's hints are).
"""
from __future__ import annotations

import html
import json
from typing import Dict, List

import gradio as gr

from .request import DEFAULT_ROWS, FIELDS, MakeError, from_form

BUILTIN, MINE = "built-in (60 prompts)", "my prompts (below)"
INTRO = (
    "<b>Make a VMix adapter from the checkpoint loaded now</b>, without pictures: the adapter learns what each "
    "phrase does to your model's own predictions (distillation from prompt pairs, the same run as "
    "<code>python -m vmix_lib.train --objective distill</code>). Training uses the plain checkpoint (LoRAs off) and "
    "blocks generation while it runs; Interrupt saves, Resume continues. The adapter appears in the VMix panel's list "
    "under its name."
)
HINTS: Dict[str, str] = {
    "name": "File name of the adapter in the VMix adapter folder (models/VMix); its training files go to <name>-training next to it",
    "overwrite": "Replace an adapter of this name (and its training files); otherwise an existing name is refused and nothing is changed",
    "dimensions": "One row per aesthetic dimension: its name (a short lowercase word), the phrase it adds to the prompt, "
                  "and the contrast it is compared with (empty = the prompt alone). Add or delete rows; up to 8",
    "prompt_source": "Content prompts the phrases are added to: 60 built-in everyday subjects, or your own",
    "prompts": "Your content prompts, one a line (# starts a comment); subjects without aesthetic words work best",
    "train": "Start a new training run (the WebUI cannot generate while it runs)",
    "resume": "Continue the run of this adapter name from its last save, with the settings it was started with (only Steps may be raised)",
    "interrupt": "Stop after the current step: the adapter and its resume state are saved",
    "preview": "λ-sweep preview of the newest save: columns λ 0, 1, 2; first row all dimensions, then one dimension at a time",
    **{f.key: f.hint for f in FIELDS},
}


def _hints_html() -> str:
    return (f"<div class='vmix-info'>{INTRO}</div>"
            f"<span hidden data-vmix-hints='{html.escape(json.dumps(HINTS), quote=True)}'></span>")


def _result_html(status) -> str:
    css = "vmix-warning" if status.state == "failed" else "vmix-info"
    return f"<div class='{css}'>{html.escape(status.message)}</div>"


def build(panel_dropdowns=None):
    """The tab's Blocks; ``panel_dropdowns()`` -> the VMix panels' adapter dropdowns to refresh after a job."""
    from modules.call_queue import wrap_gradio_gpu_call

    from .service import preview_image, ui_job

    with gr.Blocks(analytics_enabled=False) as tab:
        with gr.Row():
            with gr.Column(scale=3):
                gr.HTML(_hints_html(), elem_id="make_vmix_info")
                with gr.Row():
                    name = gr.Textbox(label="Adapter name", value="", placeholder="empty = vmix-<checkpoint name>",
                                      elem_id="make_vmix_name")
                    overwrite = gr.Checkbox(label="Overwrite", value=False, elem_id="make_vmix_overwrite")
                table = gr.Dataframe(value=[[r.name, r.phrase, r.contrast] for r in DEFAULT_ROWS],
                                     headers=["dimension", "phrase", "contrast"], datatype=["str", "str", "str"],
                                     row_count=(len(DEFAULT_ROWS), "dynamic"), col_count=(3, "fixed"), type="array",
                                     interactive=True, label="Dimensions and their phrase pairs", elem_id="make_vmix_dimensions")
                prompt_source = gr.Radio([BUILTIN, MINE], value=BUILTIN, label="Content prompts", elem_id="make_vmix_prompt_source")
                prompts = gr.Textbox(label="My prompts", lines=4, placeholder="a cat on a windowsill\na lighthouse on a rocky coast",
                                     elem_id="make_vmix_prompts")
                numbers = {}
                rows: List[List[str]] = [["steps", "batch_size", "learning_rate", "eta"],
                                         ["resolution", "xt_steps", "seed"], ["save_every", "preview_every"]]
                for keys in rows:
                    with gr.Row():
                        for key in keys:
                            f = next(f for f in FIELDS if f.key == key)
                            numbers[key] = gr.Number(label=f.label, value=f.default, precision=0 if f.kind is int else None,
                                                     elem_id=f"make_vmix_{key}")
                with gr.Row():
                    checks = {f.key: gr.Checkbox(label=f.label, value=f.default, elem_id=f"make_vmix_{f.key}")
                              for f in FIELDS if f.kind is bool}
                with gr.Row():
                    train = gr.Button("Train", variant="primary", elem_id="make_vmix_train")
                    resume = gr.Button("Resume", elem_id="make_vmix_resume")
                    interrupt = gr.Button("Interrupt", elem_id="make_vmix_interrupt")
            with gr.Column(scale=2):
                progress = gr.HTML(elem_id="make_vmix_progress")
                preview = gr.Image(label="λ-sweep preview", interactive=False, type="pil", elem_id="make_vmix_preview")
                result = gr.HTML(elem_id="make_vmix_result")

        dummy = gr.Textbox(visible=False, elem_id="make_vmix_task")
        keys = [f.key for f in FIELDS]
        controls = {**numbers, **checks}
        inputs = [dummy, name, overwrite, table, prompt_source, prompts] + [controls[k] for k in keys]

        def run(resume_run: bool):
            def fn(id_task, name_, overwrite_, table_, source_, prompts_, *values):
                request, error = None, None
                try:
                    request = from_form(name_, overwrite_, table_, source_ == BUILTIN, prompts_, **dict(zip(keys, values)))
                    if resume_run:
                        from dataclasses import replace

                        request = replace(request, resume=True, overwrite=False)
                except MakeError as e:
                    error = str(e)
                status = ui_job(id_task, request, error)
                return preview_image(status), html.escape(status.text()) if status.step else "", _result_html(status)

            return fn

        outputs = [preview, progress, result]
        for button, resume_run in ((train, False), (resume, True)):
            event = button.click(fn=wrap_gradio_gpu_call(run(resume_run), extra_outputs=[gr.update()] * (len(outputs) - 1)),
                                 _js="make_vmix_start", inputs=inputs, outputs=outputs)
            dropdowns = list(panel_dropdowns() if panel_dropdowns else [])
            if dropdowns:
                event.then(fn=_refresh_dropdowns(len(dropdowns)), inputs=[], outputs=dropdowns, show_progress=False)

        def stop():
            from .job import BOARD

            BOARD.request_stop()

        interrupt.click(fn=stop, inputs=[], outputs=[], show_progress=False)
    return tab


def _refresh_dropdowns(count: int):
    def fn():
        from .. import default_library

        library = default_library()
        library.refresh()
        return [gr.update(choices=library.names()) for _ in range(count)] if count > 1 else gr.update(choices=library.names())

    return fn


def on_ui_tabs():
    from .. import ui as panel_ui

    return [(build(panel_ui.adapter_dropdowns), "VMix", "vmix")]
