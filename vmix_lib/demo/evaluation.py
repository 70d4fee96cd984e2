"""The demonstration's models judged by the evaluation tool: ``python -m vmix_lib.demo --evaluate DIR``.

The demo's base model and adapters live in memory (their UNet is no SD layout, so no checkpoint
file can hold them).  ``DemoSource`` is an image source of vmix_lib.evaluate that samples them as
the demo's sweep does (DDIM, the extension's ValueMixer hook), one image per prompt, seed and
setting; the run is vmix_lib.evaluate's own (settings, resume, bootstrap intervals, paired shifts,
trade-off plot, grid, HTML).  CLIP on 16-pixel shapes would say little, so the numbers are the
demo's own measures (vmix_lib/demo/data.py), given to the evaluation as an ``ImageMetric``:

    saturation, brightness   mean HSV saturation / value of the image's foreground (and their shift from off)
    foreground_iou           IoU of the foreground with that of the VMix-off image of the same prompt and seed
    position_kept            1 when the shape sits at the same named position as in the VMix-off image
    centre_moved_px          how far the foreground's centre moved from the VMix-off image's, in pixels

A CLIP model (``--clip``) adds the evaluation's CLIP-based metrics beside them.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from typing import Any, Callable, Dict, List, Optional

import torch

from . import data
from ..evaluate.errors import EvaluationError
from ..evaluate.metrics import ImageMetric
from ..evaluate.prompts import Prompt
from ..evaluate.run import Options, evaluate
from ..evaluate.settings import AdapterRef, Setting, build_settings
from ..hook import ValueMixer

# The per-dimension settings (all on, all off, each alone) at this λ: the sweep's strongest, where
# each dimension's effect is largest (all on at λ = 2 is the sweep's λ = 2, rendered once).
DIMENSION_STRENGTH = 2.0
# The trade-off plot: saturation (what "color" asks for) against content kept, one point per λ.
TRADEOFF = ("foreground_iou", "saturation")
SUMMARY_KEYS = ("saturation", "brightness", "foreground_iou", "position_kept", "saturation_shift", "brightness_shift")
CONFIG_FILE = "demo-config.json"  # the demo configuration the folder's images were made with


def _pixels(images) -> torch.Tensor:
    """PIL RGB images (one size) -> [B, 3, S, S] in [0, 1]."""
    import numpy as np

    return torch.stack([torch.from_numpy(np.asarray(i, dtype=np.float32) / 255.0).permute(2, 0, 1) for i in images])


def _measure(images) -> List[Dict[str, float]]:
    x = _pixels(images)
    sat, value = data.saturation_value(x)
    masks = data.foreground(x).float()
    area = masks.flatten(1).sum(1).clamp_min(1.0)
    saturation = (sat * masks).flatten(1).sum(1) / area
    brightness = (value * masks).flatten(1).sum(1) / area
    return [{"saturation": float(s), "brightness": float(b)} for s, b in zip(saturation, brightness)]


def _compare(images, baselines) -> List[Dict[str, float]]:
    x, ref = _pixels(images), _pixels(baselines)
    masks, ref_masks = data.foreground(x), data.foreground(ref)
    iou = data.mask_iou(masks, ref_masks)
    moved = (data.centroids(masks) - data.centroids(ref_masks)).norm(dim=-1).nan_to_num(float(x.shape[-1]))
    kept = data.nearest_position(masks) == data.nearest_position(ref_masks)
    return [{"foreground_iou": float(i), "position_kept": float(k), "centre_moved_px": float(m)} for i, k, m in zip(iou, kept, moved)]


def demo_metrics() -> ImageMetric:
    """The demo's measures (vmix_lib/demo/data.py) as an ImageMetric of the evaluation."""
    return ImageMetric(
        "demo measures", _measure, _compare,
        titles={"saturation": "saturation", "brightness": "brightness", "foreground_iou": "IoU vs off",
                "position_kept": "position kept", "centre_moved_px": "centre moved px"},
        about="the demonstration's own measures (vmix_lib/demo/data.py): mean HSV saturation and value of the shape "
              "(the foreground: pixels brighter than half the brightest), its IoU with the shape of the VMix-off image of the "
              "same prompt and seed, the share of images whose shape stays at the same named position, and how far its "
              "centre moved (pixels; the named positions are 3.7 px apart at 16 px).",
    )


