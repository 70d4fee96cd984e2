"""The real-ComfyUI checks (comfyui_checks.py) as tests.  Opt-in: skipped unless VMIX_COMFY_URL names a
running ComfyUI with this repository in custom_nodes/.  docs/comfyui.md "Checking a real ComfyUI".

    VMIX_COMFY_URL     e.g. http://127.0.0.1:8188
    VMIX_COMFY_SD15    checkpoint,adapter[,wrong-family adapter]   (file names in ComfyUI's model folders)
    VMIX_COMFY_SDXL    the same for SDXL; a family without its variable is skipped
    VMIX_COMFY_SIZE    image size (default 64 for SD1.5, 128 for SDXL); VMIX_COMFY_STEPS (default 3)
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import comfyui_checks  # noqa: E402

URL = os.environ.get("VMIX_COMFY_URL", "").rstrip("/")
pytestmark = pytest.mark.skipif(not URL, reason="real-ComfyUI checks are opt-in: set VMIX_COMFY_URL")


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_vmix_nodes_in_a_real_comfyui(family):
    names = os.environ.get(f"VMIX_COMFY_{family.upper()}", "")
    if not names:
        pytest.skip(f"set VMIX_COMFY_{family.upper()}=checkpoint,adapter[,wrong adapter]")
    checkpoint, adapter, *wrong = [n.strip() for n in names.split(",")]
    size = int(os.environ.get("VMIX_COMFY_SIZE", 64 if family == "sd15" else 128))
    report = comfyui_checks.run_checks(URL, family, checkpoint, adapter, wrong[0] if wrong else None, size,
                                       int(os.environ.get("VMIX_COMFY_STEPS", 3)))
    failed = {name: c["detail"] for name, c in report["checks"].items() if not c["ok"]}
    assert not failed
