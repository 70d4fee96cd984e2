"""VMix composed with the attention patchers users stack, in a running WebUI, over its HTTP API (opt-in:
skipped unless VMIX_E2E_URL is set; no browser needed).  docs/compatibility.md has the results.

    VMIX_E2E_URL        the WebUI (started with --api), VMix installed
    VMIX_E2E_ADAPTER    a VMix adapter of the loaded model's family, as the panel lists it (default:
                        vmix_e2e_random_<family>, the random-weight one patcher_models.py writes)
    VMIX_E2E_FAMILY     sd15 (default) or sdxl: the loaded checkpoint, and the patcher models to ask for
    VMIX_E2E_PATCHERS   comma-separated names from PATCHERS below (default: every one this WebUI has)
    VMIX_E2E_OUT        folder for report.txt and results.md (default: a new temporary folder)

The models the patchers need are random-weight files in the real layouts: tests/e2e/patcher_models.py
writes them into the WebUI's folders (before the WebUI starts: ControlNet lists its models at start).
For each patcher P, on two prompts and seeds: P alone differs from the plain picture (P acted);
P + VMix off and P + VMix λ = 0 equal P alone bit for bit; P + VMix λ = 1 differs from P alone, twice
the same, and the infotext names both; the plain picture after equals the plain picture before.  Then
P + hires fix, the same.  A combination VMix cannot join must say so in its infotext ("VMix note: did
not act on ..."): a λ = 1 picture equal to P alone without that note fails as a silent no-op.
"""
from __future__ import annotations

import base64
import io
import os
import tempfile
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import pytest
from PIL import Image

from vmix_lib.evaluate.webui_client import WebUIClient  # the evaluation's stdlib client: one-sentence errors

URL = os.environ.get("VMIX_E2E_URL", "").rstrip("/")
FAMILY = os.environ.get("VMIX_E2E_FAMILY", "sd15")
ADAPTER = os.environ.get("VMIX_E2E_ADAPTER") or f"vmix_e2e_random_{FAMILY}"
SIZE = 64
CASES = [  # two prompts and seeds: no verdict rests on one lucky picture
    {"prompt": "a lighthouse on a rocky coast at dusk", "seed": 99},
    {"prompt": "a bowl of fruit on a wooden table, still life", "seed": 7},
]
BASE = {"steps": 3, "width": SIZE, "height": SIZE, "sampler_name": "Euler", "cfg_scale": 5, "batch_size": 1, "n_iter": 1}
# hr_cfg: Forge's and Neo's API default is 1 (no negative prompt in the second pass), unlike their UI's
HIRES = {"enable_hr": True, "hr_scale": 2, "hr_upscaler": "Latent", "denoising_strength": 0.6, "hr_second_pass_steps": 2,
         "hr_cfg": BASE["cfg_scale"]}


def infotext_fields(infotext: str) -> Dict[str, str]:
    """The "key: value" pairs of an infotext's last line (values with commas come quoted)."""
    last = infotext.strip().split("\n")[-1]
    fields, token, quoted = {}, "", False
    for ch in last + ",":
        if ch == '"':
            quoted = not quoted
            token += ch
        elif ch == "," and not quoted:
            if ":" in token:
                k, v = token.split(":", 1)
                fields[k.strip()] = v.strip()
            token = ""
        else:
            token += ch
    return fields


def png_base64(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def txt2img(client: WebUIClient, payload: dict) -> Tuple[np.ndarray, str]:
    """(the first picture as an int16 array, its infotext); extensions' extra pictures (a ControlNet's
    detected map) come after the first and are ignored."""
    png, infotext = client.txt2img(payload)
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16), infotext


def control_picture(size: int) -> np.ndarray:
    """A white disc and bar on black: a control map any ControlNet takes (module none) and a
    reference picture for IP-Adapter."""
    y, x = np.mgrid[:size, :size]
    picture = np.zeros((size, size, 3), np.uint8)
    picture[(x - size * 0.4) ** 2 + (y - size * 0.45) ** 2 < (size * 0.25) ** 2] = 255
    picture[int(size * 0.75):int(size * 0.85), int(size * 0.2):int(size * 0.8)] = 200
    return picture


