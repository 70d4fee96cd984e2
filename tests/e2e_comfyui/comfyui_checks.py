"""Checks of the VMix nodes in a running ComfyUI, through its HTTP API (POST /prompt, GET /history, GET /view).

    python tests/e2e_comfyui/comfyui_checks.py --url http://127.0.0.1:8188 --family sd15 \\
        --checkpoint rig-sd15-random.safetensors --adapter rig-sd15-random.safetensors \\
        --wrong-adapter rig-sdxl-random.safetensors --size 64 --steps 3 [--bypassed-prompt FILE] [--report FILE]

It builds its prompts from examples/comfyui_vmix_<family>_api.json (checkpoint, adapter, size and
steps replaced; every output saved as an image and as a latent) and prints one line per invariant:

    off          the graph without the VMix nodes, twice: the same bytes (the baseline is deterministic)
    lambda=0     Apply VMix at strength 0 = the baseline, bit for bit
    lambda=1     Apply VMix at strength 1 differs from the baseline
    bypassed     Apply VMix bypassed = the baseline (the prompt the frontend sends for a bypassed node:
                 --bypassed-prompt, captured from the real frontend by comfyui_graph.py; else built the
                 same way here: the node left out and its MODEL input wired to its consumers)
    branches     one prompt, three branches on one checkpoint: plain, Apply VMix λ=1, Apply VMix λ=2
                 positive-only; each branch = the same settings run alone
    wrong family the other family's adapter: the prompt fails at Apply VMix with a one-sentence error

Every prompt runs from scratch (POST /free first: ComfyUI would otherwise return a repeated prompt's
cached outputs).  Bytes compared: the decoded pixels (GET /view?channel=rgb re-encodes the RGB pixels as a PNG without
metadata) and the latent tensor of SaveLatent (its safetensors data, without the metadata header).
Only the standard library; every request goes to --url.  Exit status 0 when every check passed.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import struct
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from array import array

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(HERE)), "examples")
APPLY, LOADER = "VMixApply", "VMixAdapterLoader"


class ComfyClient:
    def __init__(self, url: str, timeout: float = 1800.0):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.client_id = uuid.uuid4().hex

    def _open(self, path: str, data: bytes = None):
        request = urllib.request.Request(self.url + path, data=data,
                                         headers={"Content-Type": "application/json"} if data else {})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy
        return opener.open(request, timeout=60)

    def get_json(self, path: str):
        with self._open(path) as r:
            return json.loads(r.read())

    def get_bytes(self, path: str) -> bytes:
        with self._open(path) as r:
            return r.read()

    def fresh(self) -> None:
        """POST /free: the server drops its cache of node outputs (and unloads the models) before the
        next prompt, so every node runs again: a repeated prompt is computed anew, not read back."""
        self._open("/free", json.dumps({"free_memory": True, "unload_models": True}).encode()).close()
        time.sleep(2)  # the worker resets when it wakes on the flag; queue after that

    def run(self, prompt: dict, fresh: bool = True) -> dict:
        """Queue ``prompt`` (after ``fresh()``) and wait for its history entry (status, outputs, messages)."""
        if fresh:
            self.fresh()
        body = json.dumps({"prompt": prompt, "client_id": self.client_id}).encode()
        try:
            with self._open("/prompt", body) as r:
                prompt_id = json.loads(r.read())["prompt_id"]
        except urllib.error.HTTPError as e:  # rejected before running (validation)
            return {"status": {"status_str": "rejected", "messages": []}, "rejected": json.loads(e.read() or b"{}")}
        t0 = time.time()
        while time.time() - t0 < self.timeout:
            history = self.get_json(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                entry = history[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    entry["seconds"] = round(time.time() - t0, 1)
                    return entry
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {self.timeout:.0f} s")

    def view(self, item: dict, **extra) -> bytes:
        query = urllib.parse.urlencode({"filename": item["filename"], "subfolder": item.get("subfolder", ""),
                                        "type": item.get("type", "output"), **extra})
        return self.get_bytes(f"/view?{query}")


# ---------------------------------------------------------------- results


def latent_tensor(raw: bytes):
    """(shape, float32 array) of "latent_tensor" in a SaveLatent file (safetensors)."""
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    entry = header["latent_tensor"]
    begin, end = entry["data_offsets"]
    data = raw[8 + length + begin:8 + length + end]
    if entry["dtype"] != "F32":
        raise ValueError(f"latent dtype {entry['dtype']}")
    values = array("f")
    values.frombytes(data)
    return entry["shape"], values


class Result:
    """The outputs of one branch: pixel PNG bytes (RGB, no metadata) and latent bytes."""

    def __init__(self, pixels: bytes, latent_shape, latent):
        self.pixels, self.latent_shape, self.latent = pixels, latent_shape, latent

    def same(self, other: "Result") -> bool:
        return self.pixels == other.pixels and self.latent.tobytes() == other.latent.tobytes()

    def latent_diff(self, other: "Result") -> float:
        return max(abs(a - b) for a, b in zip(self.latent, other.latent))

    def digest(self) -> str:
        return hashlib.sha256(self.pixels + self.latent.tobytes()).hexdigest()[:12]


def results_of(client: ComfyClient, entry: dict, prompt: dict) -> dict:
    """{branch prefix: Result} from a finished prompt's outputs."""
    found = {}
    for node_id, out in entry.get("outputs", {}).items():
        node = prompt[node_id]
        prefix = node["inputs"].get("filename_prefix", node_id).split("/")[-1]
        kind = "latent" if node["class_type"] == "SaveLatent" else "image"
        items = out.get("latents" if kind == "latent" else "images", [])
        if items:
            found.setdefault(prefix.rsplit("_", 1)[0], {})[kind] = items[0]
    results = {}
    for branch, items in found.items():
        shape, latent = latent_tensor(client.view(items["latent"]))
        results[branch] = Result(client.view(items["image"], channel="rgb"), shape, latent)
    return results


