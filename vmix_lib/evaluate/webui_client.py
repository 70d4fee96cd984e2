"""Images from a running AUTOMATIC1111 or Forge through its HTTP API, as any client would.

Requests follow the WebUI API's JSON contract (modules/api/models.py, StableDiffusionTxt2ImgProcessingAPI):
``POST /sdapi/v1/txt2img`` with ``prompt``, ``negative_prompt``, ``seed``, ``steps``, ``cfg_scale``,
``width``, ``height``, ``sampler_name``, ``batch_size``/``n_iter`` 1, the checkpoint through
``override_settings.sd_model_checkpoint`` (kept loaded between requests), and VMix in the dict form
``alwayson_scripts.VMix.args = [{"enabled": ..., "adapter": ..., "strength": ..., "dimensions": {...}}]``.
The answer holds base64 PNGs (with their infotext) and ``info`` (JSON with ``infotexts``).

Errors: the API answers a stopped job with ``{"error", "detail", "body", "errors"}`` and the
exception's status (VMix's input errors: 422), FastAPI's own validation with 422 ``{"detail": [...]}``,
anything else with 500.  Each becomes one sentence for that request; a server that cannot be
reached stops the run with one sentence (a rerun continues where it stopped).
"""
from __future__ import annotations

import base64
import json
import socket
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from .errors import EvaluationError
from .settings import Setting

SCRIPT_NAME = "VMix"  # the script's title; the API matches it case-insensitively


class RequestFailed(Exception):
    """One request failed (HTTP error, bad answer, timeout); the message is one sentence."""


@dataclass
class GenerationParams:
    """Sampling parameters shared by every image of a run (the paper: DDIM, 25 steps, CFG 7.5, no negative prompt)."""

    steps: int = 25
    cfg: float = 7.5
    width: int = 512
    height: int = 512
    sampler: str = "DDIM"
    scheduler: str = ""  # A1111 1.9+/Forge schedule type ("Automatic", "Karras"...); empty: not sent
    negative_prompt: str = ""
    uncond: Optional[bool] = None  # VMix on the negative pass; None: the WebUI's setting

    def to_json(self) -> Dict[str, Any]:
        return dict(vars(self))


def vmix_args(setting: Setting, params: GenerationParams) -> Dict[str, Any]:
    """The VMix script's dict-form argument for one setting."""
    if setting.adapter is None:
        return {"enabled": False}
    args: Dict[str, Any] = {"enabled": True, "adapter": setting.adapter.name, "strength": setting.strength}
    if setting.alphas is not None:
        args["dimensions"] = setting.alpha_dict
    if params.uncond is not None:
        args["uncond"] = params.uncond
    return args


def txt2img_payload(prompt: str, seed: int, setting: Setting, params: GenerationParams, checkpoint: Optional[str] = None) -> Dict[str, Any]:
    payload: Dict[str, Any] = {
        "prompt": prompt,
        "negative_prompt": params.negative_prompt,
        "seed": int(seed),
        "subseed": -1,
        "subseed_strength": 0,
        "steps": int(params.steps),
        "cfg_scale": float(params.cfg),
        "width": int(params.width),
        "height": int(params.height),
        "sampler_name": params.sampler,
        "batch_size": 1,
        "n_iter": 1,
        "send_images": True,
        "save_images": False,
        "alwayson_scripts": {SCRIPT_NAME: {"args": [vmix_args(setting, params)]}},
    }
    if params.scheduler:
        payload["scheduler"] = params.scheduler
    if checkpoint:
        # Not restored afterwards: restoring reloads the previous checkpoint after every request.
        payload["override_settings"] = {"sd_model_checkpoint": checkpoint}
        payload["override_settings_restore_afterwards"] = False
    return payload


def _error_sentence(status: int, body: bytes) -> str:
    """One sentence from an API error answer, whatever its shape."""
    text = body.decode("utf-8", "replace").strip()
    detail = ""
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        raw = data.get("detail")
        if isinstance(raw, list):  # FastAPI's request validation: [{"loc": [...], "msg": ...}]
            detail = "; ".join(
                f"{'.'.join(str(p) for p in item.get('loc', [])[1:]) or 'body'}: {item.get('msg', '')}" if isinstance(item, dict) else str(item)
                for item in raw[:3]
            )
        elif raw:
            detail = str(raw)
        if not detail:
            detail = str(data.get("errors") or data.get("error") or "")
        if data.get("error") and data.get("error") not in detail and data.get("error") != "HTTPException":
            detail = f"{data['error']}: {detail}" if detail else str(data["error"])
    elif text:
        detail = text.splitlines()[0][:300]
    detail = " ".join(detail.split())
    if len(detail) > 400:
        detail = detail[:397] + "..."
    return f"HTTP {status}" + (f": {detail}" if detail else "")


