"""The accordion's texts (info line, dimension sliders) and the package's import boundaries."""
import os
import subprocess
import sys

import pytest

from test_webui_fakes import single_thread, write_adapter  # noqa: F401  (single_thread: autouse fixture)
from vmix_lib.layers import FamilyReport
from vmix_lib.webui import panel
from vmix_lib.webui.arguments import MAX_DIMENSION_SLOTS
from vmix_lib.webui.library import AdapterLibrary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SD15 = FamilyReport("sd15", "SD1.5 (16 cross-attention layers, width 768)")
SDXL = FamilyReport("sdxl", "SDXL (70 cross-attention layers, width 2048)")


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    folder = tmp_path_factory.mktemp("VMix")
    write_adapter(folder / "style <b>.safetensors")
    (folder / "broken.safetensors").write_bytes(b"junk")
    return AdapterLibrary(lambda: str(folder))


def test_no_adapter_says_where_and_that_no_official_weights_exist(tmp_path):
    text = panel.info_html(AdapterLibrary(lambda: str(tmp_path)), None, None)
    assert f"No VMix adapter found in <code>{tmp_path}</code>" in text
    assert "No official VMix weights were ever released" in text and "⚠" not in text
    assert panel.slider_updates(None) == [{"label": f"α {i + 1}", "visible": False} for i in range(MAX_DIMENSION_SLOTS)]


def test_info_line_family_dimensions_and_fit(library):
    text = panel.info_html(library, "style <b>", SD15)
    assert text.startswith("<span class='vmix-info'>SD1.5 adapter · 6 dimensions: color, lighting, composition, focus, texture, emotion")
    assert "fits the loaded checkpoint" in text
    bad = panel.info_html(library, "style <b>", SDXL)
    assert "vmix-warning" in bad and "does not fit the loaded checkpoint, which is SDXL (70 cross-attention layers" in bad
    assert "fit: unknown until a checkpoint is loaded" in panel.info_html(library, "style <b>", None)


def test_info_line_says_how_the_adapter_was_made(tmp_path):
    """The trainer's metadata: a distilled adapter shows η and its phrase pairs, a data-trained one its
    image count; anything else (a hand-made file, odd values) adds nothing."""
    from vmix_lib.adapter_file import save_adapter

    adapter = write_adapter(tmp_path / "plain.safetensors")
    distill = {"objective": "distill", "eta": 1.5, "phrases": {
        "color": {"positive": "vibrant colors", "contrast": "dull <colors>"}, "lighting": {"positive": "golden hour", "contrast": ""}}}
    save_adapter(adapter, str(tmp_path / "distilled.safetensors"), training=distill)
    save_adapter(adapter, str(tmp_path / "data.safetensors"), training={"objective": "data", "images": 1200})
    save_adapter(adapter, str(tmp_path / "odd.safetensors"), training={"objective": "distill", "eta": "x", "phrases": ["no"]})
    library = AdapterLibrary(lambda: str(tmp_path))
    text = panel.info_html(library, "distilled", SD15)
    assert ("trained at λ 1 · distilled from prompt pairs (η 1.5): color: &#x27;vibrant colors&#x27; vs &#x27;dull &lt;colors&gt;&#x27;, "
            "lighting: &#x27;golden hour&#x27; · fits the loaded checkpoint") in text
    assert "trained at λ 1 · trained on 1200 labelled images · fits" in panel.info_html(library, "data", SD15)
    assert "trained at λ 1 · distilled from prompt pairs · fits" in panel.info_html(library, "odd", SD15)
    assert "trained at λ 1 · fits" in panel.info_html(library, "plain", SD15)


def test_info_line_problems_are_escaped_sentences(library):
    assert "⚠ VMix adapter &#x27;broken.safetensors&#x27;" in panel.info_html(library, "broken", SD15)
    missing = panel.info_html(library, "<script>", SD15)
    assert "<script>" not in missing and "is not installed" in missing
    assert "Pick an adapter (2 in" in panel.info_html(library, None, SD15)


