"""VMix end to end on a CPU in minutes, with nothing downloaded: ``python -m vmix_lib.demo``.

1. Draws a synthetic dataset (vmix_lib/demo/data.py): one coloured shape per image, captioned
   with its hue, shape and position; saturation ("color") and brightness ("lighting") play the
   aesthetic dimensions.
2. Trains a small text-to-image diffusion model from scratch in pixel space: a diffusers
   UNet2DConditionModel with real cross-attention (attn2) layers, conditioned on a transformers
   CLIPTextModel with a tiny configuration and a word-level vocabulary built here.  Captions of
   the vivid and bright pictures drawn superior end with the phrases "vibrant color" and
   "natural lighting", so the model knows the words.
3. Freezes it, builds AesEmb from its own text encoder's pooled output ("[CLS]") as the paper
   does, and trains two VMix adapters (projection layer + one W_a per attn2) with the trainer's
   loop (vmix_lib.train.loop: λ = 1, the base frozen): one on labelled pictures (objective
   "data"), one distilled from prompt pairs alone, the base model's own predictions as the target
   (objective "distill", vmix_lib.train.distill).
4. Samples fixed prompts and seeds with DDIM for a λ sweep under several aesthetic settings
   through the extension's ValueMixer hook, compares every picture with the base model's picture
   of the same prompt and seed, prints the measured table (both adapters side by side) and writes
   grid.png, results.json and results.csv.
5. With ``--evaluate DIR``: judges the same models with the evaluation tool (vmix_lib.evaluate,
   through vmix_lib/demo/evaluation.py): bootstrap intervals, paired shifts from VMix off, the λ
   trade-off plot, the grid and the HTML report.

Only this demonstration needs diffusers and transformers; the extension never imports it.  The
adapter stays in memory: the adapter file format holds the SD1.5 and SDXL layouts only, and
this UNet is neither (vmix_lib/adapter_file.py refuses other layouts by design).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from . import data
from ..dimensions import DEFAULT_DIMENSIONS
from ..hook import ValueMixer
from ..mixing import VMixAdapter, build_aes_emb
from ..train.distill import DistillConfig, DistillObjective
from ..training_step import diffusion_loss

# The extension's own label strings for the two dimensions the synthetic data varies.
DIMENSIONS = tuple(d for d in DEFAULT_DIMENSIONS if d.name in ("color", "lighting"))

# Aesthetic settings of the sweep: name -> α per dimension (1 = positive label, 0 = negative).
SETTINGS: Dict[str, Dict[str, float]] = {
    "color": {"color": 1.0, "lighting": 0.0},
    "lighting": {"color": 0.0, "lighting": 1.0},
    "none": {"color": 0.0, "lighting": 0.0},
}


@dataclass(frozen=True)
class DemoConfig:
    seed: int = 0
    size: int = 16  # image side in pixels
    channels: Tuple[int, ...] = (16, 32, 32)  # UNet block widths; attn2 in every block but the first
    context_dim: int = 32  # text width = cross-attention context width d
    text_layers: int = 2
    prediction: str = "v_prediction"
    noise_shift: float = 3.0  # see shifted_cosine_betas
    base_images: int = 8192
    # Share of the base model's pictures drawn superior per dimension (color, lighting); their
    # captions end with the dimension's phrase, so the base model learns the words.
    base_superior_fraction: Tuple[float, float] = (0.25, 0.25)
    adapter_images: int = 8192
    superior_fraction: Tuple[float, float] = (0.5, 0.5)  # (color, lighting) in the adapter's data
    appearance: data.Appearance = data.DEFAULT_APPEARANCE  # what ordinary and superior look like
    batch: int = 32
    base_steps: int = 1500
    base_lr: float = 2e-3
    adapter_steps: int = 400
    adapter_lr: float = 1e-2
    distill_steps: int = 400  # the adapter distilled from prompt pairs (vmix_lib.train.distill)
    distill_lr: float = 1e-2
    # x_t from the demo's own sampler (DDIM, steps_offset 0, x₀ clipped); no CFG (no unconditional).
    distill: DistillConfig = DistillConfig(eta=1.0, sample_steps=10, timestep_offset=0, guidance_scale=1.0, clip_sample=1.0)
    sample_steps: int = 20  # DDIM
    prompts: int = 54  # sweep prompts, one seed each (see sweep_prompts)
    lambdas: Tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0)
    settings: Tuple[str, ...] = ("color", "lighting", "none")
    adapters: Tuple[str, ...] = ("data", "distill")  # which adapters to train and sweep (ADAPTERS)
    grid_prompts: Tuple[int, ...] = (0, 13, 26, 40)  # which sweep prompts the grid shows
    grid_scale: int = 4
    threads: int = 1  # torch CPU threads (1: no slowdown from oversubscribed OpenMP threads on a
    # busy machine, and the numbers of the README within floating-point noise)

    def __post_init__(self):
        unknown = [name for name in self.settings if name not in SETTINGS]
        if unknown:
            raise ValueError(f"unknown demo setting {unknown[0]!r}; choose from {', '.join(SETTINGS)}")
        if not self.adapters or any(a not in ("data", "distill") for a in self.adapters):
            raise ValueError(f"adapters must be a non-empty choice of 'data' and 'distill', got {self.adapters}")
        if list(self.lambdas) != sorted(self.lambdas) or not self.lambdas or self.lambdas[0] < 0:
            raise ValueError(f"lambdas must be ascending and non-negative, got {self.lambdas}")


FULL = DemoConfig()
# A few minutes: a weaker base model (noisier pictures), the same behaviour.  Its captions carry the
# phrases twice as often, so that 600 steps teach it the words.
QUICK = replace(FULL, base_images=2048, adapter_images=2048, base_steps=600, base_superior_fraction=(0.5, 0.5),
                adapter_steps=200, distill_steps=150, prompts=27, grid_prompts=(0, 13, 26))
# The test suite's scale (tests/test_demo.py), a few minutes on one CPU thread.
TEST = replace(QUICK, sample_steps=10, prompts=18, lambdas=(0.0, 1.0, 2.0), grid_prompts=(0, 9))


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
        eos_token_id=data.WordTokenizer.EOS,  # pooled output = the first EOS, as in CLIP
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
        # The text also reaches the time embedding, attention-pooled (as SDXL adds its pooled
        # text embedding there): without it a model this small ignores the caption for
        # thousands of steps.
        addition_embed_type="text",
        addition_embed_type_num_heads=4,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def shifted_cosine_betas(shift: float, steps: int = 1000) -> torch.Tensor:
    """The cosine schedule with its signal-to-noise ratio divided by shift².

    A 16-pixel shape stays visible through most of the plain cosine schedule, so a model
    trained on it barely needs the caption; shifting towards noise (as is done for large images)
    puts more of the training where the caption decides what is drawn.
    """
    t = torch.arange(steps + 1, dtype=torch.float64) / steps
    a = torch.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    a = a / a[0]
    snr = a / (1 - a).clamp_min(1e-12) / shift**2
    a = snr / (1 + snr)
    a[0] = 1.0
    return (1 - a[1:] / a[:-1]).clamp(0, 0.999).float()


def build_scheduler(cfg: DemoConfig):
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        trained_betas=shifted_cosine_betas(cfg.noise_shift).tolist(),
        clip_sample=True,
        prediction_type=cfg.prediction,
    )


def coordinate_planes(size: int) -> torch.Tensor:
    """[1, 2, S, S]: x and y in [-1, 1] (CoordConv input channels)."""
    axis = torch.linspace(-1, 1, size)
    return torch.stack([axis.view(1, -1).expand(size, size), axis.view(-1, 1).expand(size, size)]).unsqueeze(0)


# -- training -----------------------------------------------------------------------------------
class Progress:
    """``progress(step, loss)``: logs the mean loss, the time spent and an ETA ten times a run."""

    def __init__(self, desc: str, steps: int, log: Callable[[str], None]):
        self.desc, self.steps, self.log = desc, steps, log
        self.every = max(1, steps // 10)
        self.recent: List[float] = []
        self.start = time.time()

    def __call__(self, step: int, loss: float) -> None:
        self.recent.append(loss)
        if step % self.every == 0 or step == self.steps:
            done = time.time() - self.start
            self.log(f"  {self.desc}: step {step}/{self.steps}  loss {sum(self.recent) / len(self.recent):.4f}  "
                     f"{done:.0f} s, about {done / step * (self.steps - step):.0f} s left")
            self.recent = []


def train_loop(
    step_fn: Callable[[torch.Generator], torch.Tensor],
    parameters: Iterable[torch.nn.Parameter],
    steps: int,
    lr: float,
    generator: torch.Generator,
    desc: str,
    log: Callable[[str], None],
) -> List[float]:
    """AdamW, short warm-up, cosine decay; ``step_fn(generator)`` returns the batch loss.

    The base model's loop only: the adapter is trained by the trainer's loop (train_adapter).
    """
    params = [p for p in parameters if p.requires_grad]
    if steps <= 0:
        return []
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps))
    )
    losses: List[float] = []
    progress = Progress(desc, steps, log)
    for i in range(steps):
        loss = step_fn(generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        schedule.step()
        losses.append(float(loss.detach()))
        progress(i + 1, losses[-1])
    return losses


@dataclass
class BaseModel:
    tokenizer: data.WordTokenizer
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    scheduler: object
    contexts: torch.Tensor  # [len(all_captions()), 77, d]: the frozen text encoder's output
    _encoded: Dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def encode_pooled(self, texts: Sequence[str]) -> torch.Tensor:
        return self.text_encoder(self.tokenizer(texts)).pooler_output

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> Tuple[torch.Tensor, None]:
        """(context [n, 77, d], None): the trainer's encode convention; cached per text."""
        new = [t for t in dict.fromkeys(texts) if t not in self._encoded]
        if new:
            for text, row in zip(new, self.text_encoder(self.tokenizer(new)).last_hidden_state):
                self._encoded[text] = row
        return torch.stack([self._encoded[t] for t in texts]), None

    def unet_forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        coords = coordinate_planes(x.shape[-1]).to(x.dtype).expand(x.shape[0], -1, -1, -1)
        return self.unet(torch.cat([x, coords], 1), t, encoder_hidden_states=context).sample


