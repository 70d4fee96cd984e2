"""The evaluation's outputs: CSV and JSON, the λ trade-off plot, the grid, one HTML page.

Plots are drawn with matplotlib when it is installed, otherwise with Pillow (as the trainer's loss
plot, vmix_lib/train/logs.py); the HTML page embeds its pictures, so it can be mailed or opened
from anywhere, and links the full-size images by relative path.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..scoring.images import label_font

METRIC_TITLES = {
    "aes": "Aes score", "clip_score": "CLIP score", "content_similarity": "content kept",
    "aes_shift": "Aes Δ vs off", "clip_score_shift": "CLIP Δ vs off",
}


DEFAULT_AXES = ("clip_score", "aes")  # the trade-off plot's (x, y): the paper's Fig. 7b
_SHORT = {"aes": "Aes", "clip_score": "CLIP"}  # image captions


def _title(key: str, titles: Optional[Dict[str, str]] = None) -> str:
    """Column title of a metric key; ``titles``: those of the run's ImageMetrics."""
    titles = titles or {}
    if key in titles:
        return titles[key]
    if key in METRIC_TITLES:
        return METRIC_TITLES[key]
    if key.startswith("probe_"):
        return f"probe {key[6:]}"
    if key.startswith("shift_"):
        return f"{key[6:]} Δ vs off"
    if key.endswith("_shift"):
        return f"{_title(key[:-6], titles)} Δ vs off"
    return key


def _cell_caption(v: Dict[str, float], axes: Sequence[str], titles: Optional[Dict[str, str]], sep: str) -> str:
    """The trade-off axes' values of one image (y first): "Aes 5.12 | CLIP 30.1" by default."""
    parts = []
    for key in (axes[1], axes[0]):
        if key in v:
            parts.append(f"{_SHORT.get(key) or _title(key, titles)} {v[key]:.{1 if key == 'clip_score' else 2}f}")
    return sep.join(parts)


