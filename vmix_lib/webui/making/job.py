"""One VMix tab job: distil an adapter from the loaded checkpoint, with progress, Interrupt and Resume.

The run is vmix_lib.train.session.train_on_model with the distill objective, exactly as on the
command line; what this adds is the WebUI side of a job:

- ``WebUIModel`` (models.py) gives the checkpoint's parts and undoes everything it touched when
  the ``opened`` block ends, whether the run finished, was interrupted or failed;
- files: the adapter goes to ``<adapter folder>/<name>.safetensors`` (never over an existing file
  unless ``overwrite``); its resume state, loss log, previews, prompts and settings to
  ``<adapter folder>/<name>-training/`` (the panel lists only the folder's own .safetensors files);
- ``JobBoard``: what the tab and ``GET /vmix/v1/make`` show (step, loss, direction size, ETA, the
  newest preview), and the interrupt flag, asked after every step (the run then saves and stops);
- every failure is one sentence on the board (and the console keeps the traceback of a real error).

Pure: the WebUI comes in through ``WebUIModel`` and ``ProgressSink`` (state.textinfo etc.).
"""
from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Dict, List, Optional, Protocol

import torch

from ...train.config import SETTINGS, TrainConfig, settings_from_mapping
from ...train.errors import TrainError
from ...train.runtime import SingleProcess
from ...train.session import ModelParts, RunFiles, StepReport, check_sizes, train_on_model
from .request import WORK_SUFFIX, MakeError, MakeRequest, check_resolution_for, default_name, train_settings

log = logging.getLogger("vmix")

STATES = ("queued", "running", "finished", "stopped", "failed")


class BusyError(MakeError):
    """Another VMix job is queued or running (HTTP 409)."""

    status_code = 409


class OpenedModel(Protocol):
    parts: ModelParts
    device: torch.device
    precision: str  # "no", "fp16", "bf16"

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...  # latents -> images [B, 3, H, W] in [-1, 1]


class WebUIModel(Protocol):
    """The checkpoint the WebUI has loaded (models.py: AUTOMATIC1111, Forge / Forge Neo)."""

    title: str  # "name [shorthash]"
    family: Optional[str]  # "sd15" / "sdxl" when usable
    vae_factor: int  # pixels per latent pixel (8)
    size_multiple: int  # picture sizes the UNet takes (64)

    def problem(self) -> Optional[str]: ...  # one sentence when VMix cannot be made from it, else None
    def facts(self) -> Dict[str, Any]: ...  # for the adapter's training metadata (hash, WebUI, what was trained on)
    def opened(self, unload_vae: bool) -> ContextManager[OpenedModel]: ...  # prepares for training; undoes it on exit


class ProgressSink(Protocol):
    """The WebUI's progress display (shared.state) and Interrupt button."""

    def begin(self, max_steps: int) -> None: ...
    def step(self, step: int, max_steps: int, text: str) -> None: ...
    def image(self, image) -> None: ...
    def interrupted(self) -> bool: ...


@dataclass
class JobStatus:
    task_id: str
    state: str = "queued"
    name: str = ""
    step: int = 0
    max_steps: int = 0
    loss: Optional[float] = None
    smoothed_loss: Optional[float] = None
    direction: Optional[float] = None  # RMS of the distillation target's η·ΣΔ in the newest step
    started: Optional[float] = None
    finished: Optional[float] = None
    eta_seconds: Optional[float] = None
    message: str = ""
    adapter: Optional[str] = None  # the adapter's name in the panel's list, once a file exists
    preview_path: Optional[str] = None
    preview_step: Optional[int] = None
    throughput: str = ""  # the run's "Throughput: ... steps/s ..." line (training steps only; GPU: peak memory)
    log: List[str] = field(default_factory=list)

    def to_json(self) -> Dict[str, Any]:
        keys = ("task_id", "state", "name", "step", "max_steps", "loss", "smoothed_loss", "direction", "eta_seconds",
                "message", "adapter", "preview_step", "throughput")
        out = {k: getattr(self, k) for k in keys}
        out["elapsed_seconds"] = None if self.started is None else round((self.finished or time.time()) - self.started, 1)
        return out

    def text(self) -> str:
        """One line for the progress bar."""
        if self.state == "queued":
            return "waiting for the current generation to finish"
        parts = [f"step {self.step}/{self.max_steps}"]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4g} (avg {self.smoothed_loss:.4g})")
        if self.direction is not None:
            parts.append(f"direction {self.direction:.3g}")
        if self.eta_seconds is not None and self.state == "running":
            parts.append(f"ETA {_duration(self.eta_seconds)}")
        return " · ".join(parts)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


