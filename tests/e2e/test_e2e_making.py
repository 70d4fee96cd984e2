"""The VMix tab in a real WebUI: make an adapter from the loaded checkpoint, over the HTTP API and in
the browser (opt-in, see conftest.py; README "Make an adapter in the WebUI").

    VMIX_E2E_FAMILY   sd15 (default) or sdxl: the checkpoint the WebUI has loaded
    VMIX_E2E_STEPS    training steps of each run (default 4)

In order: a VMix-off picture before anything; bad settings answered 422 with one sentence and
nothing started; a job over the API with progress, a second job refused (409), Interrupt (saves),
Resume (finishes); the adapter then changes a picture at λ = 1 while λ = 0 and VMix off give the
picture from before training, bit for bit; then the same in the tab: Train, the progress bar and
the λ-sweep preview, Interrupt, Resume, and the new adapter in the txt2img panel's list without 🔄.
Files the checks make are named vmix_e2e_made* and are removed at the end (with VMIX_E2E_ADAPTER_DIR).
"""
import io
import json
import os
import shutil
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

FAMILY = os.environ.get("VMIX_E2E_FAMILY", "sd15")
STEPS = int(os.environ.get("VMIX_E2E_STEPS", "4"))
SIZE = 64
PICTURE = {"prompt": "a lighthouse on a rocky coast", "steps": 2, "width": SIZE, "height": SIZE, "seed": 99,
           "sampler_name": "Euler", "cfg_scale": 5}
API_NAME, TAB_NAME = "vmix_e2e_made_api", "vmix_e2e_made_tab"
TRAIN = {"steps": STEPS, "batch_size": 1, "resolution": SIZE, "xt_steps": 4, "save_every": 0, "preview_every": 2,
         "gradient_checkpointing": True, "unload_vae": True}


@pytest.fixture(scope="module")
def made(adapter_dir_optional):
    state = {}
    yield state
    if adapter_dir_optional:
        for name in (API_NAME, TAB_NAME):
            for path in (os.path.join(adapter_dir_optional, name + ".safetensors"),
                         os.path.join(adapter_dir_optional, name + "-training")):
                if os.path.isdir(path):
                    shutil.rmtree(path)
                elif os.path.exists(path):
                    os.remove(path)


@pytest.fixture(scope="module")
def adapter_dir_optional():
    folder = os.environ.get("VMIX_E2E_ADAPTER_DIR")
    return folder if folder and os.path.isdir(folder) else None


