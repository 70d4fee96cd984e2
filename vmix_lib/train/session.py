"""One training run on a model that a host already holds: AesEmb -> adapter -> trainer -> loop -> files.

Two hosts run it (DESIGN §9), so it lives here once:

    python -m vmix_lib.train      run.py: a checkpoint file loaded with diffusers; accelerate for 1..N processes
    the WebUI's VMix tab          vmix_lib/webui/making: the checkpoint the WebUI has loaded, its own
                                  process and device (runtime.SingleProcess, no accelerate)

A host supplies ``ModelParts`` (the UNet to hook and its forward, the text conditioning, the pooled
"[CLS]" vectors for AesEmb, ᾱ, the prediction type) and a runtime; everything else is the same code:
the adapter's start (seeded), the objective's setup, resume (fingerprint checks, the state file),
the loop with its loss log, progress bar and periodic saves, stopping after a step with the state
saved, the adapter file's metadata.

Files (``RunFiles``; ``<name>`` is the run's name, all in ``folder`` unless said):
    <name>.safetensors (or ``final``)  the adapter at the end (and when stopped early, ``save_on_stop``)
    <name>-step000500.safetensors      periodic adapters (and -lora-step000500.safetensors)
    <name>-step000500.state.pt         resume state of the newest save (optimizer, step, data position, weights)
    <name>-loss.csv, <name>-loss.png   loss per optimiser step, and its plot
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .. import __version__
from ..adapter_file import FORMAT, FORMAT_VERSION, METADATA_KEY, adapter_state, save_adapter
from ..layers import detect_family, find_cross_attention_layers
from ..mixing import VMixAdapter, build_aes_emb
from .errors import TrainError
from .logs import LossLog, plot_loss
from .loop import AdapterTrainer, UnetForward

STATE_FORMAT = "vmix-train-state"
STATE_VERSION = 2  # 2: data position of the objective, process count; 1: single process, sample count
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_STATE_RE = re.compile(r"-step(\d+)\.state\.pt$")
# texts -> (context [n, 77·k, d], added conditioning {name: [n, ...]} or None) for size×size pictures
EncodeFn = Callable[[Sequence[str]], Tuple[torch.Tensor, Optional[Dict[str, torch.Tensor]]]]


@dataclass
class ModelParts:
    """What a host gives a training run (DESIGN §9: a UNet to hook, a forward, a text conditioner, ᾱ)."""

    family: str  # "sd15" / "sdxl"
    prediction: str  # "epsilon" / "v_prediction"
    unet: nn.Module  # the module tree whose attn2 layers the hook goes on
    unet_forward: Optional[UnetForward]  # (x_t, t, context, added) -> the model's output (ε or v); None: a diffusers UNet
    encoder: Callable[[int], EncodeFn]  # picture size -> the conditioning of texts for size×size pictures
    pooled: Callable[[List[str]], torch.Tensor]  # texts -> [n, d] float32 "[CLS]" rows (AesEmb)
    alphas_cumprod: torch.Tensor  # [T] the noise schedule the model was trained with
    latent_channels: int
    vae_factor: int  # pixels per latent pixel
    base: Any = None  # checkpoint_loading.BaseModel on the command line (the data objective reads its VAE)
    conditioner: Any = None  # text.TextConditioner on the command line (the data objective encodes captions)
    facts: Dict[str, Any] = field(default_factory=dict)  # the host's entries in the adapter's training metadata


@dataclass
class RunFiles:
    folder: str
    name: str
    final: Optional[str] = None  # the finished adapter (default: folder/<name>.safetensors)

    def adapter(self, step: Optional[int] = None) -> str:
        if step is None:
            return self.final or os.path.join(self.folder, f"{self.name}.safetensors")
        return os.path.join(self.folder, f"{self.name}-step{step:06d}.safetensors")

    def lora(self, step: Optional[int] = None) -> str:
        suffix = "" if step is None else f"-step{step:06d}"
        return os.path.join(self.folder, f"{self.name}-lora{suffix}.safetensors")

    def state(self, step: int) -> str:
        return os.path.join(self.folder, f"{self.name}-step{step:06d}.state.pt")

    @property
    def loss_csv(self) -> str:
        return os.path.join(self.folder, f"{self.name}-loss.csv")

    @property
    def loss_png(self) -> str:
        return os.path.join(self.folder, f"{self.name}-loss.png")

    def latest_state(self) -> Optional[str]:
        return find_latest_state(self.folder, self.name)

    def existing(self) -> List[str]:
        """Files of an earlier run of this name (a new run refuses to overwrite them)."""
        ours = re.compile(rf"^{re.escape(self.name)}((-lora)?(-step\d+)?\.safetensors|-step\d+\.state\.pt)$")
        found = sorted(f for f in os.listdir(self.folder) if ours.match(f)) if os.path.isdir(self.folder) else []
        if self.final and os.path.isfile(self.final) and os.path.basename(self.final) not in found:
            found.insert(0, os.path.basename(self.final))
        return found


@dataclass
class RunResult:
    adapter_path: Optional[str]
    lora_path: Optional[str]
    state_path: Optional[str]
    steps: int
    losses: List[float]
    stopped: bool = False  # stopped early by the host (``should_stop``), with the state saved
    throughput: str = ""


@dataclass
class StepReport:
    """What a host's ``on_step`` hears after each optimiser step (main process)."""

    step: int
    max_steps: int
    loss: float
    smoothed: float
    lr: float
    extra: Dict[str, str]  # the objective's progress fields, e.g. {"dir": "0.21"}
    seconds: float  # since the run (or its resumption) started