class JobBoard:
    """The current (or last) job, for the tab and the API; one job at a time per WebUI."""

    def __init__(self):
        self._lock = threading.Lock()
        self.current: Optional[JobStatus] = None
        self._stop = False

    def check_free(self) -> None:
        """Raise BusyError while a job is queued or running."""
        job = self.current
        if job is not None and job.state in ("queued", "running"):
            raise BusyError(f"A VMix job is already {'running' if job.state == 'running' else 'waiting'} "
                            f"({job.name or 'unnamed'}); interrupt it or wait for it to finish.")

    def new_task(self, name: str = "", task_id: Optional[str] = None) -> JobStatus:
        with self._lock:
            self.check_free()
            self.current = JobStatus(task_id=task_id or f"task(vmix-{uuid.uuid4().hex[:12]})", name=name)
            self._stop = False
            return self.current

    def request_stop(self, task_id: Optional[str] = None) -> bool:
        """Ask the running job to stop after its current step; False when no such job runs."""
        with self._lock:
            job = self.current
            if job is None or job.state not in ("queued", "running") or (task_id and task_id != job.task_id):
                return False
            self._stop = True
            return True

    @property
    def stop_requested(self) -> bool:
        return self._stop

    def get(self, task_id: Optional[str] = None) -> Optional[JobStatus]:
        job = self.current
        if job is None or (task_id and job.task_id != task_id):
            return None
        return job


BOARD = JobBoard()


class _NullSink:
    def begin(self, max_steps: int) -> None: pass
    def step(self, step: int, max_steps: int, text: str) -> None: pass
    def image(self, image) -> None: pass
    def interrupted(self) -> bool: return False


OOM_ADVICE = ("the GPU ran out of memory; lower Batch size or Resolution, or turn on Gradient checkpointing "
              "(the resume state of the last save is kept)")


def run_job(request: MakeRequest, model: WebUIModel, folder: str, status: JobStatus, board: JobBoard = BOARD,
            sink: Optional[ProgressSink] = None, shown: Callable[[str], str] = lambda p: p,
            console: Callable[[str], None] = print, on_adapter: Optional[Callable[[], None]] = None) -> JobStatus:
    """Run ``request`` on ``model``; the adapter goes into ``folder``.  Never raises: the outcome is
    ``status.state`` ("finished", "stopped", "failed") and ``status.message`` (one sentence)."""
    sink = sink or _NullSink()
    status.state, status.started = "running", time.time()

    def say(message: str) -> None:
        status.log.append(message)
        console(f"[VMix] {message}")

    try:
        _run(request, model, folder, status, board, sink, shown, say, on_adapter)
    except (MakeError, TrainError) as e:
        status.state, status.message = "failed", str(e).rstrip(".") + "."
    except Exception as e:
        if isinstance(e, torch.cuda.OutOfMemoryError):
            status.state, status.message = "failed", f"Training stopped: {OOM_ADVICE}."
        else:
            log.exception("VMix: the training job failed")
            status.state = "failed"
            status.message = f"Training stopped by an error ({type(e).__name__}: {e}); the console has the details."
    finally:
        status.finished = time.time()
        status.eta_seconds = None
        if status.state == "failed":
            console(f"[VMix] {status.message}")
    return status


@dataclass
class Plan:
    """What a job will do, checked before anything is written or loaded."""

    name: str
    work: str  # <folder>/<name>-training
    files: RunFiles
    cfg: TrainConfig
    resume_path: Optional[str]


def plan_job(request: MakeRequest, model: WebUIModel, folder: str, shown: Callable[[str], str] = lambda p: p,
             say: Callable[[str], None] = lambda m: None) -> Plan:
    """Check ``request`` against the loaded model and the adapter folder; raises MakeError/TrainError
    with one sentence.  Writes nothing (the API answers 422 from here before a job is queued)."""
    problem = model.problem()
    if problem:
        raise MakeError(problem)
    family = model.family
    check_resolution_for(request, family, model.size_multiple)
    name = request.name or default_name(model.title)
    work = os.path.join(folder, name + WORK_SUFFIX)
    files = RunFiles(work, name, final=os.path.join(folder, name + ".safetensors"))
    config_path = os.path.join(work, f"{name}-config.json")
    resume_path = None
    if request.resume:
        resume_path = files.latest_state()
        if resume_path is None or not os.path.isfile(config_path):
            raise MakeError(f"There is no run named {name!r} to resume in {shown(folder)}; start it with Train.")
        cfg = _saved_config(config_path, request)
    else:
        existing = files.existing()
        if existing and not request.overwrite:
            raise MakeError(f"An adapter named {name!r} already exists in {shown(folder)} ({existing[0]}); tick Overwrite, "
                            f"press Resume to continue its run, or choose another name (nothing was changed).")
        cfg = _new_config(request, model.title, work, files, family)
    # The objective's own checks (phrases; a saved prompts file); the tab's prompts are written by _start_fresh.
    unwritten = not request.resume and request.prompts
    checked = TrainConfig(dict(cfg.values, prompts_file=""), cfg.dimensions) if unwritten else cfg
    _objective(checked, family, model.size_multiple, say).close()
    check_sizes(cfg, family, model.size_multiple)
    return Plan(name, work, files, cfg, resume_path)