def phrases() -> List[str]:
    """The aesthetic words the base model's captions carry: each dimension's label phrase."""
    return [d.positive for d in DIMENSIONS]


def train_base(cfg: DemoConfig, log: Callable[[str], None]) -> BaseModel:
    """The base text-to-image model, trained on pictures captioned with their content and, for
    the vivid or bright ones drawn superior, the dimension's phrase ("…, vibrant color"); then frozen.

    The text encoder stays at its random initialisation (frozen, as SD keeps its CLIP frozen):
    trained jointly from scratch it collapsed, its captions drifting together before the UNet
    learnt to read them, while a random transformer already keeps all captions apart.
    """
    captions = data.all_captions()
    words = phrases()
    tokenizer = data.WordTokenizer(captions + [", " + w for w in words] + [d.negative for d in DIMENSIONS])
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        text_encoder = build_text_encoder(tokenizer.vocab_size, cfg).eval().requires_grad_(False)
        unet = build_unet(cfg)
    # Caption variants: content × (which phrases), index = content index · 2^N + Σ 2^i (superior i).
    # Encoded once, together; the plain captions (code 0) are the contexts the sweep samples with,
    # and the distillation's teacher reads the same tensors from the cache.
    variants = [
        data.caption_with_phrases(c, [(code >> i) & 1 for i in range(len(words))], words)
        for c in captions for code in range(2 ** len(words))
    ]
    base = BaseModel(tokenizer, text_encoder, unet, build_scheduler(cfg), torch.empty(0))
    variant_contexts = base.encode(variants)[0]
    base.contexts = variant_contexts[:: 2 ** len(words)]
    g = torch.Generator().manual_seed(cfg.seed + 1)
    dataset = data.make_images(cfg.base_images, cfg.size, g, superior_fraction=cfg.base_superior_fraction, appearance=cfg.appearance)
    images = dataset.images * 2 - 1
    code = sum(dataset.labels[:, i].long() << i for i in range(len(words)))
    variant_index = dataset.caption_index() * 2 ** len(words) + code
    alphas_cumprod = base.scheduler.alphas_cumprod

    def step(gen: torch.Generator) -> torch.Tensor:
        pick = torch.randint(0, images.shape[0], (cfg.batch,), generator=gen)
        return diffusion_loss(base.unet_forward, images[pick], variant_contexts[variant_index[pick]], alphas_cumprod, cfg.prediction, generator=gen)

    worded = ", ".join(f"{f:.0%} '{w}'" for f, w in zip(cfg.base_superior_fraction, words))
    log(f"Training the base model ({sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M parameters, "
        f"{cfg.base_steps} steps) on {cfg.base_images} captioned pictures ({worded})")
    unet.train()
    train_loop(step, unet.parameters(), cfg.base_steps, cfg.base_lr, g, "base", log)
    unet.eval().requires_grad_(False)
    return base


