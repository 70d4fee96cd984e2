"""A whole training run from a TrainConfig: objective -> checkpoint -> AesEmb -> adapter (+LoRA) -> loop.

The same code runs in every process of a multi-GPU / multi-node launch (runtime.py); only the main
process writes files and prints.  Outputs in ``output_dir`` (``<name>`` = the config's name):
    <name>.safetensors                 the VMix adapter (copy to the WebUI's models/VMix)
    <name>-lora.safetensors            the LoRA, when lora_rank/lora_conv_rank > 0 (models/Lora)
    <name>-step000500.safetensors      periodic adapters (and -lora-step000500.safetensors)
    <name>-step000500.state.pt         resume state of the newest save (optimizer, step, data position, weights)
    <name>-config.json                 the resolved settings
    <name>-loss.csv, <name>-loss.png   loss per optimiser step, and its plot
    previews/<name>-step000500.png     λ-sweep grids
    cache/                             cached latents, shared by runs in the folder (safe to delete)
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .. import __version__
from ..adapter_file import FORMAT, FORMAT_VERSION, METADATA_KEY, adapter_state, save_adapter
from ..cpu_threads import apply_threads
from ..layers import FAMILY_TITLES, detect_family, find_cross_attention_layers
from ..mixing import VMixAdapter, build_aes_emb
from .checkpoint_loading import BaseModel, inspect_checkpoint, load_base_model, model_configs
from .config import TrainConfig, not_a_multiple
from .errors import TrainError
from .logs import LossLog, plot_loss
from .loop import AdapterTrainer, diffusers_unet_forward
from .lora import LoRANetwork
from .objectives import OBJECTIVES, RunContext
from .previews import lambda_sweep
from .runtime import check_launch, describe, launched_processes, make_accelerator, resolve_device, resolve_precision
from .text import TextConditioner, load_tokenizers, square_image_encoder

STATE_FORMAT = "vmix-train-state"
STATE_VERSION = 2  # 2: data position of the objective, process count; 1: single process, sample count
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_STATE_RE = re.compile(r"-step(\d+)\.state\.pt$")
PAPER_BATCH, PAPER_STEPS = 256, 50_000  # VMix paper §4.1


@dataclass
class RunResult:
    adapter_path: Optional[str]
    lora_path: Optional[str]
    state_path: Optional[str]
    steps: int
    losses: List[float]


def find_latest_state(output_dir: str, name: str) -> Optional[str]:
    best = None
    if os.path.isdir(output_dir):
        for f in os.listdir(output_dir):
            m = _STATE_RE.search(f)
            if f.startswith(name + "-step") and m and (best is None or int(m.group(1)) > best[0]):
                best = (int(m.group(1)), os.path.join(output_dir, f))
    return best[1] if best else None


def _fingerprint(cfg: TrainConfig, family: str, layer_names: Sequence[str], objective) -> Dict:
    """What must not change between a run and its resumption."""
    return {
        "family": family,
        "dimensions": [d.to_json() for d in cfg.dimensions],
        "layers": list(layer_names),
        "lora": [cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lora_conv_rank, cfg.lora_conv_alpha],
        "objective": objective.fingerprint(),
    }


def _size_multiple(configs: Dict) -> Tuple[int, int]:
    """(pixels per latent pixel, pixel multiple a training size must be) from the model configs."""
    vae = 2 ** (len(configs["vae"]["block_out_channels"]) - 1)
    unet = 2 ** (len(configs["unet"]["block_out_channels"]) - 1)
    return vae, vae * unet


def _log_default(message: str) -> None:
    print(message, flush=True)


# -- the run -------------------------------------------------------------------------------
def run_training(cfg: TrainConfig, dry_run: bool = False, log: Callable[[str], None] = _log_default, progress=None) -> RunResult:
    if progress is None:
        from tqdm import tqdm as progress
    check_launch()
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.mixed_precision, device)
    accelerator = None
    if dry_run:
        is_main = os.environ.get("RANK", "0") == "0"
    else:
        accelerator = make_accelerator(device, precision, cfg.ddp_timeout)
        is_main = accelerator.is_main_process
    main_log = log if is_main else (lambda message: None)

    info = inspect_checkpoint(cfg.checkpoint, cfg.family, custom_configs=bool(cfg.model_config_dir))
    family = info.family
    prediction = info.prediction if cfg.prediction == "auto" else cfg.prediction
    vae_factor, size_multiple = _size_multiple(model_configs(family, cfg.model_config_dir or None))
    resolution = cfg.family_default("resolution", family)
    for label, res in (("resolution", resolution), ("preview_resolution", cfg.preview_resolution or resolution)):
        if res % size_multiple:
            raise TrainError(not_a_multiple(label, res, size_multiple, cfg.origin(label)))
    objective = OBJECTIVES[cfg.objective](cfg, family, size_multiple, main_log)
    lr = cfg.family_default("lr", family)
    output_dir = os.path.abspath(cfg.output_dir)
    name = cfg.name

    resume_path = None
    if cfg.resume:
        resume_path = find_latest_state(output_dir, name) if cfg.resume == "latest" else os.path.abspath(cfg.resume)
        if resume_path is None:
            raise TrainError(f"resume = 'latest', but {output_dir} holds no {name}-step*.state.pt file")
        if not os.path.isfile(resume_path):
            raise TrainError(f"resume state {resume_path} does not exist")
    else:
        ours = re.compile(rf"^{re.escape(name)}((-lora)?(-step\d+)?\.safetensors|-step\d+\.state\.pt)$")
        existing = sorted(f for f in os.listdir(output_dir) if ours.match(f)) if os.path.isdir(output_dir) else []
        if existing:
            raise TrainError(
                f"{output_dir} already holds a run named {name!r} ({existing[0]}); continue it with --resume latest, "
                "or choose another --name or --output-dir (nothing was overwritten)"
            )

    processes = accelerator.num_processes if accelerator else launched_processes()
    global_batch = cfg.batch_size * processes * cfg.grad_accum
    main_log(f"VMix trainer: {FAMILY_TITLES[family]} checkpoint {os.path.basename(cfg.checkpoint)} ({prediction}), "
             f"objective {objective.name}")
    for line in objective.summary():
        main_log(line)
    main_log(
        f"  global batch {global_batch} = {cfg.batch_size} per process x {processes} process{'es' if processes > 1 else ''} "
        f"x {cfg.grad_accum} accumulation; {cfg.max_steps} steps = {global_batch * cfg.max_steps:,} samples "
        f"(the paper: {PAPER_BATCH} x {PAPER_STEPS:,} = {PAPER_BATCH * PAPER_STEPS:,})"
    )
    main_log(
        f"  lr {lr:g} ({cfg.lr_schedule}, warm-up {cfg.warmup_steps}), LoRA rank {cfg.lora_rank} ({cfg.lora_targets}), "
        f"conv rank {cfg.lora_conv_rank}; outputs in {output_dir}"
    )
    if dry_run:
        load_tokenizers(family, cfg.tokenizer_dir or None)
        main_log("Dry run: the config, dataset, checkpoint header, model configs and tokenizers are usable.")
        objective.close()
        return RunResult(None, None, None, 0, [])

    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    device = accelerator.device
    main_log(f"  runtime: {describe(accelerator)}, mixed precision {precision}")
    accelerator.wait_for_everyone()  # every process has checked the output folder before anything is written
    if is_main:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, f"{name}-config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg.to_json(), f, indent=2)

    main_log(f"Loading {os.path.basename(cfg.checkpoint)} ({device}, weights {str(weight_dtype).replace('torch.', '')}) ...")
    base = load_base_model(
        cfg.checkpoint, family, cfg.model_config_dir or None, cfg.vae or None, cfg.tokenizer_dir or None,
        dtype=weight_dtype, vae_dtype=torch.float32,
    )
    threads = apply_threads(getattr(cfg, "threads", 0), sum(p.numel() for p in base.unet.parameters()), "UNet", device.type)
    if threads:
        main_log(f"  {threads}")
    layers = find_cross_attention_layers(base.unet)
    report = detect_family(layers)
    if report.family != family:
        if not base.custom_configs:
            raise TrainError(f"the UNet of {os.path.basename(cfg.checkpoint)} is {report.description}, not a standard {FAMILY_TITLES[family]} UNet")
        main_log(f"Note: custom model configs give {report.description}; the WebUI loads adapters of the standard layouts only.")

    for module in [base.unet, *base.text_encoders]:
        module.to(device)
    base.vae.to(device)
    conditioner = TextConditioner(family, base.tokenizers, base.text_encoders)
    aes_emb = build_aes_emb(conditioner.pooled, cfg.dimensions)
    torch.manual_seed(cfg.seed)  # the projection's token Linear and LoRA's down-projections start random (same on every process)
    adapter = VMixAdapter.for_unet(base.unet, aes_emb, family, cfg.dimensions).to(device)
    lora = None
    if cfg.lora_rank or cfg.lora_conv_rank:
        lora = LoRANetwork(base.unet, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lora_conv_rank, cfg.lora_conv_alpha).to(device)
        lora.install()

    trainer = AdapterTrainer(
        base.unet, adapter, base.alphas_cumprod, lr=lr, weight_decay=cfg.weight_decay, prediction=prediction,
        max_grad_norm=cfg.max_grad_norm, warmup_steps=cfg.warmup_steps, lr_schedule=cfg.lr_schedule,
        max_steps=cfg.max_steps, gradient_checkpointing=cfg.gradient_checkpointing,
        extra_parameters=list(lora.parameters()) if lora else (), seed=cfg.seed, objective=objective,
        accelerator=accelerator,
    )
    ctx = RunContext(cfg, family, base, conditioner, accelerator, device, output_dir, progress, main_log, vae_factor,
                     prediction, trainer.forward, trainer.mixer)
    objective.setup(ctx)
    fingerprint = _fingerprint(cfg, family, adapter.layer_names, objective)
    if resume_path:
        state = _load_state(resume_path)
        _check_resume(state, fingerprint, cfg, processes, main_log)
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
        trainer.close()
        objective.close()
        raise TrainError(f"the run is already at step {trainer.step}; raise max_steps above it to train further")

    loss_log = LossLog(os.path.join(output_dir, f"{name}-loss.csv"), resume_step=trainer.step if resume_path else None) if is_main else None
    loss_png = os.path.join(output_dir, f"{name}-loss.png")
    previews = _preview_maker(cfg, base, conditioner, trainer, objective, resolution, prediction, output_dir)
    save_dtype = _DTYPES[cfg.save_precision]
    training_facts = {
        "trainer": f"sd-webui-vmix {__version__} (vmix_lib.train)",
        "base_checkpoint": os.path.basename(cfg.checkpoint),
        "family": family,
        "prediction": prediction,
        **objective.facts(),
        "lr": lr,
        "lr_schedule": cfg.lr_schedule,
        "batch_size": cfg.batch_size,
        "processes": processes,
        "grad_accum": cfg.grad_accum,
        "global_batch": global_batch,
        "seed": cfg.seed,
        "lora": f"{name}-lora.safetensors" if lora else None,
    }
    position = objective.state_dict()  # the objective's position after the last completed step

    def save(step: int, final: bool) -> Tuple[str, Optional[str], str]:
        """Adapter (+LoRA) and the resume state: main process only."""
        suffix = "" if final else f"-step{step:06d}"
        facts = dict(training_facts, steps=step)
        adapter_path = os.path.join(output_dir, f"{name}{suffix}.safetensors")
        lora_path = os.path.join(output_dir, f"{name}-lora{suffix}.safetensors") if lora is not None else None
        state_path = os.path.join(output_dir, f"{name}-step{step:06d}.state.pt")
        if not is_main:
            return adapter_path, lora_path, state_path
        if report.family == family:
            save_adapter(adapter, adapter_path, training=facts, dtype=save_dtype)
        else:
            _save_custom_layout_adapter(adapter, adapter_path, facts, save_dtype)
        if lora is not None:
            lora.save(lora_path, family, name, {"vmix_training": json.dumps(facts)}, save_dtype)
        for path in (adapter_path, lora_path):
            if path:
                _user_readable(path)
        if not os.path.isfile(state_path):
            _save_state(state_path, {
                "format": STATE_FORMAT, "version": STATE_VERSION, "fingerprint": fingerprint,
                "processes": processes, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "seed": cfg.seed,
                "adapter": {k: v.detach().cpu().clone() for k, v in adapter.state_dict().items()},
                "lora": {k: v.detach().cpu().clone() for k, v in lora.state_dict().items()} if lora else None,
                "trainer": trainer.state_dict(), "objective": position,
            })
            for f in os.listdir(output_dir):  # only the newest state is kept: they are large and for resuming only
                path = os.path.join(output_dir, f)
                if f.startswith(name + "-step") and _STATE_RE.search(f) and path != state_path:
                    os.remove(path)
        return adapter_path, lora_path, state_path

    losses: List[float] = []
    start_step = trainer.step
    started = time.monotonic()
    step_seconds: List[float] = []
    smoothed = None
    bar = progress(total=cfg.max_steps, initial=start_step, desc="training", unit="step", dynamic_ncols=True, disable=not is_main)
    last_saved = None
    stream = objective.batches((cfg.max_steps - trainer.step) * cfg.grad_accum)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
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
                bar.set_postfix(loss=f"{loss:.4f}", avg=f"{smoothed:.4f}", lr=f"{trainer.lr_at(step - 1):.2e}", **objective.progress())
            bar.update(1)
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
                last_saved = save(step, final=False)
                if is_main:
                    plot_loss(loss_log.path, loss_png)
            if is_main and cfg.preview_every and (step % cfg.preview_every == 0 or step == cfg.max_steps):
                previews(step)
    except KeyboardInterrupt:
        bar.close()
        stream.close()
        if trainer.step > start_step and (last_saved is None or not last_saved[2].endswith(f"-step{trainer.step:06d}.state.pt")):
            saved = save(trainer.step, final=False)
            main_log(f"\nInterrupted at step {trainer.step}; saved {os.path.basename(saved[0])} and its resume state. "
                     "Continue with --resume latest.")
        trainer.close()
        objective.close()
        raise
    bar.close()
    stream.close()
    adapter_path, lora_path, state_path = save(trainer.step, final=True)
    if is_main:
        plot_loss(loss_log.path, loss_png)
    main_log(_throughput(step_seconds, global_batch, device))
    accelerator.wait_for_everyone()  # every process returns after the files exist
    trainer.close()
    objective.close()
    main_log(f"Done: {adapter_path}" + (f" and {lora_path}" if lora_path else "") + f" (resume state {os.path.basename(state_path)}).")
    return RunResult(adapter_path, lora_path, state_path, trainer.step, losses)


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


def _preview_maker(cfg, base: BaseModel, conditioner, trainer, objective, resolution, prediction, output_dir):
    res = cfg.preview_resolution or resolution
    prompts = list(cfg.preview_prompts) or objective.preview_prompts() or ["a photograph"]
    factor = 2 ** (len(base.vae.config.block_out_channels) - 1)
    shape = (base.unet.config.in_channels, res // factor, res // factor)
    forward = diffusers_unet_forward(base.unet)
    folder = os.path.join(output_dir, "previews")

    encode = square_image_encoder(conditioner, base.family, res)

    @torch.no_grad()
    def decode(lat):
        return base.vae.decode(lat.to(next(base.vae.parameters()).dtype) / base.scaling_factor).sample

    # Rows: every prompt with all dimensions superior; then the first prompt with each dimension alone.
    dims = [d.name for d in cfg.dimensions]
    rows = list(prompts) + ([prompts[0]] * len(dims) if cfg.preview_dimensions else [])
    labels = torch.ones(len(rows), len(dims))
    if cfg.preview_dimensions:
        labels[len(prompts):] = torch.eye(len(dims))
    row_labels = [p + "\nall dimensions" for p in prompts] + ([f"{prompts[0]}\nonly {d}" for d in dims] if cfg.preview_dimensions else [])

    def make(step: int) -> str:
        os.makedirs(folder, exist_ok=True)
        grid = lambda_sweep(
            trainer.mixer, forward, encode, decode, rows, cfg.preview_lambdas, shape, base.alphas_cumprod,
            cfg.preview_steps, cfg.preview_cfg, prediction, cfg.preview_seed, autocast=trainer.autocast,
            title=f"step {step}: one column per lambda; each row: its prompt and the dimensions labelled superior",
            labels=labels, row_labels=row_labels,
        )
        path = os.path.join(folder, f"{cfg.name}-step{step:06d}.png")
        grid.save(path)
        return path

    return make


def _save_custom_layout_adapter(adapter: VMixAdapter, path: str, training: Dict, dtype: torch.dtype) -> None:
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


def _user_readable(path: str) -> None:
    """safetensors writes files as 0600; give them the user's usual permissions (umask) instead."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def _save_state(path: str, state: Dict) -> None:
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_state(path: str) -> Dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # processes share the pages
    except Exception as e:
        raise TrainError(f"resume state {path} cannot be read ({e})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise TrainError(f"{path} is not a VMix training state file")
    if state.get("version", 0) > STATE_VERSION:
        raise TrainError(f"{path} was written by a newer trainer (state version {state['version']})")
    return state


def _check_resume(state: Dict, fingerprint: Dict, cfg: TrainConfig, processes: int, log) -> None:
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