def _run(request: MakeRequest, model: WebUIModel, folder: str, status: JobStatus, board: JobBoard, sink: ProgressSink,
         shown: Callable[[str], str], say: Callable[[str], None], on_adapter) -> None:
    plan = plan_job(request, model, folder, shown)
    name, work, files, cfg, resume_path = plan.name, plan.work, plan.files, plan.cfg, plan.resume_path
    family = model.family
    status.name = name
    status.max_steps = cfg.max_steps
    sink.begin(cfg.max_steps)
    if not request.resume:
        _start_fresh(work, files, cfg, request)
    objective = _objective(cfg, family, model.size_multiple, say)
    with model.opened(request.unload_vae) as opened:
        runtime = SingleProcess(opened.device, opened.precision)
        say(f"distilling {name} from {model.title} ({opened.device}, mixed precision {opened.precision}); "
            f"training files in {name}{WORK_SUFFIX} in {shown(folder)}")
        started = [None, None]  # (time, step) when the first step ended: the ETA leaves the setup out

        def on_step(report: StepReport) -> None:
            status.step, status.loss, status.smoothed_loss = report.step, report.loss, report.smoothed
            status.direction = float(report.extra["dir"]) if "dir" in report.extra else None
            now = time.time()
            if started[0] is None:
                started[0], started[1] = now, report.step
            elif report.step > started[1]:
                per_step = (now - started[0]) / (report.step - started[1])
                status.eta_seconds = per_step * (report.max_steps - report.step)
            sink.step(report.step, report.max_steps, status.text())

        def previews(trainer):
            from ...train.previews import preview_maker

            make = preview_maker(cfg, opened.parts, opened.decode, trainer, objective, os.path.join(work, "previews"))

            def preview(step: int) -> str:
                path = make(step)
                status.preview_path, status.preview_step = path, step
                try:
                    from PIL import Image

                    with Image.open(path) as image:
                        sink.image(image.copy())
                except OSError:
                    pass
                return path

            return preview

        def on_save(step: int, path: str) -> None:
            if os.path.dirname(os.path.abspath(path)) == os.path.abspath(folder):
                status.adapter = name
                if on_adapter is not None:
                    on_adapter()

        result = train_on_model(
            cfg, opened.parts, objective, runtime, files, resume_path=resume_path, log=say,
            make_previews=previews if cfg.preview_every else None,
            should_stop=lambda: board.stop_requested or sink.interrupted(), on_step=on_step, on_save=on_save,
            save_on_stop=True,
        )
    status.step, status.throughput = result.steps, result.throughput
    where = f"{name}.safetensors in {shown(folder)}"
    if result.stopped:
        status.state = "stopped"
        status.message = (f"Interrupted at step {result.steps} of {cfg.max_steps}: saved {where} and its resume state; "
                          f"press Resume to continue.")
    else:
        status.state = "finished"
        # The tab refreshes the lists of the page it runs in; other pages (and a page loaded later: the
        # WebUI sends the choices it had at start) show the file after their 🔄.
        status.message = (f"Finished {result.steps} steps: saved {where}; choose it in the VMix panel of txt2img or "
                          f"img2img (press 🔄 there if the list does not show it yet).")
    say(status.message)


def _objective(cfg: TrainConfig, family: str, size_multiple: int, say):
    from ...train.distill import DistillTraining

    return DistillTraining.from_config(cfg, family, size_multiple, say)


def _new_config(request: MakeRequest, title: str, work: str, files: RunFiles, family: str) -> TrainConfig:
    values = {s.name: copy.deepcopy(s.default) for s in SETTINGS}
    values.update(train_settings(request, title, work, os.path.join(work, f"{files.name}-prompts.txt")))
    return TrainConfig(values, request.dimensions())


def _start_fresh(work: str, files: RunFiles, cfg: TrainConfig, request: MakeRequest) -> None:
    """A new run: clear an earlier run's working files of this name (Overwrite), write settings and prompts.
    The finished adapter itself is replaced only when the new one is saved."""
    if os.path.isdir(work):
        for entry in os.listdir(work):
            if entry.startswith(files.name + "-") or entry == "previews":
                path = os.path.join(work, entry)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    os.makedirs(work, exist_ok=True)
    if request.prompts:
        with open(cfg.prompts_file, "w", encoding="utf-8") as f:
            f.write("\n".join(request.prompts) + "\n")
    with open(os.path.join(work, f"{files.name}-config.json"), "w", encoding="utf-8") as f:
        json.dump(dict(cfg.to_json(), vmix_tab=request.to_json()), f, indent=2)


def _saved_config(path: str, request: MakeRequest) -> TrainConfig:
    """The settings a run was started with (Resume continues it as it was; only Steps may grow)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        data.pop("vmix_tab", None)
        values, dims = settings_from_mapping(data, path, None)
    except (OSError, ValueError, TrainError) as e:
        raise MakeError(f"The saved settings {os.path.basename(path)} cannot be read ({e}); start the run anew with Overwrite.") from None
    full = {s.name: copy.deepcopy(s.default) for s in SETTINGS}
    full.update(values)
    full["max_steps"] = max(int(request.steps), 1)
    return TrainConfig(full, dims or [])
