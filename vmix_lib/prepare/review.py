"""Review pages: one self-contained HTML page per dimension and a summary, histograms as PNG.

Each dimension page shows the superior and the not-superior images side by side as thumbnails,
sorted by score, with the rule and threshold; clicking a thumbnail flips its label and adds the
matching row to a box whose text is appended to the overrides file (applied on the next run).
Pages embed their thumbnails and pictures (data URIs), so they open anywhere without a server.
Histograms are drawn with matplotlib when it is installed, otherwise with Pillow.
"""
from __future__ import annotations

import base64
import html
import io
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from ..scoring.images import label_font

_STYLE = """
body{font-family:system-ui,sans-serif;margin:0 1.2em 2em;color:#222;background:#fafafa}
nav{position:sticky;top:0;background:#fafafa;padding:.6em 0;border-bottom:1px solid #ddd;z-index:2}
nav a{margin-right:1em}nav a.here{font-weight:bold;color:#000;text-decoration:none}
h1{margin:.6em 0 .2em}h2{margin:.4em 0}.muted{color:#666}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.cols{display:flex;gap:1.2em;align-items:flex-start}.col{flex:1;min-width:0}
.col h2{position:sticky;top:2.4em;background:#fafafa;padding:.3em 0;z-index:1}
.sup h2{color:#17692b}.inf h2{color:#555}
.grid{display:flex;flex-wrap:wrap;gap:6px}
figure{margin:0;width:132px;cursor:pointer;border:3px solid transparent;border-radius:4px;background:#fff}
figure img{width:128px;height:128px;object-fit:contain;display:block;background:#eee}
figcaption{font-size:11px;line-height:1.25;padding:2px;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
figure.overridden{border-color:#c90}figure.flipped{border-color:#c22}
figure.flipped figcaption::after{content:" \\2192 " attr(data-to);color:#c22;font-weight:bold}
.hists{display:flex;flex-wrap:wrap;gap:12px}.hists img{border:1px solid #ddd;background:#fff}
textarea{width:100%;height:6em;font-family:monospace}
details{margin:.3em 0}details ul{max-height:20em;overflow:auto}
.pair{display:inline-flex;gap:4px;margin:0 14px 10px 0;align-items:center}
"""

_SCRIPT = """
const rows = document.getElementById('rows');
const dim = document.body.dataset.dimension;
const field = v => /[",\n]/.test(v) ? '"' + v.replace(/"/g, '""') + '"' : v;  // CSV quoting
function refresh(){
  const out = [];
  document.querySelectorAll('figure.flipped').forEach(f => out.push(`${field(f.dataset.name)},${dim},${f.dataset.to}`));
  rows.value = out.join('\\n') + (out.length ? '\\n' : '');
  document.getElementById('count').textContent = out.length;
}
document.querySelectorAll('figure[data-name]').forEach(f => f.addEventListener('click', () => {
  f.classList.toggle('flipped');
  f.dataset.to = f.dataset.label === 'superior' ? 'inferior' : 'superior';
  refresh();
}));
document.getElementById('copy').addEventListener('click', () => {
  rows.select();
  if (navigator.clipboard) navigator.clipboard.writeText(rows.value); else document.execCommand('copy');
});
document.getElementById('save').addEventListener('click', () => {
  const a = document.createElement('a');
  a.href = URL.createObjectURL(new Blob([rows.value], {type: 'text/csv'}));
  a.download = `overrides-${dim}.csv`; a.click();
});
"""


@dataclass
class ReviewItem:
    name: str  # in the dataset
    source: str  # absolute path of the original (thumbnails are made from it)
    score: float
    label: str  # superior / inferior, after overrides
    overridden: bool = False


@dataclass
class DimensionReview:
    name: str
    rule: str  # described
    threshold: Optional[float]
    phrasings: Sequence[Tuple[str, str]]
    items: List[ReviewItem]
    histogram: str = ""  # PNG path


@dataclass
class FilterReport:
    name: str
    title: str
    dropped: List[Tuple[str, str]] = field(default_factory=list)  # (input path, reason)


