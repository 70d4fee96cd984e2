"""CLIP tokenizers found offline, and the checkpoint's text encoders turned into UNet conditioning.

Conditioning matches what the WebUI feeds the UNet:
  SD1.5  context = CLIP-L last hidden state (final LayerNorm)                     [B, 77, 768]
  SDXL   context = CLIP-L penultimate ‖ OpenCLIP-G penultimate (no final LN)    [B, 77, 2048]
         text_embeds = OpenCLIP-G projected pooled [B, 1280]; time_ids [B, 6]
AesEmb rows (paper §3.2, the "[CLS]" token) are the pooled EOS states, before any projection:
  SD1.5  CLIP-L pooler_output                                                   768
  SDXL   CLIP-L pooled ‖ OpenCLIP-G pooled (final LN at EOS, before projection)   2048
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .errors import TrainError

TOKENS = 77
BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"
_BPE_MERGES = 49152 - 256 - 2  # merges CLIP uses from the file (OpenAI's SimpleTokenizer)
_HF_CLIP_L = "openai/clip-vit-large-patch14"
_BPE_PACKAGES = ("open_clip", "clip")  # open_clip_torch, clip-anytorch / openai-clip (the WebUI has both)


def _bytes_to_unicode() -> Dict[int, str]:
    """GPT-2/CLIP byte -> printable character table (the BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_vocab_from_bpe(bpe_path: str, out_dir: str, max_merges: Optional[int] = None) -> str:
    """Write vocab.json + merges.txt for transformers' CLIPTokenizer from CLIP's BPE merges file.

    Same vocabulary as OpenAI's SimpleTokenizer: 256 byte symbols, the same with ``</w>``, one token
    per merge, then ``<|startoftext|>`` and ``<|endoftext|>`` (49,408 tokens for the real file).
    """
    with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [m for m in lines[1:] if m.strip()]
    merges = merges[: _BPE_MERGES if max_merges is None else max_merges]
    alphabet = list(_bytes_to_unicode().values())
    vocab = alphabet + [a + "</w>" for a in alphabet] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({token: i for i, token in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return out_dir


def find_bpe_file() -> Optional[str]:
    """CLIP's BPE file inside an installed package (located without importing the package)."""
    for package in _BPE_PACKAGES:
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            continue
        for folder in (spec.submodule_search_locations or []) if spec else []:
            path = os.path.join(folder, BPE_NAME)
            if os.path.isfile(path):
                return path
    return None


def _has_vocab(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "vocab.json")) and os.path.isfile(os.path.join(folder, "merges.txt"))


def _from_dir(folder: str, pad_token: Optional[str]):
    from transformers import CLIPTokenizer

    kwargs = {"pad_token": pad_token} if pad_token else {}
    not_clip = f"the tokenizer files in {folder} do not hold a CLIP vocabulary (vocab.json + merges.txt)"
    try:
        tok = CLIPTokenizer.from_pretrained(folder, local_files_only=True, **kwargs)
        ids = tok("a").input_ids
    except Exception as e:  # tokenizers/transformers raise many kinds on bad files
        raise TrainError(f"{not_clip}: {e}") from None
    # transformers 5 quietly builds a 2-token vocabulary when the files are unusable: refuse that.
    if len(tok) < 514 or len(ids) != 3 or ids[0] == ids[-1] or tok.eos_token_id != ids[-1]:
        raise TrainError(not_clip)
    return tok


def _cached_hf_tokenizer() -> Optional[str]:
    """Folder of openai/clip-vit-large-patch14's tokenizer in the local Hugging Face cache, if complete."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = [try_to_load_from_cache(_HF_CLIP_L, name) for name in ("vocab.json", "merges.txt")]
    if all(isinstance(p, str) and os.path.isfile(p) for p in found) and os.path.dirname(found[0]) == os.path.dirname(found[1]):
        return os.path.dirname(found[0])
    return None


def load_tokenizers(family: str, tokenizer_dir: Optional[str] = None) -> List:
    """CLIP tokenizer(s) for ``family`` without any download; SDXL's second one pads with "!" (id 0).

    Looks in order at: ``tokenizer_dir`` (a folder with vocab.json + merges.txt, or with tokenizer/ and
    tokenizer_2/ subfolders as in a diffusers model or Forge's backend/huggingface folders); the local
    Hugging Face cache of openai/clip-vit-large-patch14 (the WebUI fills it on first start); CLIP's BPE
    file inside an installed open_clip or clip package.
    """
    count = 2 if family == "sdxl" else 1
    pads = [None, "!"][:count]
    if tokenizer_dir:
        if not os.path.isdir(tokenizer_dir):
            raise TrainError(f"tokenizer folder {tokenizer_dir} does not exist; point --tokenizer-dir at a folder with vocab.json and merges.txt")
        folders = []
        for i, pad in enumerate(pads):
            sub = os.path.join(tokenizer_dir, "tokenizer" if i == 0 else "tokenizer_2")
            if _has_vocab(sub):
                folders.append(sub)
            elif _has_vocab(tokenizer_dir):
                folders.append(tokenizer_dir)
            else:
                raise TrainError(
                    f"tokenizer folder {tokenizer_dir} has no vocab.json and merges.txt (nor a tokenizer/ subfolder with them)"
                )
        # The second SDXL tokenizer pads with "!" whatever its own folder says (open_clip.tokenize pads with 0).
        return [_from_dir(folder, pad) for folder, pad in zip(folders, pads)]
    cached = _cached_hf_tokenizer()
    if cached:
        return [_from_dir(cached, pad) for pad in pads]
    bpe = find_bpe_file()
    if bpe is None:
        raise TrainError(
            "no CLIP tokenizer vocabulary was found offline; pass --tokenizer-dir with a folder holding vocab.json and "
            "merges.txt, or install one package that ships CLIP's BPE file: pip install --no-deps clip-anytorch==2.6.0"
        )
    with tempfile.TemporaryDirectory(prefix="vmix-tokenizer-") as tmp:
        write_vocab_from_bpe(bpe, tmp)
        return [_from_dir(tmp, pad) for pad in pads]


def _ids(tokenizer, texts: Sequence[str], device) -> torch.Tensor:
    return tokenizer(
        list(texts), padding="max_length", max_length=TOKENS, truncation=True, return_tensors="pt"
    ).input_ids.to(device)


class TextConditioner:
    """The checkpoint's frozen text encoder(s): prompts -> UNet conditioning, labels -> AesEmb rows."""

    def __init__(self, family: str, tokenizers: Sequence, text_encoders: Sequence[torch.nn.Module]):
        if len(tokenizers) != len(text_encoders) or len(text_encoders) != (2 if family == "sdxl" else 1):
            raise ValueError(f"{family} needs {2 if family == 'sdxl' else 1} tokenizer/text-encoder pair(s)")
        self.family = family
        self.tokenizers = list(tokenizers)
        self.text_encoders = list(text_encoders)

    @property
    def device(self) -> torch.device:
        return next(self.text_encoders[0].parameters()).device

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(context [B, 77, d], SDXL projected pooled text_embeds [B, 1280] or None)."""
        if self.family == "sd15":
            ids = _ids(self.tokenizers[0], prompts, self.device)
            return self.text_encoders[0](ids).last_hidden_state, None
        ids1 = _ids(self.tokenizers[0], prompts, self.device)
        ids2 = _ids(self.tokenizers[1], prompts, self.device)
        out1 = self.text_encoders[0](ids1, output_hidden_states=True)
        out2 = self.text_encoders[1](ids2, output_hidden_states=True)
        context = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2].to(out1.hidden_states[-2].dtype)], dim=-1)
        return context, out2.text_embeds

    def pooled(self, texts: Sequence[str]) -> torch.Tensor:
        """The "[CLS]" vectors of ``texts`` [n, d] in float32 (build_aes_emb's encode_pooled)."""
        from ..text_encoders import pooled_encoder

        return pooled_encoder(*zip(self.text_encoders, self.tokenizers))(list(texts))


def sdxl_time_ids(original_hw: Tuple[int, int], crop_tl: Tuple[int, int], target_hw: Tuple[int, int]) -> List[float]:
    """SDXL's micro-conditioning: original size, crop top-left, target size (all (h, w))."""
    return [float(v) for v in (*original_hw, *crop_tl, *target_hw)]


def square_image_encoder(conditioner: TextConditioner, family: str, size: int):
    """texts -> (context, added conditioning or None) for uncropped ``size``×``size`` pictures:
    the UNet's inputs for generating (previews, the distill objective's teacher and student)."""

    def encode(texts: Sequence[str]):
        context, text_embeds = conditioner.encode(list(texts))
        if family != "sdxl":
            return context, None
        ids = torch.tensor([sdxl_time_ids((size, size), (0, 0), (size, size))] * len(texts), device=context.device)
        return context, {"text_embeds": text_embeds, "time_ids": ids.to(text_embeds.dtype)}

    return encode
