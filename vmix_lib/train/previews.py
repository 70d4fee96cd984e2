"""λ-sweep preview grids during training: DDIM with classifier-free guidance, adapter hooked.

One row per prompt, one column per λ (the paper's Fig. 7 sweep: 0 = the base model, 1 = training
strength, above 1 = stronger aesthetics), all with the same starting noise and all aesthetic labels
positive (the paper's inference default).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..hook import ValueMixer

EncodeFn = Callable[[Sequence[str]], Tuple[torch.Tensor, Optional[Dict[str, torch.Tensor]]]]
DecodeFn = Callable[[torch.Tensor], torch.Tensor]  # latents -> images [B, 3, H, W] in [-1, 1]


def ddim_timesteps(steps: int, train_steps: int = 1000, offset: int = 1) -> List[int]:
    """'leading' spacing with steps_offset 1, as SD's DDIM scheduler config."""
    ratio = train_steps // steps
    return [min(i * ratio + offset, train_steps - 1) for i in range(steps)][::-1]


def x0_and_eps(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, prediction: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x̂₀, ε̂) from the model's output ``out`` at ``x`` = x_t with ᾱ_t = ``a``, for ε- or v-prediction."""
    if prediction == "v_prediction":
        return a.sqrt() * x - (1 - a).sqrt() * out, a.sqrt() * out + (1 - a).sqrt() * x
    return (x - (1 - a).sqrt() * out) / a.sqrt(), out


@torch.no_grad()
def ddim_sample(
    unet_forward,
    noise: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    steps: int = 20,
    cfg: float = 7.5,
    prediction: str = "epsilon",
    added_cond: Optional[Dict[str, torch.Tensor]] = None,
    added_uncond: Optional[Dict[str, torch.Tensor]] = None,
) -> torch.Tensor:
    """Deterministic DDIM (η = 0) with CFG; ``unet_forward(x, t, context, added)`` as in loop.py."""
    acp = alphas_cumprod.to(noise.device, torch.float32)
    x = noise.float()
    times = ddim_timesteps(steps, acp.shape[0])
    context = torch.cat([uncond, cond])
    added = None
    if added_cond is not None:
        added = {k: torch.cat([added_uncond[k], added_cond[k]]) for k in added_cond}
    for i, t in enumerate(times):
        a_t = acp[t]
        a_prev = acp[times[i + 1]] if i + 1 < len(times) else acp[0]
        tt = torch.full((2 * x.shape[0],), t, device=x.device, dtype=torch.long)
        out = unet_forward(torch.cat([x, x]).to(context.dtype), tt, context, added).float()
        out_u, out_c = out.chunk(2)
        out = out_u + cfg * (out_c - out_u)
        x0, eps = x0_and_eps(out, x, a_t, prediction)
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x


