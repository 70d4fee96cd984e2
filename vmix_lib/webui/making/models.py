"""The checkpoint the WebUI has loaded, as a training run's ModelParts, and everything to put back.

AUTOMATIC1111 1.6-1.10 (``A1111Model``) and Forge / Forge Neo (``ForgeModel``).  What each supplies
(DESIGN §9) and why (facts with file:line: docs/webui-making.md):

                 A1111                                          Forge / Neo
  UNet to hook   sd_model.model.diffusion_model                 forge_objects_original.unet.model.diffusion_model
                                                                (Neo torch.compile: the module it wraps)
  forward        sd_model.apply_model(x, t, cond) in A1111's    diffusion_model(x, t, context=, y=, transformer_options={})
                 autocast: its dtype casts and --medvram hook    in the model's computation dtype
  conditioning   get_learned_conditioning(SdConditioning(..., width, height)): the WebUI's own (CLIP skip,
                 emphasis, embeddings); SDXL {"crossattn", "vector"}  (Forge's, made in inference mode, cloned)
  "[CLS]" rows   the CLIP text models' final-LN EOS state (OpenCLIP-G before its projection), as the trainer's
  ᾱ              alphas_cumprod_original (the checkpoint's;      predictor.alphas_cumprod
                 alphas_cumprod follows the last job's options)
  decode         decode_first_stage                             decode_first_stage

What it changes for the job, and puts back when ``opened`` ends (finished, interrupted or failed):
  - LoRA/hypernetworks: training uses the plain checkpoint.  A1111: ``networks.load_networks([])``
    (layers restore their backups on their next forward) and no hypernetworks, both lists put back
    afterwards (the next generation merges its own LoRA again); Forge: the original (LoRA-free) UNet
    and CLIP patchers, and the engine's forge_objects put back afterwards.
  - the VAE in RAM while training ("Unload VAE", A1111 without --medvram), back on its device after;
  - Forge/Neo build their weights in inference mode, which autograd cannot use: each such
    parameter or buffer of the UNet is replaced by an ordinary copy of the same bytes (kept);
  - Neo: an attention kernel without a backward (SageAttention, flash-attn) is swapped for PyTorch's
    for the job.
The trainer itself (vmix_lib.train.loop) removes its hooks and block checkpointing and puts every
UNet parameter's requires_grad back; nothing here calls ``train()``.
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn as nn

from ...layers import FAMILY_TITLES, detect_family, find_cross_attention_layers
from ...text_encoders import clip_pooled
from ...train.session import ModelParts
from .. import compat

VAE_FACTOR = 8  # SD1.5 and SDXL: pixels per latent pixel
SIZE_MULTIPLE = 64  # and the picture sizes the UNet takes (VAE 8 × UNet 8)


@dataclass
class Opened:
    parts: ModelParts
    device: torch.device
    precision: str
    decode: Callable[[torch.Tensor], torch.Tensor]


def _precision(device: torch.device, dtype: torch.dtype) -> str:
    """Mixed precision of the job: the UNet's own (fp16 with loss scaling, bf16), fp32 on the CPU."""
    if device.type != "cuda":
        return "no"
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "no")


def _unet_family(unet: nn.Module, title: str, allow_custom_layout: bool, claimed: str) -> Optional[str]:
    """None when the UNet is a standard SD1.5/SDXL layout of the claimed family, else one sentence."""
    report = detect_family(find_cross_attention_layers(compat.uncompiled(unet)))
    if report.family == claimed or allow_custom_layout:
        return None
    return (f"The loaded checkpoint {title} is {report.description}; VMix adapters are made for "
            f"SD1.5 and SDXL base checkpoints and their fine-tunes.")


def openclip_pooled(embedder, texts: Sequence[str], tokenize: Callable) -> torch.Tensor:
    """OpenCLIP-G's final-LN EOS state before ``text_projection`` (sgm FrozenOpenCLIPEmbedder2), [n, 1280]."""
    device = next(embedder.model.parameters()).device  # (A1111 wraps token_embedding, which then has no .weight)
    tokens = tokenize(list(texts)).to(device)
    out = embedder.encode_with_transformer(tokens)
    last = embedder.model.ln_final(out["last"])
    return last[torch.arange(last.shape[0], device=last.device), tokens.argmax(dim=-1)].float().cpu()