@dataclass
class Host:
    api: WebUIClient
    kind: str  # "a1111", "forge" or "neo"
    version: str  # the infotext's Version
    titles: List[str]
    controlnet_models: List[str]

    def controlnet_model(self, what: str) -> Optional[str]:
        """The listed ControlNet/IP-Adapter model whose name holds ``what`` and the family."""
        for name in self.controlnet_models:
            low = name.lower()
            if what in low and FAMILY in low:
                return name
        return None


@dataclass
class Patcher:
    name: str
    titles: Dict[str, str]  # host kind -> its title in /sdapi/v1/scripts (lower-case): where it exists
    args: Callable[[Host], object]  # its alwayson_scripts entry
    infotext: Dict[str, str]  # host kind -> the infotext key (prefix) it writes when it ran
    needs: Optional[str] = None  # a model /controlnet/model_list must list ("controlnet", "ip-adapter")
    prompt: Callable[[str], str] = lambda prompt: prompt  # the prompt it needs (Regional Prompter: regions)
    size: int = SIZE  # the picture's width and height


def controlnet_unit(module: str, model: str, picture: np.ndarray) -> dict:
    return {"enabled": True, "module": module, "model": model, "weight": 1.0, "image": png_base64(picture),
            "resize_mode": "Crop and Resize", "processor_res": SIZE, "guidance_start": 0.0, "guidance_end": 1.0,
            "control_mode": "Balanced", "pixel_perfect": False, "save_detected_map": False}


def _controlnet(host: Host):
    module = "none" if host.kind == "a1111" else "None"
    return {"args": [controlnet_unit(module, host.controlnet_model("controlnet"), control_picture(SIZE))]}


def _ip_adapter(host: Host):
    if host.kind == "a1111":
        module = "ip-adapter_clip_sd15" if FAMILY == "sd15" else "ip-adapter_clip_sdxl_plus_vith"
    else:
        module = "CLIP-ViT-H (IPAdapter)"
    return {"args": [controlnet_unit(module, host.controlnet_model("ip-adapter"), control_picture(224))]}


def _freeu(host: Host):
    if host.kind == "forge":  # FreeU Integrated: enabled, b1, b2, s1, s2, start, end (its SD1.5 preset)
        return {"args": [True, 1.5, 1.6, 0.9, 0.2, 0.0, 1.0]}
    # sd-webui-freeu takes a dict; version 2 is its default
    return {"args": [{"enable": True, "start_ratio": 0.0, "stop_ratio": 1.0, "transition_smoothness": 0.0, "version": "2",
                      "stage_infos": [{"backbone_factor": 1.5, "skip_factor": 0.9}, {"backbone_factor": 1.6, "skip_factor": 0.2}, {}]}]}


def _regional_prompter(host: Host):
    # its ui() order: active, debug, mode, matrix submode, mask submode, prompt submode, ratios, base ratios,
    # use base, use common, use neg common, calc mode, options, lnter, lnur, threshold, polymask, lstop, lstop_hr, flip
    return {"args": [True, False, "Matrix", "Columns", "Mask", "Prompt", "1,1", "0.2", False, False, False, "Attention",
                     False, "0", "0", "0", "", "0", "0", False]}