def _fmt(value: Optional[float], digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    text = f"{value:.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text  # no "-0.000"


def _plain(text: str) -> str:
    """Pillow's built-in font has no Greek letters."""
    return text.replace("λ=", "lambda=").replace("λ", "lambda").replace("–", "-").replace("·", "|")


def _metric_keys(summary: Sequence[Dict[str, Any]], extra: Sequence[str] = ()) -> List[str]:
    """Metric keys in report order: the CLIP-based ones, then ``extra`` (ImageMetric keys), shifts, the rest."""
    order = ["aes", "clip_score", "content_similarity", "aes_shift", "clip_score_shift", *extra]
    keys = {k for s in summary for k, v in s.items() if isinstance(v, dict) and "ci95" in v}
    rest = sorted(k for k in keys if k not in order)
    return [k for k in order if k in keys] + [k for k in rest if k.startswith("shift_")] + [k for k in rest if not k.startswith("shift_")]


# -- CSV / JSON --------------------------------------------------------------------------------
def write_tables(out_dir: str, rows, scored, results, extra: Sequence[str] = ()) -> Dict[str, str]:
    folder = os.path.join(out_dir, "results")
    os.makedirs(folder, exist_ok=True)
    values = scored["values"]
    keys = sorted({k for v in values.values() for k in v})
    per_image = os.path.join(folder, "per_image.csv")
    with open(per_image, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["setting", "group", "prompt_id", "category", "prompt", "seed", "file", *keys, "seconds", "note", "error"])
        for r in rows:
            v = values.get(id(r), {})
            file = os.path.relpath(r.path, out_dir) if r.generated_by is not None else r.path
            writer.writerow([r.setting, r.group, r.prompt.id, r.prompt.category, r.prompt.text, r.seed, file,
                             *[repr(v[k]) if k in v else "" for k in keys], r.info.get("seconds", ""), r.info.get("note", ""), r.failure])
    per_setting = os.path.join(folder, "per_setting.csv")
    summary = results["settings"]
    metric_keys = _metric_keys(summary, extra)
    with open(per_setting, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        head = ["setting", "kind", "adapter", "strength", "alphas", "images", "failed"]
        for k in metric_keys:
            head += [k, f"{k}_ci_low", f"{k}_ci_high"]
        head += ["fid", "kid", "kid_std", "n_reference", "distance_features"]
        writer.writerow(head)
        for s in summary:
            line = [s["setting"], s.get("kind", ""), s.get("adapter") or "", s.get("strength", ""),
                    json.dumps(s.get("alphas")) if s.get("alphas") else "", s["images"], s["failed"]]
            for k in metric_keys:
                m = s.get(k) or {}
                line += [m.get("mean", ""), *(m.get("ci95") or ["", ""])]
            d = s.get("distance", {})
            line += [d.get("fid", ""), d.get("kid", ""), d.get("kid_std", ""), d.get("n_real", ""), d.get("features", "")]
            writer.writerow(line)
    json_path = os.path.join(folder, "results.json")
    per_image_json = []
    for r in rows:
        per_image_json.append({
            "setting": r.setting, "prompt_id": r.prompt.id, "prompt": r.prompt.text, "category": r.prompt.category,
            "seed": r.seed, "file": os.path.relpath(r.path, out_dir) if r.generated_by is not None else r.path,
            **{k: round(v, 6) for k, v in values.get(id(r), {}).items()}, **({"error": r.failure} if r.failure else {}),
            **({"note": r.info["note"]} if r.info.get("note") else {}),
        })
    with open(json_path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(dict(results, images=per_image_json), f, indent=1, ensure_ascii=False, allow_nan=False)
    os.replace(json_path + ".tmp", json_path)
    return {"per_image_csv": per_image, "per_setting_csv": per_setting, "json": json_path}


# -- the λ trade-off plot (paper Fig. 7b) ---------------------------------------------------------
def tradeoff_series(summary: Sequence[Dict[str, Any]], baselines: Dict[str, str], axes: Sequence[str] = DEFAULT_AXES) -> List[Dict[str, Any]]:
    """One series per (group, adapter): the baseline point, then its λ points by strength; ``axes`` = (x, y) metric keys."""
    x, y = axes
    series: Dict[Tuple[str, str], Dict[str, Any]] = {}
    by_name = {s["setting"]: s for s in summary}
    for s in summary:
        if s.get("kind") != "lambda" or y not in s or x not in s:
            continue
        key = (s["group"], s.get("adapter") or "")
        entry = series.setdefault(key, {"name": s.get("adapter") or "", "group": s["group"], "points": []})
        entry["points"].append((s["strength"], f"λ={s['strength']:g}", s[x], s[y]))
    out = []
    for (group, _), entry in series.items():
        entry["points"].sort(key=lambda p: p[0])
        base = by_name.get(baselines.get(group, ""))
        entry["baseline"] = (base[x], base[y]) if base and y in base and x in base else None
        out.append(entry)
    return out


_COLOURS = [(200, 50, 50), (40, 100, 200), (40, 150, 60), (150, 80, 170), (220, 140, 30), (60, 60, 60)]


def _nice_ticks(lo: float, hi: float, count: int = 5) -> List[float]:
    span = hi - lo if hi > lo else 1.0
    step = 10 ** math.floor(math.log10(span / count))
    for m in (1, 2, 2.5, 5, 10):
        if span / (step * m) <= count:
            step *= m
            break
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step) + 1)]


Box = Tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels, y downwards


