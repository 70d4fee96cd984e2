"""The VMix graph in ComfyUI's real frontend (headless Chromium through selenium): the UI workflow files
in examples/, a run from the frontend's Queue, the prompt the frontend builds with Apply VMix bypassed,
and the screenshot docs/comfyui-graph.png.

    python tests/e2e_comfyui/comfyui_graph.py --url http://127.0.0.1:8188 --family sd15 \\
        --checkpoint rig-sd15-random.safetensors --adapter rig-sd15-random.safetensors --size 64 --steps 3 \\
        [--workflow-out examples/comfyui_vmix_sd15.json] [--bypassed-out bypassed.json] [--screenshot out.png]

--workflow-out writes the UI workflow of examples/comfyui_vmix_<family>_api.json as it is (generic file
names, full size, seed fixed): what a user drags into ComfyUI; it does only that.  Otherwise the graph
with the given checkpoint, adapter, size and steps is loaded, the bypassed prompt taken, then it is
queued from the frontend and the screenshot taken when the run has finished.  Needs selenium (requirements-e2e.txt) and /usr/bin/chromium + chromedriver.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import comfyui_checks  # noqa: E402

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1700,1000")

# Node positions (API node id -> x, y) for a graph that reads left to right.
LAYOUT = {"1": (20, 60), "2": (20, 300), "6": (20, 430), "4": (420, 60), "5": (420, 300), "3": (880, 60),
          "7": (1230, 60), "8": (1560, 60), "9": (1560, 200)}

LOAD_JS = """
const [prompt, layout, done] = [arguments[0], arguments[1], arguments[arguments.length - 1]];
(async () => {
  await window.app.loadApiJson(prompt, "vmix.json");
  for (const node of window.app.graph._nodes) {
    const id = String(node.id);
    if (layout[id]) node.pos = layout[id];
    for (const w of node.widgets || []) if (w.name === "control_after_generate") w.value = "fixed";
  }
  window.app.graph.setDirtyCanvas(true, true);
  done(window.app.graph.serialize());
})().catch(e => done({error: String(e)}));
"""

BYPASS_JS = """
const [title, done] = [arguments[0], arguments[arguments.length - 1]];
(async () => {
  const node = window.app.graph._nodes.find(n => n.type === title);
  node.mode = 4;  // LGraphEventMode.BYPASS
  const p = await window.app.graphToPrompt();
  node.mode = 0;
  window.app.graph.setDirtyCanvas(true, true);
  done(p.output);
})().catch(e => done({error: String(e)}));
"""

QUEUE_JS = """
const done = arguments[arguments.length - 1];
window.app.queuePrompt(0, 1).then(() => done(true)).catch(e => done(String(e)));
"""


def driver_for(chromium: str, chromedriver: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="vmix-comfy-profile-")
    options.add_argument(f"--user-data-dir={profile}")
    browser = webdriver.Chrome(service=Service(chromedriver), options=options)
    browser.set_page_load_timeout(120)
    browser.set_script_timeout(120)
    return browser, profile


def open_app(browser, url: str, client: comfyui_checks.ComfyClient):
    for setting, value in (("Comfy.TutorialCompleted", True), ("Comfy.Minimap.Visible", False)):
        try:
            client._open(f"/settings/{setting}", json.dumps(value).encode()).close()
        except Exception:
            pass
    browser.get(url)
    for _ in range(240):
        if browser.execute_script("return !!(window.app && window.app.graph && window.app.canvas)"):
            break
        time.sleep(0.5)
    time.sleep(2)


def close_dialogs(browser):
    browser.execute_script(
        "document.querySelectorAll('.p-dialog-close-button, .p-dialog-header-close').forEach(b => b.click());")
    time.sleep(0.5)


def generic_prompt(family: str) -> dict:
    with open(os.path.join(comfyui_checks.EXAMPLES, f"comfyui_vmix_{family}_api.json"), encoding="utf-8") as f:
        return json.load(f)


def rig_prompt(family, checkpoint, adapter, size, steps, seed=1234) -> dict:
    prompt = generic_prompt(family)
    prompt["1"]["inputs"]["ckpt_name"] = checkpoint
    prompt["2"]["inputs"]["adapter_name"] = adapter
    prompt["6"]["inputs"].update(width=size, height=size)
    prompt["7"]["inputs"].update(steps=steps, seed=seed)
    return prompt


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8188")
    parser.add_argument("--family", choices=["sd15", "sdxl"], required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--workflow-out")
    parser.add_argument("--bypassed-out")
    parser.add_argument("--screenshot")
    parser.add_argument("--chromium", default=os.environ.get("VMIX_E2E_CHROMIUM", "/usr/bin/chromium"))
    parser.add_argument("--chromedriver", default=os.environ.get("VMIX_E2E_CHROMEDRIVER", "/usr/bin/chromedriver"))
    args = parser.parse_args(argv)
    client = comfyui_checks.ComfyClient(args.url)
    browser, profile = driver_for(args.chromium, args.chromedriver)
    try:
        open_app(browser, args.url, client)
        close_dialogs(browser)
        if args.workflow_out:  # the generic example only (a browser session of its own: one tab)
            workflow = browser.execute_async_script(LOAD_JS, generic_prompt(args.family), LAYOUT)
            if "error" in workflow:
                raise RuntimeError(workflow["error"])
            with open(args.workflow_out, "w", encoding="utf-8") as f:
                json.dump(workflow, f, indent=2)
                f.write("\n")
            print(f"UI workflow: {args.workflow_out} ({len(workflow['nodes'])} nodes, {len(workflow['links'])} links)")
            return 0
        loaded = browser.execute_async_script(LOAD_JS, rig_prompt(args.family, args.checkpoint, args.adapter,
                                                                  args.size, args.steps), LAYOUT)
        if "error" in loaded:
            raise RuntimeError(loaded["error"])
        close_dialogs(browser)
        if args.bypassed_out:
            bypassed = browser.execute_async_script(BYPASS_JS, "VMixApply")
            if "error" in bypassed:
                raise RuntimeError(bypassed["error"])
            with open(args.bypassed_out, "w", encoding="utf-8") as f:
                json.dump(bypassed, f, indent=2)
            kinds = sorted(v["class_type"] for v in bypassed.values())
            print(f"bypassed prompt from the frontend: {args.bypassed_out} (nodes: {', '.join(kinds)})")
        if args.screenshot:
            before = len(client.get_json("/history"))
            queued = browser.execute_async_script(QUEUE_JS)
            if queued is not True:
                raise RuntimeError(f"queue: {queued}")
            for _ in range(1200):  # wait for the run the frontend queued
                queue = client.get_json("/queue")
                if len(client.get_json("/history")) > before and not queue["queue_running"] and not queue["queue_pending"]:
                    break
                time.sleep(1)
            time.sleep(3)
            close_dialogs(browser)
            browser.execute_script("const c = window.app.canvas; c.ds.scale = 0.83; c.ds.offset = [5, 25];"
                                   "c.setDirty(true, true);")
            time.sleep(2)
            browser.save_screenshot(args.screenshot)
            print(f"screenshot: {args.screenshot}")
    finally:
        browser.quit()
        shutil.rmtree(profile, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