# -- pictures ------------------------------------------------------------------------------------
class Thumbnails:
    """JPEG thumbnails as data URIs, made once per image per run."""

    def __init__(self, size: int = 128):
        self.size = size
        self._cache: Dict[str, str] = {}

    def __call__(self, path: str) -> str:
        if path not in self._cache:
            from PIL import Image

            from ..scoring.images import to_rgb

            try:
                with Image.open(path) as img:
                    img.draft("RGB", (2 * self.size, 2 * self.size))  # JPEG: decode at a reduced scale, much faster
                    img.load()
                    img = to_rgb(img)
                img.thumbnail((self.size, self.size), Image.BICUBIC)
            except Exception:  # shown as a grey square; the reason is in the report
                img = Image.new("RGB", (self.size, self.size), (200, 200, 200))
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=82)
            self._cache[path] = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
        return self._cache[path]


def data_uri_png(path: str) -> str:
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


def _bins(values: Sequence[float], bins: int, lo: float, hi: float) -> List[int]:
    counts = [0] * bins
    for v in values:
        k = int((v - lo) / (hi - lo) * bins) if hi > lo else 0
        counts[min(bins - 1, max(0, k))] += 1
    return counts


def _range(values: Sequence[float], threshold: Optional[float]) -> Tuple[float, float]:
    points = list(values) + ([threshold] if threshold is not None else [])
    lo, hi = (min(points), max(points)) if points else (0.0, 1.0)
    pad = (hi - lo) * 0.05 or 0.05
    return lo - pad, hi + pad


def histogram_png(values: Sequence[float], threshold: Optional[float], title: str, path: str,
                  above: str = "superior", below: str = "inferior", bins: int = 30, use_matplotlib: Optional[bool] = None) -> str:
    """A histogram of ``values`` with the threshold marked; bars at or above it in green."""
    values = [float(v) for v in values if math.isfinite(v)]
    lo, hi = _range(values, threshold)
    counts = _bins(values, bins, lo, hi)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if use_matplotlib is not False:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            plt = None
        if plt is not None:
            fig, ax = plt.subplots(figsize=(4.8, 2.6), dpi=100)
            width = (hi - lo) / bins
            for k, c in enumerate(counts):
                x = lo + k * width
                good = threshold is None or x + width / 2 >= threshold
                ax.bar(x, c, width=width, align="edge", color="#3a9a55" if good else "#9aa0a6")
            if threshold is not None:
                ax.axvline(threshold, color="#c22", linewidth=1.5)
            n_above = sum(1 for v in values if threshold is not None and v >= threshold)
            ax.set_title(f"{title}  ({above} {n_above}, {below} {len(values) - n_above})" if threshold is not None else title, fontsize=9)
            ax.set_xlabel("score", fontsize=8)
            ax.set_ylabel("images", fontsize=8)
            ax.tick_params(labelsize=7)
            fig.tight_layout()
            fig.savefig(path)
            plt.close(fig)
            return path
    return _histogram_with_pil(values, counts, lo, hi, threshold, title, path, above, below)