def error_of(entry: dict):
    for kind, message in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return message
    return None


# ---------------------------------------------------------------- prompts


def node_of(prompt: dict, class_type: str) -> str:
    return next(k for k, v in prompt.items() if v["class_type"] == class_type)


def base_prompt(family: str, checkpoint: str, adapter: str, size: int, steps: int, seed: int) -> dict:
    with open(os.path.join(EXAMPLES, f"comfyui_vmix_{family}_api.json"), encoding="utf-8") as f:
        prompt = json.load(f)
    prompt[node_of(prompt, "CheckpointLoaderSimple")]["inputs"]["ckpt_name"] = checkpoint
    prompt[node_of(prompt, LOADER)]["inputs"]["adapter_name"] = adapter
    latent = prompt[node_of(prompt, "EmptyLatentImage")]["inputs"]
    latent["width"] = latent["height"] = size
    sampler = prompt[node_of(prompt, "KSampler")]["inputs"]
    sampler["steps"], sampler["seed"] = steps, seed
    return with_latent_outputs(prompt)


def with_latent_outputs(prompt: dict) -> dict:
    """Every SaveImage gets a SaveLatent beside it on the same KSampler, and a prefix per branch."""
    prompt = copy.deepcopy(prompt)
    for node_id in [k for k, v in prompt.items() if v["class_type"] == "SaveImage"]:
        decode = prompt[prompt[node_id]["inputs"]["images"][0]]
        branch = prompt[node_id]["inputs"]["filename_prefix"].split("/")[-1].split("_")[0] or "vmix"
        prompt[node_id]["inputs"]["filename_prefix"] = f"e2e/{branch}_image"
        prompt[f"{node_id}L"] = {"class_type": "SaveLatent",
                                 "inputs": {"samples": decode["inputs"]["samples"], "filename_prefix": f"e2e/{branch}_latent"}}
    return prompt