class DemoSource:
    """Image source of vmix_lib.evaluate: the demo's base model, VMix through the extension's hook."""

    kind = "demo"

    def __init__(self, base, adapters: Dict[str, Any], cfg):
        self.base, self.adapters, self.cfg = base, dict(adapters), cfg
        self._mixer: Optional[ValueMixer] = None
        self._mixer_of: Optional[str] = None

    def prepare(self, settings) -> None:
        unknown = [s.adapter.name for s in settings if s.adapter is not None and s.adapter.name not in self.adapters]
        if unknown:
            raise EvaluationError(f"the demo has no adapter {unknown[0]!r}; it trained {', '.join(self.adapters)}")

    def describe(self) -> Dict[str, Any]:
        return {"source": "demo", "name": "python -m vmix_lib.demo", "scheduler": "ddim", "steps": self.cfg.sample_steps,
                "width": self.cfg.size, "height": self.cfg.size, "seed": self.cfg.seed, "adapters": list(self.adapters)}

    def _use(self, name: Optional[str]) -> Optional[ValueMixer]:
        """The mixer of adapter ``name`` installed alone (None: no hook at all, the base model)."""
        if name != self._mixer_of:
            self.close()
            if name is not None:
                self._mixer = ValueMixer(self.adapters[name], strict=True).install(self.base.unet)
                self._mixer_of = name
        return self._mixer

    def generate(self, prompt: str, seed: int, setting: Setting):
        from .experiment import sample

        try:
            context = self.base.encode([prompt])[0]
        except ValueError as e:  # a word the demo's vocabulary lacks
            raise EvaluationError(f"prompt {prompt!r}: {e}") from None
        noise = torch.randn(1, 3, self.cfg.size, self.cfg.size, generator=torch.Generator().manual_seed(seed))
        mixer = self._use(setting.adapter.name if setting.adapter is not None else None)
        if mixer is None:
            images = sample(self.base, context, noise, self.cfg)
        else:
            mixer.strength = setting.strength
            mixer.set_alphas(setting.alpha_dict)
            mixer.arm()
            try:
                images = sample(self.base, context, noise, self.cfg)
            finally:
                mixer.disarm()
        from PIL import Image

        pixels = (images[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        return Image.fromarray(pixels), {}

    def close(self) -> None:
        if self._mixer is not None:
            self._mixer.remove()
        self._mixer, self._mixer_of = None, None


def demo_prompts(cfg, limit: Optional[int] = None) -> List[Prompt]:
    """The demo's sweep prompts (every shape and position, every hue), as the evaluation's prompts."""
    from .experiment import sweep_prompts

    index, _ = sweep_prompts(cfg)
    captions = data.all_captions()
    picked = index.tolist()[: limit if limit is not None else len(index)]
    return [Prompt(f"p{m:02d}", captions[i], data.SHAPES[int(data.caption_parts(torch.tensor(i))[1])]) for m, i in enumerate(picked)]


def check_folder(out_dir: str, cfg) -> None:
    """Refuse a folder whose images another demo configuration made (a rerun would mix them)."""
    path = os.path.join(out_dir, CONFIG_FILE)
    wanted = json.loads(json.dumps(asdict(cfg)))
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            try:
                found = json.load(f)
            except ValueError:
                found = None
        if found != wanted:
            raise EvaluationError(
                f"{out_dir} holds an evaluation of the demo with other settings (another --seed, --quick, --threads or "
                "--adapters); choose another --evaluate folder or delete that one"
            )
    elif os.path.isdir(os.path.join(out_dir, "images")):
        raise EvaluationError(f"{out_dir} holds images that are not the demo's ({CONFIG_FILE} is missing); choose another --evaluate folder")


def evaluation_options(base, adapters: Dict[str, Any], cfg, out_dir: str, clip: Optional[str] = None,
                       prompts: Optional[int] = None, dimension_strength: float = DIMENSION_STRENGTH) -> Options:
    """The evaluation of the demo's models: VMix off, the demo's λ sweep, all on / all off / each dimension alone
    at ``dimension_strength``, both adapters side by side; the demo's sweep prompts and seeds."""
    from .experiment import DIMENSIONS

    refs = [AdapterRef(name, None, tuple(d.name for d in DIMENSIONS)) for name in adapters]
    settings = build_settings(refs, cfg.lambdas, ["all", "none", "each"], dimension_strength=dimension_strength)
    chosen = demo_prompts(cfg, prompts)
    return Options(
        out_dir=out_dir, prompts=chosen, settings=settings, sources=[DemoSource(base, adapters, cfg)],
        seed=cfg.seed * 1_000_003,  # the seeds of the demo's own sweep: prompt m gets seed·1000003 + m
        clip=clip, device="cpu", grid_prompts=min(6, len(chosen)), image_metrics=[demo_metrics()], tradeoff=TRADEOFF,
    )


def evaluate_demo(base, adapters: Dict[str, Any], cfg, out_dir: str, clip: Optional[str] = None, prompts: Optional[int] = None,
                  log: Callable[[str], None] = print, progress=None) -> Dict[str, Any]:
    """Run vmix_lib.evaluate on the demo's models; returns what results/results.json holds.  A rerun with the
    same folder and configuration makes no image again."""
    from .experiment import reproducible

    check_folder(out_dir, cfg)
    opts = evaluation_options(base, adapters, cfg, out_dir, clip, prompts)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(asdict(cfg), f, indent=1)
    with reproducible(cfg.threads):
        return evaluate(opts, log, progress)