def _histogram_with_pil(values, counts, lo, hi, threshold, title, path, above, below, size=(480, 260)) -> str:
    from PIL import Image, ImageDraw

    font = label_font()
    img = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = 44, 30, size[0] - 12, size[1] - 38
    n_above = sum(1 for v in values if threshold is not None and v >= threshold)
    heading = f"{title}  ({above} {n_above}, {below} {len(values) - n_above})" if threshold is not None else f"{title}  ({len(values)} images)"
    draw.text((left, 8), heading, fill=(0, 0, 0), font=font)
    draw.rectangle((left, top, right, bottom), outline=(0, 0, 0))
    peak = max(counts) if counts and max(counts) else 1
    width = (right - left) / len(counts)

    def x_of(value: float) -> float:
        return left + (value - lo) / (hi - lo) * (right - left)

    for k, c in enumerate(counts):
        if not c:
            continue
        x0 = left + k * width
        centre = lo + (k + 0.5) * (hi - lo) / len(counts)
        good = threshold is None or centre >= threshold
        draw.rectangle((x0 + 1, bottom - c / peak * (bottom - top - 4), x0 + width - 1, bottom),
                       fill=(58, 154, 85) if good else (154, 160, 166))
    if threshold is not None:
        x = x_of(threshold)
        draw.line((x, top, x, bottom), fill=(204, 34, 34), width=2)
        label = f"{threshold:.4g}"
        lx = min(x + 4, right - draw.textlength(label, font=font) - 4)
        draw.rectangle((lx - 2, top + 2, lx + draw.textlength(label, font=font) + 2, top + 17), fill=(255, 255, 255))
        draw.text((lx, top + 3), label, fill=(204, 34, 34), font=font)
    draw.text((4, top), str(peak), fill=(0, 0, 0), font=font)
    draw.text((4, bottom - 12), "0", fill=(0, 0, 0), font=font)
    draw.text((left, bottom + 5), f"{lo:.3g}", fill=(0, 0, 0), font=font)
    draw.text((right - draw.textlength(f"{hi:.3g}", font=font), bottom + 5), f"{hi:.3g}", fill=(0, 0, 0), font=font)
    draw.text(((left + right) // 2 - 14, bottom + 20), "score", fill=(0, 0, 0), font=font)
    img.save(path)
    return path


# -- pages -----------------------------------------------------------------------------------------
def _esc(text) -> str:
    return html.escape(str(text), quote=True)


def _sample(items: List, limit: int) -> Tuple[List, str]:
    if len(items) <= limit:
        return items, ""
    picks = sorted({round(k * (len(items) - 1) / (limit - 1)) for k in range(limit)}) if limit > 1 else [0]
    return [items[k] for k in picks], f" — showing {len(picks)}, evenly spaced by rank"


def _nav(dimensions: Sequence[str], here: str) -> str:
    links = [f'<a href="index.html"{" class=here" if here == "index" else ""}>summary</a>']
    links += [f'<a href="{_esc(d)}.html"{" class=here" if here == d else ""}>{_esc(d)}</a>' for d in dimensions]
    return "<nav>" + "".join(links) + "</nav>"


def _page(title: str, body: str, extra_attrs: str = "", script: str = "") -> str:
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
        f"<style>{_STYLE}</style></head>\n<body{extra_attrs}>\n{body}\n"
        + (f"<script>{script}</script>\n" if script else "")
        + "</body></html>\n"
    )


def _figure(item: ReviewItem, thumbs: Thumbnails) -> str:
    cls = ' class="overridden"' if item.overridden else ""
    note = " (override)" if item.overridden else ""
    return (
        f'<figure{cls} data-name="{_esc(item.name)}" data-label="{item.label}" title="{_esc(item.name)}{note}">'
        f'<img loading="lazy" src="{thumbs(item.source)}" alt="{_esc(item.name)}">'
        f"<figcaption>{item.score:.4f} · {_esc(item.name)}</figcaption></figure>"
    )


def write_dimension_page(path: str, review: DimensionReview, dimensions: Sequence[str], thumbs: Thumbnails,
                         limit: int, overrides_path: str) -> str:
    ranked = sorted(review.items, key=lambda it: (-it.score, it.name))
    superior = [it for it in ranked if it.label == "superior"]
    inferior = [it for it in ranked if it.label != "superior"]
    by_override = sum(1 for it in review.items if it.overridden)
    t = "n/a" if review.threshold is None else f"{review.threshold:.4f}"
    phrasings = "".join(f"<li>{_esc(p)} <span class=muted>vs</span> {_esc(n)}</li>" for p, n in review.phrasings)
    hist = f'<img src="{data_uri_png(review.histogram)}" alt="histogram of {_esc(review.name)} scores">' if review.histogram else ""
    columns = []
    for cls, title, items in (("sup", f"superior ({len(superior)}) — score ≥ {t}", superior),
                              ("inf", f"not superior ({len(inferior)}) — score &lt; {t}", inferior)):
        shown, note = _sample(items, limit)
        figures = "".join(_figure(it, thumbs) for it in shown)
        columns.append(f'<div class="col {cls}"><h2>{title}<span class="muted" style="font-size:60%">{note}</span></h2>'
                       f'<div class="grid">{figures}</div></div>')
    body = (
        _nav(dimensions, review.name)
        + f"<h1>{_esc(review.name)}</h1>"
        + f"<p>Rule: {_esc(review.rule)}; threshold <b>{t}</b>. Superior {len(superior)} of {len(review.items)}"
        + (f" ({by_override} label(s) set by the overrides file, framed in amber)" if by_override else "")
        + ". Score: CLIP's probability of the positive phrasing against its antonym, averaged over these pairs:</p>"
        + f"<ul>{phrasings}</ul>{hist}"
        + "<h2>Flip labels</h2><p>Click a thumbnail to flip its label (click again to undo); the rows below are "
        + f"appended to <code>{_esc(overrides_path)}</code> and applied when the same command runs again "
        + "(later rows win). Flipped: <b id=count>0</b>.</p>"
        + '<textarea id=rows readonly></textarea><p><button id=copy>Copy rows</button> <button id=save>Save as CSV</button></p>'
        + f'<div class="cols">{"".join(columns)}</div>'
    )
    with open(path, "w", encoding="utf-8") as f:
        f.write(_page(f"VMix labels: {review.name}", body, f' data-dimension="{_esc(review.name)}"', _SCRIPT))
    return path


def write_index(path: str, *, title: str, counts: Sequence[Tuple[str, int]], filters: Sequence[FilterReport],
                dimensions: Sequence[DimensionReview], histograms: Sequence[str], near_pairs: Sequence[Tuple[str, str, float, str, str]],
                captions: Sequence[Tuple[str, int]], notes: Sequence[str], overrides_path: str, thumbs: Thumbnails, limit: int,
                trainer_hint: str) -> str:
    rows = "".join(f"<tr><td>{_esc(k)}</td><td class=n>{v}</td></tr>" for k, v in counts)
    filter_html = []
    for fr in filters:
        if not fr.dropped:
            filter_html.append(f"<p><b>{_esc(fr.title)}</b>: none dropped</p>")
            continue
        shown = fr.dropped[:2000]
        items = "".join(f"<li><code>{_esc(p)}</code> — {_esc(r)}</li>" for p, r in shown)
        more = f"<li>… and {len(fr.dropped) - len(shown)} more (prepare/report.json)</li>" if len(fr.dropped) > len(shown) else ""
        filter_html.append(f"<details><summary><b>{_esc(fr.title)}</b>: {len(fr.dropped)} dropped</summary><ul>{items}{more}</ul></details>")
    label_rows = "".join(
        f'<tr><td><a href="{_esc(d.name)}.html">{_esc(d.name)}</a></td><td>{_esc(d.rule)}</td>'
        f'<td class=n>{"n/a" if d.threshold is None else f"{d.threshold:.4f}"}</td>'
        f'<td class=n>{sum(1 for it in d.items if it.label == "superior")}</td>'
        f'<td class=n>{sum(1 for it in d.items if it.label != "superior")}</td>'
        f'<td class=n>{sum(1 for it in d.items if it.overridden)}</td></tr>'
        for d in dimensions
    )
    hist_html = "".join(f'<img src="{data_uri_png(h)}" alt="{_esc(os.path.basename(h))}">' for h in histograms if h)
    pairs_shown, pairs_note = _sample(list(near_pairs), limit)
    pairs_html = "".join(
        f'<span class=pair title="cosine {cos:.4f}"><img src="{thumbs(drop_src)}" width=96 alt="dropped"> ≈ '
        f'<img src="{thumbs(keep_src)}" width=96 alt="kept"><span class=muted style="font-size:11px">'
        f"{cos:.3f}<br>dropped {_esc(drop)}<br>kept {_esc(keep)}</span></span>"
        for drop, keep, cos, drop_src, keep_src in pairs_shown
    )
    caption_rows = "".join(f"<tr><td>{_esc(k)}</td><td class=n>{v}</td></tr>" for k, v in captions)
    note_html = ("<h2>Notes</h2><ul>" + "".join(f"<li>{_esc(n)}</li>" for n in notes) + "</ul>") if notes else ""
    body = (
        _nav([d.name for d in dimensions], "index")
        + f"<h1>{_esc(title)}</h1><table>{rows}</table>"
        + "<h2>Filters</h2>" + "".join(filter_html)
        + "<h2>Labels</h2><table><tr><th>dimension</th><th>rule</th><th>threshold</th><th>superior</th>"
        + f"<th>inferior</th><th>overridden</th></tr>{label_rows}</table>"
        + f'<div class="hists">{hist_html}</div>'
        + (f"<h2>Near duplicates ({len(near_pairs)}){pairs_note}</h2><div>{pairs_html}</div>" if near_pairs else "")
        + f"<h2>Captions</h2><table>{caption_rows}</table>"
        + note_html
        + "<h2>Corrections</h2><p>Flip labels on the dimension pages, or edit "
        + f"<code>{_esc(overrides_path)}</code> by hand (<code>file_name,dimension,label</code>; "
        + "<code>NAME,*,exclude</code> leaves an image out, <code>NAME,*,keep</code> undoes a filter), then run the same "
        + f"command again: nothing is encoded again.</p><p>{_esc(trainer_hint)}</p>"
    )
    with open(path, "w", encoding="utf-8") as f:
        f.write(_page(title, body))
    return path