def without_vmix(prompt: dict) -> dict:
    """What the frontend sends when Apply VMix is bypassed: the node left out, its MODEL input wired to
    its consumers (the unused loader stays; ComfyUI runs only what an output needs)."""
    prompt = copy.deepcopy(prompt)
    for apply_id in [k for k, v in prompt.items() if v["class_type"] == APPLY]:
        source = prompt[apply_id]["inputs"]["model"]
        del prompt[apply_id]
        for node in prompt.values():
            for name, value in node["inputs"].items():
                if isinstance(value, list) and value[:1] == [apply_id]:
                    node["inputs"][name] = list(source)
    return prompt


def off_prompt(prompt: dict) -> dict:
    prompt = without_vmix(prompt)
    return {k: v for k, v in prompt.items() if v["class_type"] != LOADER}


def set_apply(prompt: dict, **inputs) -> dict:
    prompt = copy.deepcopy(prompt)
    prompt[node_of(prompt, APPLY)]["inputs"].update(inputs)
    return prompt


def branches_prompt(prompt: dict) -> dict:
    """Three branches from one checkpoint: "plain" (no VMix), "one" (λ=1) and "two" (λ=2, positive only)."""
    out = {}
    apply_id, sampler_id = node_of(prompt, APPLY), node_of(prompt, "KSampler")
    chain = [sampler_id, node_of(prompt, "VAEDecode"), node_of(prompt, "SaveImage")]
    shared = {k: v for k, v in prompt.items() if k not in chain + [apply_id, f"{chain[2]}L"]}
    out.update(copy.deepcopy(shared))
    ckpt = node_of(prompt, "CheckpointLoaderSimple")
    for branch, model_source, apply_inputs in (("plain", [ckpt, 0], None), ("one", ["A1", 0], {"strength": 1.0}),
                                               ("two", ["A2", 0], {"strength": 2.0, "apply_to_uncond": False})):
        if apply_inputs is not None:
            node = copy.deepcopy(prompt[apply_id])
            node["inputs"].update(apply_inputs)
            out[model_source[0]] = node
        rename = {old: f"{branch}{i}" for i, old in enumerate(chain)}
        for old in chain:
            node = copy.deepcopy(prompt[old])
            for name, value in node["inputs"].items():
                if isinstance(value, list) and value[:1] and value[0] in rename:
                    node["inputs"][name] = [rename[value[0]], value[1]]
            if old == sampler_id:
                node["inputs"]["model"] = list(model_source)
            if node["class_type"] == "SaveImage":
                node["inputs"]["filename_prefix"] = f"e2e/{branch}_image"
            out[rename[old]] = node
        out[f"{branch}L"] = {"class_type": "SaveLatent",
                             "inputs": {"samples": [rename[sampler_id], 0], "filename_prefix": f"e2e/{branch}_latent"}}
    return out


# ---------------------------------------------------------------- the checks


def one_sentence(message: str) -> bool:
    text = message.strip()
    return bool(text) and text.endswith(".") and "\n" not in text and ". " not in text[:-1]


