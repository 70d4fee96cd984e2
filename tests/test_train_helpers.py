"""Shared builders for the trainer tests (this module holds no tests itself)."""
from __future__ import annotations

import json
import os

import torch

SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


def tiny_unet(seed: int = 0, cross: int = 8):
    """A diffusers UNet with SD1.5's structure in miniature (cross-attention down/mid/up)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(8, 16), norm_num_groups=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross, attention_head_dim=2,
        layers_per_block=1, sample_size=8,
    ).eval()


def alphas_cumprod():
    from vmix_lib.train.checkpoint_loading import alphas_cumprod_from

    return alphas_cumprod_from(SCHEDULE)


def write_image(path: str, color=(200, 40, 40), size=(40, 32), mode="RGB") -> None:
    from PIL import Image

    Image.new(mode, size, color).save(path)


def write_dataset(folder: str, count: int = 6, size=(40, 32)) -> str:
    """``count`` images with captions; even ones {"color": "superior"}, odd ones unlabelled."""
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        stem = f"img{i}"
        write_image(os.path.join(folder, stem + ".png"), (40 * i % 256, 200 if i % 2 == 0 else 90, 30), size)
        with open(os.path.join(folder, stem + ".txt"), "w", encoding="utf-8") as f:
            f.write(f"a cat {i}")
        if i % 2 == 0:
            with open(os.path.join(folder, stem + ".json"), "w", encoding="utf-8") as f:
                json.dump({"color": "superior"}, f)
    return folder


def file_tensors(path: str):
    from safetensors.torch import load_file

    return load_file(path)
