"""VMix end to end on a CPU in minutes, with nothing downloaded: ``python -m vmix_lib.demo``.

1. Draws a synthetic dataset (vmix_lib/demo_data.py): one shape per image, captioned with its
   shape and position; saturation ("color") and brightness ("lighting") play the aesthetic
   dimensions.
2. Trains a small text-to-image diffusion model from scratch in pixel space: a diffusers
   UNet2DConditionModel with real cross-attention (attn2) layers, conditioned on a transformers
   CLIPTextModel with a tiny configuration and a word-level vocabulary built here.  The text
   encoder is trained jointly with the UNet (it is this model's "pre-training"); afterwards both
   are frozen, as a user's checkpoint is.
3. Builds AesEmb from that text encoder's pooled output ("[CLS]"), as the paper does, and trains
   a VMix adapter (projection layer + one W_a per attn2) on the frozen base through the same
   ValueMixer hook and training step the extension and the trainer use (λ = 1, labels per image).
4. Samples a fixed set of prompts and seeds with DDIM for a λ sweep under several aesthetic
   settings, and writes grid.png, results.json and results.csv, printing the measured table.

Only this demonstration needs diffusers and transformers; the extension does not import it.
The adapter stays in memory: the adapter file format holds the SD1.5 and SDXL layer layouts
only, and this little UNet is neither (see vmix_lib/adapter_file.py).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

from . import demo_data as data
from .dimensions import DEFAULT_DIMENSIONS
from .hook import ValueMixer
from .mixing import VMixAdapter, build_aes_emb
from .training_step import aesthetic_context_for_batch, diffusion_loss

# The extension's own label strings for the two dimensions the synthetic data varies.
DIMENSIONS = tuple(d for d in DEFAULT_DIMENSIONS if d.name in ("color", "lighting"))

# Aesthetic settings of the sweep: name -> α per dimension (1 = positive label, 0 = negative).
SETTINGS: Dict[str, Dict[str, float]] = {
    "color": {"color": 1.0, "lighting": 0.0},
    "lighting": {"color": 0.0, "lighting": 1.0},
    "none": {"color": 0.0, "lighting": 0.0},
}


@dataclass
class DemoConfig:
    seed: int = 0
    size: int = 16  # image side in pixels
    channels: Tuple[int, ...] = (32, 64)  # UNet block widths; attn2 in every block but the first
    context_dim: int = 32  # text width = cross-attention context width d
    pooled_text: bool = True
    train_text_encoder: bool = False
    prediction: str = "v_prediction"
    noise_shift: float = 3.0  # what the UNet predicts ("epsilon" or "v_prediction")
    text_layers: int = 2
    base_images: int = 4096
    adapter_images: int = 4096
    superior_fraction: Tuple[float, float] = (0.5, 0.5)  # (color, lighting) in the adapter set
    batch: int = 32
    base_steps: int = 1500
    base_lr: float = 2e-3
    adapter_steps: int = 400
    adapter_lr: float = 2e-3
    caption_dropout: float = 0.1  # empty caption, for classifier-free guidance
    sample_steps: int = 25  # DDIM
    guidance: float = 1.0  # classifier-free guidance scale (1 = off)
    seeds_per_prompt: int = 2  # samples per caption per λ; all 27 captions are sampled
    lambdas: Tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0)
    settings: Tuple[str, ...] = ("color", "lighting", "none")
    grid_prompts: Tuple[int, ...] = (0, 13, 26)  # caption indices shown in the grid
    grid_scale: int = 4


FULL = DemoConfig()
QUICK = replace(FULL, base_images=2048, adapter_images=2048, base_steps=500, adapter_steps=200, seeds_per_prompt=1)


# -- models -------------------------------------------------------------------------------------
def build_text_encoder(vocab_size: int, cfg: DemoConfig):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.context_dim,
        intermediate_size=cfg.context_dim * 4,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=4,
        max_position_embeddings=data.TOKENS,
        bos_token_id=data.WordTokenizer.BOS,
        eos_token_id=data.WordTokenizer.EOS,  # pooled output = first EOS, as in CLIP
        pad_token_id=data.WordTokenizer.EOS,
    )
    return CLIPTextModel(config)


def build_unet(cfg: DemoConfig):
    from diffusers import UNet2DConditionModel

    levels = len(cfg.channels)
    return UNet2DConditionModel(
        sample_size=cfg.size,
        in_channels=3 + 2,  # RGB + (x, y) coordinate planes, so a tiny UNet can place things by name
        out_channels=3,
        layers_per_block=1,
        block_out_channels=cfg.channels,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
        cross_attention_dim=cfg.context_dim,
        # Also a pooled text embedding added to the time embedding (as SDXL adds its pooled text
        # embedding): it lets a model this small pick up the caption within minutes.
        addition_embed_type="text" if cfg.pooled_text else None,
        addition_embed_type_num_heads=4,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def build_scheduler(cfg: DemoConfig):
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000, trained_betas=shifted_cosine_betas(cfg.noise_shift).tolist(),
        clip_sample=True, prediction_type=cfg.prediction,
    )


def shifted_cosine_betas(shift: float, steps: int = 1000) -> torch.Tensor:
    """The cosine schedule with its signal-to-noise ratio divided by shift².

    On 16-pixel images a shape is still visible through most of the cosine schedule's noise
    levels, so a model trained on it barely needs the caption; shifting the schedule towards
    noise (as done for large images) puts more of training where the caption decides the content.
    """
    t = torch.arange(steps + 1, dtype=torch.float64) / steps
    a = torch.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    a = a / a[0]
    snr = a / (1 - a).clamp_min(1e-12) / shift**2
    a = snr / (1 + snr)
    a[0] = 1.0
    return (1 - a[1:] / a[:-1]).clamp(0, 0.999).float()


def coordinate_planes(size: int) -> torch.Tensor:
    """[1, 2, S, S] x and y in [-1, 1] (CoordConv input channels)."""
    axis = torch.linspace(-1, 1, size)
    return torch.stack([axis.view(1, -1).expand(size, size), axis.view(-1, 1).expand(size, size)]).unsqueeze(0)


# -- the training loop --------------------------------------------------------------------------
def train_loop(
    step_fn: Callable[[torch.Generator], torch.Tensor],
    parameters: Iterable[torch.nn.Parameter],
    steps: int,
    lr: float,
    generator: torch.Generator,
    desc: str,
    log: Callable[[str], None],
) -> List[float]:
    """AdamW with a short warm-up and cosine decay; ``step_fn(generator)`` returns the loss.

    Deliberately generic (a loss closure and the parameters) so the trainer's loop can replace it.
    """
    params = [p for p in parameters if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps))
    )
    losses: List[float] = []
    start = time.time()
    every = max(1, steps // 10)
    for i in range(steps):
        loss = step_fn(generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if (i + 1) % every == 0 or i + 1 == steps:
            done = time.time() - start
            recent = sum(losses[-every:]) / len(losses[-every:])
            eta = done / (i + 1) * (steps - i - 1)
            log(f"  {desc}: step {i + 1}/{steps}  loss {recent:.4f}  {done:.0f}s elapsed, ~{eta:.0f}s left")
    return losses


@dataclass
class BaseModel:
    tokenizer: data.WordTokenizer
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    scheduler: object
    contexts: torch.Tensor  # [len(all_captions()), 77, d], frozen text encoder output
    empty_context: torch.Tensor  # [77, d] for the empty caption

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        return self.text_encoder(self.tokenizer(texts)).last_hidden_state

    def encode_pooled(self, texts: Sequence[str]) -> torch.Tensor:
        return self.text_encoder(self.tokenizer(texts)).pooler_output

    def unet_forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        coords = coordinate_planes(x.shape[-1]).to(x.dtype).expand(x.shape[0], -1, -1, -1)
        return self.unet(torch.cat([x, coords], 1), t, encoder_hidden_states=context).sample


def train_base(cfg: DemoConfig, log: Callable[[str], None]) -> BaseModel:
    captions = data.all_captions()
    label_texts = [d.positive for d in DIMENSIONS] + [d.negative for d in DIMENSIONS]
    tokenizer = data.WordTokenizer(captions + label_texts)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        text_encoder = build_text_encoder(tokenizer.vocab_size, cfg)
        unet = build_unet(cfg)
    scheduler = build_scheduler(cfg)
    alphas_cumprod = scheduler.alphas_cumprod
    g = torch.Generator().manual_seed(cfg.seed + 1)
    dataset = data.make_images(cfg.base_images, cfg.size, g)
    images = dataset.images * 2 - 1
    ids = tokenizer(captions + [""])  # the last row is the empty caption
    caption_index = dataset.caption_index()
    model = BaseModel(tokenizer, text_encoder, unet, scheduler, torch.empty(0), torch.empty(0))

    def step(gen: torch.Generator) -> torch.Tensor:
        pick = torch.randint(0, images.shape[0], (cfg.batch,), generator=gen)
        rows = caption_index[pick]
        drop = torch.rand(cfg.batch, generator=gen) < cfg.caption_dropout
        rows = torch.where(drop, torch.full_like(rows, len(captions)), rows)
        context = text_encoder(ids[rows]).last_hidden_state
        return diffusion_loss(model.unet_forward, images[pick], context, alphas_cumprod, cfg.prediction, generator=gen)

    unet.train()
    text_encoder.train()
    log(f"Training the base model ({sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M UNet + "
        f"{sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f}M text encoder parameters) on "
        f"{cfg.base_images} ordinary images")
    if not cfg.train_text_encoder:
        text_encoder.eval().requires_grad_(False)
    train_loop(step, list(unet.parameters()) + list(text_encoder.parameters()), cfg.base_steps, cfg.base_lr, g, "base", log)
    # Frozen from here on, like a user's checkpoint.
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    with torch.no_grad():
        contexts = text_encoder(ids).last_hidden_state
    model.contexts, model.empty_context = contexts[:-1], contexts[-1]
    return model


def train_adapter(base: BaseModel, cfg: DemoConfig, log: Callable[[str], None]) -> ValueMixer:
    """A VMix adapter on the frozen base; returns its ValueMixer, installed on the UNet."""
    aes_emb = build_aes_emb(base.encode_pooled, DIMENSIONS)
    # "demo": not an SD1.5/SDXL layout, so the adapter is not written in the adapter file format.
    adapter = VMixAdapter.for_unet(base.unet, aes_emb, family="demo", dimensions=DIMENSIONS)
    mixer = ValueMixer(adapter, strength=1.0, strict=True)
    mixer.install(base.unet)
    mixer.arm()
    g = torch.Generator().manual_seed(cfg.seed + 2)
    dataset = data.make_images(cfg.adapter_images, cfg.size, g, superior_fraction=cfg.superior_fraction)
    images = dataset.images * 2 - 1
    contexts = torch.cat([base.contexts, base.empty_context.unsqueeze(0)])
    caption_index = dataset.caption_index()
    alphas_cumprod = base.scheduler.alphas_cumprod

    def step(gen: torch.Generator) -> torch.Tensor:
        pick = torch.randint(0, images.shape[0], (cfg.batch,), generator=gen)
        rows = caption_index[pick]
        drop = torch.rand(cfg.batch, generator=gen) < cfg.caption_dropout
        rows = torch.where(drop, torch.full_like(rows, len(base.contexts)), rows)
        aesthetic_context_for_batch(mixer, dataset.labels[pick])
        return diffusion_loss(base.unet_forward, images[pick], contexts[rows], alphas_cumprod, cfg.prediction, generator=gen)

    adapter.train()
    trainable = sum(p.numel() for p in adapter.parameters())
    log(f"Training the VMix adapter ({len(adapter.layer_names)} attn2 layers, {trainable / 1e3:.1f}k parameters, "
        f"λ = 1) on {cfg.adapter_images} labelled images; the base stays frozen")
    train_loop(step, adapter.parameters(), cfg.adapter_steps, cfg.adapter_lr, g, "adapter", log)
    adapter.eval().requires_grad_(False)
    mixer.disarm()
    return mixer


# -- sampling -----------------------------------------------------------------------------------
@torch.no_grad()
def sample(base: BaseModel, contexts: torch.Tensor, noise: torch.Tensor, cfg: DemoConfig) -> torch.Tensor:
    """DDIM (η = 0) from ``noise`` [B, 3, S, S] for ``contexts`` [B, 77, d]; images in [0, 1]."""
    scheduler = base.scheduler
    scheduler.set_timesteps(cfg.sample_steps)
    x = noise.clone()
    guided = cfg.guidance != 1.0
    if guided:
        contexts = torch.cat([contexts, base.empty_context.expand_as(contexts)])
    for t in scheduler.timesteps:
        model_in = torch.cat([x, x]) if guided else x
        eps = base.unet_forward(model_in, t.expand(model_in.shape[0]), contexts)
        if guided:
            cond, uncond = eps.chunk(2)
            eps = uncond + cfg.guidance * (cond - uncond)
        x = scheduler.step(eps, t, x).prev_sample
    return ((x + 1) / 2).clamp(0, 1)


def sweep_inputs(base: BaseModel, cfg: DemoConfig) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fixed prompts and noise: every caption, ``seeds_per_prompt`` seeds each."""
    n_captions = len(data.all_captions())
    caption_index = torch.arange(n_captions).repeat_interleave(cfg.seeds_per_prompt)
    noise = torch.cat(
        [torch.randn(1, 3, cfg.size, cfg.size, generator=torch.Generator().manual_seed(cfg.seed * 100003 + 7 + i)) for i in range(len(caption_index))]
    )
    return caption_index, base.contexts[caption_index], noise