# ---------------------------------------------------------------- AUTOMATIC1111


def a1111_env() -> SimpleNamespace:
    """The A1111 modules the glue reads (tests pass their own namespace)."""
    from modules import devices, lowvram, prompt_parser, sd_unet, shared

    return SimpleNamespace(devices=devices, SdConditioning=prompt_parser.SdConditioning, cmd_opts=shared.cmd_opts,
                           shared=shared, lowvram_enabled=lowvram.is_enabled, current_unet=lambda: sd_unet.current_unet,
                           networks=sys.modules.get("networks"), open_clip_tokenize=_open_clip_tokenize)


def _open_clip_tokenize(texts):
    import open_clip

    return open_clip.tokenize(texts)


class A1111Model:
    """``shared.sd_model`` of AUTOMATIC1111 (ldm LatentDiffusion for SD1.x, sgm DiffusionEngine for SDXL)."""

    webui = "AUTOMATIC1111"
    vae_factor, size_multiple = VAE_FACTOR, SIZE_MULTIPLE  # tests of small models set their own

    def __init__(self, sd_model, env: Optional[SimpleNamespace] = None, allow_custom_layout: bool = False):
        self.m = sd_model
        self.env = env or a1111_env()
        self.allow_custom_layout = allow_custom_layout
        info = getattr(sd_model, "sd_checkpoint_info", None)
        self.title = getattr(info, "title", None) or "(unnamed checkpoint)"
        self.sha256 = getattr(info, "sha256", None)
        self.family = "sdxl" if getattr(sd_model, "is_sdxl", False) else "sd15"

    def problem(self) -> Optional[str]:
        m, title = self.m, self.title
        if m is None:
            return "No checkpoint is loaded; choose an SD1.5 or SDXL checkpoint at the top of the page first."
        if getattr(self.env.cmd_opts, "lowvram", False):
            return ("The WebUI runs with --lowvram, which moves the UNet to the GPU block by block during the forward pass, "
                    "so no backward pass can run; restart it without --lowvram (--medvram works) to train.")
        for flag, what in (("is_sd2", "an SD2 model"), ("is_sd3", "an SD3 model"), ("is_ssd", "an SSD-1B (pruned SDXL) model")):
            if getattr(m, flag, False):
                return f"The loaded checkpoint {title} is {what}; VMix adapters are made for SD1.5 and SDXL base checkpoints."
        if getattr(m, "is_sdxl", False) and not self._sdxl_base():
            return f"The loaded checkpoint {title} is the SDXL refiner; load an SDXL base checkpoint to train."
        model = getattr(m, "model", None)
        if getattr(model, "conditioning_key", None) in ("hybrid", "concat") or getattr(m, "is_sdxl_inpaint", False):
            return f"The loaded checkpoint {title} is an inpainting model; load the plain (non-inpainting) checkpoint to train."
        if getattr(m, "cond_stage_key", None) == "edit":
            return f"The loaded checkpoint {title} is an instruct-pix2pix model; load a plain SD1.5 or SDXL checkpoint to train."
        current = self.env.current_unet()
        if current is not None:
            return (f"A replacement UNet is active ({getattr(current, 'name', type(current).__name__)}, Settings > SD Unet); "
                    "set SD Unet to None to train on the checkpoint's own UNet.")
        unet = getattr(model, "diffusion_model", None)
        if unet is None:
            return f"The loaded checkpoint {title} has no UNet VMix can reach."
        return _unet_family(unet, title, self.allow_custom_layout, self.family)

    def _sdxl_base(self) -> bool:
        embedders = getattr(getattr(self.m, "conditioner", None), "embedders", None)
        if self.allow_custom_layout:
            return True
        # the refiner has one text embedder (OpenCLIP-G) and then the size/score embedders
        return embedders is not None and len(embedders) >= 2 and hasattr(embedders[1], "wrapped")

    def facts(self) -> Dict[str, Any]:
        return {"base_checkpoint": self.title, "base_checkpoint_sha256": self.sha256, "made_in": f"{self.webui} (the VMix tab)",
                "base_weights": "the plain checkpoint (LoRAs and hypernetworks off)"}

    # -- the parts ----------------------------------------------------------------------------
    def _autocast(self):
        devices = self.env.devices
        return devices.without_autocast() if getattr(devices, "unet_needs_upcast", False) else devices.autocast()

    def _encoder(self, size: int):
        m, env = self.m, self.env

        def encode(texts):
            with torch.no_grad(), env.devices.autocast():
                c = m.get_learned_conditioning(env.SdConditioning(list(texts), width=size, height=size))
            if isinstance(c, dict):
                return c["crossattn"], {"vector": c["vector"]}
            return c, None

        return encode

    def _pooled(self, texts: List[str]) -> torch.Tensor:
        m = self.m
        with torch.no_grad():
            self._encoder(64)([""])  # --medvram: this brings the text encoder(s) to the GPU (their forward pre-hook)
            if self.family == "sd15":
                wrapped = m.cond_stage_model.wrapped
                return clip_pooled(wrapped.transformer, wrapped.tokenizer, texts)
            first, second = m.conditioner.embedders[0].wrapped, m.conditioner.embedders[1].wrapped
            return torch.cat([clip_pooled(first.transformer, first.tokenizer, texts),
                              openclip_pooled(second, texts, self.env.open_clip_tokenize)], dim=-1)

    def _forward(self, x, t, context, added):
        cond = context if added is None else {"crossattn": context, **added}
        with self._autocast():
            return self.m.apply_model(x, t, cond)

    @contextlib.contextmanager
    def opened(self, unload_vae: bool) -> Iterator[Opened]:
        m, env = self.m, self.env
        devices = env.devices
        device = torch.device(devices.device)
        unet = m.model.diffusion_model
        undo: List[Callable[[], None]] = []
        try:
            self._plain_checkpoint(undo)
            vae = getattr(m, "first_stage_model", None)
            keep_vae_off = bool(unload_vae and vae is not None and not env.lowvram_enabled(m))
            if keep_vae_off:
                vae_device = next(vae.parameters()).device
                vae.to(devices.cpu)
                undo.append(lambda: vae.to(vae_device))

            def decode(latents):
                if keep_vae_off:
                    vae.to(device)
                try:
                    with torch.no_grad(), devices.without_autocast():
                        return m.decode_first_stage(latents.to(getattr(devices, "dtype_vae", latents.dtype))).float()
                finally:
                    if keep_vae_off:
                        vae.to(devices.cpu)

            acp = getattr(m, "alphas_cumprod_original", None)
            acp = (acp if acp is not None else m.alphas_cumprod).detach().float().cpu().clone()
            parts = ModelParts(
                self.family, "v_prediction" if getattr(m, "parameterization", "eps") == "v" else "epsilon", unet,
                self._forward, self._encoder, self._pooled, acp, int(getattr(m, "latent_channels", 4) or 4), self.vae_factor,
                facts=self.facts(),
            )
            yield Opened(parts, device, _precision(device, getattr(devices, "dtype_unet", torch.float32)), decode)
        finally:
            for step in reversed(undo):
                step()

    def _plain_checkpoint(self, undo: List[Callable[[], None]]) -> None:
        """No LoRA or hypernetwork for the job; the lists come back afterwards (the next job merges its own)."""
        nets = self.env.networks
        loaded = getattr(nets, "loaded_networks", None)
        if loaded:
            saved = list(loaded)
            nets.load_networks([])
            undo.append(lambda: (loaded.clear(), loaded.extend(saved)))
        shared = self.env.shared
        hypernetworks = getattr(shared, "loaded_hypernetworks", None)
        if hypernetworks:
            saved_h = list(hypernetworks)
            hypernetworks.clear()
            undo.append(lambda: hypernetworks.extend(saved_h))


