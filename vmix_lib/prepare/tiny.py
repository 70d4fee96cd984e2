"""Small random-weight models in the real formats, for tests and a smoke run (nothing downloaded).

    python -m vmix_lib.prepare.tiny OUT_DIR

writes OUT_DIR/clip (a transformers CLIPModel folder), OUT_DIR/aesthetic.pth (the LAION predictor's
key layout), OUT_DIR/watermark (a ViT image classifier with the labels clean/watermark) and
OUT_DIR/captioner (a BLIP captioning model whose output is biased to the word "red").  Their
judgements are meaningless; they prove the pipeline, not the models.
"""
from __future__ import annotations

import argparse
import os
from typing import Sequence

import torch

_WORDS = ("a", "photo", "of", "red", "blue", "green", "cat", "dog", "house", "tree", "sky", "the")


def write_tiny_classifier(folder: str, labels: Sequence[str] = ("clean", "watermark"), image_size: int = 32, seed: int = 0) -> str:
    """A ViTForImageClassification folder (config, safetensors weights, image processor)."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    os.makedirs(folder, exist_ok=True)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=image_size,
                       patch_size=8, num_labels=len(labels), id2label=dict(enumerate(labels)),
                       label2id={label: i for i, label in enumerate(labels)})
    torch.manual_seed(seed)
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessorPil(size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return folder


def write_tiny_captioner(folder: str, word: str = "red", image_size: int = 32, seed: int = 0) -> str:
    """A BlipForConditionalGeneration folder with a small BERT vocabulary; its decoder's output bias
    favours ``word``, so greedy decoding writes that word (a known caption for tests)."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessorPil, BlipProcessor

    os.makedirs(folder, exist_ok=True)
    vocab = os.path.join(folder, "vocab.txt")
    with open(vocab, "w", encoding="utf-8") as f:
        f.write("\n".join(("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") + _WORDS) + "\n")
    tokenizer = BertTokenizer(vocab)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})  # BLIP's decoder start token
    ids = dict(bos_token_id=tokenizer.bos_token_id, sep_token_id=tokenizer.sep_token_id,
               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.sep_token_id)
    config = BlipConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_hidden_layers=2, encoder_hidden_size=32, max_position_embeddings=64, **ids),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                           image_size=image_size, patch_size=8),
        projection_dim=32,
    )
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config)
    with torch.no_grad():
        bias = model.text_decoder.cls.predictions.bias
        bias.fill_(-10.0)
        bias[tokenizer.convert_tokens_to_ids(word)] = 10.0
    model.save_pretrained(folder)
    BlipProcessor(BlipImageProcessorPil(size={"height": image_size, "width": image_size}), tokenizer).save_pretrained(folder)
    return folder


def write_all(folder: str) -> dict:
    from ..scoring.tiny import write_random_predictor, write_tiny_clip

    return {
        "clip": write_tiny_clip(os.path.join(folder, "clip")),
        "aesthetic": write_random_predictor(os.path.join(folder, "aesthetic.pth")),
        "watermark": write_tiny_classifier(os.path.join(folder, "watermark")),
        "captioner": write_tiny_captioner(os.path.join(folder, "captioner")),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vmix_lib.prepare.tiny", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    args = parser.parse_args(argv)
    for kind, path in write_all(os.path.abspath(args.out_dir)).items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