def test_sliders_follow_the_adapter(library):
    updates = panel.slider_updates(panel.dimensions_of(library, "style <b>"))
    assert [u["visible"] for u in updates] == [True] * 6 + [False] * 2
    assert updates[0]["label"] == "α color"  # short; the phrase is in the hover hint
    assert panel.dimensions_of(library, "broken") is None


def test_pure_modules_import_without_a_webui():
    """Only host, ui, app and xyz may touch the WebUI, and only when called."""
    code = (
        "import sys\n"
        "import vmix_lib.webui, vmix_lib.webui.arguments, vmix_lib.webui.blocks, vmix_lib.webui.infotext\n"
        "import vmix_lib.webui.library, vmix_lib.webui.lifecycle, vmix_lib.webui.runner, vmix_lib.webui.panel\n"
        "import vmix_lib.webui.host, vmix_lib.webui.app\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('modules', 'gradio', 'backend', 'modules_forge', 'ldm', 'sgm')]\n"
        "print(bad)\n"
        "import vmix_lib.webui.host as h\n"
        "print(h.webui_kind())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:2] == ["[]", "a1111"]


@pytest.mark.parametrize("path", ["scripts/vmix.py", "preload.py", "install.py", "vmix_lib/webui/ui.py",
                                  "vmix_lib/webui/host.py", "vmix_lib/webui/app.py"])
def test_webui_files_compile(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        compile(f.read(), path, "exec")


def test_install_py_installs_nothing_and_finds_no_problem_here():
    out = subprocess.run([sys.executable, "install.py"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout == "" and out.stderr == ""
    assert "pip" not in open(os.path.join(ROOT, "install.py")).read().replace("pipeline", "")


def test_preload_adds_the_vmix_dir_option():
    import argparse
    import importlib.util

    spec = importlib.util.spec_from_file_location("vmix_preload_test", os.path.join(ROOT, "preload.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parser = argparse.ArgumentParser()
    module.preload(parser)
    assert parser.parse_args(["--vmix-dir", "/data/vmix"]).vmix_dir == "/data/vmix"
    assert parser.parse_args([]).vmix_dir is None


def test_a_restored_adapter_describes_itself_on_the_components(library):
    # Found in the real A1111: ui-config.json restored the dropdown to the adapter saved at the
    # first start while the info line and α sliders still described the preselected one.
    from types import SimpleNamespace

    info = SimpleNamespace(value="old")
    sliders = [SimpleNamespace(label=f"α {i + 1}", visible=False) for i in range(MAX_DIMENSION_SLOTS)]
    panel.describe_on_components(library, "style <b>", SD15, info, sliders)
    assert info.value == panel.info_html(library, "style <b>", SD15) and "fits the loaded checkpoint" in info.value
    assert [s.label for s in sliders[:2]] == ["α color", "α lighting"]
    assert [s.visible for s in sliders] == [True] * 6 + [False] * (MAX_DIMENSION_SLOTS - 6)
    panel.describe_on_components(library, "broken", SD15, info, sliders)
    assert "⚠ VMix adapter &#x27;broken.safetensors&#x27;" in info.value
    assert [(s.label, s.visible) for s in sliders] == [(f"α {i + 1}", False) for i in range(MAX_DIMENSION_SLOTS)]


# ---------------------------------------------------------------- damaged files, hover hints


def hint_map(text):
    """The {suffix: hint} the info line carries for javascript/vmix.js."""
    import html as html_lib
    import json

    return json.loads(html_lib.unescape(carried(text)[0]))


def carried(text):
    """(hints, marks) attribute texts of the info line's hidden carrier."""
    import re

    found = re.findall(r"<span class='vmix-hints' hidden data-vmix-adapter=\"[^\"]*\" data-vmix-hints=\"([^\"]*)\" "
                       r"data-vmix-marks=\"([^\"]*)\"></span>", text)
    assert len(found) == 1 and text.endswith("</span>")
    return found[0]


def mark_map(text):
    """The {name: mark} the info line carries for the adapter list."""
    import html as html_lib
    import json

    return json.loads(html_lib.unescape(carried(text)[1]))


@pytest.fixture
def damaged(tmp_path):
    from test_webui_fakes import write_damaged_adapter

    write_adapter(tmp_path / "good.safetensors")
    key = write_damaged_adapter(tmp_path / "good.safetensors", tmp_path / "a_nan.safetensors")
    return tmp_path, key


def test_a_damaged_file_is_named_as_soon_as_it_is_selected(damaged):
    folder, key = damaged
    library = AdapterLibrary(lambda: str(folder))
    assert library.info("a_nan").family == "sd15"  # the header and metadata are fine
    text = panel.info_html(library, "a_nan", SD15)
    assert (f"⚠ damaged: VMix adapter &#x27;a_nan.safetensors&#x27; has non-finite values (NaN or inf) in tensor "
            f"&#x27;{key}&#x27;. Copy it again") in text
    assert "vmix-damaged" in text and "fits the loaded checkpoint" not in text
    assert "alpha_1" in hint_map(text)  # its metadata still names the dimensions
    assert "data-vmix-adapter=\"a_nan\"" in text and "data-vmix-adapter=\"\"" in panel.info_html(library, None, SD15)


def test_the_full_check_runs_once_per_file_version(damaged, monkeypatch):
    folder, _ = damaged
    from vmix_lib.adapter_file import load_adapter

    reads = []
    library = AdapterLibrary(lambda: str(folder), loader=lambda path, device: reads.append(os.path.basename(path))
                             or load_adapter(path, device))
    assert library.default_name() == "good"  # "a_nan" sorts first but does not load completely
    for _ in range(3):
        panel.info_html(library, "a_nan", SD15)
        panel.info_html(library, "good", SD15)
        assert library.default_name() == "good"
    assert sorted(reads) == ["a_nan.safetensors", "good.safetensors"]
    os.utime(folder / "a_nan.safetensors", ns=(1, 1))  # a new version of the file: checked again
    assert library.check("a_nan") is not None and reads.count("a_nan.safetensors") == 2


def test_files_that_fail_the_full_check_are_marked_in_the_list(damaged):
    """Issue 22: a damaged file is marked in the adapter list itself, not only on the info line once
    chosen.  The list's choices and values stay the plain names; the marks ride with the info line."""
    folder, _ = damaged
    (folder / "broken.safetensors").write_bytes(b"junk")
    from vmix_lib.adapter_file import load_adapter

    reads = []
    library = AdapterLibrary(lambda: str(folder), loader=lambda path, device: reads.append(os.path.basename(path))
                             or load_adapter(path, device))
    in_use = library.load("good")
    reads.clear()
    expected = {"a_nan": "⚠ damaged", "broken": "⚠ not usable"}
    assert (panel.DAMAGED_MARK, panel.UNUSABLE_MARK) == ("⚠ damaged", "⚠ not usable")
    for selected in ("good", "a_nan", None, "good"):  # every adapter change and 🔄 sends the marks again
        text = panel.info_html(library, selected, SD15)
        assert mark_map(text) == expected
    assert library.names() == ["a_nan", "broken", "good"]  # the dropdown's choices: plain names
    assert "⚠ damaged: VMix adapter &#x27;a_nan.safetensors&#x27; has non-finite" in panel.info_html(library, "a_nan", SD15)
    # each file was read once for its mark (the good one is in use, already checked); the adapter in
    # use stays loaded
    assert sorted(reads) == ["a_nan.safetensors", "broken.safetensors"]
    assert library.load("good") is in_use and library.loads == 1
    # copied again (a new version): checked again once, and no longer marked
    (folder / "a_nan.safetensors").write_bytes((folder / "good.safetensors").read_bytes())
    os.utime(folder / "a_nan.safetensors", ns=(1, 1))
    assert mark_map(panel.info_html(library, "good", SD15)) == {"broken": "⚠ not usable"}
    assert mark_map(panel.info_html(library, "good", SD15)) == {"broken": "⚠ not usable"}
    assert sorted(reads) == ["a_nan.safetensors", "a_nan.safetensors", "broken.safetensors"]
    # no folder, an empty folder: nothing to mark
    assert mark_map(panel.info_html(AdapterLibrary(lambda: str(folder / "none")), None, None)) == {}


def test_hints_explain_every_control(library):
    hints = hint_map(panel.info_html(library, "style <b>", SD15))
    assert set(hints) == {"enabled", "adapter", "refresh", "strength", "start", "end", "uncond", "block_weights",
                          *[f"alpha_{i + 1}" for i in range(6)]}
    assert "0 = the base model, bit for bit" in hints["strength"]
    assert "“vibrant color”" in hints["alpha_1"] and "0 = its negative “sks”" in hints["alpha_1"]
    assert "“evocative emotion”" in hints["alpha_6"]
    assert "Example: IN:1, MID:0.5, OUT:1" in hints["block_weights"] and "16 for this SD1.5 adapter" in hints["block_weights"]
    assert "unconditional pass" in hints["uncond"] and "fractions of the denoising" in hints["start"]
    assert "adapter folder" in hints["refresh"] and "No official VMix weights" in hints["adapter"]
    # a name that is not installed keeps the last adapter's sliders, and so their hints
    unknown = hint_map(panel.info_html(library, "g", SD15))
    assert not any(k.startswith("alpha_") for k in unknown) and "16 for SD1.5, 70 for SDXL" in unknown["block_weights"]


def test_every_hint_names_an_element_the_panel_creates():
    import re

    with open(os.path.join(ROOT, "vmix_lib", "webui", "ui.py"), encoding="utf-8") as f:
        source = f.read()
    ids = set(re.findall(r'elem_id\("([a-z_]+)"\)', source))
    assert 'elem_id(f"alpha_{i + 1}")' in source
    ids |= {f"alpha_{i + 1}" for i in range(MAX_DIMENSION_SLOTS)}
    from vmix_lib.dimensions import DEFAULT_DIMENSIONS

    assert set(panel.hints(DEFAULT_DIMENSIONS, "sdxl", 1.0)) <= ids


def test_typing_in_the_adapter_box_changes_nothing(library):
    line, sliders = panel.describe(library, "g", SD15)
    assert "⚠ VMix adapter &#x27;g&#x27; is not installed" in line and sliders is None  # sliders kept
    line, sliders = panel.describe(library, "style <b>", SD15)
    assert sliders == panel.slider_updates(panel.dimensions_of(library, "style <b>"))
    with pytest.raises(ValueError, match="without folders or path separators"):
        library.validate(panel.TYPING)  # the marker can never be an adapter's name
    guard = panel.settled_js("script_txt2img_vmix_adapter")
    assert '"script_txt2img_vmix_adapter"' in guard and f'"{panel.TYPING}"' in guard and "activeElement" in guard
    assert '"script_img2img_vmix_adapter"' in panel.left_js("script_img2img_vmix_adapter")


def test_messages_show_the_folder_relative_to_the_webui(tmp_path):
    from vmix_lib.webui.library import shown_folder

    webui = tmp_path / "webui"
    models = webui / "models" / "VMix"
    models.mkdir(parents=True)
    assert shown_folder(str(models), [str(tmp_path / "data"), str(webui)]) == "models/VMix"
    assert shown_folder(str(tmp_path / "elsewhere"), [str(webui)], "the folder given by --vmix-dir") == "the folder given by --vmix-dir"
    assert shown_folder(str(webui), [str(webui)]) == "the WebUI folder"
    library = AdapterLibrary(lambda: str(models), shown=lambda path: shown_folder(path, [str(webui)]))
    text = panel.info_html(library, None, None)
    assert "No VMix adapter found in <code>models/VMix</code>" in text and str(tmp_path) not in text


def test_an_unexpected_loader_error_never_breaks_the_panel(tmp_path):
    # The panel is built while the WebUI starts; an exception there stops the whole WebUI.
    write_adapter(tmp_path / "a.safetensors")
    write_adapter(tmp_path / "b.safetensors")

    def loader(path, device):
        if path.endswith("a.safetensors"):
            raise TypeError("something the WebUI patched")
        from vmix_lib.adapter_file import load_adapter

        return load_adapter(path, device)

    library = AdapterLibrary(lambda: str(tmp_path), loader=loader)
    assert library.default_name() == "b"
    text = panel.info_html(library, "a", SD15)
    assert "⚠ VMix could not check a: TypeError: something the WebUI patched" in text
