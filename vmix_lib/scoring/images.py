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


# Scalable fonts with wide coverage, by file name (Pillow searches the system's font folders: Windows
# Fonts, /Library/Fonts and /System/Library/Fonts on macOS, ~/.local/share/fonts and /usr/share/fonts on
# Linux): Latin with accents, Greek and Cyrillic first, then fonts with Chinese/Japanese/Korean.
FONT_FILES = (
    "DejaVuSans.ttf", "NotoSans-Regular.ttf", "LiberationSans-Regular.ttf", "segoeui.ttf", "arial.ttf",
    "Arial Unicode.ttf", "/System/Library/Fonts/Supplemental/Arial Unicode.ttf", "/System/Library/Fonts/Helvetica.ttc",
    "NotoSansCJK-Regular.ttc", "NotoSansCJKsc-Regular.otf", "wqy-microhei.ttc", "DroidSansFallbackFull.ttf",
    "msyh.ttc", "msgothic.ttc", "/System/Library/Fonts/PingFang.ttc", "/System/Library/Fonts/Hiragino Sans GB.ttc",
)
_fonts: Dict[Tuple[str, int], object] = {}  # (file, size) -> font, or None where it cannot be opened
_covers: Dict[Tuple[str, str], bool] = {}  # (file, character) -> the font has a glyph for it


def _open_font(name: str, size: int):
    from PIL import ImageFont

    if (name, size) not in _fonts:
        try:
            _fonts[(name, size)] = ImageFont.truetype(name, size)
        except (OSError, ImportError):  # not on this system, or Pillow without FreeType
            _fonts[(name, size)] = None
    return _fonts[(name, size)]


def _render(font, text: str) -> bytes:
    from PIL import Image, ImageDraw

    image = Image.new("L", (4 * font.size, 2 * font.size), 0)
    ImageDraw.Draw(image).text((font.size // 2, font.size // 4), text, font=font, fill=255)
    return image.tobytes()


def font_covers(name: str, font, char: str) -> bool:
    """Whether ``font`` (opened from ``name``) draws ``char`` with a glyph of its own, not the box
    of a missing one (whitespace always counts as covered)."""
    if char.isspace():
        return True
    key = (name, char)
    if key not in _covers:
        _covers[key] = _render(font, char) != _render(font, "\U0010fffd")  # a code point no font has
    return _covers[key]


def label_font(size: int = 12, text: str = ""):
    """The one font of every picture the tools draw without matplotlib (training previews, loss and
    score plots, review histograms, evaluation grids): the first scalable system font (FONT_FILES)
    that has a glyph for every character of ``text`` - 'a café photo', 'Zürich', '中文' - else the one
    that has the most; where the system has none, Pillow's bundled FreeType font (ASCII only), and
    where Pillow has no FreeType, its bitmap font.  Pass all the text one picture shows, so that its
    labels share one font."""
    from PIL import ImageFont

    chars = sorted(set(text))
    best, best_count = None, -1
    for name in FONT_FILES:
        font = _open_font(name, size)
        if font is None:
            continue
        count = sum(font_covers(name, font, c) for c in chars)
        if count == len(chars):
            return font
        if count > best_count:
            best, best_count = font, count
    if best is not None:
        return best
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow < 10.1, or built without FreeType
        return ImageFont.load_default()
