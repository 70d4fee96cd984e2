"""Small random-weight models in the real formats, for tests and demonstrations (nothing downloaded).

    write_tiny_clip(folder)                       # a transformers CLIPModel folder: config, weights,
                                                  # tokenizer and image processor, loaded by load_clip
    write_random_predictor("aes.pth")             # the LAION predictor's key layout, random weights

The CLIP is tiny (2 layers, width 32, 32-pixel images) but its projection is 768 wide by default,
so a predictor in the real 768-input layout fits it.
"""
from __future__ import annotations

import os

import torch


def write_tiny_clip(folder: str, projection_dim: int = 768, image_size: int = 32, seed: int = 0) -> str:
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    from ..train.tiny_models import write_tokenizer

    os.makedirs(folder, exist_ok=True)
    write_tokenizer(folder)
    tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                         vocab_size=len(tokenizer), max_position_embeddings=77, **ids),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                           image_size=image_size, patch_size=8),
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return folder


def random_predictor_state(in_features: int = 768, seed: int = 0) -> dict:
    from .aesthetic import AestheticPredictor

    torch.manual_seed(seed)
    return {f"layers.{k}": v.clone() for k, v in AestheticPredictor(in_features).layers.state_dict().items()}


def write_random_predictor(path: str, in_features: int = 768, seed: int = 0) -> str:
    """A predictor file with the LAION keys (``layers.0.weight`` …): ``.pth`` pickled state dict or ``.safetensors``."""
    state = random_predictor_state(in_features, seed)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state, path)
    else:
        torch.save(state, path)
    return path
