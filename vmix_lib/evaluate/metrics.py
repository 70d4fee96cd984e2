"""The numbers of the report, computed with the field's implementations.

- **Aes score**: the LAION improved aesthetic predictor on L2-normalised CLIP ViT-L/14 image
  embeddings (vmix_lib/scoring/aesthetic.py).
- **CLIP score**: torchmetrics' definition, ``100 · cos(image, prompt)`` per image and, per setting,
  ``max(mean, 0)`` (the clamp after averaging, as ``CLIPScore.compute``).  It is computed from the
  cached CLIP embeddings, so no image is encoded twice; ``torchmetrics_clip_score`` runs the field's
  own ``CLIPScore`` on the same CLIP (a wrapper for transformers 5, whose ``get_*_features`` return a
  ModelOutput, and a processor that truncates prompts to 77 tokens keeping the end token:
  torchmetrics#2883), and every run cross-checks the two on a few images; the tests require equality.
- **FID / KID** with torchmetrics' ``FrechetInceptionDistance`` / ``KernelInceptionDistance`` fed with
  cached features through a pass-through feature module: CLIP ViT-L/14 embeddings (always available)
  or Inception-v3 pool features (torch-fidelity's ``inception-v3-compat``, the TF-FID port).
- **Probes**: CLIP zero-shot antonym pairs per dimension (vmix_lib/scoring/probes.py), reported as
  the paired shift from VMix off.
- **Content kept**: cosine similarity of CLIP image embeddings with the VMix-off image of the same
  prompt and seed.
- **Intervals**: percentile bootstrap (seeded) over images, 95 %.
- **Your own numbers** (``ImageMetric``, the Python API): measured on the pictures themselves,
  each with its bootstrap interval and its paired shift from the baseline, like the metrics above.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .errors import EvaluationError

FID_MIN_IMAGES = 2000  # below this FID is strongly biased upward (TTUR#4, pytorch-fid#13): prefer KID


# -- CLIP score ------------------------------------------------------------------------------
def clip_scores(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Per pair ``100 · cos``; both inputs [N, D] (normalised again here, as torchmetrics does)."""
    img = image_embeds.double() / image_embeds.double().norm(dim=-1, keepdim=True)
    txt = text_embeds.double() / text_embeds.double().norm(dim=-1, keepdim=True)
    return (100 * (img * txt).sum(dim=-1)).float()


def clip_score_of_mean(mean: float) -> float:
    """torchmetrics' CLIPScore.compute: the mean, clamped at 0 after averaging."""
    return max(float(mean), 0.0)


class _FeatureOutput(torch.nn.Module):
    """A CLIPModel whose get_image_features / get_text_features return tensors (transformers 5
    returns a ModelOutput with the projected features in ``pooler_output``)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, pixel_values=None, **kwargs):
        out = self.model.get_image_features(pixel_values=pixel_values, **kwargs)
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_text_features(self, input_ids=None, attention_mask=None, **kwargs):
        out = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return out if isinstance(out, torch.Tensor) else out.pooler_output


class _Processor:
    """torchmetrics' processor call: text truncated by the tokenizer to 77 tokens, keeping the end
    token; images (uint8 [C, H, W] tensors) through the CLIP's own image processor via PIL, the same
    route as the evaluation's cached embeddings."""

    def __init__(self, clip):
        self.clip = clip

    def __call__(self, text=None, images=None, return_tensors="pt", padding=True, **kwargs):
        if text is not None:
            return dict(self.clip.tokenize(list(text)))
        from PIL import Image

        pil = [Image.fromarray(i.permute(1, 2, 0).to(torch.uint8).numpy()) for i in images]
        return {"pixel_values": self.clip.pixel_values(pil).to(self.clip.dtype)}


def torchmetrics_clip_score(clip):
    """torchmetrics' ``CLIPScore`` running on ``clip`` (a vmix_lib.scoring ClipModel)."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    return CLIPScore(model_name_or_path=lambda: (_FeatureOutput(clip.model), _Processor(clip)))


def pil_to_uint8(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)


# -- extra numbers measured on the pictures ------------------------------------------------------
@dataclass
class ImageMetric:
    """Numbers a caller measures on the pictures (``Options.image_metrics``), e.g. a model's own
    measures where CLIP would say little.  Each key becomes a column of the report with its
    bootstrap interval, and ``measure``'s keys also ``KEY_shift``, the paired shift from the
    baseline image of the same prompt and seed.

    measure(images) -> one {key: value} per image (PIL RGB images, as stored)
    compare(images, baselines) -> one {key: value} per pair (image vs the baseline's image);
                                 not computed for the baseline itself
    """

    name: str
    measure: Optional[Callable[[List[Any]], List[Dict[str, float]]]] = None
    compare: Optional[Callable[[List[Any], List[Any]], List[Dict[str, float]]]] = None
    titles: Dict[str, str] = field(default_factory=dict)  # key -> column title in the report
    about: str = ""  # one sentence for the report's "What the numbers mean"


# -- intervals -------------------------------------------------------------------------------
@dataclass
class Estimate:
    mean: float
    low: float
    high: float
    n: int

    def to_json(self) -> Dict[str, float]:
        return {"mean": _r(self.mean), "ci95": [_r(self.low), _r(self.high)], "n": self.n}


def _r(value: float) -> Optional[float]:
    return None if value is None or not math.isfinite(value) else round(float(value), 6)


def bootstrap(values: Sequence[float], resamples: int = 1000, seed: int = 0, clamp_at_zero: bool = False) -> Estimate:
    """Mean and percentile-bootstrap 95 % interval over the values (NaNs dropped)."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if x.size == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1) if x.size > 1 else np.repeat(x.mean(), 2)
    mean, low, high = float(x.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))
    if clamp_at_zero:
        mean, low, high = (clip_score_of_mean(v) for v in (mean, low, high))
    return Estimate(mean, low, high, int(x.size))