def find_latest_state(output_dir: str, name: str) -> Optional[str]:
    best = None
    if os.path.isdir(output_dir):
        for f in os.listdir(output_dir):
            m = _STATE_RE.search(f)
            if f.startswith(name + "-step") and m and (best is None or int(m.group(1)) > best[0]):
                best = (int(m.group(1)), os.path.join(output_dir, f))
    return best[1] if best else None


def fingerprint(cfg, family: str, layer_names: Sequence[str], objective) -> Dict:
    """What must not change between a run and its resumption."""
    return {
        "family": family,
        "dimensions": [d.to_json() for d in cfg.dimensions],
        "layers": list(layer_names),
        "lora": [cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lora_conv_rank, cfg.lora_conv_alpha],
        "objective": objective.fingerprint(),
    }


def check_sizes(cfg, family: str, size_multiple: int) -> int:
    """The run's resolution (family default for 0); raises TrainError naming the setting and value."""
    from .config import not_a_multiple

    resolution = cfg.family_default("resolution", family)
    for label, res in (("resolution", resolution), ("preview_resolution", cfg.preview_resolution or resolution)):
        if res % size_multiple:
            raise TrainError(not_a_multiple(label, res, size_multiple, cfg.origin(label)))
    return resolution


# -- the run ---------------------------------------------------------------------------------
def train_on_model(
    cfg,
    parts: ModelParts,
    objective,
    accelerator,
    files: RunFiles,
    *,
    resume_path: Optional[str] = None,
    log: Callable[[str], None] = print,
    progress=None,
    is_main: bool = True,
    make_lora: Optional[Callable[[], Any]] = None,
    make_previews: Optional[Callable[[AdapterTrainer], Callable[[int], Optional[str]]]] = None,
    should_stop: Optional[Callable[[], bool]] = None,
    on_step: Optional[Callable[[StepReport], None]] = None,
    on_save: Optional[Callable[[int, str], None]] = None,
    save_on_stop: bool = False,
) -> RunResult:
    """Train ``cfg``'s adapter on ``parts`` with ``objective`` (made and checked by the caller).

    ``accelerator``: accelerate's Accelerator or runtime.SingleProcess.  ``make_lora()``: an
    installed LoRANetwork to train beside the adapter (command line), made right after the adapter.  ``make_previews(trainer)`` returns
    ``preview(step) -> path``.  ``should_stop()`` is asked after every step, before its preview: True ends the run there (no preview)
    with the adapter and its resume state saved (as Ctrl-C does on the command line; with
    ``save_on_stop`` the adapter goes to the final path).  ``on_step`` hears each step,
    ``on_save(step, adapter_path)`` each saved adapter.  The hook is removed on return and on error.
    """
    if progress is None:
        from tqdm import tqdm as progress
    device = accelerator.device
    processes = accelerator.num_processes
    name = cfg.name
    family = parts.family
    global_batch = cfg.batch_size * processes * cfg.grad_accum
    lr = cfg.family_default("lr", family)
    main_log = log if is_main else (lambda message: None)

    aes_emb = build_aes_emb(parts.pooled, cfg.dimensions)
    # The projection's token Linear and LoRA's down-projections start random, the same on every
    # process; the host's own random state (the WebUI's) is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        adapter = VMixAdapter.for_unet(parts.unet, aes_emb, family, cfg.dimensions).to(device)
        lora = make_lora() if make_lora is not None else None
    standard_layout = detect_family(find_cross_attention_layers(parts.unet)).family == family

    trainer = AdapterTrainer(
        parts.unet, adapter, parts.alphas_cumprod, lr=lr, weight_decay=cfg.weight_decay, prediction=parts.prediction,
        max_grad_norm=cfg.max_grad_norm, warmup_steps=cfg.warmup_steps, lr_schedule=cfg.lr_schedule,
        max_steps=cfg.max_steps, gradient_checkpointing=cfg.gradient_checkpointing, unet_forward=parts.unet_forward,
        extra_parameters=list(lora.parameters()) if lora else (), seed=cfg.seed, objective=objective,
        accelerator=accelerator,
    )
    try:
        return _train(cfg, parts, objective, accelerator, files, trainer, adapter, lora, standard_layout, resume_path,
                      main_log, progress, is_main, global_batch, lr, make_previews, should_stop, on_step, on_save,
                      save_on_stop)
    finally:
        trainer.close()
        objective.close()


