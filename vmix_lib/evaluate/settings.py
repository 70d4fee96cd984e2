"""What is compared: VMix off, a λ sweep, per-dimension settings (paper Fig. 8), several adapters.

A ``Setting`` is one column of the report: which adapter (None = VMix off), its strength λ and the
per-dimension weights α (None = all 1, the paper's inference default).  Every setting renders the
same prompts with the same seeds, so images pair up across settings.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

from .errors import EvaluationError

DEFAULT_LAMBDAS = (0.0, 0.5, 1.0, 1.5, 2.0)
OFF = "off"


@dataclass(frozen=True)
class AdapterRef:
    """An adapter as the evaluation names it: the WebUI's name, and its file when there is one here."""

    name: str  # the name the WebUI knows (file stem); also the report's label (offline: "folder/stem" when stems clash)
    path: Optional[str] = None  # a local .safetensors file (offline generation; dimension names)
    dimensions: Tuple[str, ...] = ()


@dataclass(frozen=True)
class Setting:
    name: str  # column title: "off", "λ=1.5", "my_adapter λ=1.5", "dims=color"
    adapter: Optional[AdapterRef] = None  # None: VMix off
    strength: float = 1.0
    alphas: Optional[Tuple[Tuple[str, float], ...]] = None  # None: every dimension 1
    kind: str = OFF  # "off", "lambda", "dimensions", "folder"
    label: str = ""  # short label in plots: "1.5", "color", "none", "all"

    @property
    def slug(self) -> str:
        """A file-system name for the setting's image folder."""
        return slugify(self.name)

    @property
    def alpha_dict(self) -> Optional[Dict[str, float]]:
        return None if self.alphas is None else dict(self.alphas)

    def to_json(self) -> Dict:
        return {
            "name": self.name, "kind": self.kind, "label": self.label,
            "adapter": self.adapter.name if self.adapter else None, "strength": self.strength if self.adapter else 0.0,
            "alphas": self.alpha_dict,
        }


def slugify(text: str) -> str:
    text = text.replace("λ", "lambda").replace("=", "")
    text = re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-.")
    return text or "setting"


def _fmt(value: float) -> str:
    return f"{value:g}"


def parse_lambdas(text: str) -> List[float]:
    """'0,0.5,1' -> [0, 0.5, 1]; one sentence on a bad entry."""
    values = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            raise EvaluationError(f"--lambdas entry {part!r} is not a number (example: --lambdas 0,0.5,1,1.5,2)") from None
        if not 0.0 <= value <= 3.0:
            raise EvaluationError(f"--lambdas entry {part} is outside 0 – 3 (the extension's strength range)")
        values.append(value)
    return list(dict.fromkeys(values))


def adapter_ref(spec: str) -> AdapterRef:
    """``--adapter``: a local .safetensors file (its dimensions are read from it) or a WebUI adapter name."""
    from ..adapter_file import AdapterError, read_adapter_info

    if spec.lower().endswith(".safetensors") or os.sep in spec or "/" in spec:
        try:
            info = read_adapter_info(spec, allow_custom_layout=True)
        except AdapterError as e:
            raise EvaluationError(str(e).rstrip(".")) from None
        return AdapterRef(info.name, os.path.abspath(spec), tuple(d.name for d in info.dimensions))
    if not spec.strip():
        raise EvaluationError("--adapter is empty; give an adapter file or the adapter's name in the WebUI")
    return AdapterRef(spec.strip())