@dataclass
class SweepResult:
    setting: str
    alphas: Dict[str, float]
    lambdas: List[float]
    saturation: List[float]
    value: List[float]
    iou: List[float]  # mean foreground IoU against λ = 0 (same prompt, same seed)
    centroid_shift: List[float]  # mean centre shift in pixels against λ = 0
    position_accuracy: List[float]  # share of images whose shape sits at the captioned position
    images: List[torch.Tensor] = field(repr=False, default_factory=list)


def run_sweep(base: BaseModel, mixer: ValueMixer, cfg: DemoConfig, log: Callable[[str], None]):
    caption_index, contexts, noise = sweep_inputs(base, cfg)
    positions = data.caption_parts(caption_index)[2]
    mixer.disarm()
    base_images = sample(base, contexts, noise, cfg)  # hook installed but not armed: the base model
    results: List[SweepResult] = []
    mixer.arm()
    try:
        for name in cfg.settings:
            alphas = SETTINGS[name]
            mixer.set_alphas(alphas)
            res = SweepResult(name, dict(alphas), list(cfg.lambdas), [], [], [], [], [])
            reference = None
            for lam in cfg.lambdas:
                mixer.strength = float(lam)
                images = sample(base, contexts, noise, cfg)
                m = data.measure(images)
                if reference is None:
                    reference = m
                shift = (data.centroids(m.masks) - data.centroids(reference.masks)).norm(dim=-1)
                res.images.append(images)
                res.saturation.append(m.saturation)
                res.value.append(m.value)
                res.iou.append(float(data.mask_iou(m.masks, reference.masks).mean()))
                res.centroid_shift.append(float(shift.nan_to_num(float(cfg.size)).mean()))
                res.position_accuracy.append(float(data.position_correct(m.masks, positions).float().mean()))
            log(f"  sampled setting {name!r} for λ = {', '.join(f'{l:g}' for l in cfg.lambdas)}")
            results.append(res)
    finally:
        mixer.disarm()
    return base_images, caption_index, results