CONTROLNET = {"a1111": "controlnet", "forge": "controlnet", "neo": "controlnet"}
UNIT = {"a1111": "ControlNet 0", "forge": "ControlNet 0", "neo": "ControlNet 0"}
PATCHERS = [
    Patcher("ControlNet", CONTROLNET, _controlnet, UNIT, needs="controlnet"),
    Patcher("IP-Adapter", CONTROLNET, _ip_adapter, UNIT, needs="ip-adapter"),
    # FreeU (version 2, Forge's only one) scales by (h - min) / (max - min) over each picture: at 64 px
    # the deepest stage is 1x1, max = min, and the picture comes out black (NaN); 128 px has 2x2
    Patcher("FreeU", {"a1111": "freeu", "forge": "freeu integrated (sd 1.x, sd 2.x, sdxl)"}, _freeu,
            {"a1111": "FreeU Stages", "forge": "freeu_enabled"}, size=128),
    Patcher("PAG", {"forge": "perturbedattentionguidance integrated"},
            lambda h: {"args": [True, 3.0, 0.0, 0.0, 1.0]}, {"forge": "pagi_enabled"}),
    Patcher("Dynamic Thresholding", {"forge": "dynamicthresholding (cfg-fix) integrated"},
            lambda h: {"args": [True, 7.0, 1.0, "Constant", 0.0, "Constant", 0.0, 1.0, "enable", "MEAN", "AD", 1.0]},
            {"forge": "dynthres_enabled"}),
    Patcher("Kohya HRFix", {"forge": "kohya hrfix integrated"},
            lambda h: {"args": [True, 3, 2.0, 0.0, 0.35, True, "bicubic", "bicubic"]}, {"forge": "kohya_hrfix_enabled"}),
    Patcher("Regional Prompter", {"a1111": "regional prompter"}, _regional_prompter, {"a1111": "RP Active"},
            prompt=lambda prompt: f"{prompt} BREAK {prompt}, at night"),
]
ONLY = [p.strip() for p in os.environ.get("VMIX_E2E_PATCHERS", "").split(",") if p.strip()]


@pytest.fixture(scope="module")
def host():
    api = WebUIClient(URL, timeout=1800)
    _, info = txt2img(api, dict(BASE, **CASES[0]))
    version = infotext_fields(info).get("Version", "")
    kind = "neo" if version.startswith("neo") else "forge" if version.startswith("f") else "a1111"
    titles = [t.lower() for t in api.get("/sdapi/v1/scripts").get("txt2img", [])]
    models = api.get("/controlnet/model_list").get("model_list", []) if "controlnet" in titles else []
    return Host(api, kind, version, titles, models)


class Report:
    """report.txt (every picture's infotext keys and the differences) and results.md (a table row per
    check), written as the checks go: a run of an hour leaves what it saw even when stopped."""

    def __init__(self, folder: str):
        self.folder = folder
        for name in ("report.txt", "results.md"):
            open(os.path.join(folder, name), "w", encoding="utf-8").close()

    def line(self, text: str) -> None:
        with open(os.path.join(self.folder, "report.txt"), "a", encoding="utf-8") as f:
            f.write(text + "\n")

    def row(self, text: str) -> None:
        with open(os.path.join(self.folder, "results.md"), "a", encoding="utf-8") as f:
            f.write(text + "\n")


@pytest.fixture(scope="module")
def report():
    folder = os.environ.get("VMIX_E2E_OUT") or tempfile.mkdtemp(prefix="vmix-e2e-compose-")
    os.makedirs(folder, exist_ok=True)
    print(f"\nreport: {folder}")
    return Report(folder)


def vmix(strength: Optional[float]) -> dict:
    return {"VMix": {"args": [None if strength is None else {"adapter": ADAPTER, "strength": strength}]}}


@pytest.mark.parametrize("patcher", [p for p in PATCHERS if not ONLY or p.name in ONLY], ids=lambda p: p.name)
@pytest.mark.parametrize("hires", [False, True], ids=["", "hires"])
def test_composes(host, report, patcher, hires):
    title = patcher.titles.get(host.kind)
    if title is None or title not in host.titles:
        pytest.skip(f"{patcher.name} is not in this WebUI ({host.kind} {host.version}: no script {title!r})")
    key = patcher.infotext[host.kind]
    if patcher.needs and not host.controlnet_model(patcher.needs):
        pytest.skip(f"no {patcher.needs} model for {FAMILY} in /controlnet/model_list: run tests/e2e/patcher_models.py")
    label = f"{patcher.name}{' + hires fix' if hires else ''}"
    report.line(f"== {label} ({host.kind} {host.version}, {FAMILY})")
    try:
        verdict = _check(host, report, patcher, hires, title, key)
    except Exception as e:  # the table says what failed, then the test fails with it
        report.row(f"| {host.kind} {host.version} | {FAMILY} | {label} | **fails**: {str(e).splitlines()[0][:300]} |")
        raise
    report.row(f"| {host.kind} {host.version} | {FAMILY} | {label} | {verdict} |")


