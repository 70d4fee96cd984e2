"""Pooled "[CLS]" text vectors for AesEmb from transformers CLIP text models (no hub access).

CLIP's text tower has no [CLS] token; its pooled vector is the final-layer-normed hidden state at
the EOS position (transformers' ``pooler_output``, unprojected).  VMix's AesEmb must live in the
cross-attention context width d, so:

    SD1.5: CLIP-L pooled                                           768
    SDXL:  CLIP-L pooled ‖ OpenCLIP-G pooled *before* text_projection   768 + 1280 = 2048

Each helper takes already-loaded (model, tokenizer) pairs and returns an ``encode_pooled``
callable for ``mixing.build_aes_emb``.  The models may be ``CLIPTextModel`` or
``CLIPTextModelWithProjection`` (whose projection is skipped) on any device and dtype.
"""
from __future__ import annotations

from typing import Callable, List, Sequence, Tuple

import torch
import torch.nn as nn

from .layers import TOKENS

EncodePooled = Callable[[List[str]], torch.Tensor]
TextEncoder = Tuple[nn.Module, Callable]  # (CLIP text model, its tokenizer)


def _text_transformer(model: nn.Module) -> nn.Module:
    # CLIPTextModelWithProjection (and transformers 4.x CLIPTextModel) wrap the transformer in
    # .text_model; calling that skips the projection, which would leave the context width.
    return getattr(model, "text_model", model)


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def eos_positions(input_ids: torch.Tensor, eos_token_id) -> torch.Tensor:
    """Index of the first EOS token in each row (padding may repeat EOS, as CLIP-L's tokenizer does).

    Without a known EOS id, fall back to OpenCLIP's rule: EOS has the highest id in the vocabulary.
    """
    if eos_token_id is None:
        return input_ids.argmax(dim=-1)
    is_eos = input_ids == int(eos_token_id)
    missing = ~is_eos.any(dim=-1)
    if bool(missing.any()):
        row = int(missing.nonzero()[0])
        raise ValueError(f"tokenized text {row} has no end-of-text token (id {eos_token_id}); check the tokenizer")
    return is_eos.int().argmax(dim=-1)


@torch.no_grad()
def clip_pooled(model: nn.Module, tokenizer: Callable, texts: Sequence[str]) -> torch.Tensor:
    """Final-layer-normed EOS hidden state of ``model`` for each text: float32 [n, hidden] on the CPU."""
    texts = list(texts)
    if not texts:
        raise ValueError("no texts to encode")
    tokens = tokenizer(texts, padding="max_length", max_length=TOKENS, truncation=True, return_tensors="pt")
    input_ids = tokens["input_ids"]
    if tuple(input_ids.shape) != (len(texts), TOKENS):
        raise ValueError(f"tokenizer returned ids of shape {tuple(input_ids.shape)}, expected {(len(texts), TOKENS)}")
    transformer = _text_transformer(model)
    input_ids = input_ids.to(_model_device(transformer))
    # No attention mask, as the SD/SDXL conditioners call it: CLIP's causal mask already keeps
    # the padding after EOS from reaching the EOS state.
    hidden = transformer(input_ids=input_ids).last_hidden_state  # [n, 77, hidden], after final LN
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    pooled = hidden[rows, eos_positions(input_ids, getattr(tokenizer, "eos_token_id", None)).to(hidden.device)]
    return pooled.float().cpu()


def pooled_encoder(*encoders: TextEncoder) -> EncodePooled:
    """``encode_pooled(texts) -> [n, Σ hidden]``: the pooled vectors of each encoder, concatenated."""
    if not encoders:
        raise ValueError("pooled_encoder needs at least one (model, tokenizer) pair")

    def encode_pooled(texts: List[str]) -> torch.Tensor:
        return torch.cat([clip_pooled(model, tokenizer, texts) for model, tokenizer in encoders], dim=-1)

    return encode_pooled


def sd15_encode_pooled(clip_l: nn.Module, tokenizer_l: Callable) -> EncodePooled:
    """SD1.5: CLIP ViT-L/14 pooled output, 768 wide."""
    return pooled_encoder((clip_l, tokenizer_l))


def sdxl_encode_pooled(
    clip_l: nn.Module, tokenizer_l: Callable, clip_g: nn.Module, tokenizer_g: Callable
) -> EncodePooled:
    """SDXL: CLIP-L pooled (768) ‖ OpenCLIP-G pooled before its text projection (1280) = 2048."""
    return pooled_encoder((clip_l, tokenizer_l), (clip_g, tokenizer_g))