def _to_pil(image: torch.Tensor):
    from PIL import Image

    array = ((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def _fit(draw, text: str, font, width: float) -> str:
    """``text``, cut with '…' to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text.rstrip() + "…"


def _wrap(draw, text: str, font, width: float, lines: int) -> List[str]:
    """``text`` in at most ``lines`` lines of ``width`` pixels, broken between words; the last is cut with '…'."""
    out: List[str] = []
    words = text.split()
    while words and len(out) < lines:
        line = words.pop(0)
        while words and draw.textlength(line + " " + words[0], font=font) <= width:
            line += " " + words.pop(0)
        out.append(line)
    if words:
        out[-1] = out[-1] + " " + " ".join(words)
    return [_fit(draw, line, font, width) for line in out]


ROW_LABEL_WIDTH = 150  # pixels of the left margin that holds the row labels


def make_grid(rows: List[List], col_labels: Sequence[str], title: str = "", min_tile: int = 128,
              row_labels: Optional[Sequence[str]] = None):
    """Paste PIL tiles into one image: a title line, a line of column labels, then the rows
    (each with its label in a left margin when ``row_labels`` are given; a label's lines are
    separated by '\n', each wrapped to two lines at most and cut with '…' beyond).

    Tiles smaller than ``min_tile`` are enlarged (nearest neighbour) so that small previews stay
    legible.  All text is drawn in one font that has glyphs for it (scoring.images.label_font).
    """
    from PIL import Image, ImageDraw

    from ..scoring.images import label_font

    tile_w, tile_h = rows[0][0].size
    zoom = max(1, -(-min_tile // max(tile_w, 1)))
    tile_w, tile_h = tile_w * zoom, tile_h * zoom
    header = 34
    margin = ROW_LABEL_WIDTH if row_labels else 0
    grid = Image.new("RGB", (margin + tile_w * len(rows[0]), tile_h * len(rows) + header), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    font = label_font(12, title + "".join(col_labels) + "".join(row_labels or []))
    draw.text((4, 3), _fit(draw, title, font, grid.width - 8), fill=(60, 60, 60), font=font)
    for c, label in enumerate(col_labels):
        draw.text((margin + c * tile_w + 4, 19), _fit(draw, label, font, tile_w - 8), fill=(0, 0, 0), font=font)
    line_height = font.size + 3 if hasattr(font, "size") else 13
    for r, row in enumerate(rows):
        if row_labels:
            lines = [line for part in row_labels[r].split("\n") for line in _wrap(draw, part, font, margin - 8, 2)]
            for k, line in enumerate(lines[: max(1, (tile_h - 8) // line_height)]):
                draw.text((4, header + r * tile_h + 4 + k * line_height), line, fill=(0, 0, 0), font=font)
        for c, tile in enumerate(row):
            if zoom > 1:
                tile = tile.resize((tile_w, tile_h), Image.NEAREST)
            grid.paste(tile, (margin + c * tile_w, header + r * tile_h))
    return grid


@torch.no_grad()
def lambda_sweep(
    mixer: ValueMixer,
    unet_forward,
    encode: EncodeFn,
    decode: DecodeFn,
    prompts: Sequence[str],
    lambdas: Sequence[float],
    latent_shape: Tuple[int, int, int],
    alphas_cumprod: torch.Tensor,
    steps: int = 20,
    cfg: float = 7.5,
    prediction: str = "epsilon",
    seed: int = 0,
    device=None,
    dtype: torch.dtype = torch.float32,
    autocast=None,
    title: str = "",
    labels: Optional[torch.Tensor] = None,
    row_labels: Optional[Sequence[str]] = None,
):
    """Grid image of ``prompts`` × ``lambdas``; restores the mixer's strength afterwards.

    Uses all-positive aesthetic labels (or ``labels`` [rows, N], α per row and dimension) and no
    negative prompt (empty-prompt unconditional), as the paper's evaluation does.  The same
    prompt may appear in several rows; each row starts from the noise of its prompt.
    """
    import contextlib

    saved_strength, saved_rows = mixer.strength, mixer.row_strengths
    mixer.row_strengths = None  # a training step's per-row factors (the mirrored λ = −1) are not the preview's
    cond, added_c = encode(list(prompts))
    uncond, added_u = encode([""] * len(prompts))
    device = device or cond.device
    generator = torch.Generator("cpu").manual_seed(int(seed))
    first = list(dict.fromkeys(prompts))
    per_prompt = torch.randn((len(first), *latent_shape), generator=generator)
    noise = per_prompt[[first.index(p) for p in prompts]].to(device)
    columns = []
    try:
        if labels is None:
            mixer.set_alphas(None)  # all dimensions positive
        else:  # one f_a per row, for the [uncond …, cond …] rows of each call
            adapter = mixer.adapter
            f_a = adapter.aesthetic_context(adapter.label_input(labels.to(adapter.aes_emb.device)))
            mixer.set_aesthetic_context(f_a.repeat(2, 1, 1))
        for lam in lambdas:
            mixer.strength = float(lam)
            with autocast() if autocast else contextlib.nullcontext():
                latents = ddim_sample(
                    unet_forward, noise, cond.to(device, dtype), uncond.to(device, dtype), alphas_cumprod, steps, cfg,
                    prediction, added_c, added_u,
                )
            columns.append(decode(latents))
    finally:
        mixer.strength, mixer.row_strengths = saved_strength, saved_rows  # the next step sets its own per-row f_a
    rows = [[_to_pil(columns[c][r]) for c in range(len(lambdas))] for r in range(len(prompts))]
    return make_grid(rows, [f"lambda {lam:g}" for lam in lambdas], title, row_labels=row_labels)


def preview_maker(cfg, parts, decode: DecodeFn, trainer, objective, folder: str) -> Callable[[int], str]:
    """``make(step) -> path``: a λ-sweep grid of the run's preview settings, written to ``folder``.

    ``parts`` is the run's session.ModelParts (its forward, conditioning, ᾱ), ``decode`` the host's
    VAE (latents -> images in [-1, 1]).  Rows: every preview prompt with all dimensions superior,
    then (``preview_dimensions``) the first prompt with one dimension at a time.
    """
    import os

    from . import loop

    res = cfg.preview_resolution or cfg.family_default("resolution", parts.family)
    prompts = list(cfg.preview_prompts) or objective.preview_prompts() or ["a photograph"]
    shape = (parts.latent_channels, res // parts.vae_factor, res // parts.vae_factor)
    forward = parts.unet_forward or loop.diffusers_unet_forward(parts.unet)
    encode = parts.encoder(res)
    dims = [d.name for d in cfg.dimensions]
    rows = list(prompts) + ([prompts[0]] * len(dims) if cfg.preview_dimensions else [])
    labels = torch.ones(len(rows), len(dims))
    if cfg.preview_dimensions:
        labels[len(prompts):] = torch.eye(len(dims))
    row_labels = [p + "\nall dimensions" for p in prompts] + ([f"{prompts[0]}\nonly {d}" for d in dims] if cfg.preview_dimensions else [])

    def make(step: int) -> str:
        os.makedirs(folder, exist_ok=True)
        grid = lambda_sweep(
            trainer.mixer, forward, encode, decode, rows, cfg.preview_lambdas, shape, parts.alphas_cumprod,
            cfg.preview_steps, cfg.preview_cfg, parts.prediction, cfg.preview_seed, autocast=trainer.autocast,
            title=f"step {step}: one column per lambda; each row: its prompt and the dimensions labelled superior",
            labels=labels, row_labels=row_labels,
        )
        path = os.path.join(folder, f"{cfg.name}-step{step:06d}.png")
        grid.save(path)
        return path

    return make
