"""javascript/vmix.js, run by node against a small stand-in for the page: it sets the hints the info
line carries as titles on the VMix elements of the same tab, on the accordion's header, and on
nothing else.  (The real page in a real browser: tests/e2e.)  Skipped where node is not installed."""
import json
import os
import shutil
import subprocess

import pytest

from vmix_lib.dimensions import DEFAULT_DIMENSIONS
from vmix_lib.webui import panel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NODE = shutil.which("node") or shutil.which("nodejs")

HARNESS = r"""
const fs = require("fs"), vm = require("vm");
const [script, hintsTxt, hintsImg, hintsNew, marksTxt, marksImg, marksNew] =
  process.argv.slice(1).map((a, i) => i ? JSON.parse(a) : a);

class El {
  constructor(id, classes = [], attrs = {}, children = []) {
    Object.assign(this, {id, classes, attrs, children, title: "", parent: null});
    for (const c of children) c.parent = this;
  }
  get classList() { return {contains: (c) => this.classes.includes(c)}; }
  getAttribute(name) { return name in this.attrs ? this.attrs[name] : null; }
  setAttribute(name, value) { this.attrs[name] = value; }
  *walk() { for (const c of this.children) { yield c; yield* c.walk(); } }
  closest(sel) {
    const m = sel.match(/^\[id\$='(.+)'\]$/);
    for (let e = this; e; e = e.parent) if (e.id && e.id.endsWith(m[1])) return e;
    return null;
  }
  querySelector(sel) {
    for (const e of this.walk()) if (sel.startsWith(".") ? e.classes.includes(sel.slice(1)) : e.id === sel.slice(1)) return e;
    return null;
  }
}
const carrier = (hints, marks) => new El("", ["vmix-hints"], marks == null ? {"data-vmix-hints": JSON.stringify(hints)}
  : {"data-vmix-hints": JSON.stringify(hints), "data-vmix-marks": JSON.stringify(marks)});
const block = (id) => new El(id, ["block"], {}, [new El("", ["wrap"])]);
const tab = (t, hints, marks) => new El(`tab_${t}`, [], {}, [
  new El(`script_${t}_vmix_enabled`, ["input-accordion"], {}, [new El("", ["label-wrap"]), new El("", ["body"], {}, [
    new El(`script_${t}_vmix_info`, ["block"], {}, [new El("", ["prose"], {}, [new El("", ["vmix-info"]), carrier(hints, marks)])]),
    ...Object.keys(hints).filter((k) => k !== "enabled").map((k) => block(`script_${t}_vmix_${k}`)),
  ])]),
  block(`script_${t}_other_strength`),   // another extension's control with the same suffix
  block(`script_${t}_vmixer_strength`),  // an id that merely starts like VMix's
]);
const page = new El("root", [], {}, [tab("txt2img", hintsTxt, marksTxt), tab("img2img", hintsImg, marksImg)]);
page.querySelectorAll = (sel) => [...page.walk()].filter((e) => e.getAttribute("data-vmix-hints") !== null);
const loaded = [], updates = [];
const head = [];  // document.head's children
const document = {head: {appendChild: (e) => head.push(e)}, createElement: (tag) => ({tag, id: "", textContent: ""}),
                  getElementById: (id) => head.find((e) => e.id === id) || null};
Object.assign(globalThis, {gradioApp: () => page, onUiLoaded: (f) => loaded.push(f), onUiUpdate: (f) => updates.push(f),
                           document});
const styles = () => Object.fromEntries(head.map((e) => [e.id, e.tag + ": " + e.textContent]));
vm.runInThisContext(fs.readFileSync(script, "utf8"), {filename: script});
const titles = () => Object.fromEntries([...page.walk()].filter((e) => e.title).map((e) => [e.id || e.classes.join("."), e.title]));
loaded.forEach((f) => f());
const first = titles(), firstStyles = styles();
// the adapter changes in txt2img: gradio replaces the info line's content
const info = page.querySelector("#script_txt2img_vmix_info").children[0];
info.children[1] = carrier(hintsNew, marksNew); info.children[1].parent = info;
updates.forEach((f) => f([]));
updates.forEach((f) => f([]));  // a burst of page changes: applied once, shortly after
setTimeout(() => { console.log(JSON.stringify({first, second: titles(), loaded: loaded.length, updates: updates.length,
                                               firstStyles, secondStyles: styles(), styleCount: head.length})); }, 400);
"""


