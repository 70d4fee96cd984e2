"""The VMix training loop on any UNet (paper §3.4), run by HuggingFace accelerate.

Frozen base model; trainable: the projection layer and every W_a (the adapter), plus optional extra
parameters (the LoRA).  λ = 1 in training.  Loss: ε- or v-prediction MSE (vmix_lib.training_step).

    trainer = AdapterTrainer(unet, adapter, alphas_cumprod, lr=1e-4)
    for batch in batches:                      # TrainBatch(latents, context, labels[, added_cond])
        loss = trainer.train_step([batch])     # one optimiser step (a list = gradient accumulation)
    trainer.close()                            # removes the hooks; the UNet is the base model again

``train_adapter(...)`` wraps that for a fixed number of steps.  ``state_dict()`` / ``load_state_dict()``
carry everything a resumed run needs to continue bit-for-bit (optimizer, step, RNG).

How a step runs (the same code on 1 device or N processes; runtime.py makes the Accelerator):
``TrainableParts`` - the adapter and the LoRA, and nothing else - is what accelerate prepares: on
several processes it is wrapped in DistributedDataParallel, and the micro-batch loss is computed
inside its ``forward``, so DDP averages the gradients of exactly these parameters.  The frozen UNet is
referenced, not registered: DDP neither owns nor broadcasts its weights.  Gradient accumulation is
accelerate's (``accumulate``: no all-reduce until the last micro-batch; ``backward`` divides by
their number); mixed precision is accelerate's autocast (+ GradScaler for fp16); the learning rate
is a function of the optimiser step, so it is the same for any process count.

The objective seam
------------------
An *objective* is the part that differs between ways of training the same adapter:

    data      objectives.DataObjective: dataset images -> cached VAE latents in aspect-ratio
              buckets -> ε/v-prediction MSE against the drawn noise
    distill   distill.DistillTraining: prompt pairs only -> the frozen model's own predictions as
              targets (its teacher passes run with the hook disarmed, in the same loss call)

Everything else is shared and objective-agnostic: accelerate (devices, processes, DDP), mixed
precision, gradient accumulation, clipping, the learning-rate schedule, the optimiser (this file);
logging, previews, saving, resume, the progress bar (run.py).  See ``Objective`` for what one
provides.  ``DiffusionObjective`` is the loss on ready-made ``TrainBatch`` micro-batches that
programmatic callers (the demonstration, tests) use.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence

import torch
import torch.nn as nn

from ..hook import ValueMixer
from ..layers import find_cross_attention_layers
from ..mixing import VMixAdapter
from ..training_step import aesthetic_context_for_batch, diffusion_loss

PRECISIONS = ("no", "fp16", "bf16")
LR_SCHEDULES = ("constant", "linear", "cosine")
UnetForward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Optional[Dict[str, torch.Tensor]]], torch.Tensor]


@dataclass
class TrainBatch:
    latents: torch.Tensor  # [B, C, h, w], already scaled by the VAE scaling factor
    context: torch.Tensor  # [B, 77·k, d] text conditioning (caption dropout already applied)
    labels: torch.Tensor  # [B, N]: 1 superior, 0 inferior / not labelled (aesthetic dropout applied if noise is given)
    added_cond: Optional[Dict[str, torch.Tensor]] = None  # SDXL: text_embeds [B, 1280], time_ids [B, 6]
    # Drawn per sample by the data pipeline (then the loss draws nothing itself):
    noise: Optional[torch.Tensor] = None  # [B, C, h, w]
    timesteps: Optional[torch.Tensor] = None  # [B] int64
    weights: Optional[torch.Tensor] = None  # [B]: 1, or 0 for a stand-in sample (see runtime.split_for_process)
    loss_scale: float = 1.0  # factor on Σ weight·loss: processes / samples in the global micro-batch


def diffusers_unet_forward(unet: nn.Module) -> UnetForward:
    """(x_t, t, context, added_cond) -> prediction for a diffusers UNet2DConditionModel."""

    def forward(x, t, context, added_cond=None):
        return unet(x, t, encoder_hidden_states=context, added_cond_kwargs=added_cond, return_dict=False)[0]

    return forward


_UNSET = object()
WEBUI_BLOCK_LISTS = ("input_blocks", "output_blocks")  # A1111 (ldm, sgm) and Forge UNets: plus middle_block


def checkpoint_unet_blocks(unet: nn.Module) -> Callable[[], None]:
    """Gradient checkpointing for a WebUI UNet: each of ``input_blocks.i``, ``middle_block`` and
    ``output_blocks.i`` keeps only its inputs and runs again in the backward pass.

    For UNets without diffusers' ``enable_gradient_checkpointing`` (A1111's ldm/sgm, Forge's own).
    Set per instance (``block.forward``), never on a class, so nothing else in the process changes;
    the returned function puts every block back exactly as it was.  Without gradients (sampling,
    the teacher's passes) a block runs as usual.
    """
    from torch.utils.checkpoint import checkpoint

    blocks = [b for name in WEBUI_BLOCK_LISTS for b in getattr(unet, name, ())]
    if getattr(unet, "middle_block", None) is not None:
        blocks.append(unet.middle_block)
    if not blocks:
        raise ValueError("gradient checkpointing needs a diffusers UNet or a WebUI UNet (input_blocks, middle_block, output_blocks)")
    saved = []
    for block in blocks:
        previous = block.__dict__.get("forward", _UNSET)
        original = block.forward

        def forward(*args, _original=original, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_original, *args, use_reentrant=False, **kwargs)
            return _original(*args, **kwargs)

        block.forward = forward
        saved.append((block, previous))

    def restore() -> None:
        for block, previous in saved:
            if previous is _UNSET:
                block.__dict__.pop("forward", None)
            else:
                block.forward = previous
        saved.clear()

    return restore


# -- the seam ------------------------------------------------------------------------------------
class Objective:
    """A way of training the adapter: where micro-batches come from, and what their loss is.

    The loop calls, on every process:

    ``loss(model, batch) -> Tensor``  (required)
        The micro-batch loss, called INSIDE the forward of the DDP-wrapped ``TrainableParts``
        (so gradients are averaged over processes).  ``model`` gives the frozen base and the
        trainable parts: ``model.unet_forward(x_t, t, context, added_cond)``, ``model.unet``,
        ``model.mixer`` (the armed VMix hook; ``model.condition(labels)`` sets f_a per row; with
        ``model.mixer.strength = 0`` the UNet is the frozen base model - set it back to
        ``model.adapter.train_lambda`` for the trained pass), ``model.adapter``, ``model.extra`` (LoRA),
        ``model.alphas_cumprod``, ``model.prediction``, ``model.generator``.  Under mixed precision
        the call already runs in accelerate's autocast.  Return this process's *share*: with a
        global micro-batch split by ``runtime.split_for_process``, ``loss_scale · Σ weight·loss_i``,
        so that DDP's mean over processes is the mean over the global micro-batch.

    ``find_unused_parameters`` (class attribute, default False)
        True if a step can leave some trainable parameter without a gradient (DDP must then
        search the graph each step; otherwise it fails with "Expected to have finished
        reduction in the prior iteration").  The data objective touches every parameter.

    For a whole run (``python -m vmix_lib.train``, see run.py) an objective is made by the factory
    ``objectives.OBJECTIVES[cfg.objective](cfg, family, size_multiple, log)`` before any model
    loads (it validates its inputs there; ``--dry-run`` stops after it), and also provides:

    ``name``                         "data", "distill": the config's ``objective`` and the adapter's metadata
    ``summary() -> [str]``           lines for the start of the log (main process prints them)
    ``setup(ctx)``                   ctx = objectives.RunContext (cfg, base model, text conditioner,
                                     accelerator, device, ...), after the models are loaded, on every
                                     process: heavy preparation
                                     (e.g. caching latents, shared out over ``ctx.accelerator``'s
                                     processes with a barrier)
    ``batches(count) -> Iterator``   this process's next ``count`` micro-batches, on ``ctx.device``,
                                     each passed to ``loss``; it advances the objective's position
    ``state_dict() -> dict``         its position after the batches handed out so far (tensors,
                                     numbers, strings only: it is saved with torch.save and read with
                                     weights_only=True); resuming from it must give the same batches
    ``load_state_dict(state, log)``  continue from a saved position; if the saved run differed
                                     (another global batch, other images) continue sensibly and log
                                     one line saying what changed
    ``fingerprint() -> dict``        settings a resume must not change (else the run refuses)
    ``facts() -> dict``              added to the adapter file's "training" metadata
    ``preview_prompts() -> [str]``   prompts of the λ-sweep previews when the config names none
    ``progress() -> {name: text}``   extra fields for the progress bar after a step (main process)
    ``close()``                      release workers and files

    Randomness: draw per sample from ``runtime.sample_generator(seed, serial)`` (serial = the
    sample's number in the run), not per batch, so the result does not depend on the process count.
    """

    name = "custom"
    find_unused_parameters = False

    def loss(self, model: "TrainableParts", batch: Any) -> torch.Tensor:
        raise NotImplementedError

    def summary(self) -> List[str]:
        return []

    def setup(self, ctx) -> None:
        pass

    def batches(self, count: int) -> Iterator[Any]:
        raise NotImplementedError(f"objective {self.name!r} cannot make batches for a run")

    def state_dict(self) -> Dict:
        return {}

    def load_state_dict(self, state: Dict, log: Callable[[str], None] = print) -> None:
        pass

    def fingerprint(self) -> Dict:
        return {"objective": self.name}

    def facts(self) -> Dict:
        return {"objective": self.name}

    def preview_prompts(self) -> List[str]:
        return []

    def progress(self) -> Dict[str, str]:
        return {}

    def close(self) -> None:
        pass


class DiffusionObjective(Objective):
    """ε/v-prediction MSE on ``TrainBatch`` micro-batches (the paper's loss, Eq. 1).

    With ``batch.noise`` given, the data pipeline drew timesteps, noise and the aesthetic dropout
    per sample; otherwise they are drawn here from the trainer's generator (labels, then timesteps,
    then noise), with ``aesthetic_dropout``.
    """

    name = "diffusion"

    def __init__(self, aesthetic_dropout: float = 0.0):
        self.aesthetic_dropout = float(aesthetic_dropout)

    def loss(self, model: "TrainableParts", batch: TrainBatch) -> torch.Tensor:
        drawn = batch.noise is not None
        model.condition(batch.labels, 0.0 if drawn else self.aesthetic_dropout)
        per_sample = batch.weights is not None
        loss = diffusion_loss(
            lambda x, t, c: model.unet_forward(x, t, c, batch.added_cond),
            batch.latents, batch.context, model.alphas_cumprod, model.prediction, model.generator,
            noise=batch.noise, timesteps=batch.timesteps, reduction="none" if per_sample else "mean",
        )
        if per_sample:
            loss = (loss * batch.weights.to(loss.device, loss.dtype)).sum() * batch.loss_scale
        return loss


class TrainableParts(nn.Module):
    """What accelerate prepares (DDP on several processes): the adapter and the optional LoRA.

    ``forward(batch)`` is the objective's micro-batch loss.  The frozen UNet, the hook and the
    noise schedule are plain attributes, not submodules or buffers, so DDP leaves them alone.
    """

    def __init__(self, unet: nn.Module, adapter: VMixAdapter, mixer: ValueMixer, unet_forward: UnetForward,
                 alphas_cumprod: torch.Tensor, prediction: str, generator: torch.Generator, objective: Objective,
                 extra_parameters: Sequence[nn.Parameter] = ()):
        super().__init__()
        self.adapter = adapter
        self.extra = nn.ParameterList(list(extra_parameters))  # the LoRA's (its modules hook the UNet)
        self.__dict__.update(unet=unet, mixer=mixer, unet_forward=unet_forward, alphas_cumprod=alphas_cumprod,
                             prediction=prediction, generator=generator, objective=objective)

    def trainable_parameters(self) -> List[nn.Parameter]:
        return [p for p in self.adapter.parameters() if p.requires_grad] + list(self.extra)

    def condition(self, labels: torch.Tensor, dropout: float = 0.0) -> torch.Tensor:
        """Per-row f_a [B, 77, d] from labels [B, N] on the hook (outside autocast: a small fp32 layer)."""
        device = self.adapter.aes_emb.device.type
        guard = torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else contextlib.nullcontext()
        with guard:
            return aesthetic_context_for_batch(self.mixer, labels, dropout, self.generator)

    def forward(self, batch):
        return self.objective.loss(self, batch)


# -- the trainer ---------------------------------------------------------------------------------
class AdapterTrainer:
    """Trains ``adapter`` (and ``extra_parameters``) on the frozen ``unet`` through the VMix hook.

    ``accelerator``: an accelerate.Accelerator shared with the caller (a multi-process run);
    by default one is made for the adapter's device and ``mixed_precision``.  ``objective``: the
    micro-batch loss (default: DiffusionObjective on TrainBatch).
    """

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
        lr_schedule: str = "constant",
        max_steps: int = 0,
        mixed_precision: str = "no",
        gradient_checkpointing: bool = False,
        extra_parameters: Iterable[nn.Parameter] = (),
        unet_forward: Optional[UnetForward] = None,
        seed: int = 0,
        objective: Optional[Objective] = None,
        accelerator=None,
    ):

        if prediction not in ("epsilon", "v_prediction"):
            raise ValueError(f"unknown prediction type {prediction!r}; use 'epsilon' or 'v_prediction'")
        if mixed_precision not in PRECISIONS:
            raise ValueError(f"mixed precision must be one of {', '.join(PRECISIONS)}")
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown learning-rate schedule {lr_schedule!r}; use one of {', '.join(LR_SCHEDULES)}")
        self.unet = unet
        self.adapter = adapter
        self.device = adapter.aes_emb.device
        self.alphas_cumprod = alphas_cumprod.to(self.device, torch.float32)
        self.prediction = prediction
        self.max_grad_norm = float(max_grad_norm)
        self.warmup_steps = int(warmup_steps)
        self.lr_schedule = lr_schedule
        self.max_steps = int(max_steps)
        self.base_lr = float(lr)
        self.gradient_checkpointing = bool(gradient_checkpointing)
        self.forward = unet_forward or diffusers_unet_forward(unet)
        self.objective = objective or DiffusionObjective(aesthetic_dropout)
        self.step = 0

        self._unet_flags = [(p, p.requires_grad) for p in unet.parameters()]  # put back by close()
        unet.requires_grad_(False)
        adapter.requires_grad_(True)
        adapter.aes_emb.requires_grad_(False)  # AesEmb is a frozen lookup table (a buffer anyway)
        self._restore_blocks: Optional[Callable[[], None]] = None
        if self.gradient_checkpointing:
            if hasattr(unet, "input_blocks") or not hasattr(unet, "enable_gradient_checkpointing"):
                self._restore_blocks = checkpoint_unet_blocks(unet)  # a WebUI UNet
            else:
                unet.enable_gradient_checkpointing()
        self.layers = find_cross_attention_layers(unet)
        self.mixer = ValueMixer(adapter, strength=adapter.train_lambda, strict=True)
        self.mixer.install(unet, self.layers)
        self.mixer.arm()
        self.generator = torch.Generator(self.device).manual_seed(int(seed))

        if accelerator is None:
            from .runtime import make_accelerator

            accelerator = make_accelerator(self.device, mixed_precision)
        self.accelerator = accelerator
        self.mixed_precision = self.accelerator.mixed_precision
        self.parts = TrainableParts(unet, adapter, self.mixer, self.forward, self.alphas_cumprod, prediction,
                                    self.generator, self.objective, list(extra_parameters))
        self.parameters = self.parts.trainable_parameters()
        self.extra_parameters = list(self.parts.extra)
        optimizer = torch.optim.AdamW(self.parameters, lr=self.base_lr, betas=tuple(betas), weight_decay=weight_decay)
        if self.accelerator.num_processes > 1:
            from accelerate.utils import DistributedDataParallelKwargs

            # DDP only for several processes; gradient buckets as views save a copy of the gradients.
            self.accelerator.ddp_handler = DistributedDataParallelKwargs(
                find_unused_parameters=self.objective.find_unused_parameters, gradient_as_bucket_view=True)
        self.model, self.optimizer = self.accelerator.prepare(self.parts, optimizer)

    # -- helpers ----------------------------------------------------------------------------
    def autocast(self):
        """accelerate's autocast context for the configured mixed precision (previews use it)."""
        return self.accelerator.autocast()

    def lr_at(self, step: int) -> float:
        """Learning rate of optimiser step ``step`` (0-based): linear warm-up, then the schedule."""
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        if self.lr_schedule == "constant" or self.max_steps <= self.warmup_steps:
            return self.base_lr
        progress = min(1.0, (step - self.warmup_steps) / (self.max_steps - self.warmup_steps))
        if self.lr_schedule == "linear":
            return self.base_lr * (1.0 - progress)
        return self.base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))

    # -- training ---------------------------------------------------------------------------
    def loss(self, batch: TrainBatch) -> torch.Tensor:
        """Loss of one micro-batch with gradients enabled (no optimiser step, no all-reduce)."""
        with self.autocast():
            return self.objective.loss(self.parts, batch)

    def train_step(self, batches: Sequence[Any]) -> float:
        """One optimiser step over ``batches`` (gradient accumulation); returns their mean loss,
        averaged over all processes."""
        if not batches:
            raise ValueError("train_step needs at least one batch")
        acc = self.accelerator
        self.mixer.strength = self.adapter.train_lambda
        self.mixer.arm()
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        acc.gradient_accumulation_steps = len(batches)
        acc.step = 0  # the last micro-batch of this list syncs the gradients
        losses = []
        for batch in batches:
            with acc.accumulate(self.model):
                loss = self.model(batch)
                acc.backward(loss)
            losses.append(loss.detach())
        if acc.num_processes > 1:
            mean = acc.reduce(torch.stack(losses).float().mean(), "mean").item()
        else:
            mean = sum(float(v) for v in losses) / len(losses)
        if not math.isfinite(mean):
            self.optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(f"the loss became {mean} at step {self.step + 1}")
        if self.max_grad_norm > 0:
            acc.clip_grad_norm_(self.parameters, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return mean

    # -- resume -----------------------------------------------------------------------------
    def state_dict(self) -> Dict:
        """Everything but the weights' owners: step, optimizer, scaler and RNG states."""
        scaler = self.accelerator.scaler
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else {},
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: Dict) -> None:
        self.step = int(state["step"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler") and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.generator.set_state(state["generator"].to(torch.uint8).cpu())

    def close(self) -> None:
        """Remove the VMix hook and the checkpointing; the UNet computes the base model again."""
        self.mixer.remove()
        if self._restore_blocks is not None:
            self._restore_blocks()
            self._restore_blocks = None
        elif self.gradient_checkpointing and hasattr(self.unet, "disable_gradient_checkpointing"):
            self.unet.disable_gradient_checkpointing()
        for parameter, flag in self._unet_flags:
            parameter.requires_grad_(flag)
        self._unet_flags = []


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
