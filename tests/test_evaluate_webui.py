"""The evaluation's WebUI client against a local server that follows the WebUI API's JSON contract.

The server runs in a thread (stdlib http.server on 127.0.0.1, a free port).  It accepts exactly the
fields of A1111 1.10.1's ``StableDiffusionTxt2ImgProcessingAPI`` that a client may send, parses the
VMix argument with the extension's own parser (vmix_lib.webui.arguments), and answers as
modules/api/api.py does: 200 with base64 PNGs and ``info``; an input error of VMix as 422
``{"error": "VMixError", "detail": ...}``; FastAPI's validation as 422 ``{"detail": [...]}``; any
other exception as 500 ``{"error", "detail": "", "body": "", "errors"}``.
"""
import base64
import io
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from vmix_lib.evaluate.cli import main
from vmix_lib.evaluate.errors import EvaluationError
from vmix_lib.evaluate.prompts import Prompt
from vmix_lib.evaluate.run import Options, evaluate
from vmix_lib.evaluate.settings import AdapterRef, Setting, build_settings
from vmix_lib.evaluate.webui_client import GenerationParams, WebUIClient, WebUISource, txt2img_payload
from vmix_lib.scoring.tiny import write_random_predictor, write_tiny_clip

# Fields of the txt2img request model a client may send (A1111 1.10.1 modules/api/models.py builds
# it from StableDiffusionProcessingTxt2Img's arguments plus these API-only ones; Forge the same).
API_FIELDS = {
    "prompt": str, "negative_prompt": str, "styles": list, "seed": int, "subseed": int, "subseed_strength": (int, float),
    "seed_resize_from_h": int, "seed_resize_from_w": int, "sampler_name": str, "scheduler": str, "batch_size": int,
    "n_iter": int, "steps": int, "cfg_scale": (int, float), "width": int, "height": int, "restore_faces": bool,
    "tiling": bool, "do_not_save_samples": bool, "do_not_save_grid": bool, "eta": (int, float),
    "denoising_strength": (int, float), "override_settings": dict, "override_settings_restore_afterwards": bool,
    "refiner_checkpoint": str, "refiner_switch_at": (int, float), "disable_extra_networks": bool,
    "enable_hr": bool, "hr_scale": (int, float), "hr_upscaler": str, "sampler_index": str, "script_name": str,
    "script_args": list, "send_images": bool, "save_images": bool, "alwayson_scripts": dict, "infotext": str,
    "force_task_id": str,
}
CHECKPOINTS = [
    {"title": "v1-5-pruned-emaonly.safetensors [6ce0161689]", "model_name": "v1-5-pruned-emaonly", "hash": "6ce01616",
     "sha256": "6ce0161689", "filename": "/webui/models/Stable-diffusion/v1-5-pruned-emaonly.safetensors", "config": None},
    {"title": "sdxl/base.safetensors [31e35c80fc]", "model_name": "sdxl_base", "hash": "31e35c80",
     "sha256": "31e35c80fc", "filename": "/webui/models/Stable-diffusion/sdxl/base.safetensors", "config": None},
]
INSTALLED = ("my_adapter",)