def _train(cfg, parts, objective, accelerator, files, trainer, adapter, lora, standard_layout, resume_path, main_log,
           progress, is_main, global_batch, lr, make_previews, should_stop, on_step, on_save, save_on_stop) -> RunResult:
    from .objectives import RunContext

    device, processes, family = accelerator.device, accelerator.num_processes, parts.family
    ctx = RunContext(cfg, family, parts.base, parts.conditioner, accelerator, device, files.folder, progress, main_log,
                     parts.vae_factor, parts.prediction, trainer.forward, trainer.mixer, parts.latent_channels,
                     parts.alphas_cumprod, parts.encoder)
    objective.setup(ctx)
    print_ = fingerprint(cfg, family, adapter.layer_names, objective)
    if resume_path:
        state = load_state(resume_path)
        check_resume(state, print_, cfg, processes, main_log)
        adapter.load_state_dict(state["adapter"])
        if lora is not None:
            lora.load_state_dict(state["lora"])
        trainer.load_state_dict(state["trainer"])
        if state["version"] == 1:
            objective.load_state_dict({"samples_seen": state["samples_seen"], "images": state["images"]}, main_log)
        else:
            objective.load_state_dict(state["objective"], main_log)
        main_log(f"Resumed from {os.path.basename(resume_path)} at step {trainer.step}.")
    if trainer.step >= cfg.max_steps:
        raise TrainError(f"the run is already at step {trainer.step}; raise max_steps above it to train further")

    loss_log = LossLog(files.loss_csv, resume_step=trainer.step if resume_path else None) if is_main else None
    previews = make_previews(trainer) if make_previews is not None else None
    save_dtype = _DTYPES[cfg.save_precision]
    training_facts = {
        "trainer": f"sd-webui-vmix {__version__} (vmix_lib.train)",
        "base_checkpoint": os.path.basename(cfg.checkpoint),
        "family": family,
        "prediction": parts.prediction,
        **objective.facts(),
        "lr": lr,
        "lr_schedule": cfg.lr_schedule,
        "batch_size": cfg.batch_size,
        "processes": processes,
        "grad_accum": cfg.grad_accum,
        "global_batch": global_batch,
        "seed": cfg.seed,
        "lora": f"{files.name}-lora.safetensors" if lora else None,
        **parts.facts,
    }
    position = objective.state_dict()  # the objective's position after the last completed step

    def save(step: int, final: bool) -> Tuple[str, Optional[str], str]:
        """Adapter (+LoRA) and the resume state: main process only."""
        facts = dict(training_facts, steps=step)
        if step < cfg.max_steps:
            facts["max_steps"] = cfg.max_steps
        adapter_path = files.adapter(None if final else step)
        lora_path = files.lora(None if final else step) if lora is not None else None
        state_path = files.state(step)
        if not is_main:
            return adapter_path, lora_path, state_path
        if standard_layout:
            save_adapter(adapter, adapter_path, training=facts, dtype=save_dtype)
        else:
            save_custom_layout_adapter(adapter, adapter_path, facts, save_dtype)
        if lora is not None:
            lora.save(lora_path, family, files.name, {"vmix_training": json.dumps(facts)}, save_dtype)
        for path in (adapter_path, lora_path):
            if path:
                user_readable(path)
        if not os.path.isfile(state_path):
            save_state(state_path, {
                "format": STATE_FORMAT, "version": STATE_VERSION, "fingerprint": print_,
                "processes": processes, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "seed": cfg.seed,
                "adapter": {k: v.detach().cpu().clone() for k, v in adapter.state_dict().items()},
                "lora": {k: v.detach().cpu().clone() for k, v in lora.state_dict().items()} if lora else None,
                "trainer": trainer.state_dict(), "objective": position,
            })
            for f in os.listdir(files.folder):  # only the newest state is kept: they are large and for resuming only
                path = os.path.join(files.folder, f)
                if f.startswith(files.name + "-step") and _STATE_RE.search(f) and path != state_path:
                    os.remove(path)
        if on_save is not None:
            on_save(step, adapter_path)
        return adapter_path, lora_path, state_path

    losses: List[float] = []
    start_step = trainer.step
    started = time.monotonic()
    step_seconds: List[float] = []
    smoothed = None
    bar = progress(total=cfg.max_steps, initial=start_step, desc="training", unit="step", dynamic_ncols=True, disable=not is_main)
    last_saved = None
    stopped = False
    stream = objective.batches((cfg.max_steps - trainer.step) * cfg.grad_accum)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def save_early() -> Optional[Tuple[str, Optional[str], str]]:
        """Stopped before max_steps: keep the newest step's adapter and resume state (once)."""
        if trainer.step > start_step and (last_saved is None or not last_saved[2].endswith(f"-step{trainer.step:06d}.state.pt")):
            return save(trainer.step, final=False)
        return last_saved

    try:
        while trainer.step < cfg.max_steps:
            began = time.perf_counter()
            group = [next(stream) for _ in range(cfg.grad_accum)]
            loss = trainer.train_step(group)
            step_seconds.append(time.perf_counter() - began)
            position = objective.state_dict()
            losses.append(loss)
            smoothed = loss if smoothed is None else 0.95 * smoothed + 0.05 * loss
            step = trainer.step
            if is_main:
                loss_log.append(step, loss, trainer.lr_at(step - 1), time.monotonic() - started)
                extra = objective.progress()
                bar.set_postfix(loss=f"{loss:.4f}", avg=f"{smoothed:.4f}", lr=f"{trainer.lr_at(step - 1):.2e}", **extra)
                if on_step is not None:
                    on_step(StepReport(step, cfg.max_steps, loss, smoothed, trainer.lr_at(step - 1), extra,
                                       time.monotonic() - started))
            bar.update(1)
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
                last_saved = save(step, final=False)
                if is_main:
                    plot_loss(loss_log.path, files.loss_png)
            # asked before the preview: an Interrupt during a step ends the run there, without first
            # drawing a λ-sweep (minutes on a CPU)
            stop_now = should_stop is not None and step < cfg.max_steps and should_stop()
            if is_main and previews is not None and cfg.preview_every and not stop_now and (
                    step % cfg.preview_every == 0 or step == cfg.max_steps):
                previews(step)
            if stop_now:
                stopped = True
                break
    except KeyboardInterrupt:
        bar.close()
        stream.close()
        saved = save_early()
        if saved is not None and trainer.step > start_step:
            main_log(f"\nInterrupted at step {trainer.step}; saved {os.path.basename(saved[0])} and its resume state. "
                     "Continue with --resume latest.")
        raise
    bar.close()
    stream.close()
    if stopped:
        saved = save_early()
        if save_on_stop:
            adapter_path, lora_path, state_path = save(trainer.step, final=True)
        else:
            adapter_path, lora_path, state_path = saved
    else:
        adapter_path, lora_path, state_path = save(trainer.step, final=True)
    if is_main:
        plot_loss(loss_log.path, files.loss_png)
    throughput = _throughput(step_seconds, global_batch, device)
    main_log(throughput)
    accelerator.wait_for_everyone()  # every process returns after the files exist
    return RunResult(adapter_path, lora_path, state_path, trainer.step, losses, stopped, throughput)