def distinct_adapters(refs: Sequence[AdapterRef], webui: bool) -> List[AdapterRef]:
    """The ``--adapter`` list with one name each.

    Two files of the same name from different folders are told apart by their folders offline
    ("run1/vmix", "run2/vmix"); a WebUI knows an adapter by its file name only, so with ``webui``
    they are refused, both paths named.  The same adapter given twice is refused.
    """
    groups: Dict[str, List[int]] = {}
    for i, ref in enumerate(refs):
        groups.setdefault(ref.name, []).append(i)
    out = list(refs)
    for name, members in groups.items():
        if len(members) < 2:
            continue
        a, b = (refs[i] for i in members[:2])
        if a.path is None or b.path is None:
            both = " and ".join("the WebUI name " + repr(r.name) if r.path is None else f"the file {r.path}" for r in (a, b))
            raise EvaluationError(f"--adapter {name!r} is given twice ({both}); give each adapter once")
        paths = [refs[i].path for i in members]
        twice = next((p for p in paths if paths.count(p) > 1), None)
        if twice:
            raise EvaluationError(f"--adapter {twice} is given twice; give each adapter once")
        if webui:
            raise EvaluationError(
                f"the adapters {a.path} and {b.path} are both called {name!r}, and the WebUI knows an adapter by its file name "
                "only; rename one of the files (offline evaluation tells them apart by their folders)"
            )
        for i, label in zip(members, _folder_labels(paths, name)):
            out[i] = replace(refs[i], name=label)
    return out


def _folder_labels(paths: Sequence[str], name: str) -> List[str]:
    """The shortest 'folder/.../name' labels that differ, e.g. run1/vmix and run2/vmix; numbered if none do."""
    parts = [os.path.dirname(p).replace("\\", "/").strip("/").split("/") for p in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:] + [name]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{name} ({k})" for k in range(1, len(paths) + 1)]  # e.g. x.safetensors and x.SAFETENSORS


def build_settings(
    adapters: Sequence[AdapterRef],
    lambdas: Sequence[float] = DEFAULT_LAMBDAS,
    dimension_modes: Sequence[str] = (),
    include_off: bool = True,
    dimension_strength: float = 1.0,
    default_dimensions: Sequence[str] = (),
) -> List[Setting]:
    """Off, then per adapter its λ sweep (all labels positive) and its per-dimension settings.

    ``dimension_modes``: ``all`` (every dimension 1), ``none`` (every dimension 0: the negative
    labels), ``each`` (each dimension alone, the others 0), or dimension names (that one alone).
    """
    settings: List[Setting] = [Setting(OFF)] if include_off else []
    several = len(adapters) > 1
    for ref in adapters:
        prefix = f"{ref.name} " if several else ""
        for lam in lambdas:
            settings.append(Setting(f"{prefix}λ={_fmt(lam)}", ref, float(lam), None, "lambda", _fmt(lam)))
        if not dimension_modes:
            continue
        names = list(ref.dimensions or default_dimensions)
        if not names:
            raise EvaluationError(
                f"adapter {ref.name!r} is named, not given as a file, so its dimensions are unknown; pass the adapter file "
                "(--adapter path/to/adapter.safetensors) or --dimension-names color,lighting,..."
            )
        picked: List[Tuple[str, Dict[str, float]]] = []
        for mode in dimension_modes:
            if mode == "all":
                picked.append(("all", {n: 1.0 for n in names}))
            elif mode == "none":
                picked.append(("none", {n: 0.0 for n in names}))
            elif mode == "each":
                picked.extend((n, {m: float(m == n) for m in names}) for n in names)
            elif mode in names:
                picked.append((mode, {m: float(m == mode) for m in names}))
            else:
                raise EvaluationError(
                    f"--dimensions entry {mode!r} is neither all, none, each nor a dimension of adapter {ref.name!r} "
                    f"({', '.join(names)})"
                )
        seen = set()
        for label, alphas in picked:
            if label in seen:
                continue
            seen.add(label)
            settings.append(Setting(
                f"{prefix}dims={label} λ={_fmt(dimension_strength)}", ref, float(dimension_strength),
                tuple(sorted(alphas.items())), "dimensions", label,
            ))
    slugs: Dict[str, str] = {}
    for s in settings:
        if s.slug in slugs:
            raise EvaluationError(f"settings {slugs[s.slug]!r} and {s.name!r} would share an image folder; rename an adapter")
        slugs[s.slug] = s.name
    return settings
