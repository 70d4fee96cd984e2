"""The composition suite's own tools, without a WebUI: the random-weight models it writes must have the
layouts the WebUIs' loaders read (tests/e2e/patcher_models.py), and its infotext reader must read the
WebUIs' infotexts (tests/e2e/test_e2e_compose.py)."""
import os
import sys
import zipfile

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "e2e"))

import patcher_models  # noqa: E402
from test_e2e_compose import control_picture, infotext_fields  # noqa: E402


@pytest.mark.parametrize("family, layers, context, tokens_width", [("sd15", 16, 768, 768), ("sdxl", 70, 2048, 2048)])
def test_ip_adapter_has_h94s_layout(family, layers, context, tokens_width):
    state = patcher_models.ip_adapter_state(family)
    numbers = sorted({int(k.split(".")[1]) for k in state if k.startswith("ip_adapter.")})
    # diffusers' processor order: the self-attentions take the even numbers, the cross-attentions the odd
    assert numbers == list(range(1, 2 * layers, 2))
    # what Forge's and sd-webui-controlnet's loaders read: SDXL iff 1.to_k_ip is 2048 wide; 4 tokens from proj
    assert state["ip_adapter.1.to_k_ip.weight"].shape[1] == context
    assert tuple(state["image_proj.proj.weight"].shape) == (4 * tokens_width, 1024)
    assert tuple(state["image_proj.norm.weight"].shape) == (tokens_width,)
    assert all(v.dtype == torch.float16 for v in state.values())
    widths = [state[f"ip_adapter.{n}.to_v_ip.weight"].shape[0] for n in numbers]
    if family == "sd15":  # down 320,320,640,640,1280,1280; up 1280x3, 640x3, 320x3; mid 1280 (last)
        assert widths == [320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320, 1280]
    else:
        assert widths.count(640) == 2 * 2 + 3 * 2 and widths.count(1280) == 70 - 10


def test_clip_h_pth_is_in_the_format_automatic1111_can_load(tmp_path, monkeypatch):
    """A1111's safe unpickler refuses torch's zip format (its .format_version entry); sd-webui-controlnet
    reads clip_h.pth through it, so the file is written in the legacy format."""
    monkeypatch.setattr(patcher_models, "clip_vision_state", lambda seed=0: {"visual_projection.weight": torch.ones(2, 2)})
    webui = tmp_path / "webui"
    (webui / "modules").mkdir(parents=True)
    (webui / "modules" / "sd_models.py").write_text("")
    target = patcher_models.destinations(str(webui), "sd15")["clip-vision"]
    assert target.endswith(os.path.join("sd-webui-controlnet", "annotator", "downloads", "clip_vision", "clip_h.pth"))
    patcher_models.write(target, patcher_models.clip_vision_state, force=False)
    assert not zipfile.is_zipfile(target)
    assert torch.equal(torch.load(target, weights_only=False)["visual_projection.weight"], torch.ones(2, 2))
    before = os.path.getmtime(target)
    patcher_models.write(target, lambda: pytest.fail("an existing file was rewritten"), force=False)
    assert os.path.getmtime(target) == before and not os.path.exists(target + ".partial")


def test_forge_folders(tmp_path):
    (tmp_path / "modules_forge").mkdir()
    where = patcher_models.destinations(str(tmp_path), "sdxl")
    assert where["clip-vision"] == os.path.join(str(tmp_path), "models", "ControlNetPreprocessor", "CLIP-ViT-H-14.safetensors")
    assert where["ip-adapter"].endswith(os.path.join("models", "ControlNet", "ip-adapter_sdxl_vit-h.safetensors"))
    with pytest.raises(SystemExit, match="is not a WebUI folder"):
        patcher_models.destinations(str(tmp_path / "elsewhere"), "sd15")


def test_random_vmix_adapter_loads_and_acts(tmp_path):
    from vmix_lib.adapter_file import load_adapter
    from vmix_lib.hook import AestheticValues

    path = str(tmp_path / "vmix_e2e_random_sd15.safetensors")
    patcher_models.write(path, lambda: patcher_models.vmix_adapter("sd15"), force=False)
    adapter = load_adapter(path)
    values = AestheticValues.for_alphas(adapter)
    assert values.f_a.abs().max() > 0.01  # a fresh adapter's projection is zero: this one adds something


def test_infotext_fields_reads_quoted_entries():
    info = ("a lighthouse\nNegative prompt: blurry\nSteps: 3, Sampler: Euler, Seed: 99, "
            'ControlNet 0: "Module: None, Model: controlnet_random_sd15 [e3b0c442], Weight: 1.0", '
            'VMix: True, VMix adapter: vmix_e2e_random_sd15 (0123456789), VMix strength: 1, Version: f2.0.1v1.10.1-1.10.1')
    fields = infotext_fields(info)
    assert fields["ControlNet 0"] == '"Module: None, Model: controlnet_random_sd15 [e3b0c442], Weight: 1.0"'
    assert fields["VMix"] == "True" and fields["VMix strength"] == "1" and fields["Seed"] == "99"
    assert fields["Version"] == "f2.0.1v1.10.1-1.10.1" and "Negative prompt" not in fields


def test_control_picture_is_not_blank():
    """Forge's ControlNet fails on an all-dark control image (every pixel < 5)."""
    picture = control_picture(64)
    assert picture.shape == (64, 64, 3) and (picture > 5).any() and (picture < 5).any()
    assert np.array_equal(picture, control_picture(64))