def _overlap(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def place_labels(anchors: Sequence[Tuple[float, float]], sizes: Sequence[Tuple[float, float]], frame: Box,
                 obstacles: Sequence[Box] = (), gap: float = 6, marker: float = 4) -> List[Optional[Box]]:
    """A box for each label beside its point, in the order given (the first win): no two labels overlap,
    none covers a point's marker or an obstacle (the legend), all inside ``frame``.  A label that finds
    no free place gets None and is left out: λ points close together printed their labels over each other.
    """
    markers = [(x - marker, y - marker, x + marker, y + marker) for x, y in anchors]
    taken: List[Box] = list(obstacles)
    out: List[Optional[Box]] = []
    for (x, y), (w, h) in zip(anchors, sizes):
        # right-above, right-below, left-above, left-below, right, left, above, below; then a line further out
        offsets = [(gap, -h - 1), (gap, 1), (-gap - w, -h - 1), (-gap - w, 1), (gap, -h / 2), (-gap - w, -h / 2),
                   (-w / 2, -h - gap), (-w / 2, gap), (gap, -2 * h - 1), (gap, h + 1), (-gap - w, -2 * h - 1), (-gap - w, h + 1)]
        found = None
        for dx, dy in offsets:
            box = (x + dx, y + dy, x + dx + w, y + dy + h)
            inside = frame[0] <= box[0] and box[2] <= frame[2] and frame[1] <= box[1] and box[3] <= frame[3]
            if inside and not any(_overlap(box, other) for other in taken + markers):
                found = box
                break
        if found is not None:
            taken.append(found)
        out.append(found)
    return out


def _label_order(series: List[Dict[str, Any]]) -> List[Tuple[int, int, str]]:
    """(series, point, text) of every label to place: each series' "off" first (point -1; once for series
    that share it), then its λ points."""
    order, seen = [], set()
    for i, s in enumerate(series):
        base = (s["baseline"][0]["mean"], s["baseline"][1]["mean"]) if s["baseline"] else None
        if base is not None and base not in seen:
            seen.add(base)
            order.append((i, -1, "off"))
        order += [(i, j, p[1]) for j, p in enumerate(s["points"])]
    return order


def plot_tradeoff(series: List[Dict[str, Any]], path: str, title: str = "Aes score vs CLIP score over λ (paper Fig. 7b)",
                  labels: Sequence[str] = ("CLIP score", "Aes score")) -> Optional[str]:
    """``labels``: (x, y) axis titles."""
    if not series:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _plot_tradeoff_pil(series, path, title, labels)
    fig, ax = plt.subplots(figsize=(7, 5), dpi=100)
    for i, s in enumerate(series):
        colour = tuple(c / 255 for c in _COLOURS[i % len(_COLOURS)])
        xs = [p[2]["mean"] for p in s["points"]]
        ys = [p[3]["mean"] for p in s["points"]]
        xerr = [[p[2]["mean"] - p[2]["ci95"][0] for p in s["points"]], [p[2]["ci95"][1] - p[2]["mean"] for p in s["points"]]]
        yerr = [[p[3]["mean"] - p[3]["ci95"][0] for p in s["points"]], [p[3]["ci95"][1] - p[3]["mean"] for p in s["points"]]]
        ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, color=colour, marker="o", capsize=2, label=" ".join(filter(None, [s["group"], s["name"]])) or "VMix")
        if s["baseline"]:
            ax.plot([s["baseline"][0]["mean"]], [s["baseline"][1]["mean"]], marker="s", color="black", linestyle="none")
    means_x = [p[2]["mean"] for s in series for p in s["points"]]
    means_y = [p[3]["mean"] for s in series for p in s["points"]]
    for lim, values in ((ax.set_xlim, means_x), (ax.set_ylim, means_y)):
        pad = max((max(values) - min(values)) * 0.25, 1e-3)
        lim(min(values) - pad, max(values) + pad)
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.set_title(title)
    ax.grid(alpha=0.3)
    legend = ax.legend()
    fig.tight_layout()
    # Labels are placed in pixels once the layout is final, so that none is printed over another.
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    corner = ax.transAxes.inverted().transform(legend.get_window_extent(renderer).p0)
    legend = ax.legend(loc=tuple(corner))  # where "best" put it, fixed: the labels must not move it
    fig.canvas.draw()
    height = fig.bbox.height
    flip = lambda b: (b.x0, height - b.y1, b.x1, height - b.y0)  # matplotlib's y runs upwards
    order = _label_order(series)
    anchors, sizes = [], []
    for i, j, text in order:
        point = series[i]["baseline"] if j < 0 else series[i]["points"][j][2:]
        px, py = ax.transData.transform((point[0]["mean"], point[1]["mean"]))
        anchors.append((px, height - py))
        probe = ax.text(0, 0, text, fontsize=8)
        extent = probe.get_window_extent(renderer)
        probe.remove()
        sizes.append((extent.width, extent.height))
    boxes = place_labels(anchors, sizes, flip(ax.get_window_extent(renderer)), [flip(legend.get_window_extent(renderer))])
    to_points = 72.0 / fig.dpi
    for (i, j, text), (ax_x, ax_y), box in zip(order, anchors, boxes):
        if box is None:
            continue
        point = series[i]["baseline"] if j < 0 else series[i]["points"][j][2:]
        ax.annotate(text, (point[0]["mean"], point[1]["mean"]), textcoords="offset points", fontsize=8, ha="left", va="top",
                    xytext=((box[0] - ax_x) * to_points, -(box[1] - ax_y) * to_points))
    fig.savefig(path)
    plt.close(fig)
    return path