# ---------------------------------------------------------------- Forge / Forge Neo


def forge_env() -> SimpleNamespace:
    from backend import memory_management
    from modules import prompt_parser, shared

    return SimpleNamespace(memory_management=memory_management, SdConditioning=prompt_parser.SdConditioning,
                           shared=shared, attention=_forge_attention_module())


def _forge_attention_module():
    """Neo/Forge's backend.nn.unet (its module-level attention_function) and the PyTorch kernel, if present."""
    try:
        from backend import attention
        from backend.nn import unet as unet_module
    except Exception:
        return None
    plain = getattr(attention, "attention_pytorch", None)
    trainable = {plain, getattr(attention, "attention_xformers", None), getattr(attention, "attention_basic", None),
                 getattr(attention, "attention_split", None), getattr(attention, "attention_sub_quad", None)}
    return SimpleNamespace(module=unet_module, plain=plain, trainable={f for f in trainable if f is not None})


FORGE_ENGINES = {"StableDiffusion": "sd15", "StableDiffusionXL": "sdxl"}
FORGE_OTHER = {"StableDiffusion2": "an SD2 model", "StableDiffusionXLRefiner": "the SDXL refiner",
               "StableDiffusion3": "an SD3 model"}


def make_trainable(module: nn.Module) -> int:
    """Replace inference-mode parameters and buffers of ``module`` by ordinary tensors with the same
    bytes (Forge builds its models under torch.inference_mode(), and autograd refuses to save such
    tensors for the backward pass).  Returns how many were replaced."""
    replaced = 0
    with torch.inference_mode(False):
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None and p.is_inference():
                    sub._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
                    replaced += 1
            for name, b in list(sub._buffers.items()):
                if b is not None and b.is_inference():
                    sub._buffers[name] = b.detach().clone()
                    replaced += 1
    return replaced


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