def _throughput(step_seconds: Sequence[float], global_batch: int, device: torch.device) -> str:
    """Steps/s and images/s of the training steps (previews and saves excluded; the first step,
    which warms up, too when there are more)."""
    timed = list(step_seconds[1:] if len(step_seconds) > 1 else step_seconds)
    seconds = sum(timed)
    line = (f"Throughput: {len(timed) / seconds:.3g} steps/s, {len(timed) * global_batch / seconds:.3g} images/s "
            f"(global batch {global_batch}, {len(timed)} timed steps)") if seconds > 0 else "Throughput: no timed steps"
    if device.type == "cuda":
        line += f"; peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (this process)"
    return line


# -- files ------------------------------------------------------------------------------------
def save_custom_layout_adapter(adapter: VMixAdapter, path: str, training: Dict, dtype: torch.dtype) -> None:
    """The adapter file format for a UNet of a non-standard layout (custom model configs).

    save_adapter writes only the SD1.5/SDXL layouts the WebUI can use; a smaller test or research
    model still gets the same tensors and metadata (the extension's loader will name the mismatch).
    """
    from safetensors.torch import save_file

    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "family": adapter.family, "context_dim": adapter.context_dim,
        "tokens": adapter.tokens, "dimensions": [d.to_json() for d in adapter.dimensions],
        "train_lambda": adapter.train_lambda, "training": dict(training, custom_layout=True),
    }
    save_file(adapter_state(adapter, dtype), path + ".tmp", metadata={METADATA_KEY: json.dumps(meta)})
    os.replace(path + ".tmp", path)


