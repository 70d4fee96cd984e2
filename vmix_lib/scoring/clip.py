"""CLIP from a local folder or a hub id: L2-normalised image and text embeddings.

    clip = load_clip("openai/clip-vit-large-patch14")      # the local HF cache; nothing downloaded
    clip = load_clip("/models/clip-vit-large-patch14")    # a folder with config.json + weights
    img = clip.embed_images([pil_image, ...])               # [B, D] float32, unit length
    txt = clip.embed_texts(["a photo of a cat", ...])      # [B, D]; long prompts keep their end token

Text is truncated to 77 tokens by the tokenizer, which keeps the end token CLIP pools on (slicing the
ids after tokenizing drops it and lowers the scores of long prompts: torchmetrics#2883).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import List, Sequence

import torch

from .errors import ScoringError
from .paths import DEFAULT_CLIP, check_model_folder

MAX_TOKENS = 77


def _features(output) -> torch.Tensor:
    """transformers < 5 returns the projected features; 5.x a ModelOutput holding them in pooler_output."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _short(e: Exception) -> str:
    text = (str(e) or type(e).__name__).strip().splitlines()[0]
    return text if len(text) <= 200 else text[:197] + "..."


@dataclass
class ClipModel:
    """A transformers CLIPModel with its tokenizer and image processor, in eval mode."""

    model: "torch.nn.Module"
    tokenizer: object
    image_processor: object
    source: str  # what the user named
    identity: str  # changes when the weights change: the key of feature caches

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def dim(self) -> int:
        return int(self.model.config.projection_dim)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp())

    def pixel_values(self, images: Sequence) -> torch.Tensor:
        """PIL images -> the model's input tensor [B, 3, H, W] (CPU; safe in DataLoader workers)."""
        return self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def embed_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = _features(self.model.get_image_features(pixel_values=pixel_values.to(self.device, self.dtype)))
        return torch.nn.functional.normalize(out.float(), dim=-1)

    def embed_images(self, images: Sequence) -> torch.Tensor:
        return self.embed_pixels(self.pixel_values(images)).cpu()

    def tokenize(self, texts: Sequence[str]):
        return self.tokenizer(list(texts), padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        parts: List[torch.Tensor] = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenize(texts[start:start + batch_size])
            out = self.model.get_text_features(
                input_ids=tokens["input_ids"].to(self.device), attention_mask=tokens["attention_mask"].to(self.device)
            )
            parts.append(torch.nn.functional.normalize(_features(out).float(), dim=-1).cpu())
        return torch.cat(parts) if parts else torch.zeros(0, self.dim)


def _weights_identity(model) -> str:
    """A hash of the configuration and of both projections: cheap, and different for other weights."""
    digest = hashlib.sha1(model.config.to_json_string(use_diff=False).encode())
    for name in ("visual_projection", "text_projection"):
        weight = getattr(model, name).weight.detach().float().cpu().contiguous()
        digest.update(weight.numpy().tobytes())
    return digest.hexdigest()[:16]


def load_clip(source: str = DEFAULT_CLIP, device="cpu", dtype: torch.dtype = torch.float32, allow_download: bool = False) -> ClipModel:
    """CLIP from ``source``: a folder (config.json + weights + tokenizer files) or a hub id.

    A hub id is looked up in the local Hugging Face cache only, unless ``allow_download``.
    """
    from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    if not source:
        raise ScoringError("no CLIP model was named; give a local folder or a hub id such as openai/clip-vit-large-patch14")
    source = check_model_folder("CLIP", source, DEFAULT_CLIP)  # a missing folder is not a hub id
    is_path = os.path.exists(source)
    if is_path and not os.path.isdir(source):
        raise ScoringError(
            f"CLIP model {source} is a file; name the folder that holds its config.json, weights and tokenizer files"
        )
    where = f"folder {source}" if is_path else f"hub id {source!r}"
    offline = is_path or not allow_download
    how = (
        "name a folder with config.json, the weights and the tokenizer files"
        if is_path
        else "it is not in the local Hugging Face cache; name a local folder, or allow downloading (--allow-download)"
        if offline
        else "check the name and your connection"
    )
    try:
        model = CLIPModel.from_pretrained(source, local_files_only=offline)
    except Exception as e:  # OSError, ValueError, safetensors errors...: one sentence for all
        raise ScoringError(f"the CLIP model in {where} could not be loaded ({_short(e)}); {how}") from None
    try:
        tokenizer = CLIPTokenizer.from_pretrained(source, local_files_only=offline)
        probe = tokenizer("a").input_ids
        image_processor = CLIPImageProcessorPil.from_pretrained(source, local_files_only=offline)
    except Exception as e:
        raise ScoringError(f"the CLIP model in {where} has no usable tokenizer or image processor files ({_short(e)}); {how}") from None
    # transformers 5 quietly builds a 2-token vocabulary when the vocabulary files are unusable: refuse that.
    if len(tokenizer) < 258 or len(probe) != 3 or tokenizer.eos_token_id != probe[-1]:
        raise ScoringError(f"the tokenizer files of the CLIP model in {where} do not hold a CLIP vocabulary (vocab.json + merges.txt)")
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return ClipModel(model, tokenizer, image_processor, source, _weights_identity(model))
