"""Images without a WebUI: the trainer's single-file checkpoint loading, the extension's ValueMixer
hook, a diffusers scheduler (DDIM, Euler, DPM++ 2M) and classifier-free guidance, on CPU or CUDA.

The checkpoint is read offline exactly as the trainer reads it (vmix_lib/train/checkpoint_loading.py:
diffusers' LDM converters into models built from the configurations this repository ships), the
prompts are encoded the way the WebUI conditions the UNet (vmix_lib/train/text.py), and VMix acts
through the same hook the extension installs in the WebUI (vmix_lib/hook.py), so the only
differences from a WebUI image are the sampler implementation and the noise of a seed.

The starting noise of a seed is drawn on the CPU (``torch.Generator("cpu")``), so a seed gives the
same image on CPU and GPU up to kernel differences.  On CUDA the UNet and text encoders run in fp16
or bf16 (``--precision``); the VAE decodes in fp32 (SDXL's VAE overflows in fp16).
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

import torch

from .errors import EvaluationError
from .settings import Setting
from .webui_client import GenerationParams

SCHEDULERS = ("ddim", "euler", "dpm++")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def make_scheduler(name: str, config: Dict[str, Any], prediction: str):
    """A diffusers scheduler from the checkpoint's training schedule (scheduler.json)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    from ..train.checkpoint_loading import clean_config

    base = dict(clean_config(config), prediction_type=prediction)
    if name == "ddim":  # the paper's sampler; η = 0, SD's "leading" spacing with steps_offset 1
        return DDIMScheduler.from_config(base, clip_sample=False, set_alpha_to_one=False)
    if name == "euler":
        return EulerDiscreteScheduler.from_config(base)
    if name == "dpm++":  # DPM++ 2M, the WebUI's most used sampler
        return DPMSolverMultistepScheduler.from_config(base, algorithm_type="dpmsolver++", solver_order=2)
    raise EvaluationError(f"--scheduler {name!r} is not one of {', '.join(SCHEDULERS)}")


def resolve_precision(setting: str, device: torch.device) -> str:
    """The UNet/text-encoder dtype name: bf16 (or fp16 without bf16 support) on CUDA, fp32 on the CPU."""
    if device.type != "cuda":
        if setting in ("fp16", "bf16"):
            raise EvaluationError(f"--precision {setting} needs a CUDA GPU; on the CPU sampling runs in fp32 (use auto or fp32)")
        return "fp32"
    if setting == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return setting