def run_harness(txt, img, new, marks_txt=None, marks_img=None, marks_new=None):
    """vmix.js on the stand-in page: hints (and marks, None: a carrier without the attribute) of
    the txt2img and img2img info lines, then txt2img's replaced by ``new`` / ``marks_new``."""
    args = [os.path.join(ROOT, "javascript", "vmix.js"), json.dumps(txt), json.dumps(img), json.dumps(new),
            json.dumps(marks_txt), json.dumps(marks_img), json.dumps(marks_new)]
    result = subprocess.run([NODE, "-e", HARNESS, *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.skipif(NODE is None, reason="node is not installed")
def test_hints_go_on_vmix_elements_only():
    dims = list(DEFAULT_DIMENSIONS)
    txt = panel.hints(dims[:2], "sd15", 1.0, "models/VMix")
    img = panel.hints(dims[:3], "sdxl", 1.0, "models/VMix")
    new = panel.hints(dims[3:4], "sd15", 1.0, "models/VMix")
    out = run_harness(txt, img, new)
    assert (out["loaded"], out["updates"]) == (1, 1)
    first = out["first"]
    # the accordion's hint is on its header, every other hint on the element with its id
    assert first.pop("label-wrap") == txt["enabled"]  # both tabs' headers share the class name
    expected = {f"script_txt2img_vmix_{k}": v for k, v in txt.items() if k != "enabled"}
    expected.update({f"script_img2img_vmix_{k}": v for k, v in img.items() if k != "enabled"})
    assert first == expected
    assert "script_txt2img_other_strength" not in first and "script_txt2img_vmixer_strength" not in first
    second = out["second"]
    assert second["script_txt2img_vmix_alpha_1"] == panel.alpha_hint(dims[3])  # follows the new adapter
    assert second["script_txt2img_vmix_alpha_2"] == txt["alpha_2"]  # slots the new one lacks keep theirs
    assert second["script_img2img_vmix_alpha_3"] == img["alpha_3"]



@pytest.mark.skipif(NODE is None, reason="node is not installed")
def test_marks_show_after_the_adapter_list_items_of_their_own_tab():
    """Issue 22: files that fail the full check are marked in the dropdown's list, by CSS on the
    items whose aria-label is the name (gradio 3.41 and 4.40), one <style> per tab; the choices
    and values stay the plain names."""
    hints = panel.hints(folder="models/VMix")
    txt = {"0_nan": panel.DAMAGED_MARK, 'odd "name\\': panel.UNUSABLE_MARK}
    out = run_harness(hints, hints, hints, txt, {}, {})
    assert out["firstStyles"] == {
        "script_txt2img_vmix_list_marks": (
            'style: #script_txt2img_vmix_adapter li.item[aria-label="0_nan"]::after { content: "⚠ damaged"; }\n'
            '#script_txt2img_vmix_adapter li.item[aria-label="odd \\"name\\\\"]::after { content: "⚠ not usable"; }\n'),
        "script_img2img_vmix_list_marks": "style: ",
    }
    # the file was copied again and 🔄 pressed in txt2img: its marks go, the same element is reused
    assert out["secondStyles"] == {"script_txt2img_vmix_list_marks": "style: ", "script_img2img_vmix_list_marks": "style: "}
    assert out["styleCount"] == 2
    # an info line from before this change (no data-vmix-marks): no marks, hints as before
    old = run_harness(hints, hints, hints)
    assert old["secondStyles"] == {"script_txt2img_vmix_list_marks": "style: ", "script_img2img_vmix_list_marks": "style: "}
    assert old["second"]["script_txt2img_vmix_strength"] == hints["strength"]
