"""The VMix panel in a real WebUI, driven in a real browser (opt-in: see conftest.py).

One session, in order: hover hints and the α grid; typing in the adapter box; Generate with λ and
one α and the infotext; "Read generation parameters"; "Send to img2img"; the refresh button finding
a newly copied adapter; a damaged file and "Reload UI" after a failed job.  Each step prints what it
saw (run with -s) and writes screenshots; report.txt collects the lines.
"""
import json
import os
import re
import shutil
import time
import urllib.error

import pytest

SEED = 4321
SMALL = {"steps": 2, "width": 64, "height": 64, "seed": SEED, "sampler_name": "Euler", "cfg_scale": 5}
STRENGTH, ALPHA = 1.4, 0.5
COPY = "vmix_e2e_copy"
DAMAGED = "0_vmix_e2e_damaged"  # sorts before every other name, so it would be the first choice


@pytest.fixture(scope="module")
def state():
    return {}


def adapter_file(folder, name):
    return os.path.join(folder, name + ".safetensors")


def test_01_hover_hints_and_the_slider_grid(page, state):
    page.note("== hover hints, slider grid")
    # A picture made before VMix was ever used: "Reload UI" must leave the model giving it again.
    state["baseline"], _ = page.api_image(dict(SMALL, prompt="a lighthouse at dusk"))
    tab = "txt2img"
    page.set_enabled(tab, True)
    choices = page.adapter_choices(tab)
    page.note(f"  adapters in the list: {choices}")
    fitting = None
    for name in choices:
        page.pick_adapter(tab, name)
        info = page.info(tab)
        page.note(f"  {name}: {info}")
        if "SD1.5 adapter" in info and "damaged" not in info and ("fits" in info or "unknown" in info):
            fitting = name
            break
    assert fitting, "no SD1.5 adapter that fits the loaded checkpoint is installed"
    state["adapter"] = fitting
    ids = {key: page.vid(tab, key) for key in ("adapter", "refresh", "strength", "alpha_1", "start", "end", "uncond",
                                               "block_weights")}
    titles = {key: page.js("return document.getElementById(arguments[0]).title;", i) for key, i in ids.items()}
    titles["enabled"] = page.js("return document.querySelector('#' + arguments[0] + ' .label-wrap').title;",
                                page.vid(tab, "enabled"))
    for key, title in titles.items():
        page.note(f"  title of {key}: {title}")
    assert "0 = the base model" in titles["strength"]
    assert "α of" in titles["alpha_1"] and "“" in titles["alpha_1"]
    assert "Example: IN:1, MID:0.5, OUT:1" in titles["block_weights"]
    assert "unconditional" in titles["uncond"] and "Start" in titles["start"] and "End" in titles["end"]
    assert "adapter folder" in titles["refresh"] and "Turn VMix on" in titles["enabled"]
    # no element outside the VMix panel carries a VMix hint
    strays = page.js("""
        const hints = new Set(arguments[0]);
        return [...document.querySelectorAll('[title]')].filter((e) => hints.has(e.title) &&
            !e.closest('[id^="script_txt2img_vmix_"], [id^="script_img2img_vmix_"]')).map((e) => e.outerHTML.slice(0, 80));
        """, list(titles.values()))
    assert strays == []
    alphas = page.visible_alphas(tab)
    page.note("  α sliders: " + "; ".join(f"{a['label']!r} at ({a['x']:.0f}, {a['y']:.0f}) {a['w']:.0f}×{a['h']:.0f}"
                                          f" label height {a['label_h']:.0f}" for a in alphas))
    assert alphas and all(re.fullmatch(r"α [a-z0-9_]+", a["label"]) for a in alphas)
    assert max(a["label_h"] for a in alphas) - min(a["label_h"] for a in alphas) < 1  # one line each
    assert max(a["h"] for a in alphas) - min(a["h"] for a in alphas) < 1
    assert max(a["w"] for a in alphas) - min(a["w"] for a in alphas) < 1
    columns = sorted({round(a["x"]) for a in alphas})
    rows = sorted({round(a["y"]) for a in alphas})
    width = page.js("return document.getElementById(arguments[0]).getBoundingClientRect().width;", page.vid(tab, "enabled"))
    page.note(f"  grid: {len(columns)} columns × {len(rows)} rows in a {width:.0f} px wide accordion")
    assert len(columns) * len(rows) >= len(alphas) and len(columns) * (len(rows) - 1) < len(alphas)
    assert len(columns) >= min(len(alphas), int(width // 200)), "the sliders do not use the accordion's width"
    page.screenshot("panel-txt2img", f"#{page.vid(tab, 'enabled')}")
    errors = [e for e in page.console_errors() if "vmix" in e.lower()]
    page.note(f"  browser console errors from VMix: {errors}")
    assert errors == []


def test_02_typing_in_the_adapter_box_does_not_act_per_keystroke(page, state):
    page.note("== typing in the adapter box")
    tab = "txt2img"
    before_info, before_alphas = page.info(tab), page.visible_alphas(tab)
    page.type_in_adapter_box(tab, "g")
    time.sleep(2.5)  # room for the per-keystroke events gradio 3.41 sends
    typed_info, typed_alphas = page.info(tab), page.visible_alphas(tab)
    page.screenshot("typing-g", f"#{page.vid(tab, 'enabled')}")
    page.note(f"  after typing 'g': {typed_info}")
    assert typed_info == before_info and [a["label"] for a in typed_alphas] == [a["label"] for a in before_alphas]
    page.type_in_adapter_box(tab, "gx", leave=True)
    left_info = page.wait(lambda: "not installed" in page.info(tab) and page.info(tab), "the unknown-name warning")
    page.note(f"  after leaving the box with 'gx': {left_info}")
    assert left_info.count("⚠") == 1 and "'gx' is not installed" in left_info
    assert [a["label"] for a in page.visible_alphas(tab)] == [a["label"] for a in before_alphas]  # kept
    assert str(os.sep + "models") not in left_info or "/work" not in left_info  # no absolute path
    page.screenshot("unknown-name", f"#{page.vid(tab, 'enabled')}")
    page.pick_adapter(tab, state["adapter"])
    page.wait(lambda: page.info(tab) == before_info, "the adapter's info line again")


def test_03_generate_writes_the_infotext(page, state):
    page.note("== Generate")
    tab = "txt2img"
    alphas = page.visible_alphas(tab)
    assert len(alphas) >= 2
    state["dimension"] = alphas[1]["label"].split(" ", 1)[1]
    page.set_slider(page.vid(tab, "strength"), STRENGTH)
    page.set_slider(page.vid(tab, "alpha_2"), ALPHA)
    page.set_slider(f"{tab}_steps", SMALL["steps"])
    for side in ("width", "height"):
        page.set_slider(f"{tab}_{side}", SMALL[side])
    text = page.generate(tab)
    page.note(f"  infotext: {text}")
    state["infotext"] = text
    assert "VMix: True" in text and f"VMix adapter: {state['adapter']} (" in text
    assert f"VMix strength: {STRENGTH:g}" in text and f"VMix dimensions: {state['dimension']}={ALPHA:g}" in text
    page.screenshot("generated", f"#{tab}_results")


def test_04_read_generation_parameters_restores_the_panel(page, state):
    page.note("== Read generation parameters")
    tab = "txt2img"
    page.set_slider(page.vid(tab, "strength"), 0.3)
    page.set_slider(page.vid(tab, "alpha_2"), 1.0)
    page.set_enabled(tab, False)
    page.set_text(f"{tab}_prompt", state["infotext"])
    page.finds("#paste")[0].click()  # the first is txt2img's
    page.wait(lambda: page.enabled(tab) and abs(page.slider_value(page.vid(tab, "strength")) - STRENGTH) < 1e-9,
              "VMix on with λ restored")
    restored = (page.enabled(tab), page.adapter_value(tab), page.slider_value(page.vid(tab, "strength")),
                page.slider_value(page.vid(tab, "alpha_2")))
    page.note(f"  restored: enabled {restored[0]}, adapter {restored[1]}, λ {restored[2]}, α2 {restored[3]}")
    assert restored == (True, state["adapter"], STRENGTH, ALPHA)


def test_05_send_to_img2img_carries_the_settings(page, state):
    page.note("== Send to img2img")
    page.find("#txt2img_send_to_img2img").click()
    tab = "img2img"
    page.wait(lambda: page.enabled(tab) and abs(page.slider_value(page.vid(tab, "strength")) - STRENGTH) < 1e-9,
              "VMix on in img2img with λ carried")
    carried = (page.enabled(tab), page.adapter_value(tab), page.slider_value(page.vid(tab, "strength")),
               page.slider_value(page.vid(tab, "alpha_2")))
    page.note(f"  img2img: enabled {carried[0]}, adapter {carried[1]}, λ {carried[2]}, α2 {carried[3]}")
    assert carried == (True, state["adapter"], STRENGTH, ALPHA)
    page.screenshot("panel-img2img", f"#{page.vid(tab, 'enabled')}")
    page.go_tab("txt2img")


def test_06_refresh_finds_a_newly_copied_adapter(page, state, adapter_dir):
    page.note("== refresh")
    tab = "txt2img"
    copy = adapter_file(adapter_dir, COPY)
    assert COPY not in page.adapter_choices(tab)
    shutil.copyfile(adapter_file(adapter_dir, state["adapter"]), copy)
    try:
        page.find(f"#{page.vid(tab, 'refresh')}").click()
        choices = page.wait(lambda: COPY in page.adapter_choices(tab) and page.adapter_choices(tab), "the copied adapter")
        page.note(f"  after copying {COPY}.safetensors and pressing 🔄: {choices}")
    finally:
        os.remove(copy)
        page.find(f"#{page.vid(tab, 'refresh')}").click()


def test_07_damaged_file_and_reload_ui_after_a_failed_job(page, state, adapter_dir):
    page.note("== damaged file, failed job, Reload UI")
    tab = "txt2img"
    damaged = adapter_file(adapter_dir, DAMAGED)
    write_damaged_copy(adapter_file(adapter_dir, state["adapter"]), damaged)
    log = os.environ.get("VMIX_E2E_LOG")
    log_start = os.path.getsize(log) if log and os.path.exists(log) else 0
    try:
        # A job stopped by bad block weights from the UI stops before sampling: VMix's one console
        # line, no traceback, the sentence under the infotext (issue 21).
        page.set_text(page.vid(tab, "block_weights"), "IN:9")
        error = page.generate(tab, expect="VMix")
        page.note(f"  failed job: {error}")
        # The WebUI's own "Time taken: …" line follows the message in the same element (A1111 1.10.1, Forge)
        message = error.split("\nTime taken:")[0].rstrip()
        assert "IN:9" in message and message.endswith("The job is stopped.")
        page.set_text(page.vid(tab, "block_weights"), "")
        # The same from the API answers 422 with the sentence; that job raises at its first UNet call,
        # so its postprocess never runs and VMix's UNet pre-hook stays until the next job or "Reload UI".
        try:
            page.api_json("/sdapi/v1/txt2img", dict(SMALL, prompt="bad block weights", alwayson_scripts={
                "VMix": {"args": [{"adapter": state["adapter"], "block_weights": "IN:9"}]}}))
            status, detail = 200, ""
        except urllib.error.HTTPError as e:
            status, detail = e.code, json.loads(e.read()).get("detail", "")
        page.note(f"  the same from the API: {status} {detail}")
        assert status == 422 and "IN:9" in detail
        if log:
            with open(log, encoding="utf-8", errors="replace") as f:
                f.seek(log_start)
                printed = f.read()
            stops = [line.strip() for line in printed.splitlines() if "[VMix]" in line and "IN:9" in line]
            page.note(f"  console for the two stopped jobs: {stops}")
            assert len(stops) == 2 and "Traceback" not in printed and "Error completing request" not in printed
        page.reload_ui()
        default = page.adapter_value(tab)
        api_default = page.api_json("/sdapi/v1/txt2img", dict(SMALL, prompt="default adapter",
                                                             alwayson_scripts={"VMix": {"args": [{}]}}))
        api_adapter = re.search(r"VMix adapter: ([^,(]+)", api_default["info"])
        page.note(f"  after Reload UI: the panel shows adapter {default!r}; the API's default adapter is "
                  f"{api_adapter.group(1).strip() if api_adapter else None!r}")
        assert default != DAMAGED and api_adapter and api_adapter.group(1).strip() != DAMAGED
        page.set_enabled(tab, True)
        # the damaged file is marked in the list itself (issue 22); the value stays its name
        marks = page.wait(lambda: (lambda m: m.get(DAMAGED) == '"⚠ damaged"' and m)(page.adapter_marks(tab)),
                          "the damaged file's mark in the adapter list")
        page.note(f"  marks in the adapter list: {marks}")
        assert marks[state["adapter"]] in ("none", "normal")
        page.pick_adapter(tab, DAMAGED)
        info = page.wait(lambda: "damaged" in page.info(tab) and page.info(tab), "the damaged-file line")
        page.note(f"  {DAMAGED}: {info}")
        assert info.startswith(f"⚠ damaged: VMix adapter '{DAMAGED}.safetensors' has non-finite values")
        page.screenshot("damaged", f"#{page.vid(tab, 'enabled')}")
        if log:
            with open(log, encoding="utf-8", errors="replace") as f:
                f.seek(log_start)
                lines = [line.strip() for line in f if "[VMix] Reload UI" in line]
            page.note(f"  console: {lines}")
            assert lines and "nothing of VMix is left on the loaded model" in lines[-1]
            assert re.search(r"removed [1-9]\d* VMix hook", " ".join(lines))
        after, _ = page.api_image(dict(SMALL, prompt="a lighthouse at dusk"))
        same = list(after.getdata()) == list(state["baseline"].getdata())
        page.note(f"  VMix off after Reload UI gives the picture made before VMix was used: {same}")
        assert same
    finally:
        if os.path.exists(damaged):
            os.remove(damaged)


def write_damaged_copy(source, path):
    """A copy whose header and metadata are fine but one W_a holds NaN (only a full load sees it)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(source, "pt") as f:
        metadata = f.metadata()
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    key = sorted(k for k in tensors if k.startswith("values."))[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, path, metadata=metadata)


def test_08_api_errors_name_the_folder_as_configured(page):
    page.note("== HTTP API error")
    import json
    import urllib.error

    payload = dict(SMALL, prompt="x", alwayson_scripts={"VMix": {"args": [{"adapter": "vmix_e2e_not_there"}]}})
    with pytest.raises(urllib.error.HTTPError) as e:
        page.api_json("/sdapi/v1/txt2img", payload)
    body = json.loads(e.value.read())
    page.note(f"  HTTP {e.value.code}: {body}")
    assert e.value.code == 422 and body.get("error", "VMixError") == "VMixError"  # Forge sends the detail only
    assert "'vmix_e2e_not_there' is not installed in models/VMix;" in body["detail"]
    assert "/tmp" not in body["detail"] and "/work" not in body["detail"] and "/home" not in body["detail"]