def user_readable(path: str) -> None:
    """safetensors writes files as 0600; give them the user's usual permissions (umask) instead."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def save_state(path: str, state: Dict) -> None:
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_state(path: str) -> Dict:
    try:
        # torch.serialization.load, not torch.load: AUTOMATIC1111 replaces torch.load with a checker that
        # refuses files written by newer torch versions; weights_only=True is PyTorch's own safe loader.
        state = torch.serialization.load(path, map_location="cpu", weights_only=True, mmap=True)  # processes share the pages
    except Exception as e:
        raise TrainError(f"resume state {path} cannot be read ({e})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise TrainError(f"{path} is not a VMix training state file")
    if state.get("version", 0) > STATE_VERSION:
        raise TrainError(f"{path} was written by a newer trainer (state version {state['version']})")
    return state


def check_resume(state: Dict, fingerprint: Dict, cfg, processes: int, log) -> None:
    """Refuse a state of other model/adapter settings; say how the continuation differs otherwise."""
    saved = dict(state["fingerprint"])
    saved.setdefault("objective", {"objective": "data"})  # version 1 trained on data
    for key, what in (("family", "model family"), ("dimensions", "aesthetic dimensions"), ("layers", "UNet layers"),
                      ("lora", "LoRA settings (rank, alpha, targets, conv rank, conv alpha)"), ("objective", "objective")):
        if saved[key] != fingerprint[key]:
            raise TrainError(f"the resume state was trained with other {what} than this config; use the original settings or start a new run")
    if state["version"] == 1:
        log("Note: the resume state was written by an earlier version of the trainer; training continues from its weights, "
            "optimizer and step with a new draw of batches (not bit for bit).")
        return
    was = state.get("processes", 1)
    if was != processes:
        same_micro = state["batch_size"] * was == cfg.batch_size * processes
        log(f"Note: the state was saved by {was} process{'es' if was > 1 else ''}, this run has {processes}. "
            + ("The global micro-batch is the same, so the same samples and noise follow: the run continues as the original "
               "would have, up to float rounding in the gradient sums." if same_micro else
               "The global micro-batch differs, see the next note."))
    changed = [k for k, v in (("grad_accum", cfg.grad_accum),) if state.get(k) != v]
    if changed:
        log(f"Note: {', '.join(changed)} changed since the saved state: the global batch per step differs from the original run.")
