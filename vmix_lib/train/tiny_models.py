"""Small random-weight SD1.5- and SDXL-shaped models written as real single-file checkpoints.

For smoke runs and tests of the whole trainer on a CPU: the checkpoint has the original (WebUI) key
layout and is read by the same loader as a real one, given the model configs and tokenizer written
next to it (``--model-config-dir``, ``--tokenizer-dir``).  Its images are noise, of course; it proves
the pipeline, not the method (that is vmix_lib.demo's job).

    python -m vmix_lib.train.tiny_models OUT_DIR [--family sd15|sdxl] [--full-size]

``--full-size`` writes a random-weight checkpoint of the real SD1.5 / SDXL size instead (fp16, the
configurations the trainer ships; only the tokenizer is tiny): for timing and memory measurements
of the trainer on a GPU without downloading a model.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
from typing import Dict, Tuple

import torch

from .checkpoint_loading import clean_config
from .ldm_names import single_file_state_dict
from .text import write_vocab_from_bpe

HIDDEN = 32
# A few BPE merges so that common words are single tokens; everything else splits into characters.
_MERGES = ["c a", "ca t</w>", "o f</w>", "d o", "do g</w>", "r e", "re d</w>", "s k", "sk s</w>"]


def tiny_configs(family: str = "sd15") -> Dict[str, Dict]:
    vocab = 512 + len(_MERGES) + 2
    text = {
        "_class_name": "CLIPTextModel", "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
        "hidden_act": "quick_gelu", "hidden_size": HIDDEN, "intermediate_size": 2 * HIDDEN, "num_attention_heads": 4,
        "num_hidden_layers": 2, "max_position_embeddings": 77, "projection_dim": HIDDEN, "vocab_size": vocab,
        "layer_norm_eps": 1e-5,
    }
    vae = {
        "_class_name": "AutoencoderKL", "block_out_channels": [16, 32, 32],
        "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
        "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1, "norm_num_groups": 8,
        "sample_size": 32, "scaling_factor": 0.5,
    }
    scheduler = {
        "_class_name": "DDPMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000, "prediction_type": "epsilon", "steps_offset": 1,
    }
    if family == "sd15":
        unet = {
            "_class_name": "UNet2DConditionModel", "block_out_channels": [32, 64], "layers_per_block": 2,
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
            "cross_attention_dim": HIDDEN, "attention_head_dim": 4, "norm_num_groups": 8, "sample_size": 8,
            "in_channels": 4, "out_channels": 4,
        }
        return {"unet": unet, "vae": vae, "text_encoder": text, "scheduler": scheduler}
    if family != "sdxl":
        raise ValueError(f"unknown family {family!r}")
    unet = {
        "_class_name": "UNet2DConditionModel", "block_out_channels": [32, 64], "layers_per_block": 2,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"], "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "transformer_layers_per_block": [1, 2], "use_linear_projection": True, "attention_head_dim": [2, 4],
        "cross_attention_dim": 2 * HIDDEN, "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": HIDDEN + 6 * 8, "norm_num_groups": 8, "sample_size": 8,
        "in_channels": 4, "out_channels": 4,
    }
    text2 = dict(text, _class_name="CLIPTextModelWithProjection", hidden_act="gelu")
    return {"unet": unet, "vae": vae, "text_encoder": text, "text_encoder_2": text2, "scheduler": scheduler}


def build_tiny_models(family: str = "sd15", seed: int = 0, configs: Dict[str, Dict] = None):
    """(unet, vae, [text encoders], configs) with random weights from ``seed`` (tiny configs by default)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    configs = configs or tiny_configs(family)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(clean_config(configs["unet"]))
    vae = AutoencoderKL.from_config(clean_config(configs["vae"]))
    encoders = [CLIPTextModel(CLIPTextConfig(**clean_config(configs["text_encoder"])))]
    if family == "sdxl":
        encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(**clean_config(configs["text_encoder_2"]))))
    for module in (unet, vae, *encoders):
        module.eval().requires_grad_(False)
    return unet, vae, encoders, configs


def write_tokenizer(folder: str) -> str:
    """A CLIP-style BPE vocabulary (bytes + a few merges) as vocab.json / merges.txt."""
    os.makedirs(folder, exist_ok=True)
    bpe = os.path.join(folder, "tiny_bpe.txt.gz")
    with gzip.open(bpe, "wt", encoding="utf-8") as f:
        f.write("#version: tiny\n" + "\n".join(_MERGES) + "\n")
    write_vocab_from_bpe(bpe, folder)
    os.remove(bpe)
    return folder


def write_tiny_model(folder: str, family: str = "sd15", seed: int = 0, v_prediction: bool = False) -> Tuple[str, str, str]:
    """Write checkpoint, configs and tokenizer; returns (checkpoint, config dir, tokenizer dir)."""
    from safetensors.torch import save_file

    unet, vae, encoders, configs = build_tiny_models(family, seed)
    os.makedirs(folder, exist_ok=True)
    config_dir = os.path.join(folder, "configs")
    os.makedirs(config_dir, exist_ok=True)
    for name, config in configs.items():
        with open(os.path.join(config_dir, f"{name}.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
    tokenizer_dir = write_tokenizer(os.path.join(folder, "tokenizer"))
    checkpoint = os.path.join(folder, f"tiny-{family}.safetensors")
    save_file(single_file_state_dict(family, unet, vae, encoders, v_prediction=v_prediction), checkpoint)
    return checkpoint, config_dir, tokenizer_dir


def write_full_size_model(folder: str, family: str = "sd15", seed: int = 0) -> Tuple[str, str]:
    """A random-weight checkpoint of the real size (fp16) and a tiny tokenizer; returns (checkpoint,
    tokenizer dir).  The trainer builds it from its shipped configurations (no --model-config-dir)."""
    from safetensors.torch import save_file

    from .checkpoint_loading import model_configs

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)  # built in fp16: half the memory (SD1.5 ~2 GB, SDXL ~7 GB)
    try:
        unet, vae, encoders, _ = build_tiny_models(family, seed, model_configs(family))
    finally:
        torch.set_default_dtype(previous)
    os.makedirs(folder, exist_ok=True)
    tokenizer_dir = write_tokenizer(os.path.join(folder, "tokenizer"))
    state = {k: v.half().contiguous() for k, v in single_file_state_dict(family, unet, vae, encoders).items()}
    del unet, vae, encoders
    checkpoint = os.path.join(folder, f"random-{family}.safetensors")
    save_file(state, checkpoint)
    return checkpoint, tokenizer_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vmix_lib.train.tiny_models", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--family", choices=("sd15", "sdxl"), default="sd15")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--full-size", action="store_true", help="the real model size with random weights (fp16)")
    args = parser.parse_args(argv)
    if args.full_size:
        checkpoint, tokenizer_dir = write_full_size_model(args.out_dir, args.family, args.seed)
        print(f"checkpoint {checkpoint}\ntokenizer_dir {tokenizer_dir}")
        return 0
    checkpoint, config_dir, tokenizer_dir = write_tiny_model(args.out_dir, args.family, args.seed)
    print(f"checkpoint {checkpoint}\nmodel_config_dir {config_dir}\ntokenizer_dir {tokenizer_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
