"""Finding and decoding images: recursive listing, full decode, alpha flattened onto white; the
font of the pictures the tools draw."""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

# The image formats every tool reads (preparation, evaluation, the trainer's dataset): one list.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Files that travel with images and are not skipped pictures: captions, labels, metadata.
COMPANION_EXTENSIONS = (".txt", ".json", ".jsonl")


def find_images(folder: str, recursive: bool = True, skipped: Optional[Dict[str, int]] = None) -> List[str]:
    """Image files under ``folder`` (sorted relative paths, '/'-separated), hidden folders skipped.

    ``skipped``: a dict that receives, per extension ('.gif', or '' for none), how many other files
    were passed over (hidden files and the caption/label companions are not counted).
    """
    from .errors import ScoringError

    if not os.path.isdir(folder):
        raise ScoringError(f"image folder {folder} does not exist or is not a folder")
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if recursive else []
        for name in files:
            if name.startswith("."):
                continue
            ext = os.path.splitext(name)[1].lower()
            if ext in IMAGE_EXTENSIONS:
                found.append(os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/"))
            elif skipped is not None and ext not in COMPANION_EXTENSIONS:
                skipped[ext] = skipped.get(ext, 0) + 1
    return sorted(found)


def describe_skipped(skipped: Dict[str, int]) -> str:
    """'.gif 2, .tiff 1, (no extension) 1': most frequent first."""
    return ", ".join(f"{ext or '(no extension)'} {count}" for ext, count in sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0])))


def file_key(path: str) -> str:
    """Identity of an image file for caches: absolute path, size and modification time."""
    st = os.stat(path)
    return f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}"


def to_rgb(img):
    """A PIL image as RGB, EXIF orientation applied and transparency composited onto white."""
    from PIL import Image, ImageOps

    img = ImageOps.exif_transpose(img)
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def read_image(path: str):
    """The whole image decoded to RGB (a truncated or corrupt file raises OSError/ValueError)."""
    from PIL import Image

    with Image.open(path) as img:
        img.load()  # decodes every byte: PIL's lazy open would accept a truncated file
        return to_rgb(img)


def image_size(path: str) -> Tuple[int, int]:
    """(width, height) from the header only."""
    from PIL import Image

    with Image.open(path) as img:
        return img.size


def label_font(size: int = 12):
    """Pillow's bundled FreeType font at ``size`` px, for plots drawn without matplotlib (at its
    default 10 px the spaces between words all but vanish); the bitmap font where FreeType is missing."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow < 10.1, or built without FreeType
        return ImageFont.load_default()