class ForgeModel:
    """``shared.sd_model`` of Forge / Forge Neo (backend/diffusion_engine engines with forge_objects)."""

    webui = "Forge"
    vae_factor, size_multiple = VAE_FACTOR, SIZE_MULTIPLE

    def __init__(self, sd_model, env: Optional[SimpleNamespace] = None, allow_custom_layout: bool = False,
                 webui: str = "Forge"):
        self.m = sd_model
        self.env = env or forge_env()
        self.allow_custom_layout = allow_custom_layout
        self.webui = webui
        info = getattr(sd_model, "sd_checkpoint_info", None)
        self.title = getattr(info, "title", None) or "(unnamed checkpoint)"
        self.sha256 = getattr(info, "sha256", None)
        self.family = FORGE_ENGINES.get(type(sd_model).__name__) if sd_model is not None else None
        if self.family is None and allow_custom_layout:
            self.family = "sdxl" if getattr(sd_model, "is_sdxl", False) else "sd15"

    def _kmodel(self):
        return self.m.forge_objects_original.unet.model

    def _diffusion_model(self) -> nn.Module:
        """The UNet itself: under Neo's torch.compile the module the wrapper holds (its names are the real ones)."""
        kmodel = self._kmodel()
        backup = getattr(kmodel, "_model_backup", None) if hasattr(kmodel, "_compile_config") else None
        return backup if isinstance(backup, nn.Module) else compat.uncompiled(kmodel.diffusion_model)

    def problem(self) -> Optional[str]:
        m, title = self.m, self.title
        if m is None or getattr(m, "forge_objects", None) is None or getattr(m, "forge_objects_original", None) is None:
            return "No checkpoint is loaded yet; choose an SD1.5 or SDXL checkpoint at the top of the page (or generate once) first."
        kind = type(m).__name__
        if self.family is None:
            other = FORGE_OTHER.get(kind)
            what = other or compat.model_title(kind) or kind
            if other is None and compat.model_title(kind):
                return f"The loaded model {title} is {compat.non_unet_description(what)}."
            return f"The loaded checkpoint {title} is {what}; VMix adapters are made for SD1.5 and SDXL base checkpoints."
        if getattr(m, "is_inpaint", False):
            return f"The loaded checkpoint {title} is an inpainting model; load the plain (non-inpainting) checkpoint to train."
        storage = getattr(self._kmodel(), "storage_dtype", None)
        if isinstance(storage, str) and storage in ("nf4", "fp4", "gguf"):
            return (f"The loaded checkpoint {title} is stored as {storage}, which training cannot take gradients through; "
                    "load it in 16-bit (Diffusion in Low Bits: Automatic) to train.")
        return _unet_family(self._diffusion_model(), title, self.allow_custom_layout, self.family)

    def facts(self) -> Dict[str, Any]:
        return {"base_checkpoint": self.title, "base_checkpoint_sha256": self.sha256, "made_in": f"{self.webui} (the VMix tab)",
                "base_weights": "the plain checkpoint (LoRAs off)"}

    @contextlib.contextmanager
    def opened(self, unload_vae: bool) -> Iterator[Opened]:
        m, env = self.m, self.env
        undo: List[Callable[[], None]] = []
        try:
            saved_objects = m.forge_objects
            original = m.forge_objects_original
            m.forge_objects = original.shallow_copy()  # CLIP and UNet without the last job's LoRA
            undo.append(lambda: setattr(m, "forge_objects", saved_objects))
            kmodel = original.unet.model
            env.memory_management.load_models_gpu([original.unet])  # restores LoRA-merged weights (refresh_loras({}))
            unet = self._diffusion_model()
            make_trainable(unet)
            attention = env.attention
            if attention is not None and attention.plain is not None:
                current = getattr(attention.module, "attention_function", None)
                if current is not None and current not in attention.trainable:
                    attention.module.attention_function = attention.plain  # SageAttention / flash-attn have no backward
                    undo.append(lambda: setattr(attention.module, "attention_function", current))
            compute = getattr(kmodel, "computation_dtype", None) or next(unet.parameters()).dtype
            get_device = getattr(env.memory_management, "get_torch_device", None)
            device = torch.device(get_device()) if get_device is not None else next(unet.parameters()).device
            predictor = kmodel.predictor
            prediction = "v_prediction" if getattr(predictor, "prediction_type", "epsilon") == "v_prediction" else "epsilon"

            def forward(x, t, context, added):
                y = None if added is None else added["vector"].to(compute)
                return unet(x.to(compute), t.float(), context=context.to(compute), y=y, transformer_options={})

            def encoder(size: int):
                def encode(texts):
                    c = m.get_learned_conditioning(env.SdConditioning(list(texts), width=size, height=size))
                    if isinstance(c, dict):
                        return c["crossattn"].clone(), {"vector": c["vector"].clone()}
                    return c.clone(), None

                return encode

            def pooled(texts):
                clip = original.clip
                env.memory_management.load_models_gpu([clip.patcher])
                with torch.no_grad():
                    if self.family == "sd15":
                        engines = [m.text_processing_engine]
                    else:
                        engines = [m.text_processing_engine_l, m.text_processing_engine_g]
                    return torch.cat([clip_pooled(e.text_encoder.transformer, e.tokenizer, texts) for e in engines], dim=-1)

            def decode(latents):
                return _clone(m.decode_first_stage(latents)).float()

            parts = ModelParts(
                self.family, prediction, unet, forward, encoder, pooled,
                predictor.alphas_cumprod.detach().float().cpu().clone(),
                int(getattr(original.vae, "latent_channels", 4) or 4), self.vae_factor,
                facts=self.facts(),
            )
            yield Opened(parts, device, _precision(device, compute), decode)
        finally:
            for step in reversed(undo):
                step()
            soft_empty = getattr(env.memory_management, "soft_empty_cache", None)
            if soft_empty is not None:
                soft_empty()


