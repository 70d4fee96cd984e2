"""Prompt sets: a built-in set across the MJHQ-30K categories, MJHQ-30K's ``meta_data.json``, text files.

    builtin_prompts()                                   # 40 prompts, 4 per MJHQ category
    load_prompts("meta_data.json", categories=["people"], limit=200, seed=0)
    load_prompts("prompts.txt")                         # one prompt a line; '#' lines are comments

MJHQ-30K's ``meta_data.json`` is ``{id: {"category": ..., "prompt": ...}}`` (playgroundai/MJHQ-30K);
a sample of N is drawn with a seeded generator, so the same seed gives the same prompts.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from .errors import EvaluationError

MJHQ_CATEGORIES = ("animals", "art", "fashion", "food", "indoor", "landscape", "logo", "people", "plants", "vehicles")


@dataclass(frozen=True)
class Prompt:
    id: str  # stable within a run: used in image file names and to pair images across settings
    text: str
    category: str = ""


# Written for this project: four per MJHQ-30K category, plain content descriptions without
# aesthetic words, so that what VMix adds is not already asked for by the prompt.
_BUILTIN: Dict[str, Sequence[str]] = {
    "animals": (
        "a red fox sitting in a snowy field",
        "a cat sleeping on a windowsill",
        "an owl perched on a branch at night",
        "a herd of horses running along a beach",
    ),
    "art": (
        "an oil painting of a harbour with fishing boats",
        "a watercolor of a mountain village",
        "an abstract painting of circles and lines",
        "a charcoal drawing of an old man reading",
    ),
    "fashion": (
        "a woman wearing a long red coat on a city street",
        "a pair of leather boots on a wooden floor",
        "a man in a tailored grey suit",
        "a model wearing a straw hat and a summer dress",
    ),
    "food": (
        "a bowl of ramen with a boiled egg",
        "a slice of chocolate cake on a plate",
        "a basket of fresh bread",
        "a plate of sushi on a wooden table",
    ),
    "indoor": (
        "a living room with a sofa and a bookshelf",
        "a kitchen with copper pots hanging on the wall",
        "a library with tall wooden shelves",
        "a bedroom with a large window",
    ),
    "landscape": (
        "a lighthouse on a cliff above the sea",
        "a forest path in autumn",
        "a desert with sand dunes",
        "a lake surrounded by mountains",
    ),
    "logo": (
        "a logo of a coffee shop with a cup",
        "a logo of a mountain and a sun",
        "a logo with the letter A made of leaves",
        "a logo of a rocket for a tech company",
    ),
    "people": (
        "a portrait of an old woman with grey hair",
        "a child flying a kite in a park",
        "a musician playing a guitar on a stage",
        "a fisherman mending a net on a pier",
    ),
    "plants": (
        "a sunflower in a field",
        "a cactus in a clay pot",
        "a cherry tree in bloom",
        "a fern growing on a mossy rock",
    ),
    "vehicles": (
        "a vintage car parked on a street",
        "a red bicycle leaning against a wall",
        "a steam train crossing a bridge",
        "a sailboat on a calm sea",
    ),
}


def builtin_prompts(categories: Sequence[str] = ()) -> List[Prompt]:
    """The built-in set (all categories, or the named ones), ids ``<category>-<n>``."""
    _check_categories(categories, MJHQ_CATEGORIES, "the built-in prompt set")
    return [
        Prompt(f"{cat}-{i}", text, cat)
        for cat, texts in _BUILTIN.items() if not categories or cat in categories
        for i, text in enumerate(texts)
    ]


def _check_categories(wanted: Sequence[str], known: Sequence[str], where: str) -> None:
    unknown = [c for c in wanted if c not in known]
    if unknown:
        raise EvaluationError(f"category {unknown[0]!r} is not in {where} (categories: {', '.join(sorted(known))})")


def _sample(prompts: List[Prompt], limit: Optional[int], seed: int) -> List[Prompt]:
    if limit is None or limit >= len(prompts):
        return prompts
    picked = sorted(random.Random(seed).sample(range(len(prompts)), limit))
    return [prompts[i] for i in picked]


def read_mjhq_meta(path: str, categories: Sequence[str] = ()) -> List[Prompt]:
    name = os.path.basename(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise EvaluationError(f"prompt file {path} cannot be read ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EvaluationError(f"{name} is not valid JSON ({e}); MJHQ-30K's meta_data.json maps ids to {{category, prompt}}") from None
    if not isinstance(data, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("prompt"), str) for v in data.values()
    ):
        raise EvaluationError(f"{name} is not in MJHQ-30K's meta_data.json layout ({{id: {{\"category\": ..., \"prompt\": ...}}}})")
    prompts = [Prompt(str(k), v["prompt"].strip(), str(v.get("category", ""))) for k, v in sorted(data.items())]
    _check_categories(categories, {p.category for p in prompts}, name)
    return [p for p in prompts if not categories or p.category in categories]


def read_text_prompts(path: str) -> List[Prompt]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise EvaluationError(f"prompt file {path} cannot be read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise EvaluationError(f"prompt file {path} is not UTF-8 text") from None
    texts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return [Prompt(f"p{i:05d}", text) for i, text in enumerate(texts)]


def load_prompts(source: str = "builtin", categories: Sequence[str] = (), limit: Optional[int] = None, seed: int = 0) -> List[Prompt]:
    """Prompts from ``builtin``, a ``.json`` (MJHQ-30K meta_data.json) or a text file; sampled to ``limit``."""
    if limit is not None and limit < 1:
        raise EvaluationError(f"--limit must be at least 1, got {limit}")
    if source == "builtin":
        prompts = builtin_prompts(categories)
    elif not os.path.isfile(source):
        raise EvaluationError(f"prompt file {source} does not exist (give 'builtin', MJHQ-30K's meta_data.json or a text file)")
    elif source.lower().endswith(".json"):
        prompts = read_mjhq_meta(source, categories)
    else:
        if categories:
            raise EvaluationError(f"--category needs MJHQ-30K's meta_data.json or the built-in set; {os.path.basename(source)} has no categories")
        prompts = read_text_prompts(source)
    if not prompts:
        raise EvaluationError(f"no prompts were found in {source}")
    return _sample(prompts, limit, seed)
