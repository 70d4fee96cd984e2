"""A whole training run from a TrainConfig: dataset -> checkpoint -> AesEmb -> adapter (+LoRA) -> loop.

Outputs in ``output_dir`` (``<name>`` = the config's name):
    <name>.safetensors                 the VMix adapter (copy to the WebUI's models/VMix)
    <name>-lora.safetensors            the LoRA, when lora_rank/lora_conv_rank > 0 (models/Lora)
    <name>-step000500.safetensors      periodic adapters (and -lora-step000500.safetensors)
    <name>-step000500.state.pt         resume state of the newest save (optimizer, step, RNG, fp32 weights)
    <name>-config.json                 the resolved settings
    <name>-loss.csv, <name>-loss.png   loss per optimiser step, and its plot
    previews/<name>-step000500.png     λ-sweep grids
    cache/                             cached latents, shared by runs in the folder (safe to delete)
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .. import __version__
from ..adapter_file import FORMAT, FORMAT_VERSION, METADATA_KEY, adapter_state, save_adapter
from ..layers import FAMILY_TITLES, detect_family, find_cross_attention_layers
from ..mixing import VMixAdapter, build_aes_emb
from .checkpoint_loading import BaseModel, inspect_checkpoint, load_base_model, model_configs
from .config import TrainConfig
from .dataset import DatasetError, DatasetItem, load_dataset, load_image
from .errors import TrainError
from .logs import LossLog, plot_loss
from .loop import AdapterTrainer, TrainBatch, diffusers_unet_forward
from .lora import LoRANetwork
from .previews import lambda_sweep
from .text import TextConditioner, load_tokenizers, sdxl_time_ids

STATE_FORMAT = "vmix-train-state"
STATE_VERSION = 1
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_STATE_RE = re.compile(r"-step(\d+)\.state\.pt$")


@dataclass
class RunResult:
    adapter_path: Optional[str]
    lora_path: Optional[str]
    state_path: Optional[str]
    steps: int
    losses: List[float]


# -- small helpers -------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TrainError(f"device {name!r} is not a torch device name (try auto, cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"device {name!r} was asked for, but this PyTorch sees no CUDA GPU")
    return device


def resolve_precision(setting: str, device: torch.device) -> str:
    if device.type != "cuda":
        if setting in ("fp16", "bf16"):
            raise TrainError(f"mixed_precision = {setting!r} needs a CUDA GPU; on {device.type} the trainer runs in fp32 (use auto or no)")
        return "no"
    if setting == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return setting


def find_latest_state(output_dir: str, name: str) -> Optional[str]:
    best = None
    if os.path.isdir(output_dir):
        for f in os.listdir(output_dir):
            m = _STATE_RE.search(f)
            if f.startswith(name + "-step") and m and (best is None or int(m.group(1)) > best[0]):
                best = (int(m.group(1)), os.path.join(output_dir, f))
    return best[1] if best else None


def _fingerprint(cfg: TrainConfig, family: str, layer_names: Sequence[str]) -> Dict:
    """What must not change between a run and its resumption."""
    return {
        "family": family,
        "dimensions": [d.to_json() for d in cfg.dimensions],
        "layers": list(layer_names),
        "lora": [cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lora_conv_rank, cfg.lora_conv_alpha],
    }


def _batch_order(n: int, seed: int, epoch: int) -> List[int]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


class SampleStream:
    """Dataset indices in a seeded order, epoch after epoch; resumable from a sample count."""

    def __init__(self, n: int, seed: int, seen: int = 0):
        self.n, self.seed, self.seen = n, seed, seen
        self._epoch, self._order = -1, []

    def take(self, count: int) -> List[int]:
        out = []
        for _ in range(count):
            epoch, pos = divmod(self.seen, self.n)
            if epoch != self._epoch:
                self._epoch, self._order = epoch, _batch_order(self.n, self.seed, epoch)
            out.append(self._order[pos])
            self.seen += 1
        return out


# -- latents -------------------------------------------------------------------------------
class LatentSource:
    """VAE latents of dataset images (scaled), cached on disk when asked; with SDXL's size/crop."""

    def __init__(self, vae, scaling_factor: float, resolution: int, device, cache_dir: Optional[str], identity: str):
        self.vae, self.scale, self.resolution, self.device = vae, scaling_factor, resolution, device
        self.cache_dir, self.identity = cache_dir, identity
        if cache_dir:
            os.makedirs(cache_dir, exist_ok=True)

    def _path(self, item: DatasetItem) -> str:
        st = os.stat(item.image)
        key = f"{os.path.abspath(item.image)}|{st.st_size}|{st.st_mtime_ns}|{self.resolution}|{self.identity}"
        return os.path.join(self.cache_dir, hashlib.sha1(key.encode()).hexdigest() + ".safetensors")

    def _load(self, items: Sequence[DatasetItem]):
        """Decoded pixels per image, or the decoder's complaint for images that cannot be read."""
        loaded, failures = [], []
        for item in items:
            try:
                loaded.append((item, *load_image(item.image, self.resolution)))
            except Exception as e:  # PIL raises many kinds (OSError, DecompressionBombError, ...)
                failures.append((item.name, str(e) or type(e).__name__))
        return loaded, failures

    @torch.no_grad()
    def _encode(self, loaded) -> List[Tuple[torch.Tensor, List[int]]]:
        batch = torch.stack([pixels for _, pixels, _, _ in loaded]).to(self.device, next(self.vae.parameters()).dtype)
        latents = self.vae.encode(batch).latent_dist.mean * self.scale  # the mean: deterministic, std ~ 0
        return [(lat.float().cpu(), [*original, *crop]) for lat, (_, _, original, crop) in zip(latents, loaded)]

    def fill_cache(self, items: Sequence[DatasetItem], batch_size: int, progress) -> List[Tuple[str, str]]:
        """Encode every uncached image; returns (image name, error) for images that fail to decode."""
        from safetensors.torch import save_file

        todo = [it for it in items if not os.path.isfile(self._path(it))]
        failures: List[Tuple[str, str]] = []
        bar = progress(total=len(todo), desc="caching latents", unit="img", disable=not todo)
        for start in range(0, len(todo), batch_size):
            loaded, failed = self._load(todo[start:start + batch_size])
            failures.extend(failed)
            for (item, *_), (latents, extra) in zip(loaded, self._encode(loaded) if loaded else []):
                path = self._path(item)
                save_file({"latents": latents.half().contiguous(), "size_crop": torch.tensor(extra, dtype=torch.int64)}, path + ".tmp")
                os.replace(path + ".tmp", path)
            bar.update(len(loaded) + len(failed))
        bar.close()
        return failures

    def get(self, items: Sequence[DatasetItem]) -> Tuple[torch.Tensor, List[List[int]]]:
        if not self.cache_dir:
            loaded, failures = self._load(items)
            if failures:
                raise TrainError(f"image {failures[0][0]} cannot be read ({failures[0][1]}); fix or remove it and resume")
            results = self._encode(loaded)
        else:
            from safetensors.torch import load_file

            results = []
            for item in items:
                data = load_file(self._path(item))
                results.append((data["latents"].float(), data["size_crop"].tolist()))
        return torch.stack([r[0] for r in results]).to(self.device), [r[1] for r in results]


