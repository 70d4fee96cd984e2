"""The ``--device`` option of the scoring tools (prepare, evaluate): auto, cpu, cuda, cuda:N."""
from __future__ import annotations

import torch

from .errors import ScoringError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ScoringError(f"--device {name!r} is not a torch device name (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ScoringError(f"--device {name} was asked for, but this PyTorch sees no CUDA GPU; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ScoringError(f"--device {name} does not exist; this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return device