# -- report -------------------------------------------------------------------------------------
def is_increasing(values: Sequence[float]) -> bool:
    return all(b > a for a, b in zip(values, values[1:]))


def spread(values: Sequence[float]) -> float:
    return max(values) - min(values)


def format_table(results: Sequence[SweepResult]) -> str:
    lambdas = results[0].lambdas
    head = f"{'setting':<10}{'measure':<16}" + "".join(f"{'λ=' + format(l, 'g'):>9}" for l in lambdas)
    lines = [head, "-" * len(head)]
    for res in results:
        alphas = ",".join(f"{k}={v:g}" for k, v in res.alphas.items())
        rows = [
            ("saturation", res.saturation, "{:.3f}"),
            ("brightness", res.value, "{:.3f}"),
            ("IoU vs λ=0", res.iou, "{:.3f}"),
            ("shift px", res.centroid_shift, "{:.2f}"),
            ("position ok", res.position_accuracy, "{:.2f}"),
        ]
        for i, (label, values, fmt) in enumerate(rows):
            first = res.setting if i == 0 else (f"({alphas})" if i == 1 else "")
            lines.append(f"{first:<10}{label:<16}" + "".join(f"{fmt.format(v):>9}" for v in values))
        lines.append("")
    return "\n".join(lines).rstrip()


