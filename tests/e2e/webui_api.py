"""A running WebUI's HTTP API for the checks that need no browser (tests/e2e/test_e2e_compose.py)."""
from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request
from typing import Dict, List, Optional, Tuple

import numpy as np


class WebUIError(RuntimeError):
    pass


class WebUIApi:
    def __init__(self, url: str):
        self.url = url.rstrip("/")

    def json(self, path: str, payload: Optional[dict] = None, timeout: float = 1800):
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:
            raise WebUIError(f"{path} answered {e.code}: {e.read()[:2000].decode(errors='replace')}") from None

    def txt2img(self, payload: dict) -> Tuple[np.ndarray, str]:
        """(the first picture as an int16 array, its infotext); extensions' extra pictures (a ControlNet's
        detected map) come after the first and are ignored."""
        from PIL import Image

        result = self.json("/sdapi/v1/txt2img", payload)
        image = Image.open(io.BytesIO(base64.b64decode(result["images"][0]))).convert("RGB")
        return np.asarray(image).astype(np.int16), json.loads(result["info"])["infotexts"][0]

    def script_titles(self) -> List[str]:
        """The txt2img scripts this WebUI has, lower-case as /sdapi/v1/scripts gives them."""
        return [t.lower() for t in self.json("/sdapi/v1/scripts").get("txt2img", [])]


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
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()