# -- the run -------------------------------------------------------------------------------
def _log_default(message: str) -> None:
    print(message, flush=True)


def run_training(cfg: TrainConfig, dry_run: bool = False, log: Callable[[str], None] = _log_default, progress=None) -> RunResult:
    if progress is None:
        from tqdm import tqdm as progress
    dim_names = [d.name for d in cfg.dimensions]
    info = inspect_checkpoint(cfg.checkpoint, cfg.family, custom_configs=bool(cfg.model_config_dir))
    items = load_dataset(cfg.dataset_dir, dim_names, cfg.skip_bad, log)
    family = info.family
    prediction = info.prediction if cfg.prediction == "auto" else cfg.prediction
    resolution = cfg.family_default("resolution", family)
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

    counts = {d: sum(1 for it in items if it.labels[i] == 1.0) for i, d in enumerate(dim_names)}
    log(
        f"VMix trainer: {FAMILY_TITLES[family]} checkpoint {os.path.basename(cfg.checkpoint)} ({prediction}); "
        f"{len(items)} images at {resolution}px; superior labels: "
        + ", ".join(f"{d} {c}" for d, c in counts.items())
    )
    log(
        f"  {cfg.max_steps} steps x batch {cfg.batch_size} x accumulation {cfg.grad_accum}, lr {lr:g}, "
        f"LoRA rank {cfg.lora_rank} ({cfg.lora_targets}), conv rank {cfg.lora_conv_rank}; outputs in {output_dir}"
    )
    small = sum(1 for it in items if 0 < min(it.size) < resolution)
    if small:
        log(f"  note: {small} image(s) are smaller than {resolution}px on the short side and are upscaled")
    if dry_run:
        model_configs(family, cfg.model_config_dir or None)
        load_tokenizers(family, cfg.tokenizer_dir or None)
        log("Dry run: the config, dataset, checkpoint header, model configs and tokenizers are usable.")
        return RunResult(None, None, None, 0, [])

    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.mixed_precision, device)
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, f"{name}-config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg.to_json(), f, indent=2)

    log(f"Loading {os.path.basename(cfg.checkpoint)} ({device}, weights {str(weight_dtype).replace('torch.', '')}) ...")
    base = load_base_model(
        cfg.checkpoint, family, cfg.model_config_dir or None, cfg.vae or None, cfg.tokenizer_dir or None,
        dtype=weight_dtype, vae_dtype=torch.float32,
    )
    layers = find_cross_attention_layers(base.unet)
    report = detect_family(layers)
    if report.family != family:
        if not base.custom_configs:
            raise TrainError(f"the UNet of {os.path.basename(cfg.checkpoint)} is {report.description}, not a standard {FAMILY_TITLES[family]} UNet")
        log(f"Note: custom model configs give {report.description}; the WebUI loads adapters of the standard layouts only.")
    unet_latent_factor = 2 ** (len(base.unet.config.block_out_channels) - 1)
    vae_factor = 2 ** (len(base.vae.config.block_out_channels) - 1)
    for label, res in (("resolution", resolution), ("preview_resolution", cfg.preview_resolution or resolution)):
        if res % (vae_factor * unet_latent_factor):
            raise TrainError(f"{label} {res} must be a multiple of {vae_factor * unet_latent_factor} for this model")

    for module in [base.unet, *base.text_encoders]:
        module.to(device)
    base.vae.to(device)
    conditioner = TextConditioner(family, base.tokenizers, base.text_encoders)
    aes_emb = build_aes_emb(conditioner.pooled, cfg.dimensions)
    torch.manual_seed(cfg.seed)  # the projection's token Linear and LoRA's down-projections start random
    adapter = VMixAdapter.for_unet(base.unet, aes_emb, family, cfg.dimensions).to(device)
    lora = None
    if cfg.lora_rank or cfg.lora_conv_rank:
        lora = LoRANetwork(base.unet, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lora_conv_rank, cfg.lora_conv_alpha).to(device)
        lora.install()

    identity = f"{os.path.abspath(cfg.vae or cfg.checkpoint)}|{os.path.getsize(cfg.vae or cfg.checkpoint)}"
    cache_dir = (cfg.cache_dir or os.path.join(output_dir, "cache")) if cfg.cache_latents else None
    latents = LatentSource(base.vae, base.scaling_factor, resolution, device, cache_dir, identity)
    if cache_dir:
        failures = latents.fill_cache(items, max(1, cfg.batch_size), progress)
        if failures:
            problems = [f"unreadable image: {n} ({e})" for n, e in failures]
            if not cfg.skip_bad:
                raise DatasetError(os.path.abspath(cfg.dataset_dir), problems)
            log(f"--skip-bad: skipping {len(failures)} image(s) that failed to decode: " + ", ".join(n for n, _ in failures))
            items = [it for it in items if it.name not in {n for n, _ in failures}]
            if not items:
                raise TrainError("no usable images are left")

    trainer = AdapterTrainer(
        base.unet, adapter, base.alphas_cumprod, lr=lr, weight_decay=cfg.weight_decay, prediction=prediction,
        aesthetic_dropout=cfg.aesthetic_dropout, max_grad_norm=cfg.max_grad_norm, warmup_steps=cfg.warmup_steps,
        mixed_precision=precision, gradient_checkpointing=cfg.gradient_checkpointing,
        extra_parameters=list(lora.parameters()) if lora else (), seed=cfg.seed,
    )
    data_generator = torch.Generator().manual_seed(cfg.seed)
    stream = SampleStream(len(items), cfg.seed)
    fingerprint = _fingerprint(cfg, family, adapter.layer_names)
    if resume_path:
        state = _load_state(resume_path)
        _check_resume(state, fingerprint, cfg, len(items), log)
        adapter.load_state_dict(state["adapter"])
        if lora is not None:
            lora.load_state_dict(state["lora"])
        trainer.load_state_dict(state["trainer"])
        data_generator.set_state(state["data_generator"])
        torch.set_rng_state(state["torch_rng"])
        stream.seen = int(state["samples_seen"])
        log(f"Resumed from {os.path.basename(resume_path)} at step {trainer.step}.")
    if trainer.step >= cfg.max_steps:
        trainer.close()
        raise TrainError(f"the run is already at step {trainer.step}; raise max_steps above it to train further")

    loss_log = LossLog(os.path.join(output_dir, f"{name}-loss.csv"), resume_step=trainer.step if resume_path else None)
    loss_png = os.path.join(output_dir, f"{name}-loss.png")
    previews = _preview_maker(cfg, base, conditioner, trainer, items, resolution, prediction, output_dir, precision)
    save_dtype = _DTYPES[cfg.save_precision]
    training_facts = {
        "trainer": f"sd-webui-vmix {__version__} (vmix_lib.train)",
        "base_checkpoint": os.path.basename(cfg.checkpoint),
        "family": family,
        "prediction": prediction,
        "resolution": resolution,
        "images": len(items),
        "superior_labels": counts,
        "lr": lr,
        "batch_size": cfg.batch_size,
        "grad_accum": cfg.grad_accum,
        "caption_dropout": cfg.caption_dropout,
        "aesthetic_dropout": cfg.aesthetic_dropout,
        "seed": cfg.seed,
        "lora": f"{name}-lora.safetensors" if lora else None,
    }

    def save(step: int, final: bool) -> Tuple[str, Optional[str], str]:
        suffix = "" if final else f"-step{step:06d}"
        facts = dict(training_facts, steps=step)
        adapter_path = os.path.join(output_dir, f"{name}{suffix}.safetensors")
        if report.family == family:
            save_adapter(adapter, adapter_path, training=facts, dtype=save_dtype)
        else:
            _save_custom_layout_adapter(adapter, adapter_path, facts, save_dtype)
        lora_path = None
        if lora is not None:
            lora_path = lora.save(os.path.join(output_dir, f"{name}-lora{suffix}.safetensors"), family, name,
                                  {"vmix_training": json.dumps(facts)}, save_dtype)
        for path in (adapter_path, lora_path):
            if path:
                _user_readable(path)
        state_path = os.path.join(output_dir, f"{name}-step{step:06d}.state.pt")
        if not os.path.isfile(state_path):
            _save_state(state_path, {
                "format": STATE_FORMAT, "version": STATE_VERSION, "fingerprint": fingerprint,
                "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "images": len(items), "seed": cfg.seed,
                "adapter": {k: v.detach().cpu().clone() for k, v in adapter.state_dict().items()},
                "lora": {k: v.detach().cpu().clone() for k, v in lora.state_dict().items()} if lora else None,
                "trainer": trainer.state_dict(), "data_generator": data_generator.get_state(),
                "torch_rng": torch.get_rng_state(), "samples_seen": stream.seen,
            })
            for f in os.listdir(output_dir):  # only the newest state is kept: they are large and for resuming only
                path = os.path.join(output_dir, f)
                if f.startswith(name + "-step") and _STATE_RE.search(f) and path != state_path:
                    os.remove(path)
        return adapter_path, lora_path, state_path

    losses: List[float] = []
    start_step = trainer.step
    started = time.monotonic()
    smoothed = None
    bar = progress(total=cfg.max_steps, initial=start_step, desc="training", unit="step", dynamic_ncols=True)
    last_saved = None
    try:
        while trainer.step < cfg.max_steps:
            group = []
            for _ in range(cfg.grad_accum):
                batch_items = [items[i] for i in stream.take(cfg.batch_size)]
                group.append(_make_batch(batch_items, latents, conditioner, data_generator, cfg.caption_dropout, family, resolution, device))
            loss = trainer.train_step(group)
            losses.append(loss)
            smoothed = loss if smoothed is None else 0.95 * smoothed + 0.05 * loss
            step = trainer.step
            loss_log.append(step, loss, trainer.lr_at(step - 1), time.monotonic() - started)
            bar.set_postfix(loss=f"{loss:.4f}", avg=f"{smoothed:.4f}", lr=f"{trainer.lr_at(step - 1):.2e}")
            bar.update(1)
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
                last_saved = save(step, final=False)
                plot_loss(loss_log.path, loss_png)
            if cfg.preview_every and (step % cfg.preview_every == 0 or step == cfg.max_steps):
                previews(step)
    except KeyboardInterrupt:
        bar.close()
        if trainer.step > start_step and (last_saved is None or not last_saved[2].endswith(f"-step{trainer.step:06d}.state.pt")):
            saved = save(trainer.step, final=False)
            log(f"\nInterrupted at step {trainer.step}; saved {os.path.basename(saved[0])} and its resume state. "
                "Continue with --resume latest.")
        trainer.close()
        raise
    bar.close()
    adapter_path, lora_path, state_path = save(trainer.step, final=True)
    plot_loss(loss_log.path, loss_png)
    trainer.close()
    log(f"Done: {adapter_path}" + (f" and {lora_path}" if lora_path else "") + f" (resume state {os.path.basename(state_path)}).")
    return RunResult(adapter_path, lora_path, state_path, trainer.step, losses)


