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


def test_info_line_problems_are_escaped_sentences(library):
    assert "⚠ VMix adapter &#x27;broken.safetensors&#x27;" in panel.info_html(library, "broken", SD15)
    missing = panel.info_html(library, "<script>", SD15)
    assert "<script>" not in missing and "is not installed" in missing
    assert "Pick an adapter (2 in" in panel.info_html(library, None, SD15)


def test_sliders_follow_the_adapter(library):
    updates = panel.slider_updates(panel.dimensions_of(library, "style <b>"))
    assert [u["visible"] for u in updates] == [True] * 6 + [False] * 2
    assert updates[0]["label"] == "α color (vibrant color)"
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
    assert [s.label for s in sliders[:2]] == ["α color (vibrant color)", "α lighting (natural lighting)"]
    assert [s.visible for s in sliders] == [True] * 6 + [False] * (MAX_DIMENSION_SLOTS - 6)
    panel.describe_on_components(library, "broken", SD15, info, sliders)
    assert "⚠ VMix adapter &#x27;broken.safetensors&#x27;" in info.value
    assert [(s.label, s.visible) for s in sliders] == [(f"α {i + 1}", False) for i in range(MAX_DIMENSION_SLOTS)]