def loaded_model(allow_custom_layout: bool = False):
    """The WebUI's loaded checkpoint as an A1111Model or ForgeModel (loading the selected one first,
    as a generation would).  Call with the queue lock held."""
    from modules import shared

    from .. import host

    kind = host.webui_kind()
    if kind.startswith("forge"):
        from modules import sd_models

        reload = getattr(sd_models, "forge_model_reload", None)
        if reload is not None:
            reload()
        title = compat.FLAVOUR_TITLES.get(kind, "Forge")
        return ForgeModel(shared.sd_model, allow_custom_layout=allow_custom_layout, webui=title)
    return A1111Model(shared.sd_model, allow_custom_layout=allow_custom_layout)


def current_model(allow_custom_layout: bool = False):
    """The checkpoint loaded now, without loading one (None when none is, or Forge has not loaded it yet):
    for checking an API request before its job is queued."""
    from modules import sd_models

    from .. import host

    kind = host.webui_kind()
    sd_model = getattr(getattr(sd_models, "model_data", None), "sd_model", None)
    if sd_model is None:
        return None
    if kind.startswith("forge"):
        if getattr(sd_model, "forge_objects", None) is None:
            return None
        return ForgeModel(sd_model, allow_custom_layout=allow_custom_layout, webui=compat.FLAVOUR_TITLES.get(kind, "Forge"))
    return A1111Model(sd_model, allow_custom_layout=allow_custom_layout)
