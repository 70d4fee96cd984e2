"""Benchmark: the VMix tab's training run against ``python -m vmix_lib.train`` on the same checkpoint.

Runs the same distillation (steps, batch, resolution, x_t steps, seed, phrases, gradient
checkpointing) once through a running WebUI's ``POST /vmix/v1/make`` and once through the command
line, then compares their speed (the run's own "Throughput" line: training steps only, the first
step left out), their peak memory (the WebUI process's VmHWM from /proc, which includes the WebUI's
own models; the CLI process's max RSS; on a GPU the runs' peak allocated memory is in their
Throughput lines), their loss sequences and the adapters' tensors.  The two halves can run at
different times (a CPU without the memory for both SDXL copies at once): each writes
``OUT/webui.json`` or ``OUT/cli.json``; the report is printed when both exist.

    python -m vmix_lib.webui.making.bench webui --url http://127.0.0.1:7860 --pid 1234 \\
        --adapter-dir /path/to/webui/models/VMix --out out/tab-bench --steps 6 --resolution 64
    python -m vmix_lib.webui.making.bench cli --checkpoint /path/to/model.safetensors \\
        --tokenizer-dir /path/to/clip-tokenizer --out out/tab-bench --steps 6 --resolution 64

No WebUI import: the WebUI is reached over HTTP like any client.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Dict, List, Optional

from .request import DEFAULT_ROWS

NAME = "vmix_bench_tab"
_THROUGHPUT = re.compile(r"Throughput: ([0-9.e+-]+) steps/s")


def settings(args) -> Dict:
    return {"steps": args.steps, "batch_size": args.batch_size, "resolution": args.resolution, "xt_steps": args.xt_steps,
            "seed": args.seed, "save_every": 0, "preview_every": 0, "gradient_checkpointing": args.gradient_checkpointing}


def _losses(path: str) -> List[float]:
    with open(path, newline="", encoding="utf-8") as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


def _peak_rss_mib(pid: int) -> Optional[float]:
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _request(url: str, path: str, payload: Optional[Dict] = None) -> Dict:
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url.rstrip("/") + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=600) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        raise SystemExit(f"bench: {path} answered {e.code}: {e.read().decode(errors='replace')}") from None


def run_webui(args) -> Dict:
    body = dict(settings(args), name=NAME, overwrite=True)
    status = _request(args.url, "/vmix/v1/make", body)
    started = time.time()
    while status["state"] in ("queued", "running"):
        time.sleep(2)
        status = _request(args.url, "/vmix/v1/make")
        print(f"\r  webui: {status['state']} step {status['step']}/{status['max_steps']}", end="", flush=True)
    print()
    if status["state"] != "finished":
        raise SystemExit(f"bench: the WebUI job ended {status['state']}: {status['message']}")
    work = os.path.join(args.adapter_dir, NAME + "-training")
    match = _THROUGHPUT.search(status.get("throughput", ""))
    return {"steps_per_second": float(match.group(1)) if match else None, "throughput": status.get("throughput"),
            "wall_seconds": round(time.time() - started, 1), "peak_rss_mib": _peak_rss_mib(args.pid) if args.pid else None,
            "losses": _losses(os.path.join(work, f"{NAME}-loss.csv")),
            "adapter": os.path.join(args.adapter_dir, NAME + ".safetensors")}


def run_cli(args) -> Dict:
    out = os.path.join(os.path.abspath(args.out), "cli-run")
    command = [sys.executable, "-m", "vmix_lib.train", "--objective", "distill", "--checkpoint", args.checkpoint,
               "--output-dir", out, "--name", NAME, "--max-steps", str(args.steps), "--batch-size", str(args.batch_size),
               "--resolution", str(args.resolution), "--xt-steps", str(args.xt_steps), "--seed", str(args.seed),
               "--save-every", "0", "--preview-every", "0", "--device", args.device,
               "--gradient-checkpointing" if args.gradient_checkpointing else "--no-gradient-checkpointing",
               *[f"--phrase={r.name}={r.phrase}|{r.contrast}" for r in DEFAULT_ROWS]]
    if args.tokenizer_dir:
        command += ["--tokenizer-dir", args.tokenizer_dir]
    if os.path.isdir(out):
        import shutil

        shutil.rmtree(out)
    started = time.time()
    done = subprocess.run(["/usr/bin/time", "-v", *command] if os.path.exists("/usr/bin/time") else command,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench: the command line failed:\n{done.stderr[-2000:]}")
    text = done.stdout + done.stderr
    match = _THROUGHPUT.search(text)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    return {"steps_per_second": float(match.group(1)) if match else None,
            "throughput": next((line for line in text.splitlines() if line.startswith("Throughput")), ""),
            "wall_seconds": round(time.time() - started, 1), "peak_rss_mib": int(rss.group(1)) / 1024 if rss else None,
            "losses": _losses(os.path.join(out, f"{NAME}-loss.csv")), "adapter": os.path.join(out, NAME + ".safetensors")}


def report(out: str) -> Optional[str]:
    paths = {k: os.path.join(out, f"{k}.json") for k in ("webui", "cli")}
    if not all(os.path.isfile(p) for p in paths.values()):
        return None
    runs = {k: json.load(open(p, encoding="utf-8")) for k, p in paths.items()}
    web, cli = runs["webui"], runs["cli"]
    lines = [f"settings: {web['settings']}" + ("" if web["settings"] == cli["settings"] else f" (CLI: {cli['settings']})")]
    for key, run in runs.items():
        lines.append(f"{key:>5}: {run['throughput']}; wall {run['wall_seconds']} s; peak RSS "
                     f"{'%.0f MiB' % run['peak_rss_mib'] if run['peak_rss_mib'] else 'unknown'}")
    if web["steps_per_second"] and cli["steps_per_second"]:
        lines.append(f"WebUI s/step ÷ CLI s/step: {cli['steps_per_second'] / web['steps_per_second']:.3f}")
    diffs = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(web["losses"], cli["losses"])]
    lines.append("losses WebUI / CLI: " + ", ".join(f"{a:.6g}/{b:.6g}" for a, b in zip(web["losses"], cli["losses"]))
                 + f"; largest relative difference {max(diffs):.2e}" if diffs else "no losses")
    try:
        from safetensors.torch import load_file

        a, b = load_file(web["adapter"]), load_file(cli["adapter"])
        worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
        scale = max(float(b[k].float().abs().max()) for k in b)
        lines.append(f"adapters: {len(a)} tensors; largest |difference| {worst:.3e} (largest |value| {scale:.3e})")
    except Exception as e:  # the other half's file may be on another machine
        lines.append(f"adapters not compared ({type(e).__name__}: {e})")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vmix_lib.webui.making.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("side", choices=("webui", "cli", "report"))
    parser.add_argument("--out", required=True, help="folder for webui.json / cli.json (and the CLI run)")
    parser.add_argument("--url", help="the WebUI (webui)")
    parser.add_argument("--pid", type=int, help="the WebUI's process id, for its peak RSS (webui)")
    parser.add_argument("--adapter-dir", help="the WebUI's VMix adapter folder (webui)")
    parser.add_argument("--checkpoint", help="the same checkpoint file the WebUI has loaded (cli)")
    parser.add_argument("--tokenizer-dir", help="CLIP tokenizer files for the command line (cli)")
    parser.add_argument("--device", default="auto", help="the command line's device (cli)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--xt-steps", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.side != "report":
        missing = [flag for flag, value in (("--url", args.url), ("--adapter-dir", args.adapter_dir)) if args.side == "webui" and not value]
        missing += ["--checkpoint"] if args.side == "cli" and not args.checkpoint else []
        if missing:
            parser.error(f"{args.side} needs {', '.join(missing)}")
        result = run_webui(args) if args.side == "webui" else run_cli(args)
        result["settings"] = settings(args)
        with open(os.path.join(args.out, f"{args.side}.json"), "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
        print(f"{args.side}: {result['throughput']}")
    text = report(args.out)
    print(text if text else "run the other side (webui / cli) with the same --out for the comparison")
    return 0


if __name__ == "__main__":
    sys.exit(main())
