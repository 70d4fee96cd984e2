"""A whole training run from a TrainConfig: objective -> checkpoint -> AesEmb -> adapter (+LoRA) -> loop.

The same code runs in every process of a multi-GPU / multi-node launch (runtime.py); only the main
process writes files and prints.  This file loads the checkpoint (the command line's host); the run
itself is session.train_on_model, shared with the WebUI's VMix tab.  Outputs in ``output_dir``
(``<name>`` = the config's name):
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
from typing import Callable, Dict, Tuple

import torch

from ..cpu_threads import apply_threads
from ..layers import FAMILY_TITLES, detect_family, find_cross_attention_layers
from .checkpoint_loading import BaseModel, inspect_checkpoint, load_base_model, model_configs
from .config import TrainConfig
from .errors import TrainError
from .lora import LoRANetwork
from .objectives import OBJECTIVES
from .previews import preview_maker
from .runtime import check_launch, describe, launched_processes, make_accelerator, resolve_device, resolve_precision
from .session import (ModelParts, RunFiles, RunResult, check_sizes, find_latest_state, save_custom_layout_adapter,
                      train_on_model)
from .text import TextConditioner, load_tokenizers, square_image_encoder

PAPER_BATCH, PAPER_STEPS = 256, 50_000  # VMix paper §4.1


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
    resolution = check_sizes(cfg, family, size_multiple)
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
        existing = RunFiles(output_dir, name).existing()
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
    parts = ModelParts(
        family, prediction, base.unet, None,
        lambda size: square_image_encoder(conditioner, family, size), conditioner.pooled, base.alphas_cumprod,
        base.unet.config.in_channels, vae_factor, base=base, conditioner=conditioner,
    )
    make_lora = None
    if cfg.lora_rank or cfg.lora_conv_rank:
        def make_lora():  # after the adapter, from the same seeded generator (same on every process)
            return LoRANetwork(base.unet, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lora_conv_rank,
                               cfg.lora_conv_alpha).to(device).install()
    result = train_on_model(
        cfg, parts, objective, accelerator, RunFiles(output_dir, name), resume_path=resume_path, log=log,
        progress=progress, is_main=is_main, make_lora=make_lora,
        make_previews=lambda trainer: preview_maker(cfg, parts, _vae_decoder(base), trainer, objective,
                                                    os.path.join(output_dir, "previews")),
    )
    main_log(f"Done: {result.adapter_path}" + (f" and {result.lora_path}" if result.lora_path else "")
             + f" (resume state {os.path.basename(result.state_path)}).")
    return result


def _vae_decoder(base: BaseModel):
    @torch.no_grad()
    def decode(lat):
        return base.vae.decode(lat.to(next(base.vae.parameters()).dtype) / base.scaling_factor).sample

    return decode


_save_custom_layout_adapter = save_custom_layout_adapter  # the name tests and older callers use