def _make_batch(items, latents: LatentSource, conditioner: TextConditioner, data_generator, caption_dropout, family, resolution, device) -> TrainBatch:
    lat, size_crop = latents.get(items)
    drop = torch.rand(len(items), generator=data_generator) < caption_dropout
    captions = ["" if d else it.caption for it, d in zip(items, drop.tolist())]
    context, text_embeds = conditioner.encode(captions)
    labels = torch.tensor([it.labels for it in items], dtype=torch.float32, device=device)
    added = None
    if family == "sdxl":
        time_ids = torch.tensor(
            [sdxl_time_ids((sc[0], sc[1]), (sc[2], sc[3]), (resolution, resolution)) for sc in size_crop], device=device
        )
        added = {"text_embeds": text_embeds, "time_ids": time_ids.to(text_embeds.dtype)}
    return TrainBatch(lat, context, labels, added)


def _preview_maker(cfg, base: BaseModel, conditioner, trainer, items, resolution, prediction, output_dir, precision):
    res = cfg.preview_resolution or resolution
    prompts = list(cfg.preview_prompts) or list(dict.fromkeys(it.caption for it in items))[:2]
    factor = 2 ** (len(base.vae.config.block_out_channels) - 1)
    shape = (base.unet.config.in_channels, res // factor, res // factor)
    forward = diffusers_unet_forward(base.unet)
    folder = os.path.join(output_dir, "previews")

    def encode(texts):
        context, text_embeds = conditioner.encode(texts)
        if base.family != "sdxl":
            return context, None
        ids = torch.tensor([sdxl_time_ids((res, res), (0, 0), (res, res))] * len(texts), device=context.device)
        return context, {"text_embeds": text_embeds, "time_ids": ids.to(text_embeds.dtype)}

    @torch.no_grad()
    def decode(lat):
        return base.vae.decode(lat.to(next(base.vae.parameters()).dtype) / base.scaling_factor).sample

    def make(step: int) -> str:
        os.makedirs(folder, exist_ok=True)
        grid = lambda_sweep(
            trainer.mixer, forward, encode, decode, prompts, cfg.preview_lambdas, shape, base.alphas_cumprod,
            cfg.preview_steps, cfg.preview_cfg, prediction, cfg.preview_seed, autocast=trainer.autocast,
            title=f"step {step}: lambda sweep, all labels positive",
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
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise TrainError(f"resume state {path} cannot be read ({e})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise TrainError(f"{path} is not a VMix training state file")
    if state.get("version", 0) > STATE_VERSION:
        raise TrainError(f"{path} was written by a newer trainer (state version {state['version']})")
    return state


def _check_resume(state: Dict, fingerprint: Dict, cfg: TrainConfig, n_items: int, log) -> None:
    saved = state["fingerprint"]
    for key, what in (("family", "model family"), ("dimensions", "aesthetic dimensions"), ("layers", "UNet layers"),
                      ("lora", "LoRA settings (rank, alpha, targets, conv rank, conv alpha)")):
        if saved[key] != fingerprint[key]:
            raise TrainError(f"the resume state was trained with other {what} than this config; use the original settings or start a new run")
    changed = [k for k, v in (("batch_size", cfg.batch_size), ("grad_accum", cfg.grad_accum), ("images", n_items), ("seed", cfg.seed)) if state.get(k) != v]
    if changed:
        log(f"Note: {', '.join(changed)} changed since the saved state; training continues, but not as the original run would have.")
