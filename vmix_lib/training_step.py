"""One VMix training step, shared by the trainer and the demonstration (paper §3.4, Eq. 1).

The base UNet is frozen; gradients reach the projection layer and every W_a through the same
to_v hook used at inference (λ = 1 in training).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .hook import ValueMixer


def aesthetic_context_for_batch(
    mixer: ValueMixer, labels: torch.Tensor, drop_prob: float = 0.0, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """f_a [B, 77, d] from labels [B, N] (1 superior, 0 inferior/missing).

    Aesthetic-condition dropout replaces a row's labels by all-negative, which is what the
    extension feeds for "no aesthetic labels" (α = 0).
    """
    adapter = mixer.adapter
    labels = labels.to(adapter.aes_emb.device, adapter.aes_emb.dtype)
    if drop_prob > 0:
        keep = torch.rand(labels.shape[0], 1, generator=generator, device=labels.device) >= drop_prob
        labels = labels * keep
    f_a = adapter.aesthetic_context(adapter.label_input(labels))
    mixer.set_aesthetic_context(f_a)
    return f_a


def diffusion_loss(
    unet_forward: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    latents: torch.Tensor,
    context: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction: str = "epsilon",
    generator: Optional[torch.Generator] = None,
    noise: Optional[torch.Tensor] = None,
    timesteps: Optional[torch.Tensor] = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """ε- or v-prediction MSE at uniformly drawn timesteps; ``unet_forward(x_t, t, context)``.

    ``timesteps`` [B] and ``noise`` (latents' shape) may be given (drawn per sample elsewhere);
    otherwise they are drawn here from ``generator``, timesteps first.  ``reduction`` "mean" gives
    one number, "none" the per-sample means [B].
    """
    b = latents.shape[0]
    t = timesteps.to(latents.device) if timesteps is not None else torch.randint(
        0, alphas_cumprod.shape[0], (b,), generator=generator, device=latents.device)
    if noise is None:
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    noise = noise.to(latents.device, latents.dtype)
    a = alphas_cumprod.to(latents.device, torch.float32)[t].view(b, *([1] * (latents.dim() - 1)))
    noisy = (a.sqrt() * latents + (1 - a).sqrt() * noise).to(latents.dtype)
    pred = unet_forward(noisy, t, context)
    if prediction == "epsilon":
        target = noise
    elif prediction == "v_prediction":
        target = a.sqrt() * noise - (1 - a).sqrt() * latents
    else:
        raise ValueError(f"unknown prediction type {prediction!r}; use 'epsilon' or 'v_prediction'")
    if reduction == "none":
        return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, pred.dim())))
    return F.mse_loss(pred.float(), target.float())
