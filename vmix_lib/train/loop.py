"""The VMix training loop on any UNet, independent of how batches are made (paper §3.4).

Frozen base model; trainable: the projection layer and every W_a (the adapter), plus optional extra
parameters (the LoRA).  λ = 1 in training.  Loss: ε- or v-prediction MSE (vmix_lib.training_step).

    trainer = AdapterTrainer(unet, adapter, alphas_cumprod, lr=1e-4)
    for batch in batches:                      # TrainBatch(latents, context, labels[, added_cond])
        loss = trainer.train_step([batch])     # one optimiser step (a list = gradient accumulation)
    trainer.close()                            # removes the hooks; the UNet is the base model again

``train_adapter(...)`` wraps that for a fixed number of steps.  ``state_dict()`` / ``load_state_dict()``
carry everything a resumed run needs to continue bit-for-bit (optimizer, step, RNG).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence

import torch
import torch.nn as nn

from ..hook import ValueMixer
from ..layers import find_cross_attention_layers
from ..mixing import VMixAdapter
from ..training_step import aesthetic_context_for_batch, diffusion_loss

PRECISIONS = ("no", "fp16", "bf16")
UnetForward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Optional[Dict[str, torch.Tensor]]], torch.Tensor]


@dataclass
class TrainBatch:
    latents: torch.Tensor  # [B, C, h, w], already scaled by the VAE scaling factor
    context: torch.Tensor  # [B, 77·k, d] text conditioning (caption dropout already applied)
    labels: torch.Tensor  # [B, N]: 1 superior, 0 inferior / not labelled
    added_cond: Optional[Dict[str, torch.Tensor]] = None  # SDXL: text_embeds [B, 1280], time_ids [B, 6]


def diffusers_unet_forward(unet: nn.Module) -> UnetForward:
    """(x_t, t, context, added_cond) -> prediction for a diffusers UNet2DConditionModel."""

    def forward(x, t, context, added_cond=None):
        return unet(x, t, encoder_hidden_states=context, added_cond_kwargs=added_cond, return_dict=False)[0]

    return forward


class AdapterTrainer:
    """Trains ``adapter`` (and ``extra_parameters``) on the frozen ``unet`` through the VMix hook."""

    def __init__(
        self,
        unet: nn.Module,
        adapter: VMixAdapter,
        alphas_cumprod: torch.Tensor,
        *,
        lr: float = 1e-4,
        weight_decay: float = 1e-2,
        betas=(0.9, 0.999),
        prediction: str = "epsilon",
        aesthetic_dropout: float = 0.0,
        max_grad_norm: float = 1.0,
        warmup_steps: int = 0,
        mixed_precision: str = "no",
        gradient_checkpointing: bool = False,
        extra_parameters: Iterable[nn.Parameter] = (),
        unet_forward: Optional[UnetForward] = None,
        seed: int = 0,
    ):
        if prediction not in ("epsilon", "v_prediction"):
            raise ValueError(f"unknown prediction type {prediction!r}; use 'epsilon' or 'v_prediction'")
        if mixed_precision not in PRECISIONS:
            raise ValueError(f"mixed precision must be one of {', '.join(PRECISIONS)}")
        self.unet = unet
        self.adapter = adapter
        self.device = adapter.aes_emb.device
        self.alphas_cumprod = alphas_cumprod.to(self.device, torch.float32)
        self.prediction = prediction
        self.aesthetic_dropout = float(aesthetic_dropout)
        self.max_grad_norm = float(max_grad_norm)
        self.warmup_steps = int(warmup_steps)
        self.base_lr = float(lr)
        self.mixed_precision = mixed_precision
        self.gradient_checkpointing = bool(gradient_checkpointing)
        self.forward = unet_forward or diffusers_unet_forward(unet)
        self.step = 0

        unet.requires_grad_(False)
        adapter.requires_grad_(True)
        adapter.aes_emb.requires_grad_(False)  # AesEmb is a frozen lookup table (a buffer anyway)
        if self.gradient_checkpointing:
            if not hasattr(unet, "enable_gradient_checkpointing"):
                raise ValueError("gradient checkpointing needs a diffusers UNet (enable_gradient_checkpointing)")
            unet.enable_gradient_checkpointing()
        self.layers = find_cross_attention_layers(unet)
        self.mixer = ValueMixer(adapter, strength=adapter.train_lambda, strict=True)
        self.mixer.install(unet, self.layers)
        self.mixer.arm()

        self.extra_parameters = [p for p in extra_parameters]
        params = [p for p in adapter.parameters() if p.requires_grad] + self.extra_parameters
        self.parameters = params
        self.optimizer = torch.optim.AdamW(params, lr=self.base_lr, betas=tuple(betas), weight_decay=weight_decay)
        use_scaler = mixed_precision == "fp16" and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        self.generator = torch.Generator(self.device).manual_seed(int(seed))

    # -- helpers ----------------------------------------------------------------------------
    def autocast(self):
        if self.mixed_precision == "no":
            return contextlib.nullcontext()
        dtype = torch.float16 if self.mixed_precision == "fp16" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype)

    def lr_at(self, step: int) -> float:
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        return self.base_lr

    # -- training ---------------------------------------------------------------------------
    def loss(self, batch: TrainBatch) -> torch.Tensor:
        """Loss of one micro-batch with gradients enabled (no optimiser step)."""
        aesthetic_context_for_batch(self.mixer, batch.labels, self.aesthetic_dropout, self.generator)
        with self.autocast():
            return diffusion_loss(
                lambda x, t, c: self.forward(x, t, c, batch.added_cond),
                batch.latents,
                batch.context,
                self.alphas_cumprod,
                self.prediction,
                self.generator,
            )

    def train_step(self, batches: Sequence[TrainBatch]) -> float:
        """One optimiser step over ``batches`` (gradient accumulation); returns their mean loss."""
        if not batches:
            raise ValueError("train_step needs at least one batch")
        self.mixer.strength = self.adapter.train_lambda
        self.mixer.arm()
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for batch in batches:
            loss = self.loss(batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the loss became {loss.item()} at step {self.step + 1}")
            self.scaler.scale(loss / len(batches)).backward()
            total += float(loss.detach())
        self.scaler.unscale_(self.optimizer)
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.parameters, self.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        return total / len(batches)

    # -- resume -----------------------------------------------------------------------------
    def state_dict(self) -> Dict:
        """Everything but the weights' owners: step, optimizer, scaler and RNG states."""
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: Dict) -> None:
        self.step = int(state["step"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.generator.set_state(state["generator"].to(torch.uint8).cpu())

    def close(self) -> None:
        """Remove the VMix hook; the UNet computes the base model again."""
        self.mixer.remove()
        if self.gradient_checkpointing and hasattr(self.unet, "disable_gradient_checkpointing"):
            self.unet.disable_gradient_checkpointing()


def train_adapter(
    unet: nn.Module,
    adapter: VMixAdapter,
    batches: Iterable[TrainBatch],
    steps: int,
    alphas_cumprod: torch.Tensor,
    grad_accum: int = 1,
    on_step: Optional[Callable[[int, float], None]] = None,
    **trainer_options,
) -> List[float]:
    """Train for ``steps`` optimiser steps drawing ``grad_accum`` batches per step; returns the losses.

    ``trainer_options`` are AdapterTrainer's keyword arguments (lr, prediction, mixed_precision,
    gradient_checkpointing, aesthetic_dropout, extra_parameters, unet_forward, seed, ...).  The hook
    is removed on return, also after an error.
    """
    trainer = AdapterTrainer(unet, adapter, alphas_cumprod, **trainer_options)
    iterator: Iterator[TrainBatch] = iter(batches)
    losses = []
    try:
        for _ in range(steps):
            group = [next(iterator) for _ in range(grad_accum)]
            losses.append(trainer.train_step(group))
            if on_step is not None:
                on_step(trainer.step, losses[-1])
    finally:
        trainer.close()
    return losses
