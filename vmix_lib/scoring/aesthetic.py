"""The LAION improved aesthetic predictor (christophschuhmann/improved-aesthetic-predictor).

An MLP 768 → 1024 → 128 → 64 → 16 → 1 (dropout, no activations: the reference inference script
``simple_inference.py`` runs every published file, ``reluMSE`` included, through this layout) on the
L2-normalised CLIP ViT-L/14 image embedding; the standard file is ``sac+logos+ava1-l14-linearMSE.pth``.
The score is an unbounded regression on human ratings from 1 to 10: about 5.5 is fair, 6.5 good,
7+ what good text-to-image models reach.

The published files are pickles (saved on cuda:0): they are read with
``torch.load(weights_only=True, map_location="cpu")``, which runs no code; safetensors files with the
same keys (``layers.0.weight`` …, optionally beside the CLIP weights of the Hub wrappers) work too.
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import torch
import torch.nn as nn

from .errors import ScoringError

# Index of each Linear in the reference nn.Sequential (the Dropouts sit at 1, 3, 5).
LINEAR_INDICES = (0, 2, 4, 6, 7)
WIDTHS = (1024, 128, 64, 16, 1)
_CLIP_PREFIXES = ("vision_model.", "visual_projection.", "text_model.", "text_projection.", "logit_scale")


class AestheticPredictor(nn.Module):
    """The reference module layout (``self.layers``, an nn.Sequential), so its state dict loads as is."""

    def __init__(self, in_features: int = 768):
        super().__init__()
        self.in_features = in_features
        self.layers = nn.Sequential(
            nn.Linear(in_features, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16), nn.Linear(16, 1),
        )

    def forward(self, normalized_embeds: torch.Tensor) -> torch.Tensor:
        """[B, in_features] unit-length CLIP image embeddings -> [B] scores."""
        return self.layers(normalized_embeds.to(self.layers[0].weight.dtype)).squeeze(-1)


def _read_state(path: str) -> Dict[str, torch.Tensor]:
    name = os.path.basename(path)
    if os.path.isdir(path):
        raise ScoringError(
            f"aesthetic predictor {path} is a folder; name the predictor file itself, a .pth or .safetensors file "
            "such as sac+logos+ava1-l14-linearMSE.pth"
        )
    if not os.path.isfile(path):
        raise ScoringError(
            f"aesthetic predictor file {path} does not exist; name the LAION predictor's .pth or .safetensors file "
            "(e.g. sac+logos+ava1-l14-linearMSE.pth)"
        )
    lower = name.lower()
    if lower.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as e:
            raise ScoringError(f"aesthetic predictor {name} is not a readable safetensors file ({str(e).splitlines()[0]})") from None
    if lower.endswith((".pth", ".pt", ".bin", ".ckpt")):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            first = (str(e) or type(e).__name__).strip().splitlines()[0]
            raise ScoringError(
                f"aesthetic predictor {name} cannot be read as a plain weights file ({first[:160]}); "
                "use the LAION .pth state dict (e.g. sac+logos+ava1-l14-linearMSE.pth) or a safetensors copy"
            ) from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ScoringError(f"aesthetic predictor {name} does not hold a state dict of tensors")
        return state
    raise ScoringError(f"aesthetic predictor {name} has an unknown extension; give the LAION .pth file or a .safetensors file")


def load_aesthetic_predictor(path: str, device="cpu", expected_dim: Optional[int] = None) -> AestheticPredictor:
    """The predictor from ``path``; ``expected_dim`` (the CLIP model's embedding width) is checked against the first layer.
    """
    name = os.path.basename(path)
    state = _read_state(path)
    weights = {}
    for key, value in state.items():
        if key.startswith(_CLIP_PREFIXES):
            continue  # the Hub wrappers bundle CLIP-L in the same file
        weights[key[len("layers."):] if key.startswith("layers.") else key] = value
    expected = {f"{i}.{p}" for i in LINEAR_INDICES for p in ("weight", "bias")}
    missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or extra:
        what = (f"missing {', '.join('layers.' + k for k in missing[:4])}" if missing else "") + (
            ("; " if missing and extra else "") + f"unexpected {', '.join(extra[:4])}" if extra else ""
        )
        raise ScoringError(f"aesthetic predictor {name} does not have the LAION predictor's layers ({what})")
    in_features = weights["0.weight"].shape[-1] if weights["0.weight"].dim() == 2 else -1
    previous = in_features
    for index, width in zip(LINEAR_INDICES, WIDTHS):
        w, b = weights[f"{index}.weight"], weights[f"{index}.bias"]
        if tuple(w.shape) != (width, previous) or tuple(b.shape) != (width,):
            raise ScoringError(
                f"aesthetic predictor {name}: layers.{index} has shape {tuple(w.shape)}/{tuple(b.shape)}, "
                f"expected ({width}, {previous})/({width},); it is not the LAION predictor"
            )
        if not (torch.isfinite(w).all() and torch.isfinite(b).all()):
            raise ScoringError(f"aesthetic predictor {name}: layers.{index} holds NaN or infinite values; the file is damaged")
        previous = width
    if expected_dim is not None and in_features != expected_dim:
        raise ScoringError(
            f"aesthetic predictor {name} expects {in_features}-wide CLIP image embeddings, but the CLIP model gives "
            f"{expected_dim}; use the CLIP the predictor was trained on (ViT-L/14: openai/clip-vit-large-patch14)"
        )
    predictor = AestheticPredictor(in_features)
    predictor.layers.load_state_dict({k: v.float() for k, v in weights.items()})
    return predictor.to(device).eval().requires_grad_(False)