def _plot_tradeoff_pil(series: List[Dict[str, Any]], path: str, title: str, labels: Sequence[str] = ("CLIP score", "Aes score"),
                       size=(760, 520)) -> str:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    draw.font = label_font()
    left, top, right, bottom = 70, 40, size[0] - 30, size[1] - 55
    xs, ys = [], []  # the frame fits the means: intervals over prompts can be far wider than λ's effect
    for s in series:
        for p in s["points"]:
            xs.append(p[2]["mean"])
            ys.append(p[3]["mean"])
        if s["baseline"]:
            xs.append(s["baseline"][0]["mean"])
            ys.append(s["baseline"][1]["mean"])
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    ys = [y for y in ys if y is not None and math.isfinite(y)]
    x0, x1 = (min(xs), max(xs)) if xs else (0.0, 1.0)
    y0, y1 = (min(ys), max(ys)) if ys else (0.0, 1.0)
    padx, pady = max((x1 - x0) * 0.25, 1e-3), max((y1 - y0) * 0.25, 1e-3)
    x0, x1, y0, y1 = x0 - padx, x1 + padx, y0 - pady, y1 + pady

    def xy(x, y):
        x, y = min(max(x, x0), x1), min(max(y, y0), y1)  # bars beyond the frame end at its edge
        return left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top)

    draw.text((left, 12), _plain(title), fill=(0, 0, 0))
    draw.rectangle((left, top, right, bottom), outline=(0, 0, 0))
    for t in _nice_ticks(x0, x1):
        px, _ = xy(t, y0)
        draw.line((px, bottom, px, bottom + 4), fill=(0, 0, 0))
        draw.line((px, top, px, bottom), fill=(235, 235, 235))
        draw.text((px - 12, bottom + 7), f"{round(t, 9):g}", fill=(0, 0, 0))
    for t in _nice_ticks(y0, y1):
        _, py = xy(x0, t)
        draw.line((left - 4, py, left, py), fill=(0, 0, 0))
        draw.line((left, py, right, py), fill=(235, 235, 235))
        draw.text((8, py - 6), f"{round(t, 9):g}", fill=(0, 0, 0))
    draw.rectangle((left, top, right, bottom), outline=(0, 0, 0))
    draw.text(((left + right) // 2 - 30, bottom + 25), _plain(labels[0]), fill=(0, 0, 0))
    draw.text((8, top - 20), _plain(labels[1]), fill=(0, 0, 0))
    for i, s in enumerate(series):
        colour = _COLOURS[i % len(_COLOURS)]
        points = [xy(p[2]["mean"], p[3]["mean"]) for p in s["points"]]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for p, (px, py) in zip(s["points"], points):
            lx, hx = (xy(v, 0)[0] for v in p[2]["ci95"])
            ly, hy = (xy(0, v)[1] for v in p[3]["ci95"])
            draw.line((lx, py, hx, py), fill=colour)
            draw.line((px, ly, px, hy), fill=colour)
            draw.ellipse((px - 4, py - 4, px + 4, py + 4), fill=colour)
        if s["baseline"]:
            bx, by = xy(s["baseline"][0]["mean"], s["baseline"][1]["mean"])
            draw.rectangle((bx - 4, by - 4, bx + 4, by + 4), fill=(0, 0, 0))
        label = " ".join(filter(None, [s["group"], s["name"]])) or "VMix"
        draw.line((right - 170, top + 12 + 16 * i, right - 150, top + 12 + 16 * i), fill=colour, width=2)
        draw.text((right - 145, top + 6 + 16 * i), _plain(label)[:24], fill=(0, 0, 0))
    for (i, j, text), box in zip(*tradeoff_label_boxes(series, xy, draw, (left, top, right, bottom))):
        if box is not None:
            x0, y0, _, _ = draw.textbbox((0, 0), _plain(text))  # the ink starts below/right of the text origin
            draw.text((box[0] - x0, box[1] - y0), _plain(text), fill=(0, 0, 0) if j < 0 else _COLOURS[i % len(_COLOURS)])
    img.save(path)
    return path


def tradeoff_label_boxes(series: List[Dict[str, Any]], xy, draw, frame: Box):
    """(labels, boxes) of the Pillow plot: every "off" and λ label with its place (None: left out)."""
    order = _label_order(series)
    anchors = [xy(*(m["mean"] for m in (series[i]["baseline"] if j < 0 else series[i]["points"][j][2:]))) for i, j, _ in order]
    sizes = []
    for _, _, text in order:
        x0, y0, x1, y1 = draw.textbbox((0, 0), _plain(text))
        sizes.append((x1 - x0, y1 - y0))
    legend = (frame[2] - 172, frame[1] + 2, frame[2], frame[1] + 10 + 16 * len(series))
    return order, place_labels(anchors, sizes, frame, [legend])


# -- the grid ------------------------------------------------------------------------------------
def _wrap(text: str, width: int) -> List[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + ([line] if line else [])


def grid_rows(rows, scored, limit: int) -> Tuple[List[str], List[Tuple[Any, List[Any]]]]:
    """(setting names, [(prompt, [row per setting or None])]) for the first ``limit`` prompts, first seed."""
    settings = list(dict.fromkeys(r.setting for r in rows))
    table: Dict[Tuple[str, str], Any] = {}
    order: List[Tuple[str, int]] = []
    prompts = {}
    for r in rows:
        key = r.pair_key
        if key not in prompts:
            prompts[key] = r.prompt
            order.append(key)
        table.setdefault((r.setting, key), r)
    first_seed: Dict[str, Tuple[str, int]] = {}
    for key in order:
        first_seed.setdefault(key[0], key)
    keys = list(first_seed.values())[:limit]
    return settings, [(prompts[k], [table.get((s, k)) for s in settings]) for k in keys]


def draw_grid(rows, scored, path: str, limit: int = 8, tile: int = 160, axes: Sequence[str] = DEFAULT_AXES,
              titles: Optional[Dict[str, str]] = None) -> Optional[str]:
    from PIL import Image, ImageDraw

    from ..scoring.images import read_image

    settings, table = grid_rows(rows, scored, limit)
    if not table:
        return None
    values = scored["values"]
    label_w, head_h, foot = 170, 40, 14
    img = Image.new("RGB", (label_w + tile * len(settings), head_h + (tile + foot) * len(table)), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for c, name in enumerate(settings):
        for j, line in enumerate(_wrap(_plain(name), tile // 6)[:2]):
            draw.text((label_w + c * tile + 4, 4 + 14 * j), line, fill=(0, 0, 0))
    for r_i, (prompt, cells) in enumerate(table):
        y = head_h + r_i * (tile + foot)
        for j, line in enumerate(_wrap(_plain(prompt.text), 27)[: tile // 13]):
            draw.text((4, y + 4 + 13 * j), line, fill=(40, 40, 40))
        for c, row in enumerate(cells):
            x = label_w + c * tile
            if row is None or id(row) not in values:
                draw.rectangle((x + 2, y + 2, x + tile - 3, y + tile - 3), outline=(200, 0, 0))
                draw.text((x + 8, y + tile // 2), "failed" if row is not None and row.failure else "-", fill=(200, 0, 0))
                continue
            try:
                picture = read_image(row.path)
            except Exception:
                continue
            picture.thumbnail((tile, tile), Image.BICUBIC if min(picture.size) > tile else Image.NEAREST)
            if max(picture.size) < tile:  # small images (a 16-px demo) are enlarged to be seen
                scale = tile // max(picture.size)
                picture = picture.resize((picture.size[0] * scale, picture.size[1] * scale), Image.NEAREST)
            img.paste(picture, (x + (tile - picture.size[0]) // 2, y + (tile - picture.size[1]) // 2))
            draw.text((x + 4, y + tile), _plain(_cell_caption(values[id(row)], axes, titles, " | ")), fill=(60, 60, 60))
    img.save(path)
    return path


# -- HTML ----------------------------------------------------------------------------------------
def _data_uri(path: Optional[str]) -> str:
    if not path or not os.path.isfile(path):
        return ""
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


def _thumb_uri(path: str, size: int = 128) -> str:
    from PIL import Image

    from ..scoring.images import read_image

    try:
        picture = read_image(path)
    except Exception:
        return ""
    if max(picture.size) < size:
        scale = size // max(picture.size)
        picture = picture.resize((picture.size[0] * scale, picture.size[1] * scale), Image.NEAREST)
    picture.thumbnail((size, size))
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def _ci(m: Optional[Dict[str, Any]], digits: int = 3) -> str:
    if not m:
        return "–"
    low, high = m.get("ci95") or [None, None]
    return f"{_fmt(m.get('mean'), digits)} <small>[{_fmt(low, digits)}, {_fmt(high, digits)}]</small>"


def interval_class(m: Optional[Dict[str, Any]], digits: int = 3) -> str:
    """'pos' when a 95 % interval lies above 0 as printed with ``digits`` (its lower end rounds above 0),
    'neg' when below, else '': a cell showing 0.000 [0.000, 0.000] is never marked as a shift."""
    if not m or not m.get("ci95") or None in m["ci95"]:
        return ""
    low, high = (float(f"{v:.{digits}f}") for v in m["ci95"])  # the numbers as the cell prints them
    return "pos" if low > 0 else "neg" if high < 0 else ""


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}td,th{border:1px solid #ddd;padding:4px 7px;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}small{color:#777}
.note{background:#fff8e0;border:1px solid #eed68a;padding:6px 10px;margin:6px 0;font-size:13px}
.pos{background:#e6f4e6}.neg{background:#fbe6e6}.gallery td{text-align:center;vertical-align:top}
.gallery img{display:block;margin:auto;image-rendering:pixelated}.prompt{max-width:220px;text-align:left!important;font-size:12px}
img.figure{max-width:100%;border:1px solid #eee}code{background:#f4f4f4;padding:1px 4px}
"""


def write_html(out_dir: str, rows, scored, results, files: Dict[str, str], limit: int, axes: Sequence[str] = DEFAULT_AXES,
               image_metrics: Sequence[Any] = ()) -> str:
    summary = results["settings"]
    titles = {k: t for m in image_metrics for k, t in m.titles.items()}
    keys = _metric_keys(summary, _extra_keys(image_metrics))
    main_keys = [k for k in keys if not k.startswith(("shift_", "probe_"))]
    shift_keys = [k for k in keys if k.startswith("shift_")]
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>VMix evaluation</title><style>{_CSS}</style></head><body>"]
    parts.append("<h1>VMix evaluation</h1>")
    src = "; ".join(
        ", ".join(f"{k} {v}" for k, v in s.items() if v not in (None, "") and k in ("source", "url", "checkpoint", "scheduler", "sampler", "steps", "cfg", "width", "height", "device", "precision", "name", "folder"))
        for s in results["sources"]
    )
    parts.append(
        f"<p>{results['prompts']} prompts × {results['seeds_per_prompt']} seed(s), the same seed per prompt in every setting. "
        f"Sources: {e(src)}. CLIP: <code>{e(str(results['clip'] or 'none'))}</code>; aesthetic predictor: <code>{e(str(results['aesthetic_predictor']))}</code>."
        " Means with bootstrap 95 % intervals over images.</p>"
    )
    for note in results["notes"]:
        parts.append(f"<div class='note'>{e(note)}</div>")
    check = results.get("clip_score_check")
    if check:
        parts.append(f"<p><small>CLIP score cross-check with torchmetrics' CLIPScore on {check['images']} images: "
                     f"{check['torchmetrics']:.4f} (torchmetrics) vs {check['ours']:.4f} (from cached features) — "
                     f"{'agree' if check['agree'] else 'DISAGREE'}.</small></p>")
    for c in results.get("lambda0_equals_off") or []:
        parts.append(f"<p><small>{e(c['setting'])} against {e(c['baseline'])}: {c['identical']} of {c['pairs']} images identical pixel for pixel.</small></p>")

    parts.append("<h2>Per setting</h2><table><tr><th>setting</th><th>images</th>")
    parts += [f"<th>{e(_title(k, titles))}</th>" for k in main_keys]
    parts.append("<th>FID</th><th>KID</th></tr>")
    for s in summary:
        d = s.get("distance", {})
        parts.append(f"<tr><td>{e(s['setting'])}</td><td>{s['images']}{' <small>(' + str(s['failed']) + ' failed)</small>' if s['failed'] else ''}</td>")
        parts += [f"<td>{_ci(s.get(k), 2 if k in ('clip_score', 'clip_score_shift') else 3)}</td>" for k in main_keys]
        kid = f"{_fmt(d.get('kid'), 4)} ± {_fmt(d.get('kid_std'), 4)}" if d.get("kid") is not None else "–"
        parts.append(f"<td>{_fmt(d.get('fid'), 3) if d.get('fid') is not None else '–'}</td><td>{kid}</td></tr>")
    parts.append("</table>")
    dist_notes = {s["distance"].get("note") for s in summary if s.get("distance", {}).get("note")}
    if any(s.get("distance") for s in summary):
        features = next(s["distance"].get("features") for s in summary if s.get("distance"))
        against = results.get("reference_images") or results.get("reference")  # says what was counted and skipped
        parts.append(f"<p><small>FID/KID: torchmetrics on {e(str(features))}, against the {e(str(against))}.</small></p>")
    for note in dist_notes:
        parts.append(f"<div class='note'>{e(note)}</div>")

    if files.get("tradeoff") and tuple(axes) == DEFAULT_AXES:
        parts.append("<h2>λ trade-off (paper Fig. 7b)</h2><p>Aes score against CLIP score, one point per λ, the square VMix off; "
                     "bars: 95 % intervals over prompts (clipped to the frame). The paired shifts from VMix off in the table above "
                     "(Aes Δ, CLIP Δ) are the sharper test: the same prompts and seeds with and without VMix.</p>")
    elif files.get("tradeoff"):
        parts.append(f"<h2>λ trade-off</h2><p>{e(_title(axes[1], titles))} against {e(_title(axes[0], titles))}, one point per λ, "
                     "the square VMix off (where it has both numbers); bars: 95 % intervals over prompts (clipped to the frame). "
                     "The paired shifts from VMix off in the table above (Δ) are the sharper test: the same prompts and seeds "
                     "with and without VMix.</p>")
    if files.get("tradeoff"):
        parts.append(f"<img class='figure' src='{_data_uri(files['tradeoff'])}' alt='trade-off plot'>")

    if shift_keys:
        parts.append("<h2>Per dimension: CLIP zero-shot probes, shift from VMix off</h2>"
                     "<p>Probability of the positive pole of each dimension's antonym pairs, minus that of the VMix-off image of the same prompt and seed. "
                     "A dimension switched on alone should move its own probe most.</p><table><tr><th>setting</th>")
        parts += [f"<th>{e(k[6:])}</th>" for k in shift_keys]
        parts.append("</tr>")
        for s in summary:
            if not any(k in s for k in shift_keys):
                continue
            parts.append(f"<tr><td>{e(s['setting'])}</td>")
            for k in shift_keys:
                m = s.get(k)
                cls = interval_class(m, 3)
                parts.append(f"<td{f' class={cls!r}' if cls else ''}>{_ci(m, 3)}</td>")
            parts.append("</tr>")
        parts.append("</table><p><small>Green: the 95 % interval lies above 0 as printed (its lower end is at least 0.001); "
                     "red: below 0.</small></p>")

    if files.get("grid"):
        parts.append(f"<h2>Grid</h2><p>Rows: the first {limit} prompts; columns: settings. "
                     f"<a href='{e(os.path.relpath(files['grid'], out_dir))}'>grid.png</a></p>")
        parts.append(f"<img class='figure' src='{_data_uri(files['grid'])}' alt='grid'>")

    settings, table = grid_rows(rows, scored, limit)
    if table:
        values = scored["values"]
        parts.append("<h2>Images</h2><table class='gallery'><tr><th>prompt</th>")
        parts += [f"<th>{e(s)}</th>" for s in settings]
        parts.append("</tr>")
        for prompt, cells in table:
            parts.append(f"<tr><td class='prompt'>{e(prompt.text)}</td>")
            for row in cells:
                if row is None or id(row) not in values:
                    failed = row is not None and row.failure
                    parts.append(f"<td title='{e(row.failure) if failed else ''}'><small>{'failed (see Failures)' if failed else '–'}</small></td>")
                    continue
                v = values[id(row)]
                link = os.path.relpath(row.path, out_dir) if row.generated_by is not None else row.path
                caption = e(_cell_caption(v, axes, titles, "\n")).replace("\n", "<br>")
                if "content_similarity" in v:
                    caption += f"<br>kept {v['content_similarity']:.3f}"
                parts.append(f"<td><a href='{e(link)}'><img src='{_thumb_uri(row.path)}' alt=''></a><small>{caption}</small></td>")
            parts.append("</tr>")
        parts.append("</table>")

    if results["failures"]:
        parts.append(f"<h2>Failures ({len(results['failures'])})</h2><table><tr><th>setting</th><th>prompt</th><th>seed</th><th>error</th></tr>")
        for f in results["failures"][:200]:
            parts.append(f"<tr><td>{e(f['setting'])}</td><td>{e(f['prompt_id'])}</td><td>{f['seed']}</td><td style='text-align:left'>{e(f['error'])}</td></tr>")
        parts.append("</table>")
    parts.append("<h2>What the numbers mean</h2><ul>"
                 "<li><b>Aes score</b>: the LAION improved aesthetic predictor (1–10 scale of human ratings; about 5.5 fair, 6.5 good, 7+ what good text-to-image models reach). The paper reports 5.35 → 5.79 for SD1.5 → VMix on MJHQ-30K.</li>"
                 "<li><b>CLIP score</b>: 100 · cos(image, prompt) with CLIP ViT-L/14 (torchmetrics' definition); text fidelity. The paper's VMix keeps it within about ±0.5 of the base model.</li>"
                 "<li><b>content kept</b>: cosine similarity of CLIP image embeddings with the VMix-off image of the same prompt and seed (1 = same picture to CLIP).</li>"
                 "<li><b>FID/KID</b>: distance of a setting's images to the reference images; lower is closer. FID needs thousands of images; below that read KID.</li>"
                 "<li><b>probes</b>: CLIP zero-shot antonym pairs per dimension (e.g. vibrant vs dull colors), 0–1, shown as the shift from VMix off.</li>"
                 + "".join(f"<li><b>{e(m.name)}</b>: {e(m.about)}</li>" for m in image_metrics if m.about) + "</ul>")
    parts.append(f"<p><small>Files: {', '.join(e(os.path.relpath(p, out_dir)) for k, p in files.items() if p)}.</small></p></body></html>")
    path = os.path.join(out_dir, "report.html")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write("\n".join(parts))
    os.replace(path + ".tmp", path)
    return path


def _extra_keys(image_metrics: Sequence[Any]) -> List[str]:
    """The ImageMetrics' keys in the order they name them, then their shifts."""
    keys = [k for m in image_metrics for k in m.titles]
    return keys + [f"{k}_shift" for k in keys]


def write_all(out_dir: str, rows, scored, results, opts) -> Dict[str, str]:
    axes, extra = tuple(opts.tradeoff), _extra_keys(opts.image_metrics)
    titles = {k: t for m in opts.image_metrics for k, t in m.titles.items()}
    files = write_tables(out_dir, rows, scored, results, extra)
    series = tradeoff_series(results["settings"], results["baselines"], axes)
    if axes == DEFAULT_AXES:
        files["tradeoff"] = plot_tradeoff(series, os.path.join(out_dir, "tradeoff.png"))
    else:
        labels = (_title(axes[0], titles), _title(axes[1], titles))
        files["tradeoff"] = plot_tradeoff(series, os.path.join(out_dir, "tradeoff.png"), f"{labels[1]} vs {labels[0]} over λ", labels)
    if not series:
        results["notes"].append("no λ trade-off plot: it needs λ settings, the CLIP score and the Aes score (--aesthetic-predictor)" if axes == DEFAULT_AXES else
                                f"no λ trade-off plot: it needs λ settings and the metrics {axes[0]} and {axes[1]}")
    files["grid"] = draw_grid(rows, scored, os.path.join(out_dir, "grid.png"), opts.grid_prompts, axes=axes, titles=titles)
    files["html"] = write_html(out_dir, rows, scored, results, files, opts.grid_prompts, axes, opts.image_metrics)
    # results.json was written before the pictures: write it again with the file list and notes.
    files.update(write_tables(out_dir, rows, scored, dict(results, files={k: os.path.relpath(v, out_dir) for k, v in files.items() if v}), extra))
    return {k: v for k, v in files.items() if v}