def post(page, path, payload, expect=200):
    request = urllib.request.Request(page.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def pixels(image):
    return np.asarray(image).astype(np.int16)


def wait_job(page, until, what, timeout=3600):
    status = page.wait(lambda: (lambda s: s if until(s) else None)(page.api_json("/vmix/v1/make")), what, timeout)
    return status


def test_10_make_an_adapter_over_the_api(page, made):
    page.note(f"== VMix tab over the API ({FAMILY})")
    baseline, _ = page.api_image(PICTURE)
    made["baseline"] = pixels(baseline)
    for payload, expected in (({"steps": 0}, "Steps must be from 1 to 1000000, got 0."),
                              ({"name": "../x"}, "Adapter name '../x' has a path in it"),
                              ({"dimensions": [["color", "", ""]]}, "Dimension 'color' has an empty phrase"),
                              ({"resolution": 96}, "Resolution must be a multiple of 64")):
        code, body = post(page, "/vmix/v1/make", dict(payload, name=payload.get("name", API_NAME)))
        page.note(f"  {payload} -> {code} {body.get('detail')}")
        assert code == 422 and body["detail"].startswith(expected)
    code, body = post(page, "/vmix/v1/make", dict(TRAIN, name=API_NAME, overwrite=True))
    page.note(f"  start -> {code} {body}")
    assert code == 200 and body["state"] in ("queued", "running")
    code, busy = post(page, "/vmix/v1/make", dict(TRAIN, name=API_NAME + "2"))
    assert code == 409 and busy["detail"].startswith("A VMix job is already")
    started = time.time()
    running = wait_job(page, lambda s: s["step"] >= 1 or s["state"] not in ("queued", "running"), "the first step")
    progress = page.api_json("/sdapi/v1/progress?skip_current_image=true")
    page.note(f"  after {time.time() - started:.0f} s: {running}; /sdapi/v1/progress textinfo {progress.get('textinfo')!r}")
    assert running["state"] == "running" and progress["textinfo"].startswith("VMix: step ")
    code, stop = post(page, "/vmix/v1/make/interrupt", {})
    assert code == 200 and stop["interrupted"] is True
    stopped = wait_job(page, lambda s: s["state"] != "running", "the interrupted job")
    page.note(f"  interrupted: {stopped['message']}")
    assert stopped["state"] == "stopped" and stopped["step"] < STEPS and stopped["message"].startswith("Interrupted at step")
    code, body = post(page, "/vmix/v1/make", dict(TRAIN, name=API_NAME, resume=True))
    assert code == 200
    done = wait_job(page, lambda s: s["state"] not in ("queued", "running"), "the resumed job")
    page.note(f"  resumed: {done['message']} ({done['elapsed_seconds']} s)")
    assert done["state"] == "finished" and done["step"] == STEPS and done["adapter"] == API_NAME
    preview = page.api_json("/vmix/v1/make?preview=true")["preview"]
    assert preview, "the job drew no λ-sweep preview"
    with open(os.path.join(page.out_dir, f"api-preview-{FAMILY}.png"), "wb") as f:
        import base64

        f.write(base64.b64decode(preview))
    # The new adapter, at once (no refresh): λ = 1 changes the picture, λ = 0 and off give the picture from before.
    pictures = {}
    for label, vmix in (("off", None), ("λ=0", {"adapter": API_NAME, "strength": 0}), ("λ=1", {"adapter": API_NAME, "strength": 1})):
        payload = dict(PICTURE, alwayson_scripts={"VMix": {"args": [vmix]}}) if vmix else PICTURE
        image, result = page.api_image(payload)
        pictures[label] = pixels(image)
        info = json.loads(result["info"])["infotexts"][0]
        page.note(f"  {label}: mean |Δ| to the picture before training {np.abs(pictures[label] - made['baseline']).mean():.3f}; "
                  f"{[p for p in info.split(', ') if p.startswith('VMix')]}")
    assert np.array_equal(pictures["off"], made["baseline"]) and np.array_equal(pictures["λ=0"], made["baseline"])
    assert not np.array_equal(pictures["λ=1"], made["baseline"])


def test_11_make_an_adapter_in_the_tab(page, made):
    page.note(f"== VMix tab in the browser ({FAMILY})")
    if "baseline" not in made:
        made["baseline"] = pixels(page.api_image(PICTURE)[0])
    buttons = [b for b in page.finds("#tabs > .tab-nav button, #tabs button") if b.text.strip() == "VMix"]
    assert buttons, "no VMix tab"
    buttons[0].click()
    page.wait(lambda: page.find("#make_vmix_train").is_displayed(), "the VMix tab")
    titles = {key: page.js("const e = document.getElementById(arguments[0]); return e ? e.title : null;", f"make_vmix_{key}")
              for key in ("name", "dimensions", "steps", "eta", "train", "resume", "interrupt", "unload_vae")}
    page.note(f"  hover hints: {titles}")
    assert all(titles.values()), "a control of the VMix tab has no hover hint"
    page.screenshot(f"vmix-tab-{FAMILY}", "#tab_vmix")

    def set_value(key, value):
        box = page.find(f"#make_vmix_{key} input, #make_vmix_{key} textarea")
        box.clear()
        box.send_keys(str(value))
        box.send_keys("\t")

    set_value("name", TAB_NAME)
    for key in ("steps", "batch_size", "resolution", "xt_steps", "save_every", "preview_every"):
        set_value(key, TRAIN[key])
    overwrite = page.find("#make_vmix_overwrite input")
    if not overwrite.is_selected():
        overwrite.click()
    page.find("#make_vmix_train").click()
    # the WebUI's own progress bar (requestProgress) with shared.state's text, above the progress output
    page.wait(lambda: any("VMix: step" in (e.text or "") for e in page.finds("#tab_vmix .progressDiv")), "the progress bar", 1800)
    page.screenshot(f"vmix-tab-{FAMILY}-training", "#tab_vmix")
    page.find("#make_vmix_interrupt").click()
    result = page.wait(lambda: (lambda t: t if t.strip() else None)(page.find("#make_vmix_result").text), "the result line", 1800)
    page.note(f"  after Interrupt: {result.strip()}")
    assert result.strip().startswith("Interrupted at step")
    page.find("#make_vmix_resume").click()
    result = page.wait(lambda: (lambda t: t if t.startswith("Finished") else None)(page.find("#make_vmix_result").text.strip()),
                       "the resumed run", 3600)
    page.note(f"  after Resume: {result}")
    page.wait(lambda: page.js("const i = document.querySelector('#make_vmix_preview img'); return i && i.naturalWidth > 0;"),
              "the λ-sweep preview in the tab")
    page.screenshot(f"vmix-tab-{FAMILY}-finished", "#tab_vmix")
    page.go_tab("txt2img")
    page.set_enabled("txt2img", True)
    choices = page.adapter_choices("txt2img")
    page.note(f"  txt2img panel's adapters, without pressing 🔄: {choices}")
    assert TAB_NAME in choices
    page.set_enabled("txt2img", False)
    after, _ = page.api_image(PICTURE)
    assert np.array_equal(pixels(after), made["baseline"]), "VMix off after the tab's runs differs from the picture before training"
    errors = [e for e in page.console_errors() if "vmix" in e.lower()]
    assert not errors, errors