# -- FID / KID on cached features ------------------------------------------------------------
class CachedFeatures(torch.nn.Module):
    """torchmetrics' ``feature`` module for features computed (and cached) beforehand: passes them through."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() != 2 or features.shape[1] != self.num_features:
            raise ValueError(f"expected features [N, {self.num_features}], got {tuple(features.shape)}")
        return features


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """torchmetrics' FrechetInceptionDistance on features [N, D] (float64 statistics)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=CachedFeatures(real.shape[1]))
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return float(metric.compute())


def kernel_distance(real: torch.Tensor, fake: torch.Tensor, subsets: int = 100, seed: int = 0) -> Tuple[float, float, int]:
    """torchmetrics' KernelInceptionDistance (mean, std over subsets, subset size); seeded subsets."""
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(1000, real.shape[0], fake.shape[0])
    with warnings.catch_warnings():  # "will save all extracted features": they are in memory already
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(feature=CachedFeatures(real.shape[1]), subsets=subsets, subset_size=size)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std), size


class InceptionFeatures:
    """Inception-v3 pool features (2048) as torchmetrics' FID computes them (torch-fidelity's
    ``inception-v3-compat``, weights from a local file), for the FID that published numbers use.

    Images are resized to 299×299 with PIL bicubic (clean-fid's "clean" resize) before the network.
    Needs ``torch-fidelity`` (which needs torchvision); see requirements-train.txt.
    """

    def __init__(self, weights_path: Optional[str], device="cpu"):
        import hashlib
        import importlib.util
        import os

        if importlib.util.find_spec("torch_fidelity") is None or importlib.util.find_spec("torchvision") is None:
            raise EvaluationError(
                "--fid-features inception needs torch-fidelity and torchvision (pip install torch-fidelity==0.4.0 and the "
                "torchvision build that matches your torch); or use --fid-features clip"
            )
        if not weights_path or not os.path.isfile(weights_path):
            raise EvaluationError(
                "--inception-weights must name torch-fidelity's weights-inception-2015-12-05-6726825d.pth "
                "(nothing is downloaded during an evaluation)"
            )
        from torchmetrics.image.fid import NoTrainInceptionV3

        try:
            self.model = NoTrainInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=weights_path, antialias=False)
        except Exception as e:
            raise EvaluationError(f"Inception weights {weights_path} could not be loaded ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        self.model = self.model.to(device)
        self.device = device
        with open(weights_path, "rb") as f:
            self.identity = "inception-v3-compat-" + hashlib.sha1(f.read()).hexdigest()[:12]

    @staticmethod
    def pixel_values(images) -> torch.Tensor:
        from PIL import Image

        return torch.stack([pil_to_uint8(i.resize((299, 299), Image.BICUBIC)) for i in images])

    @torch.no_grad()
    def embed_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixels.to(self.device)).reshape(pixels.shape[0], -1).float()


def distances(real: torch.Tensor, fake: torch.Tensor, seed: int = 0) -> Dict[str, object]:
    """FID and KID of ``fake`` against ``real`` features, with the sample-size caveat spelled out."""
    out: Dict[str, object] = {"n_real": int(real.shape[0]), "n_fake": int(fake.shape[0])}
    if real.shape[0] < 2 or fake.shape[0] < 2:
        out["note"] = "needs at least 2 images on each side"
        return out
    out["fid"] = _r(frechet_distance(real, fake))
    kid_mean, kid_std, size = kernel_distance(real, fake, seed=seed)
    out.update(kid=_r(kid_mean), kid_std=_r(kid_std), kid_subset=size)
    if min(real.shape[0], fake.shape[0]) < FID_MIN_IMAGES:
        out["note"] = (f"fewer than {FID_MIN_IMAGES} images: FID is biased upward at this size and only comparable "
                       "between settings of this run with the same counts; use KID")
    return out


def paired_shift(values: Dict[Tuple[str, int], float], baseline: Dict[Tuple[str, int], float]) -> List[float]:
    """value − baseline value for every (prompt, seed) both have."""
    return [values[k] - baseline[k] for k in values if k in baseline]


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).float()