def write_grid(path: str, results: Sequence[SweepResult], caption_index: torch.Tensor, cfg: DemoConfig) -> None:
    """Rows = (setting, prompt), columns = λ; each cell one sample, scaled up without smoothing."""
    from PIL import Image, ImageDraw

    scale, size = cfg.grid_scale, cfg.size
    cell = size * scale
    pad = 2
    label_w, head_h = 170, 16
    picks = []
    for prompt in cfg.grid_prompts:
        hits = (caption_index == prompt).nonzero()
        if len(hits):
            picks.append((prompt, int(hits[0])))
    rows = [(res, prompt, i) for res in results for prompt, i in picks]
    width = label_w + len(cfg.lambdas) * (cell + pad)
    height = head_h + len(rows) * (cell + pad)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, lam in enumerate(cfg.lambdas):
        draw.text((label_w + j * (cell + pad) + 2, 2), f"λ={lam:g}" if False else f"lambda={lam:g}", fill=(0, 0, 0))
    captions = data.all_captions()
    for r, (res, prompt, i) in enumerate(rows):
        y = head_h + r * (cell + pad)
        draw.text((2, y + 2), res.setting + " " + ",".join(f"{k[0]}={v:g}" for k, v in res.alphas.items()), fill=(0, 0, 0))
        draw.text((2, y + 16), captions[prompt].replace("a ", "", 1), fill=(80, 80, 80))
        for j, images in enumerate(res.images):
            pixels = (images[i].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
            tile = Image.fromarray(pixels).resize((cell, cell), Image.NEAREST)
            canvas.paste(tile, (label_w + j * (cell + pad), y))
    canvas.save(path)


def checks(results: Sequence[SweepResult]) -> Dict[str, object]:
    by = {r.setting: r for r in results}
    out: Dict[str, object] = {}
    if "color" in by:
        out["color_on_saturation_increasing"] = is_increasing(by["color"].saturation)
        out["color_on_saturation_spread"] = spread(by["color"].saturation)
        out["color_on_min_iou"] = min(by["color"].iou)
    off = [r for r in results if r.alphas.get("color") == 0.0]
    if off:
        out["color_off_saturation_spread"] = max(spread(r.saturation) for r in off)
    if "lighting" in by:
        out["lighting_on_brightness_increasing"] = is_increasing(by["lighting"].value)
    return out


def run_demo(cfg: DemoConfig, out_dir: Optional[str] = None, log: Callable[[str], None] = print) -> Dict[str, object]:
    """The whole demonstration; returns the report (and writes it to ``out_dir`` if given)."""
    started = time.time()
    with deterministic():
        base = train_base(cfg, log)
        mixer = train_adapter(base, cfg, log)
        log(f"Sampling {len(data.all_captions()) * cfg.seeds_per_prompt} images per λ with DDIM, {cfg.sample_steps} steps")
        try:
            base_images, caption_index, results = run_sweep(base, mixer, cfg, log)
        finally:
            mixer.remove()
    equal = all(torch.equal(r.images[r.lambdas.index(0.0)], base_images) for r in results if 0.0 in r.lambdas)
    report = {
        "config": asdict(cfg),
        "dimensions": [d.to_json() for d in DIMENSIONS],
        "lambda0_equals_base_bitwise": equal,
        "results": [{k: v for k, v in asdict(r).items() if k != "images"} for r in results],
        "checks": checks(results),
        "seconds": round(time.time() - started, 1),
    }
    report["_results"] = results
    report["_base_images"] = base_images
    report["_caption_index"] = caption_index
    if out_dir:
        write_outputs(out_dir, report, cfg)
    return report


def write_outputs(out_dir: str, report: Mapping[str, object], cfg: DemoConfig) -> Dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, n) for k, n in (("grid", "grid.png"), ("json", "results.json"), ("csv", "results.csv"))}
    results: Sequence[SweepResult] = report["_results"]
    write_grid(paths["grid"], results, report["_caption_index"], cfg)
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump({k: v for k, v in report.items() if not k.startswith("_")}, f, indent=2)
    with open(paths["csv"], "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["setting", "alpha_color", "alpha_lighting", "lambda", "saturation", "brightness", "iou_vs_lambda0", "centroid_shift_px", "position_accuracy"])
        for r in results:
            for i, lam in enumerate(r.lambdas):
                w.writerow([r.setting, r.alphas["color"], r.alphas["lighting"], lam, f"{r.saturation[i]:.4f}", f"{r.value[i]:.4f}",
                            f"{r.iou[i]:.4f}", f"{r.centroid_shift[i]:.3f}", f"{r.position_accuracy[i]:.3f}"])
    return paths


@contextlib.contextmanager
def deterministic():
    """Deterministic kernels for the run; the caller's setting is restored afterwards."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


# -- command line -------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vmix_lib.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join("out", "vmix-demo"), help="output folder (default: out/vmix-demo)")
    parser.add_argument("--seed", type=int, default=0, help="seed for data, initialisation and sampling (default 0)")
    parser.add_argument("--quick", action="store_true", help="a smaller run (under a minute) for a first look")
    args = parser.parse_args(argv)
    cfg = replace(QUICK if args.quick else FULL, seed=args.seed)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    report = run_demo(cfg, args.out, log)
    print(format_table(report["_results"]))
    print()
    c = report["checks"]
    print(f"λ = 0 equals the base model bit for bit: {'yes' if report['lambda0_equals_base_bitwise'] else 'NO'}")
    if "color_on_saturation_increasing" in c:
        print(f"saturation rises monotonically with λ when color is on: {'yes' if c['color_on_saturation_increasing'] else 'NO'} "
              f"(spread {c['color_on_saturation_spread']:.3f}; with color off: {c['color_off_saturation_spread']:.3f})")
    print(f"wrote {os.path.join(args.out, 'grid.png')}, results.json and results.csv ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