class OfflineSource:
    """ImageSource: sample a single-file checkpoint in this process."""

    kind = "offline"

    def __init__(
        self,
        checkpoint: str,
        params: GenerationParams,
        scheduler: str = "ddim",
        model_config_dir: Optional[str] = None,
        tokenizer_dir: Optional[str] = None,
        vae: Optional[str] = None,
        device: str = "auto",
        precision: str = "auto",
        threads: int = 0,
    ):
        if scheduler not in SCHEDULERS:
            raise EvaluationError(f"--scheduler {scheduler!r} is not one of {', '.join(SCHEDULERS)}")
        self.checkpoint_path = checkpoint
        self.params = params
        self.scheduler_name = scheduler
        self.model_config_dir = model_config_dir
        self.tokenizer_dir = tokenizer_dir
        self.vae_path = vae
        self.device_name = device
        self.precision_name = precision
        self.threads = threads
        self.threads_line: Optional[str] = None  # set by prepare(): the CPU thread choice, for the log
        self.name = f"offline {os.path.basename(checkpoint)}"
        self.base = None
        self.mixers: Dict[str, Any] = {}

    def describe(self) -> Dict[str, Any]:
        return {
            "source": "offline", "checkpoint": os.path.basename(self.checkpoint_path), "scheduler": self.scheduler_name,
            "device": str(getattr(self, "device", self.device_name)), "precision": getattr(self, "precision", self.precision_name),
            **self.params.to_json(),
        }

    def check(self, settings: List[Setting]) -> None:
        """What is known without loading the model (headers and configs, seconds): the checkpoint, its
        family against every adapter's, the image size; run before the scorers load and any image is made."""
        from ..adapter_file import AdapterError, read_adapter_info
        from ..layers import FAMILY_TITLES
        from ..train.checkpoint_loading import inspect_checkpoint, model_configs
        from ..train.errors import TrainError
        from .run import resolve_device

        try:
            self.device = resolve_device(self.device_name)
            self.precision = resolve_precision(self.precision_name, self.device)
            self.info = inspect_checkpoint(self.checkpoint_path, custom_configs=bool(self.model_config_dir))
            self.configs = model_configs(self.info.family, self.model_config_dir)
        except TrainError as e:
            raise EvaluationError(str(e)) from None
        family, checkpoint = self.info.family, os.path.basename(self.checkpoint_path)
        for ref in dict.fromkeys(s.adapter for s in settings if s.adapter is not None):
            if not ref.path:
                raise EvaluationError(f"adapter {ref.name!r} needs its file for offline generation (--adapter path/to/{ref.name}.safetensors)")
            try:
                adapter_family = read_adapter_info(ref.path, allow_custom_layout=True).family
            except AdapterError as e:
                raise EvaluationError(str(e).rstrip(".")) from None
            if adapter_family != family:  # else the hook lists every layer it cannot find
                raise EvaluationError(
                    f"VMix adapter {os.path.basename(ref.path)!r} is an {FAMILY_TITLES.get(adapter_family, adapter_family)} adapter, "
                    f"but the checkpoint {checkpoint!r} is {FAMILY_TITLES.get(family, family)}; evaluate it with a checkpoint of its family"
                )
        # the VAE's and the UNet's downsampling, from the configs (absent keys: diffusers' defaults)
        vae_levels = len(self.configs["vae"].get("block_out_channels", (64,)))
        unet_levels = len(self.configs["unet"].get("block_out_channels", (320, 640, 1280, 1280)))
        multiple = 2 ** (vae_levels - 1) * 2 ** (unet_levels - 1)
        for what, size in (("--width", self.params.width), ("--height", self.params.height)):
            if size % multiple:
                raise EvaluationError(f"{what} {size} must be a multiple of {multiple} for this model")

    def prepare(self, settings: List[Setting]) -> None:
        """Load the checkpoint and every adapter of ``settings``; check that each adapter fits."""
        from ..adapter_file import AdapterError, load_adapter
        from ..cpu_threads import apply_threads
        from ..hook import AdapterMismatch, ValueMixer
        from ..layers import find_cross_attention_layers
        from ..train.checkpoint_loading import load_base_model
        from ..train.errors import TrainError
        from ..train.text import TextConditioner

        self.check(settings)
        info, configs = self.info, self.configs
        try:
            dtype = _DTYPES[self.precision]
            base = load_base_model(
                self.checkpoint_path, info.family, self.model_config_dir, self.vae_path, self.tokenizer_dir,
                dtype=dtype, vae_dtype=torch.float32,
            )
        except TrainError as e:
            raise EvaluationError(str(e)) from None
        self.base = base
        self.dtype = dtype
        # a tiny (test, smoke-run) UNet samples several times faster on one CPU thread: vmix_lib.cpu_threads
        self.threads_line = apply_threads(self.threads, sum(p.numel() for p in base.unet.parameters()), "UNet",
                                          torch.device(self.device).type)
        self.scheduler = make_scheduler(self.scheduler_name, configs["scheduler"], info.prediction)
        for module in (base.unet, *base.text_encoders, base.vae):
            module.to(self.device)
        self.conditioner = TextConditioner(base.family, base.tokenizers, base.text_encoders)
        self.vae_factor = 2 ** (len(base.vae.config.block_out_channels) - 1)
        layers = find_cross_attention_layers(base.unet)
        shapes = {layer.name: layer.inner_dim for layer in layers}
        for setting in settings:
            ref = setting.adapter
            if ref is None or ref.name in self.mixers:
                continue
            try:
                adapter = load_adapter(ref.path, layers=shapes if base.custom_configs else None)
                mixer = ValueMixer(adapter, strict=True).install(base.unet, layers)
            except (AdapterError, AdapterMismatch) as e:
                raise EvaluationError(f"{str(e).rstrip('.')} ({os.path.basename(self.checkpoint_path)})") from None
            mixer.disarm()
            self.mixers[ref.name] = mixer
        self._empty = None

    @torch.no_grad()
    def _encode(self, prompt: str):
        base = self.base
        cond, pooled = self.conditioner.encode([prompt])
        if self._empty is None:
            self._empty = self.conditioner.encode([self.params.negative_prompt])
        uncond, pooled_u = self._empty
        added = None
        if base.family == "sdxl":
            h, w = self.params.height, self.params.width
            ids = torch.tensor([[h, w, 0, 0, h, w]] * 2, device=self.device, dtype=pooled.dtype)
            added = {"text_embeds": torch.cat([pooled_u, pooled]), "time_ids": ids}
        return torch.cat([uncond, cond]), added

    @torch.no_grad()
    def generate(self, prompt: str, seed: int, setting: Setting):
        from PIL import Image

        base, params, scheduler = self.base, self.params, self.scheduler
        context, added = self._encode(prompt)
        shape = (1, base.unet.config.in_channels, params.height // self.vae_factor, params.width // self.vae_factor)
        x = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(seed))).to(self.device)
        scheduler.set_timesteps(params.steps, device=self.device)
        x = x * scheduler.init_noise_sigma
        active = None
        for name, mixer in self.mixers.items():  # one adapter at a time; all others inert
            mixer.disarm()
        if setting.adapter is not None:
            active = self.mixers[setting.adapter.name]
            active.strength = float(setting.strength)
            active.set_alphas(setting.alpha_dict)
            active.row_strengths = None if params.uncond in (None, True) else [0.0, 1.0]  # rows: [uncond, cond]
            active.arm()
        try:
            for t in scheduler.timesteps:
                model_in = scheduler.scale_model_input(torch.cat([x, x]), t).to(self.dtype)
                out = base.unet(model_in, t, encoder_hidden_states=context, added_cond_kwargs=added).sample.float()
                out_u, out_c = out.chunk(2)
                x = scheduler.step(out_u + params.cfg * (out_c - out_u), t, x).prev_sample
        finally:
            if active is not None:
                active.disarm()
        image = base.vae.decode(x.float() / base.scaling_factor).sample[0]
        array = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        return Image.fromarray(array), {}

    def close(self) -> None:
        for mixer in self.mixers.values():
            mixer.remove()
        self.mixers = {}