def new_adapter(base: BaseModel, seed: int) -> VMixAdapter:
    """A fresh adapter: AesEmb from the base's text encoder, projection initialised from ``seed``."""
    aes_emb = build_aes_emb(base.encode_pooled, DIMENSIONS)
    # family "demo": this UNet is not an SD1.5/SDXL layout (nothing checks the family in memory).
    with torch.random.fork_rng():  # the projection's token Linear starts random: seeded, as in the trainer
        torch.manual_seed(seed)
        return VMixAdapter.for_unet(base.unet, aes_emb, family="demo", dimensions=DIMENSIONS)


def train_adapter(base: BaseModel, cfg: DemoConfig, log: Callable[[str], None]) -> VMixAdapter:
    """A VMix adapter on the frozen base, trained by the trainer's own loop (vmix_lib.train.loop)
    on labelled pictures (objective "data")."""
    from ..train.loop import TrainBatch, train_adapter as run_trainer

    adapter = new_adapter(base, cfg.seed + 4)
    g = torch.Generator().manual_seed(cfg.seed + 2)
    dataset = data.make_images(cfg.adapter_images, cfg.size, g, superior_fraction=cfg.superior_fraction, appearance=cfg.appearance)
    images, caption_index, labels = dataset.images * 2 - 1, dataset.caption_index(), dataset.labels

    def batches():
        while True:
            pick = torch.randint(0, images.shape[0], (cfg.batch,), generator=g)
            yield TrainBatch(images[pick], base.contexts[caption_index[pick]], labels[pick])

    log(f"Training the VMix adapter on data ({len(adapter.layer_names)} attn2 layers, "
        f"{sum(p.numel() for p in adapter.parameters()) / 1e3:.1f}k parameters, {cfg.adapter_steps} steps) on "
        f"{cfg.adapter_images} labelled images; the base stays frozen")
    progress = Progress("adapter (data)", cfg.adapter_steps, log)
    run_trainer(
        base.unet, adapter, batches(), cfg.adapter_steps, base.scheduler.alphas_cumprod,
        on_step=progress, lr=cfg.adapter_lr, weight_decay=0.0, prediction=cfg.prediction,
        warmup_steps=max(1, cfg.adapter_steps // 20), unet_forward=lambda x, t, c, added=None: base.unet_forward(x, t, c),
        seed=cfg.seed + 3,
    )
    return adapter.eval().requires_grad_(False)


def train_distilled_adapter(base: BaseModel, cfg: DemoConfig, log: Callable[[str], None]) -> VMixAdapter:
    """A VMix adapter distilled from the frozen base's own predictions on prompt pairs (objective
    "distill"): the content captions alone, no picture and no label; the trainer's loop
    (optimizer, warm-up, clipping, generator) with the distillation loss in place of the data loss."""
    from ..train.distill import DistillTraining
    from ..train.loop import AdapterTrainer

    adapter = new_adapter(base, cfg.seed + 5)
    forward = lambda x, t, c, added=None: base.unet_forward(x, t, c)
    objective = DistillObjective(DIMENSIONS, base.scheduler.alphas_cumprod, cfg.prediction, (3, cfg.size, cfg.size), cfg.distill)

    prompts = data.all_captions()
    effects = objective.probe(forward, base.encode, prompts[:: len(prompts) // 27], torch.Generator().manual_seed(cfg.seed + 8))
    log("How much each phrase moves the base model (RMS of the difference over RMS of the prediction): "
        + ", ".join(f"'{p.positive}' {effects[d.name]:.3f}" for d, p in zip(DIMENSIONS, objective.phrases)))
    g = torch.Generator().manual_seed(cfg.seed + 6)  # which prompts each step
    log(f"Distilling a VMix adapter from prompt pairs ({len(prompts)} content prompts; "
        + "; ".join(f"{d.name}: '{p.positive}' vs '{p.contrast}'" for d, p in zip(DIMENSIONS, objective.phrases))
        + f"; η = {cfg.distill.eta:g}, {cfg.distill_steps} steps), no picture and no label")
    progress = Progress("adapter (distill)", cfg.distill_steps, log)
    trainer = AdapterTrainer(
        base.unet, adapter, base.scheduler.alphas_cumprod, lr=cfg.distill_lr, weight_decay=0.0, prediction=cfg.prediction,
        warmup_steps=max(1, cfg.distill_steps // 20), unet_forward=forward, seed=cfg.seed + 7,
        objective=DistillTraining(objective, base.encode),
    )
    try:
        for _ in range(cfg.distill_steps):
            pick = torch.randint(0, len(prompts), (cfg.batch,), generator=g)
            progress(trainer.step + 1, trainer.train_step([[prompts[int(i)] for i in pick]]))
    finally:
        trainer.close()
    return adapter.eval().requires_grad_(False)


# -- sampling and measuring ---------------------------------------------------------------------
@torch.no_grad()
def sample(base: BaseModel, contexts: torch.Tensor, noise: torch.Tensor, cfg: DemoConfig) -> torch.Tensor:
    """DDIM (η = 0) from ``noise`` [B, 3, S, S] for ``contexts`` [B, 77, d]; images in [0, 1]."""
    scheduler = base.scheduler
    scheduler.set_timesteps(cfg.sample_steps)
    x = noise.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(base.unet_forward(x, t.expand(x.shape[0]), contexts), t, x).prev_sample
    return ((x + 1) / 2).clamp(0, 1)


def sweep_prompts(cfg: DemoConfig) -> Tuple[torch.Tensor, torch.Tensor]:
    """(caption indices [P], noise [P, 3, S, S]): prompt m draws shape m//9, position m%9 and
    hue m%6, so every 27 prompts cover all shapes and positions and every hue; one seed each."""
    m = torch.arange(cfg.prompts)
    hue, shape, position = m % len(data.HUE_NAMES), m // len(data.POSITION_NAMES) % len(data.SHAPES), m % len(data.POSITION_NAMES)
    index = (hue * len(data.SHAPES) + shape) * len(data.POSITION_NAMES) + position
    noise = torch.stack(
        [torch.randn(3, cfg.size, cfg.size, generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + i)) for i in range(cfg.prompts)]
    )
    return index, noise


ADAPTERS = {"data": "trained on labelled pictures", "distill": "distilled from prompt pairs"}


@dataclass
class SweepResult:
    adapter: str  # "data" or "distill" (ADAPTERS)
    setting: str
    alphas: Dict[str, float]
    lambdas: List[float]
    saturation: List[float] = field(default_factory=list)  # mean HSV saturation of the foreground
    brightness: List[float] = field(default_factory=list)  # mean HSV value of the foreground
    iou: List[float] = field(default_factory=list)  # mean foreground IoU with the base model's image (λ = 0)
    shift: List[float] = field(default_factory=list)  # mean move of the foreground's centre from it, pixels
    # Share of prompts whose hue / shape / position, read off the picture, are those of the base
    # model's image.
    same_hue: List[float] = field(default_factory=list)
    same_shape: List[float] = field(default_factory=list)
    same_position: List[float] = field(default_factory=list)
    images: List[torch.Tensor] = field(default_factory=list, repr=False)


def run_sweep(
    base: BaseModel, mixer: ValueMixer, contexts: torch.Tensor, noise: torch.Tensor, base_images: torch.Tensor,
    cfg: DemoConfig, log: Callable[[str], None], adapter: str = "data",
) -> List[SweepResult]:
    """One SweepResult per aesthetic setting, sampling ``contexts`` from ``noise``; content is
    compared with ``base_images``, the base model's samples of the same prompts and seeds."""
    reference = data.measure(base_images)
    reference_content = data.content_classes(base_images, reference.masks)
    results = []
    for name in cfg.settings:
        mixer.set_alphas(SETTINGS[name])
        res = SweepResult(adapter, name, dict(SETTINGS[name]), list(cfg.lambdas))
        mixer.arm()
        try:
            for lam in cfg.lambdas:
                mixer.strength = float(lam)
                images = sample(base, contexts, noise, cfg)
                m = data.measure(images)
                moved = (data.centroids(m.masks) - data.centroids(reference.masks)).norm(dim=-1)
                kept = (data.content_classes(images, m.masks) == reference_content).float().mean(0)
                res.images.append(images)
                res.saturation.append(m.saturation)
                res.brightness.append(m.brightness)
                res.iou.append(float(data.mask_iou(m.masks, reference.masks).mean()))
                res.shift.append(float(moved.nan_to_num(float(cfg.size)).mean()))
                res.same_hue.append(float(kept[0]))
                res.same_shape.append(float(kept[1]))
                res.same_position.append(float(kept[2]))
        finally:
            mixer.disarm()
        log(f"  sampled {cfg.prompts} prompts, adapter {adapter}, {name}: " + ", ".join(f"{k}={v:g}" for k, v in SETTINGS[name].items()))
        results.append(res)
    return results


def phrase_effects(base: BaseModel, index: torch.Tensor, noise: torch.Tensor, cfg: DemoConfig) -> Dict[str, Dict[str, float]]:
    """Saturation and brightness of the base model's pictures of the sweep prompts, plain and with
    each dimension's phrase added: what the words mean to the base model, the distillation's teacher."""
    captions = [data.all_captions()[int(i)] for i in index]
    out = {}
    for name, phrase in [("plain", "")] + [(d.name, d.positive) for d in DIMENSIONS]:
        m = data.measure(sample(base, base.encode([data.caption_with_phrases(c, [1], [phrase]) for c in captions])[0], noise, cfg))
        out[name] = {"phrase": phrase, "saturation": round(m.saturation, 4), "brightness": round(m.brightness, 4)}
    return out


def caption_accuracy(images: torch.Tensor, index: torch.Tensor) -> Dict[str, float]:
    """Share of ``images`` whose hue, shape and position (read off the picture) match the caption."""
    read = data.content_classes(images, data.measure(images).masks)
    wanted = torch.stack(data.caption_parts(index), -1)
    right = read == wanted
    return {"hue": float(right[:, 0].float().mean()), "shape": float(right[:, 1].float().mean()),
            "position": float(right[:, 2].float().mean()), "all": float(right.all(-1).float().mean())}


# -- report -------------------------------------------------------------------------------------
def increasing(values: Sequence[float]) -> bool:
    return all(b > a for a, b in zip(values, values[1:]))


def spread(values: Sequence[float]) -> float:
    return max(values) - min(values)


def checks(results: Sequence[SweepResult]) -> Dict[str, object]:
    """The paper's behaviour, as numbers: each dimension's property rises with λ when it is on and
    stays put when everything is off ("none"); the side effect of each on the other property; how
    much of the content survives.  Ranges are max - min over the λ sweep."""
    by = {r.setting: r for r in results}
    out: Dict[str, object] = {}
    if "color" in by:
        out["saturation_rises_with_color_on"] = increasing(by["color"].saturation)
        out["saturation_range_color_on"] = round(spread(by["color"].saturation), 4)
        out["brightness_change_color_on"] = round(by["color"].brightness[-1] - by["color"].brightness[0], 4)
    if "lighting" in by:
        out["brightness_rises_with_lighting_on"] = increasing(by["lighting"].brightness)
        out["brightness_range_lighting_on"] = round(spread(by["lighting"].brightness), 4)
        out["saturation_change_lighting_on"] = round(by["lighting"].saturation[-1] - by["lighting"].saturation[0], 4)
    if "none" in by:
        out["saturation_range_all_off"] = round(spread(by["none"].saturation), 4)
        out["brightness_range_all_off"] = round(spread(by["none"].brightness), 4)
    out["min_iou_vs_base"] = round(min(min(r.iou) for r in results), 4)
    out["max_shift_px"] = round(max(max(r.shift) for r in results), 4)
    for part in ("position", "hue", "shape"):
        out[f"min_same_{part}"] = round(min(min(getattr(r, "same_" + part)) for r in results), 4)
    return out


def format_table(results: Sequence[SweepResult]) -> str:
    """Rows = setting × measure; one block of λ columns per adapter, side by side."""
    lambdas = results[0].lambdas
    adapters = list(dict.fromkeys(r.adapter for r in results))
    settings = list(dict.fromkeys(r.setting for r in results))
    by = {(r.adapter, r.setting): r for r in results}
    block = len(lambdas) * 8
    head = f"{'setting':<22}{'measure':<15}" + " | ".join(f"{'adapter: ' + a:<{block}}" for a in adapters)
    lam = f"{'':<37}" + " | ".join("".join(f"{'λ=' + format(l, 'g'):>8}" for l in lambdas) for _ in adapters)
    lines = [head, lam, "-" * len(lam)]
    measures = [
        ("saturation", "saturation", "{:.3f}"),
        ("brightness", "brightness", "{:.3f}"),
        ("IoU vs base", "iou", "{:.3f}"),
        ("shift (px)", "shift", "{:.2f}"),
        ("same position", "same_position", "{:.2f}"),
        ("same hue", "same_hue", "{:.2f}"),
        ("same shape", "same_shape", "{:.2f}"),
    ]
    for setting in settings:
        alphas = next(r.alphas for r in results if r.setting == setting)
        for i, (label, attr, fmt) in enumerate(measures):
            first = setting if i == 0 else ("(" + ", ".join(f"{k}={v:g}" for k, v in alphas.items()) + ")" if i == 1 else "")
            cells = []
            for a in adapters:
                res = by.get((a, setting))
                cells.append("".join(f"{fmt.format(v):>8}" for v in getattr(res, attr)) if res else " " * block)
            lines.append(f"{first:<22}{label:<15}" + " | ".join(cells))
    return "\n".join(lines)


def write_grid(path: str, results: Sequence[SweepResult], index: torch.Tensor, cfg: DemoConfig) -> None:
    """Rows = (adapter, setting, prompt), columns = λ; each cell one sample, enlarged without smoothing."""
    from PIL import Image, ImageDraw

    cell, pad, label_w, head_h = cfg.size * cfg.grid_scale, 2, 230, 16
    picks = [p for p in cfg.grid_prompts if p < len(index)]
    rows = [(res, p) for res in results for p in picks]
    canvas = Image.new("RGB", (label_w + len(cfg.lambdas) * (cell + pad), head_h + len(rows) * (cell + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, lam in enumerate(cfg.lambdas):
        draw.text((label_w + j * (cell + pad) + 2, 2), f"lambda = {lam:g}", fill="black")
    captions = data.all_captions()
    for r, (res, p) in enumerate(rows):
        y = head_h + r * (cell + pad)
        draw.text((2, y + 2), f"adapter: {res.adapter}", fill="black")
        draw.text((2, y + 16), res.setting + ": " + ", ".join(f"{k}={v:g}" for k, v in res.alphas.items()), fill="black")
        draw.text((2, y + 30), captions[int(index[p])], fill=(90, 90, 90))
        for j, images in enumerate(res.images):
            pixels = (images[p].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
            canvas.paste(Image.fromarray(pixels).resize((cell, cell), Image.NEAREST), (label_w + j * (cell + pad), y))
    canvas.save(path)


def write_outputs(out_dir: str, report: Dict[str, object], results: Sequence[SweepResult], index: torch.Tensor, cfg: DemoConfig) -> Dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = {name: os.path.join(out_dir, name) for name in ("grid.png", "results.json", "results.csv")}
    write_grid(paths["grid.png"], results, index, cfg)
    with open(paths["results.json"], "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    with open(paths["results.csv"], "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["adapter", "setting", "alpha_color", "alpha_lighting", "lambda", "saturation", "brightness", "iou_vs_base", "shift_px", "same_position", "same_hue", "same_shape"])
        for r in results:
            for i, lam in enumerate(r.lambdas):
                w.writerow([r.adapter, r.setting, r.alphas["color"], r.alphas["lighting"], lam, f"{r.saturation[i]:.4f}", f"{r.brightness[i]:.4f}",
                            f"{r.iou[i]:.4f}", f"{r.shift[i]:.3f}", f"{r.same_position[i]:.3f}", f"{r.same_hue[i]:.3f}", f"{r.same_shape[i]:.3f}"])
    return paths


@contextlib.contextmanager
def reproducible(threads: int):
    """Deterministic kernels and a fixed thread count for the run; restored afterwards."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.set_num_threads(previous[1])


@dataclass
class DemoRun:
    report: Dict[str, object]  # what results.json holds
    results: List[SweepResult]  # every adapter's, in cfg.adapters order
    base_images: torch.Tensor  # the base model's samples, same prompts and seeds
    index: torch.Tensor  # caption index of each sweep prompt
    base: Optional[BaseModel] = None  # the trained models, frozen (for vmix_lib/demo/evaluation.py)
    adapters: Dict[str, VMixAdapter] = field(default_factory=dict)

    def of(self, adapter: str) -> List[SweepResult]:
        return [r for r in self.results if r.adapter == adapter]


TRAINERS = {"data": train_adapter, "distill": train_distilled_adapter}


def run_demo(cfg: DemoConfig, out_dir: Optional[str] = None, log: Callable[[str], None] = print) -> DemoRun:
    """The whole demonstration; writes grid.png, results.json and results.csv to ``out_dir``."""
    started = time.time()
    with reproducible(cfg.threads):
        base = train_base(cfg, log)
        adapters = {name: TRAINERS[name](base, cfg, log) for name in cfg.adapters}
        log(f"Sampling {cfg.prompts} prompts for λ = {', '.join(f'{l:g}' for l in cfg.lambdas)} (DDIM, {cfg.sample_steps} steps)")
        index, noise = sweep_prompts(cfg)
        contexts = base.contexts[index]
        base_images = sample(base, contexts, noise, cfg)  # no hook anywhere: the base model
        words = phrase_effects(base, index, noise, cfg)
        results: List[SweepResult] = []
        for name, adapter in adapters.items():
            # Sampling goes through a fresh ValueMixer, as in the extension.
            mixer = ValueMixer(adapter, strict=True).install(base.unet)
            try:
                results += run_sweep(base, mixer, contexts, noise, base_images, cfg, log, adapter=name)
            finally:
                mixer.remove()
    report = {
        "config": asdict(cfg),
        "dimensions": [d.to_json() for d in DIMENSIONS],
        "adapters": {name: ADAPTERS[name] for name in cfg.adapters},
        "settings": {r.setting: r.alphas for r in results},
        # None when λ = 0 is not swept.
        "lambda0_equals_base_bitwise": (
            all(torch.equal(r.images[0], base_images) for r in results) if cfg.lambdas[0] == 0.0 else None
        ),
        "base_model_draws_the_caption": caption_accuracy(base_images, index),
        "base_model_with_phrases": words,
        "results": [{k: v for k, v in asdict(r).items() if k != "images"} for r in results],
        "checks": {name: checks([r for r in results if r.adapter == name]) for name in cfg.adapters},
        "seconds": round(time.time() - started, 1),
    }
    if out_dir:
        write_outputs(out_dir, report, results, index, cfg)
    return DemoRun(report, results, base_images, index, base, adapters)


# -- command line -------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vmix_lib.demo",
        description="VMix end to end on a CPU in minutes, nothing downloaded: trains a small text-to-image model, a "
        "VMix adapter on labelled synthetic pictures and one distilled from prompt pairs alone, then measures "
        "saturation, brightness and content over a λ sweep.",
    )
    parser.add_argument("--out", default=os.path.join("out", "vmix-demo"), help="output folder (default: out/vmix-demo)")
    parser.add_argument("--seed", type=int, default=0, help="seed for data, initialisation and sampling (default: 0)")
    parser.add_argument("--quick", action="store_true", help="a smaller, faster run: less training, fewer prompts")
    parser.add_argument("--adapters", choices=("both", "data", "distill"), default="both",
                        help="which adapters to train and measure (default: both, side by side)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default: 1; more is faster on an idle machine, and the numbers then differ slightly)")
    parser.add_argument("--evaluate", metavar="DIR", help="then judge the models with the evaluation tool (python -m vmix_lib.evaluate): "
                        "VMix off, the λ sweep, each dimension alone, both adapters; CSV/JSON with 95%% intervals, trade-off plot, "
                        "grid and report.html in DIR (a rerun with the same settings makes no image again)")
    parser.add_argument("--clip", metavar="DIR", help="with --evaluate: a CLIP model folder, adding CLIP score, probes and CLIP "
                        "content similarity to the demo's own measures")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    cfg = replace(QUICK if args.quick else FULL, seed=args.seed, threads=args.threads,
                  adapters=tuple(ADAPTERS) if args.adapters == "both" else (args.adapters,))
    missing = [name for name in ("diffusers", "transformers", "PIL") if importlib.util.find_spec(name) is None]
    if missing:
        print(f"VMix demo: needs {', '.join(missing)}, which this Python lacks; install the pinned versions with "
              "'pip install -r requirements-train.txt'.", file=sys.stderr)
        return 1
    try:  # fail now, not after minutes of training
        os.makedirs(args.out, exist_ok=True)
        with tempfile.TemporaryFile(dir=args.out):
            pass
    except OSError as e:
        print(f"VMix demo: cannot write to {args.out!r} ({e.strerror or e}); choose another folder with --out.", file=sys.stderr)
        return 1
    if args.clip and not args.evaluate:
        parser.error("--clip is a setting of --evaluate DIR")
    if args.evaluate:
        from ..evaluate.errors import EvaluationError
        from .evaluation import check_folder

        try:
            check_folder(args.evaluate, cfg)
            os.makedirs(args.evaluate, exist_ok=True)
            with tempfile.TemporaryFile(dir=args.evaluate):
                pass
        except EvaluationError as e:
            print(f"VMix demo: {e}.", file=sys.stderr)
            return 1
        except OSError as e:
            print(f"VMix demo: cannot write to {args.evaluate!r} ({e.strerror or e}); choose another folder with --evaluate.", file=sys.stderr)
            return 1
    log = lambda message: print(message, file=sys.stderr, flush=True)
    run = run_demo(cfg, args.out, log)
    drawn, words = run.report["base_model_draws_the_caption"], run.report["base_model_with_phrases"]
    print(format_table(run.results))
    print()
    print(f"The base model draws the captioned hue {drawn['hue']:.0%}, shape {drawn['shape']:.0%}, "
          f"position {drawn['position']:.0%} of the time (all three {drawn['all']:.0%}).")
    plain = words["plain"]
    print("The base model with a phrase added to the prompt (what distillation learns from): "
          + "; ".join(f"'{w['phrase']}' saturation {plain['saturation']:.3f} → {w['saturation']:.3f}, "
                      f"brightness {plain['brightness']:.3f} → {w['brightness']:.3f}" for k, w in words.items() if k != "plain"))
    if run.report["lambda0_equals_base_bitwise"] is not None:
        print(f"λ = 0 gives the base model's images bit for bit: {'yes' if run.report['lambda0_equals_base_bitwise'] else 'NO'}")
    for name in cfg.adapters:
        c = run.report["checks"][name]
        print(f"adapter {name} ({ADAPTERS[name]}):")
        if "color" in cfg.settings:
            print(f"  color on: saturation rises with λ: {'yes' if c['saturation_rises_with_color_on'] else 'NO'} "
                  f"(range {c['saturation_range_color_on']:.3f}; brightness changes by {c['brightness_change_color_on']:+.3f})")
        if "lighting" in cfg.settings:
            print(f"  lighting on: brightness rises with λ: {'yes' if c['brightness_rises_with_lighting_on'] else 'NO'} "
                  f"(range {c['brightness_range_lighting_on']:.3f}; saturation changes by {c['saturation_change_lighting_on']:+.3f})")
        if "none" in cfg.settings:
            print(f"  everything off: saturation range {c['saturation_range_all_off']:.3f}, brightness range {c['brightness_range_all_off']:.3f}")
        print(f"  content vs the base model's image: foreground IoU >= {c['min_iou_vs_base']:.2f}, centre moved <= "
              f"{c['max_shift_px']:.2f} px; same position >= {c['min_same_position']:.0%}, hue >= {c['min_same_hue']:.0%}, "
              f"shape >= {c['min_same_shape']:.0%} (read off the pictures)")
    print(f"wrote {os.path.join(args.out, 'grid.png')}, results.json and results.csv in {run.report['seconds']:.0f} s")
    if args.evaluate:
        return evaluate_run(run, cfg, args.evaluate, args.clip, log)
    return 0


def evaluate_run(run: DemoRun, cfg: DemoConfig, out_dir: str, clip: Optional[str], log: Callable[[str], None]) -> int:
    """--evaluate: the evaluation tool on the models just trained; prints its table, as python -m vmix_lib.evaluate does."""
    from ..evaluate.cli import print_summary
    from ..evaluate.errors import EvaluationError
    from .evaluation import SUMMARY_KEYS, demo_metrics, evaluate_demo

    log(f"Evaluating with vmix_lib.evaluate in {out_dir}")
    try:
        results = evaluate_demo(run.base, run.adapters, cfg, out_dir, clip, log=log)
    except EvaluationError as e:
        print(f"VMix demo: {e}.".replace("..", "."), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nVMix demo: evaluation interrupted; rerun the same command to continue (images already made are kept).", file=sys.stderr)
        return 130
    print()
    keys = (*SUMMARY_KEYS, *(("clip_score", "content_similarity") if clip else ()))
    print_summary(results, keys=keys, titles=demo_metrics().titles | {"saturation_shift": "saturation Δ", "brightness_shift": "brightness Δ"})
    for c in results.get("lambda0_equals_off", []):
        print(f"{c['setting']} vs {c['baseline']}: {c['identical']}/{c['pairs']} images identical pixel for pixel")
    print(f"report: {results['files']['html']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
