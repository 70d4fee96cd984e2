"""Optional transformers models of the preparation: a watermark/text classifier and a captioner.

    classifier = load_image_classifier("amrul-hzz/watermark_detector")   # AutoModelForImageClassification
    probs = classifier.reject_probability(images, labels)                 # [B]: P(any of the reject labels)
    captioner = load_captioner("Salesforce/blip-image-captioning-large")  # AutoModelForImageTextToText
    texts = captioner.caption(images, prompt="", max_new_tokens=40)

Both come from a local folder or a hub id (the local Hugging Face cache only, unless downloading is
allowed); pickled weights go through transformers' ``weights_only`` loading.  Every wrong file or name
raises ``PrepareError`` with one sentence.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from typing import List, Sequence

import torch

from ..scoring import ScoringError
from ..scoring.clip import _short
from ..scoring.paths import check_model_folder
from .errors import PrepareError

# Labels that mean "reject" when the user names none: a watermark, a logo or text, but not their absence.
_REJECT_RE = re.compile(r"watermark|logo|text", re.IGNORECASE)
_NEGATION_RE = re.compile(r"^\s*(no|non|not|without|clean)([\s_-]|$|(?=watermark|logo|text))|free", re.IGNORECASE)


def _identity(model) -> str:
    """Changes with the configuration and the weights (the first and last tensors are hashed)."""
    digest = hashlib.sha1(model.config.to_json_string(use_diff=False).encode())
    state = model.state_dict()
    for name in (next(iter(state)), next(reversed(state))):
        digest.update(state[name].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def check_path_like(kind: str, source: str) -> str:
    """``source`` with ``~`` expanded; one sentence when it can only be a path and does not exist
    (the rule lives in vmix_lib.scoring.paths, shared with evaluate's --clip)."""
    try:
        return check_model_folder(kind, source)
    except ScoringError as e:
        raise PrepareError(str(e)) from None


def _load(kind: str, source: str, loader, allow_download: bool):
    source = check_path_like(kind, source)
    is_path = os.path.exists(source)
    if is_path and not os.path.isdir(source):
        raise PrepareError(f"the {kind} {source} is a file; name the folder that holds its config.json and weights")
    where = f"folder {source}" if is_path else f"hub id {source!r}"
    offline = is_path or not allow_download
    how = (
        "name a folder with config.json, the weights and the processor files" if is_path
        else "it is not in the local Hugging Face cache; name a local folder, or allow downloading (--allow-download)" if offline
        else "check the name and your connection"
    )
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # our sentence replaces transformers' load report
    try:
        return loader(source, offline)
    except PrepareError:
        raise
    except Exception as e:  # OSError, ValueError, KeyError from configs...: one sentence for all
        raise PrepareError(f"the {kind} in {where} could not be loaded ({_short(e)}); {how}") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def _complete(kind: str, source: str, loaded):
    """transformers fills weights missing from the files with random values: refuse that (a head
    initialised at random would judge at random)."""
    model, info = loaded
    missing = list(info.get("missing_keys") or [])
    if missing:
        raise PrepareError(
            f"the {kind} {source} holds no trained weights for {', '.join(sorted(missing)[:3])}{' ...' if len(missing) > 3 else ''} "
            f"of {type(model).__name__} (transformers would fill them with random values); name a checkpoint made for this task"
        )
    return model


@dataclass
class ImageClassifier:
    model: "torch.nn.Module"
    processor: object
    labels: List[str]  # by class index
    source: str
    identity: str

    def resolve_reject_labels(self, names: Sequence[str]) -> List[int]:
        """Indices of the labels meaning 'reject': the ones named, else the ones naming a watermark/logo/text."""
        if names:
            lower = {label.lower(): i for i, label in enumerate(self.labels)}
            missing = [n for n in names if n.lower() not in lower]
            if missing:
                raise PrepareError(
                    f"the watermark model {self.source} has no label {missing[0]!r} (its labels: {', '.join(self.labels)})"
                )
            return sorted({lower[n.lower()] for n in names})
        found = [i for i, label in enumerate(self.labels) if _REJECT_RE.search(label) and not _NEGATION_RE.search(label)]
        if not found or len(found) == len(self.labels):
            raise PrepareError(
                f"cannot tell which label of the watermark model {self.source} means a watermark (its labels: "
                f"{', '.join(self.labels)}); name it with --watermark-labels"
            )
        return found

    def pixel_values(self, images: Sequence) -> torch.Tensor:
        return self.processor(images=list(images), return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def probabilities(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, classes] softmax probabilities."""
        p = next(self.model.parameters())
        logits = self.model(pixel_values=pixel_values.to(p.device, p.dtype)).logits
        return logits.float().softmax(-1).cpu()


def load_image_classifier(source: str, device="cpu", dtype=torch.float32, allow_download: bool = False) -> ImageClassifier:
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    def loader(src, offline):
        model = _complete("watermark model", src, AutoModelForImageClassification.from_pretrained(
            src, local_files_only=offline, weights_only=True, output_loading_info=True))
        processor = AutoImageProcessor.from_pretrained(src, local_files_only=offline)
        return model, processor

    model, processor = _load("watermark model", source, loader, allow_download)
    id2label = getattr(model.config, "id2label", None) or {}
    labels = [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(model.config.num_labels)]
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return ImageClassifier(model, processor, labels, source, _identity(model))


@dataclass
class Captioner:
    model: "torch.nn.Module"
    processor: object
    source: str
    identity: str

    @torch.no_grad()
    def caption(self, images: Sequence, prompt: str = "", max_new_tokens: int = 40) -> List[str]:
        p = next(self.model.parameters())
        kwargs = {"text": [prompt] * len(images)} if prompt else {}
        inputs = self.processor(images=list(images), return_tensors="pt", **kwargs)
        inputs = {k: (v.to(p.device, p.dtype) if v.is_floating_point() else v.to(p.device)) for k, v in inputs.items()}
        out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        texts = self.processor.batch_decode(out, skip_special_tokens=True)
        return [" ".join(t.split()) for t in texts]


def load_captioner(source: str, device="cpu", dtype=torch.float32, allow_download: bool = False) -> Captioner:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    def loader(src, offline):
        model = _complete("captioner", src, AutoModelForImageTextToText.from_pretrained(
            src, local_files_only=offline, weights_only=True, output_loading_info=True))
        processor = AutoProcessor.from_pretrained(src, local_files_only=offline)
        if not hasattr(processor, "batch_decode"):
            raise PrepareError(f"the captioner {src} has no text processor (tokenizer) to decode its captions")
        return model, processor

    model, processor = _load("captioner", source, loader, allow_download)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return Captioner(model, processor, source, _identity(model))