def _check(host: Host, report: Report, patcher: Patcher, hires: bool, title: str, key: str) -> str:
    other = {title: patcher.args(host)}
    outcomes = []
    for case in CASES:
        job = dict(BASE, **case, **(HIRES if hires else {}), width=patcher.size, height=patcher.size)
        job["prompt"] = patcher.prompt(case["prompt"])
        if hires and host.kind != "a1111":
            job["hr_additional_modules"] = ["Use same choices"]  # Forge's API default (None) fails the hires pass

        def run(label, scripts):
            pixels, info = txt2img(host.api, dict(job, alwayson_scripts=scripts))
            report.line(f"  [{case['seed']}] {label}: {', '.join(k for k in infotext_fields(info) if k.startswith(('VMix', key)))}")
            return pixels, info

        plain_before, _ = run("plain", {})
        alone, alone_info = run(patcher.name, other)
        off, _ = run(f"{patcher.name} + VMix off", dict(other, **vmix(None)))
        zero, _ = run(f"{patcher.name} + VMix λ=0", dict(other, **vmix(0.0)))
        one, one_info = run(f"{patcher.name} + VMix λ=1", dict(other, **vmix(1.0)))
        again, _ = run(f"{patcher.name} + VMix λ=1 again", dict(other, **vmix(1.0)))
        plain_after, _ = run("plain after", {})
        fields = infotext_fields(one_info)
        note = fields.get("VMix note", "")
        delta = float(np.abs(one - alone).mean())
        report.line(f"  [{case['seed']}] mean |Δ| λ=1 vs {patcher.name} alone {delta:.3f}; "
                     f"{patcher.name} vs plain {float(np.abs(alone - plain_before).mean()):.3f}; note {note!r}")
        assert any(k.startswith(key) for k in infotext_fields(alone_info)), \
            f"{patcher.name} left no '{key}' entry in the infotext: it did not run"
        assert not np.array_equal(alone, plain_before), f"{patcher.name} did not change the picture: it did not act"
        assert alone.std() > 1, f"{patcher.name} alone gave a blank picture: nothing can be compared with it"
        assert np.array_equal(off, alone), f"{patcher.name} + VMix off differs from {patcher.name} alone"
        assert np.array_equal(zero, alone), f"{patcher.name} + VMix λ=0 differs from {patcher.name} alone"
        assert np.array_equal(one, again), f"{patcher.name} + VMix λ=1 is not deterministic"
        assert np.array_equal(plain_after, plain_before), "the plain picture after differs from the one before"
        assert any(k.startswith(key) for k in fields), f"λ=1's infotext lost the {patcher.name} entry"
        assert fields.get("VMix") == "True", f"λ=1's infotext says VMix {fields.get('VMix')!r}, not True"
        if note:
            assert note.startswith("did not act"), note
            outcomes.append(f"does not compose: {note}")
        else:
            assert not np.array_equal(one, alone), \
                f"{patcher.name} + VMix λ=1 equals {patcher.name} alone and VMix said nothing: a silent no-op"
            outcomes.append(f"{delta:.3f}")
    composes = [o for o in outcomes if not o.startswith("does not")]
    verdict = "; ".join(o for o in outcomes if o.startswith("does not"))
    if composes:
        verdict = f"composes: off = λ 0 = {patcher.name} alone, bit for bit; λ = 1 mean |Δ| {', '.join(composes)}" + \
            (f"; {verdict}" if verdict else "")
    return verdict
