"""Telling a local model folder from a Hugging Face hub id, for every tool that takes either
(``--clip`` of prepare and evaluate, prepare's ``--watermark-model`` and ``--captioner``).

A hub id is ``name`` or ``owner/name``.  A name that cannot be one is a path the user meant, and
when it does not exist the user must hear that, not that a hub lookup failed.  The rule:

- absolute (``/models/clip``, ``C:\\models\\clip``), or starting with ``./``, ``../``, ``.`` or ``~``;
- a backslash, two or more slashes, or a trailing slash (``models/clip/``);
- one slash whose first part is an existing folder here (``models/clip`` beside a ``models/`` folder).
"""
from __future__ import annotations

import os

from .errors import ScoringError

DEFAULT_CLIP = "openai/clip-vit-large-patch14"  # the LAION aesthetic predictor's CLIP (here: no torch import for --help)


def expand(source: str) -> str:
    """``~`` and ``~user`` expanded (argparse gets ``--clip=~/x`` unexpanded from the shell)."""
    return os.path.expanduser(source) if source.startswith("~") else source


def looks_like_path(source: str) -> bool:
    """Whether ``source`` can only be meant as a local path (see the module's rule)."""
    if not source:
        return False
    if os.path.isabs(source) or source.startswith((".", "~")) or "\\" in source or source.endswith("/"):
        return True
    parts = source.split("/")
    if len(parts) > 2:
        return True
    return len(parts) == 2 and os.path.isdir(parts[0])


def check_model_folder(kind: str, source: str, example: str = "owner/name") -> str:
    """``source`` expanded; ScoringError when it is meant as a path and does not exist.

    ``kind`` names the model in the sentence ("CLIP", "watermark model"); ``example`` is a hub id.
    """
    path = expand(source)
    if looks_like_path(source) and not os.path.exists(path):
        raise ScoringError(
            f"the {kind} folder {path} does not exist; name a folder with config.json and the weights, "
            f"or a hub id such as {example}"
        )
    return path