class WebUIClient:
    """A small client for the endpoints the evaluation needs (stdlib only)."""

    def __init__(self, url: str, timeout: float = 600.0, auth: Optional[str] = None):
        parsed = urllib.parse.urlparse(url if "://" in url else f"http://{url}")
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise EvaluationError(f"--webui {url!r} is not an http(s) URL (example: http://127.0.0.1:7860)")
        self.url = f"{parsed.scheme}://{parsed.netloc}{parsed.path.rstrip('/')}"
        self.timeout = timeout
        self.headers = {"Content-Type": "application/json"}
        if auth:  # --api-auth user:password
            self.headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()

    def _request(self, method: str, path: str, payload: Optional[Dict] = None) -> Any:
        data = None if payload is None else json.dumps(payload).encode("utf-8")
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=self.headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                body = response.read()
        except urllib.error.HTTPError as e:
            raise RequestFailed(_error_sentence(e.code, e.read() or b"")) from None
        except (socket.timeout, TimeoutError):
            raise RequestFailed(f"no answer within {self.timeout:g} s (raise --timeout for slow machines)") from None
        except urllib.error.URLError as e:
            reason = getattr(e.reason, "strerror", None) or str(e.reason)
            raise EvaluationError(
                f"cannot reach the WebUI at {self.url} ({reason}); start it with --api (and --listen for another machine) "
                "and check the address; a rerun continues where this one stopped"
            ) from None
        except (ConnectionError, OSError) as e:
            raise EvaluationError(f"the connection to the WebUI at {self.url} failed ({e.strerror or e}); a rerun continues where this one stopped") from None
        try:
            return json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise RequestFailed(f"{path} answered with something that is not JSON ({body[:80]!r})") from None

    def get(self, path: str) -> Any:
        return self._request("GET", path)

    def post(self, path: str, payload: Dict) -> Any:
        return self._request("POST", path, payload)

    # -- checks before the run --------------------------------------------------------------
    def checkpoints(self) -> List[Dict[str, Any]]:
        try:
            models = self.get("/sdapi/v1/sd-models")
        except RequestFailed as e:
            if str(e).startswith("HTTP 404"):
                raise EvaluationError(f"{self.url} does not serve the WebUI API (/sdapi/v1/sd-models: {e}); start the WebUI with --api") from None
            raise EvaluationError(f"the WebUI at {self.url} did not list its checkpoints ({e})") from None
        if not isinstance(models, list):
            raise EvaluationError(f"{self.url}/sdapi/v1/sd-models did not answer with a list of checkpoints")
        return [m for m in models if isinstance(m, dict)]

    def resolve_checkpoint(self, name: str) -> str:
        """The WebUI's title of checkpoint ``name`` (title, model name or file name, with or without extension)."""
        models = self.checkpoints()
        wanted = name.strip().lower()
        for m in models:
            title = str(m.get("title", ""))
            names = {title.lower(), str(m.get("model_name", "")).lower(), str(m.get("filename", "")).replace("\\", "/").rsplit("/", 1)[-1].lower()}
            names |= {n.rsplit(".", 1)[0] for n in list(names) if "." in n}
            names.add(title.split(" [")[0].lower())
            if wanted in names:
                return title
        listed = ", ".join(str(m.get("title", "")) for m in models[:8]) or "none"
        raise EvaluationError(f"the WebUI at {self.url} has no checkpoint named {name!r} (it has: {listed})")

    def check_vmix(self) -> None:
        try:
            scripts = self.get("/sdapi/v1/scripts")
        except RequestFailed as e:
            raise EvaluationError(f"the WebUI at {self.url} did not list its scripts ({e})") from None
        names = [str(n).lower() for n in (scripts or {}).get("txt2img", [])] if isinstance(scripts, dict) else []
        if SCRIPT_NAME.lower() not in names:
            raise EvaluationError(
                f"the WebUI at {self.url} has no VMix script in txt2img; install the sd-webui-vmix extension there and restart it"
            )

    # -- one image ---------------------------------------------------------------------------
    def txt2img(self, payload: Dict) -> Tuple[bytes, str]:
        """(PNG bytes, infotext) of the first image of the answer; RequestFailed on any problem."""
        answer = self.post("/sdapi/v1/txt2img", payload)
        images = answer.get("images") if isinstance(answer, dict) else None
        if not images or not isinstance(images[0], str):
            raise RequestFailed("the answer holds no image")
        try:
            png = base64.b64decode(images[0].split(",", 1)[-1], validate=False)
        except (ValueError, TypeError):
            raise RequestFailed("the answer's image is not base64") from None
        infotext = ""
        try:
            info = json.loads(answer.get("info") or "{}")
            infotext = (info.get("infotexts") or [""])[0] or ""
        except (ValueError, AttributeError, TypeError):
            pass
        return png, infotext


class WebUISource:
    """ImageSource: one txt2img request per image."""

    kind = "webui"

    def __init__(self, url: str, checkpoint: Optional[str], params: GenerationParams, timeout: float = 600.0, auth: Optional[str] = None):
        self.client = WebUIClient(url, timeout, auth)
        self.params = params
        self.checkpoint_name = checkpoint
        self.checkpoint: Optional[str] = None
        self.name = f"WebUI {self.client.url}"

    def prepare(self, settings) -> None:
        """Check the server, the checkpoint and the extension before the first image."""
        if self.checkpoint_name:
            self.checkpoint = self.client.resolve_checkpoint(self.checkpoint_name)
        else:
            self.client.checkpoints()
        if any(s.adapter is not None for s in settings):
            self.client.check_vmix()

    def describe(self) -> Dict[str, Any]:
        return {"source": "webui", "url": self.client.url, "checkpoint": self.checkpoint, **self.params.to_json()}

    def generate(self, prompt: str, seed: int, setting: Setting):
        png, infotext = self.client.txt2img(txt2img_payload(prompt, seed, setting, self.params, self.checkpoint))
        note = ""
        for line in infotext.splitlines()[-1:]:
            for part in line.split(", "):
                if part.startswith("VMix: ") and "skipped" in part:
                    note = part  # VMix did not act on this image: the WebUI says why
        if setting.adapter is not None and not note and "VMix" not in infotext and infotext:
            note = "the infotext has no VMix entry: VMix did not act on this image"
        return png, {"infotext": infotext, "note": note}

    def close(self) -> None:
        pass