def run_checks(url: str, family: str, checkpoint: str, adapter: str, wrong_adapter: str = None, size: int = 64,
               steps: int = 3, seed: int = 1234, bypassed_prompt: dict = None, log=print) -> dict:
    client = ComfyClient(url)
    prompt = base_prompt(family, checkpoint, adapter, size, steps, seed)
    report = {"family": family, "checkpoint": checkpoint, "adapter": adapter, "size": size, "steps": steps,
              "checks": {}, "runs": {}}
    checks = report["checks"]

    def single(name: str, p: dict) -> Result:
        entry = client.run(p)
        report["runs"][name] = {"status": entry["status"].get("status_str"), "seconds": entry.get("seconds")}
        if entry["status"].get("status_str") != "success":
            raise RuntimeError(f"{name}: {entry['status'].get('status_str')}: {error_of(entry) or entry.get('rejected')}")
        (result,) = results_of(client, entry, p).values()
        report["runs"][name]["digest"] = result.digest()
        return result

    def check(name: str, ok: bool, detail: str):
        checks[name] = {"ok": bool(ok), "detail": detail}
        log(f"[{'PASS' if ok else 'FAIL'}] {family} {name}: {detail}")

    off = single("off", off_prompt(prompt))
    again = single("off again", off_prompt(prompt))
    check("off", off.same(again), f"two runs without VMix give the same bytes ({off.digest()})")
    zero = single("lambda=0", set_apply(prompt, strength=0.0))
    check("lambda=0", zero.same(off), f"Apply VMix at strength 0 = baseline bytes ({zero.digest()} vs {off.digest()})")
    one = single("lambda=1", set_apply(prompt, strength=1.0))
    check("lambda=1", one.pixels != off.pixels and one.latent_diff(off) > 0,
          f"strength 1 differs from the baseline in pixels and latent (latent max |diff| {one.latent_diff(off):.4g}; "
          f"{one.digest()})")
    if bypassed_prompt is not None:
        bypassed, how = bypassed_prompt, "the prompt the frontend built with the node bypassed"
        if not any(v.get("class_type") == "SaveLatent" for v in bypassed.values()):
            bypassed = with_latent_outputs(bypassed)
    else:
        bypassed, how = without_vmix(set_apply(prompt, strength=1.0)), "the node left out as the frontend does"
    bypass = single("bypassed", bypassed)
    check("bypassed", bypass.same(off), f"Apply VMix bypassed = baseline bytes ({how}; {bypass.digest()})")

    two_alone = single("lambda=2 positive only", set_apply(prompt, strength=2.0, apply_to_uncond=False))
    branches = branches_prompt(prompt)
    entry = client.run(branches)
    report["runs"]["branches"] = {"status": entry["status"].get("status_str"), "seconds": entry.get("seconds")}
    got = results_of(client, entry, branches) if entry["status"].get("status_str") == "success" else {}
    ok = (set(got) == {"plain", "one", "two"} and got["plain"].same(off) and got["one"].same(one)
          and got["two"].same(two_alone) and not got["two"].same(one))
    check("branches", ok, "one prompt with three branches on one checkpoint: plain = baseline, Apply VMix λ=1 = its "
                          "run alone, Apply VMix λ=2 positive-only = its run alone" if ok else
          f"status {entry['status'].get('status_str')}, branches {sorted(got)}, error {error_of(entry)}")

    if wrong_adapter:
        wrong = set_apply(prompt, strength=1.0)
        wrong[node_of(wrong, LOADER)]["inputs"]["adapter_name"] = wrong_adapter
        entry = client.run(wrong)
        error = error_of(entry) or {}
        message = (error.get("exception_message") or "").strip()
        ok = entry["status"].get("status_str") == "error" and error.get("node_type") == APPLY and one_sentence(message)
        report["runs"]["wrong family"] = {"status": entry["status"].get("status_str"), "node_type": error.get("node_type"),
                                          "exception_message": message}
        check("wrong family", ok, f"{error.get('node_type')} failed with: {message}")
    report["passed"] = all(c["ok"] for c in checks.values())
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=os.environ.get("VMIX_COMFY_URL", "http://127.0.0.1:8188"))
    parser.add_argument("--family", choices=["sd15", "sdxl"], required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--wrong-adapter")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--bypassed-prompt", help="API prompt the frontend built with Apply VMix bypassed (JSON)")
    parser.add_argument("--report", help="write the results as JSON here")
    args = parser.parse_args(argv)
    bypassed = None
    if args.bypassed_prompt:
        with open(args.bypassed_prompt, encoding="utf-8") as f:
            bypassed = json.load(f)
    stats = ComfyClient(args.url).get_json("/system_stats")
    print(f"ComfyUI {stats.get('system', {}).get('comfyui_version')} at {args.url}, "
          f"python {stats.get('system', {}).get('python_version', '').split()[0]}, "
          f"torch {stats.get('system', {}).get('pytorch_version')}, devices {[d.get('type') for d in stats.get('devices', [])]}")
    report = run_checks(args.url, args.family, args.checkpoint, args.adapter, args.wrong_adapter, args.size,
                        args.steps, args.seed, bypassed)
    report["comfyui"] = stats.get("system", {})
    if args.report:
        with open(args.report, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    print("all checks passed" if report["passed"] else "SOME CHECKS FAILED")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