class FakeWebUI(BaseHTTPRequestHandler):
    requests = []  # (path, payload) of every request, for the tests
    scripts = ["x/y/z plot", "vmix"]

    def log_message(self, *args):
        pass

    def _send(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        type(self).requests.append((self.path, None))
        if self.path == "/sdapi/v1/sd-models":
            return self._send(200, CHECKPOINTS)
        if self.path == "/sdapi/v1/scripts":
            return self._send(200, {"txt2img": self.scripts, "img2img": self.scripts})
        return self._send(404, {"detail": "Not Found"})

    def do_POST(self):
        length = int(self.headers.get("Content-Length", 0))
        payload = json.loads(self.rfile.read(length))
        type(self).requests.append((self.path, payload))
        if self.path != "/sdapi/v1/txt2img":
            return self._send(404, {"detail": "Not Found"})
        problems = [
            {"loc": ["body", k], "msg": "extra fields not permitted" if k not in API_FIELDS else f"value is not a valid {API_FIELDS[k]}", "type": "type_error"}
            for k, v in payload.items() if k not in API_FIELDS or not isinstance(v, API_FIELDS[k]) or isinstance(v, bool) != (API_FIELDS[k] is bool)
        ]
        if problems:
            return self._send(422, {"detail": problems})
        if "boom" in payload["prompt"]:  # an exception inside the WebUI
            return self._send(500, {"error": "RuntimeError", "detail": "", "body": "", "errors": "CUDA out of memory (fake)"})
        from vmix_lib.webui.arguments import VMixArgumentError, parse_script_args

        scripts = {k.lower(): v for k, v in payload.get("alwayson_scripts", {}).items()}
        settings = None
        if "vmix" in scripts:
            try:
                settings = parse_script_args(scripts["vmix"]["args"])
                if settings.enabled and settings.adapter not in INSTALLED:
                    raise VMixArgumentError(f"VMix adapter {settings.adapter!r} is not installed in /webui/models/VMix; installed adapters: my_adapter.")
            except VMixArgumentError as e:
                return self._send(422, {"error": "VMixError", "detail": str(e), "body": "", "errors": str(e)})
        checkpoint = payload.get("override_settings", {}).get("sd_model_checkpoint", CHECKPOINTS[0]["title"])
        on = settings is not None and settings.enabled
        strength = settings.strength if on else 0.0
        shade = int(40 * strength) + (payload["seed"] * 7) % 50
        buffer = io.BytesIO()
        Image.new("RGB", (payload["width"] // 8, payload["height"] // 8), (100 + shade, 80, 200 - shade)).save(buffer, "PNG")
        infotext = f"{payload['prompt']}\nSteps: {payload['steps']}, Sampler: {payload['sampler_name']}, Seed: {payload['seed']}, Model: {checkpoint}"
        if on:
            infotext += f", VMix: True, VMix adapter: {settings.adapter} (0123456789), VMix strength: {strength:g}"
        return self._send(200, {"images": [base64.b64encode(buffer.getvalue()).decode()], "parameters": payload,
                                "info": json.dumps({"infotexts": [infotext], "seed": payload["seed"]})})


@pytest.fixture()
def server():
    FakeWebUI.requests = []
    FakeWebUI.scripts = ["x/y/z plot", "vmix"]
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeWebUI)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def scorers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scorers")
    return str(write_tiny_clip(str(folder / "clip"))), write_random_predictor(str(folder / "aes.pth"))


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_payload_is_the_api_contract_with_vmix_in_dict_form():
    ref = AdapterRef("my_adapter", None, ("color", "lighting"))
    params = GenerationParams(steps=20, cfg=7.0, width=512, height=768, sampler="DDIM", scheduler="Karras")
    payload = txt2img_payload("a cat", 42, Setting("dims=color λ=1.5", ref, 1.5, (("color", 1.0), ("lighting", 0.0)), "dimensions"), params, "model [abc]")
    assert payload["alwayson_scripts"] == {"VMix": {"args": [{"enabled": True, "adapter": "my_adapter", "strength": 1.5,
                                                              "dimensions": {"color": 1.0, "lighting": 0.0}}]}}
    assert payload["override_settings"] == {"sd_model_checkpoint": "model [abc]"}
    assert payload["override_settings_restore_afterwards"] is False  # no checkpoint reload after every image
    assert (payload["seed"], payload["steps"], payload["cfg_scale"], payload["width"], payload["height"]) == (42, 20, 7.0, 512, 768)
    assert payload["sampler_name"] == "DDIM" and payload["scheduler"] == "Karras" and payload["negative_prompt"] == ""
    assert set(payload) <= set(API_FIELDS)
    off = txt2img_payload("a cat", 42, Setting("off"), GenerationParams())
    assert off["alwayson_scripts"]["VMix"]["args"] == [{"enabled": False}] and "scheduler" not in off and "override_settings" not in off
    # the extension's own parser reads exactly what the client sends
    from vmix_lib.webui.arguments import parse_script_args

    parsed = parse_script_args(payload["alwayson_scripts"]["VMix"]["args"])
    assert parsed.enabled and parsed.adapter == "my_adapter" and parsed.strength == 1.5
    assert parsed.alphas == {"color": 1.0, "lighting": 0.0}
    assert not parse_script_args(off["alwayson_scripts"]["VMix"]["args"]).enabled


def test_checkpoint_by_name_and_errors(server):
    client = WebUIClient(server)
    assert client.resolve_checkpoint("v1-5-pruned-emaonly") == CHECKPOINTS[0]["title"]
    assert client.resolve_checkpoint("base.safetensors") == CHECKPOINTS[1]["title"]
    assert client.resolve_checkpoint(CHECKPOINTS[1]["title"]) == CHECKPOINTS[1]["title"]
    with pytest.raises(EvaluationError, match="has no checkpoint named 'nope'.*v1-5-pruned-emaonly"):
        client.resolve_checkpoint("nope")
    client.check_vmix()
    FakeWebUI.scripts = ["x/y/z plot"]
    with pytest.raises(EvaluationError, match="has no VMix script in txt2img; install the sd-webui-vmix extension"):
        client.check_vmix()


def test_unreachable_server_is_one_sentence(tmp_path, capsys, scorers):
    url = f"http://127.0.0.1:{_free_port()}"
    code = main(["--webui", url, "--adapter", "my_adapter", "--clip", scorers[0], "--out", str(tmp_path / "o"), "--limit", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err == [f"VMix evaluation: cannot reach the WebUI at {url} (Connection refused); start it with --api (and --listen for "
                   "another machine) and check the address; a rerun continues where this one stopped."]
    assert main(["--webui", "ftp://x", "--out", str(tmp_path / "o")]) == 1
    assert "is not an http(s) URL" in capsys.readouterr().err


def test_a_run_stopped_by_an_error_leaves_no_folder_it_made(tmp_path, capsys, scorers):
    """The server is found missing after the output folder was made: the folders this run made go
    (new/deeper/eval), and nothing that was there before is removed (a file, an empty folder)."""
    url = f"http://127.0.0.1:{_free_port()}"
    args = ["--webui", url, "--clip", scorers[0], "--limit", "1"]
    assert main(args + ["--out", str(tmp_path / "new" / "deeper" / "eval")]) == 1
    assert "cannot reach the WebUI" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
    existing = tmp_path / "eval"
    (existing / "empty").mkdir(parents=True)
    (existing / "notes.txt").write_text("mine")
    assert main(args + ["--out", str(existing)]) == 1
    assert sorted(os.listdir(existing)) == ["empty", "notes.txt"] and os.listdir(existing / "empty") == []


def test_run_through_the_api_422_and_500_are_reported_per_request_and_the_run_goes_on(server, tmp_path, scorers, capsys):
    clip, aes = scorers
    prompts = [Prompt("a", "a cat on a roof"), Prompt("b", "boom: a dog"), Prompt("c", "a red car")]
    refs = [AdapterRef("my_adapter", None, ("color", "lighting")), AdapterRef("missing_adapter", None, ("color", "lighting"))]
    settings = build_settings(refs, [0.0, 1.0], ["color"])
    source = WebUISource(server, "v1-5-pruned-emaonly", GenerationParams(steps=4, width=64, height=64))
    opts = Options(out_dir=str(tmp_path / "eval"), prompts=prompts, settings=settings, sources=[source], clip=clip, aesthetic=aes,
                   resamples=200)
    results = evaluate(opts, log=lambda m: None)
    txt2img = [p for path, p in FakeWebUI.requests if path == "/sdapi/v1/txt2img"]
    # off + 2 adapters × (λ 0, λ 1, dims=color) = 7 settings, 3 prompts; dims=color λ=1 is its own render
    assert len(txt2img) == 7 * 3
    assert {p["override_settings"]["sd_model_checkpoint"] for p in txt2img} == {CHECKPOINTS[0]["title"]}
    # same seed per prompt across settings, different seeds for different prompts
    seeds = {}
    for p in txt2img:
        seeds.setdefault(p["prompt"], set()).add(p["seed"])
    assert all(len(s) == 1 for s in seeds.values()) and len({next(iter(s)) for s in seeds.values()}) == 3
    failures = results["failures"]
    by_kind = {}
    for f in failures:
        by_kind.setdefault("boom" if f["prompt_id"] == "b" else "missing", []).append(f)
    assert len(by_kind["boom"]) == 7 and all(f["error"] == "HTTP 500: RuntimeError: CUDA out of memory (fake)" for f in by_kind["boom"])
    assert len(by_kind["missing"]) == 2 * 3  # the missing adapter's 3 settings × the 2 good prompts
    assert all(f["error"] == "HTTP 422: VMixError: VMix adapter 'missing_adapter' is not installed in /webui/models/VMix; "
               "installed adapters: my_adapter." for f in by_kind["missing"])
    summary = {s["setting"]: s for s in results["settings"]}
    assert summary["my_adapter λ=1"]["images"] == 2 and summary["my_adapter λ=1"]["failed"] == 1
    assert summary["missing_adapter λ=1"]["images"] == 0
    assert results["lambda0_equals_off"][0]["identical"] == 2  # λ=0 gives the off image (the fake does)
    # the PNG is stored as the WebUI sent it, with the infotext in images.jsonl
    lines = [json.loads(l) for l in open(tmp_path / "eval" / "images.jsonl", encoding="utf-8")]
    vmix_line = next(l for l in lines if l["setting"] == "my_adapter λ=1")
    assert "VMix strength: 1" in vmix_line["infotext"] and vmix_line["source"] == "webui"
    report = (tmp_path / "eval" / "report.html").read_text(encoding="utf-8")
    assert "HTTP 422: VMixError" in report and "HTTP 500" in report

    # A rerun makes only what is missing: the failed requests, nothing else.
    FakeWebUI.requests = []
    again = evaluate(opts, log=lambda m: None)
    retried = [p for path, p in FakeWebUI.requests if path == "/sdapi/v1/txt2img"]
    assert len(retried) == len(failures) and again["generation"]["made"] == 0
    assert again["generation"]["existing"] == 21 - len(failures)


def test_fastapi_validation_422_is_one_sentence(server):
    from vmix_lib.evaluate.webui_client import RequestFailed

    client = WebUIClient(server)
    with pytest.raises(RequestFailed) as info:
        client.txt2img({"prompt": "x", "steps": "many", "width": 64, "height": 64, "seed": 1})
    assert str(info.value) == "HTTP 422: steps: value is not a valid <class 'int'>"


def test_error_answers_of_both_webuis_become_one_sentence():
    from vmix_lib.evaluate.webui_client import _error_sentence

    a1111 = {"error": "VMixError", "detail": "VMix adapter 'x' is not installed in /m; installed adapters: a.", "body": "", "errors": "..."}
    forge = {"detail": "VMix adapter 'x' is not installed in /m; installed adapters: a."}  # Forge: FastAPI's own HTTPException answer
    pydantic2 = {"detail": [{"type": "int_parsing", "loc": ["body", "steps"], "msg": "Input should be a valid integer", "input": "many"}]}
    crash = {"error": "RuntimeError", "detail": "", "body": "", "errors": "boom"}
    assert _error_sentence(422, json.dumps(a1111).encode()) == "HTTP 422: VMixError: VMix adapter 'x' is not installed in /m; installed adapters: a."
    assert _error_sentence(422, json.dumps(forge).encode()) == "HTTP 422: VMix adapter 'x' is not installed in /m; installed adapters: a."
    assert _error_sentence(422, json.dumps(pydantic2).encode()) == "HTTP 422: steps: Input should be a valid integer"
    assert _error_sentence(500, json.dumps(crash).encode()) == "HTTP 500: RuntimeError: boom"
    assert _error_sentence(502, b"<html>\nBad gateway</html>") == "HTTP 502: <html>"
    assert _error_sentence(500, b"") == "HTTP 500"
