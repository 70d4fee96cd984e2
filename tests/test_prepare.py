"""``vmix_lib.prepare``: labels from known colours, filters, caches and resume, overrides, the output
folder and the review pages, with a CLIP stand-in whose image and text features are built to agree.

The stand-in maps a picture of known hue/saturation/brightness to a unit vector whose first
coordinate is linear in saturation and second in brightness; the text features of the colour
probe's positive phrasings point along +e0 (negative: -e0), lighting's along ±e1.  So the colour
score is a strictly increasing function of saturation, the lighting score of brightness, and the
labels the tool writes can be predicted exactly.  Real models (tiny CLIP, ViT classifier, BLIP, the
trainer's dry run) are in test_prepare_models.py.
"""
import colorsys
import csv
import hashlib
import json
import math
import os

import pytest
import torch
from PIL import Image

from vmix_lib.prepare import PrepareError
from vmix_lib.prepare.filters import aesthetic_cut, exact_duplicates, near_duplicates
from vmix_lib.prepare.labels import read_overrides, threshold
from vmix_lib.prepare.output import dataset_names
from vmix_lib.prepare.review import histogram_png
from vmix_lib.prepare.run import run_prepare
from vmix_lib.prepare.settings import PrepareSettings, Rule, settings_from_args
from vmix_lib.scoring.probes import DEFAULT_PROBES, default_probes
from vmix_lib.train.dataset import scan_dataset

DIMS = ["color", "lighting"]


class Quiet:
    """A tqdm stand-in that prints nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def update(self, n=1):
        pass

    def close(self):
        pass


class ColourClip:
    """CLIP stand-in: image features from the mean colour, text features from the probe tables."""

    dim = 16
    identity = "colour-standin-1"

    def __init__(self, logit_scale: float = 4.0):
        self.logit_scale = logit_scale
        self.calls = 0  # embed_pixels calls
        self.embedded = 0  # images embedded
        self.interrupt_after = None  # raise KeyboardInterrupt on this call number
        self._texts = {}
        for axis, name in enumerate(DIMS):
            for pos, neg in next(p for p in DEFAULT_PROBES if p.name == name).pairs:
                self._texts[pos], self._texts[neg] = (axis, 1.0), (axis, -1.0)

    def pixel_values(self, images):
        tensors = []
        for im in images:
            small = im.convert("RGB").resize((4, 4))
            tensors.append(torch.tensor(list(small.getdata()), dtype=torch.float32).T.reshape(3, 4, 4) / 255.0)
        return torch.stack(tensors)

    def embed_pixels(self, pixels):
        if self.interrupt_after is not None and self.calls >= self.interrupt_after:
            raise KeyboardInterrupt
        self.calls += 1
        self.embedded += pixels.shape[0]
        out = torch.zeros(pixels.shape[0], self.dim)
        for row, (r, g, b) in enumerate(pixels.mean(dim=(2, 3)).tolist()):
            h, s, v = colorsys.rgb_to_hsv(r, g, b)
            x1, x2 = 0.6 * (s - 0.5), 0.6 * (v - 0.5)
            rest = math.sqrt(1.0 - x1 * x1 - x2 * x2)
            out[row, :4] = torch.tensor([x1, x2, rest * math.cos(2 * math.pi * h), rest * math.sin(2 * math.pi * h)])
        return out  # unit length by construction

    def embed_texts(self, texts):
        out = torch.zeros(len(texts), self.dim)
        for row, text in enumerate(texts):
            if text in self._texts:
                axis, sign = self._texts[text]
                out[row, axis] = sign
            else:  # other dimensions: a fixed direction per phrase, orthogonal to colour and light
                g = torch.Generator().manual_seed(int(hashlib.sha1(text.encode()).hexdigest()[:8], 16))
                out[row, 2:] = torch.nn.functional.normalize(torch.randn(self.dim - 2, generator=g), dim=0)
        return out


def brightness_predictor(path):
    """A predictor file in the LAION layout whose score is 5 + 10·e1 (e1 is linear in brightness)."""
    state = {}
    shapes = {0: (1024, 16), 2: (128, 1024), 4: (64, 128), 6: (16, 64), 7: (1, 16)}
    for index, (rows, cols) in shapes.items():
        w = torch.zeros(rows, cols)
        w[0, 1 if index == 0 else 0] = 10.0 if index == 7 else 1.0
        state[f"layers.{index}.weight"], state[f"layers.{index}.bias"] = w, torch.zeros(rows)
    state["layers.7.bias"] = torch.tensor([5.0])
    torch.save(state, path)
    return path


def hsv_image(path, h, s, v, size=(72, 64)):
    rgb = tuple(round(255 * c) for c in colorsys.hsv_to_rgb(h, s, v))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, rgb).save(path)
    return path


def caption(path, text):
    with open(os.path.splitext(path)[0] + ".txt", "w", encoding="utf-8") as f:
        f.write(text)


# 8 pictures, hues 45° apart (no two are near duplicates): (name, hue, saturation, brightness)
PALETTE = [
    ("p0", 0 / 8, 0.15, 0.31), ("p1", 1 / 8, 0.85, 0.23), ("p2", 2 / 8, 0.45, 0.79), ("p3", 3 / 8, 0.25, 0.63),
    ("p4", 4 / 8, 0.95, 0.47), ("p5", 5 / 8, 0.55, 0.87), ("p6", 6 / 8, 0.35, 0.15), ("p7", 7 / 8, 0.75, 0.71),
]


def palette_folder(root):
    for k, (name, h, s, v) in enumerate(PALETTE):
        sub = "" if k < 4 else "nested/deeper/"
        path = hsv_image(os.path.join(root, sub + name + ".png"), h, s, v)
        if k % 2 == 0:
            caption(path, f"picture {name}")
    # captions for the odd ones: from metadata.jsonl files (root, and the nested folder's own)
    with open(os.path.join(root, "metadata.jsonl"), "w", encoding="utf-8") as f:
        f.write(json.dumps({"file_name": "p1.png", "text": "meta p1"}) + "\n")
        f.write(json.dumps({"file_name": "p3.png", "caption": "meta p3"}) + "\n")
        f.write(json.dumps({"file_name": "nested/deeper/p5.png", "text": "root meta p5"}) + "\n")
    with open(os.path.join(root, "nested", "deeper", "metadata.jsonl"), "w", encoding="utf-8") as f:
        f.write(json.dumps({"file_name": "p5.png", "text": "nested meta p5"}) + "\n")
        f.write(json.dumps({"file_name": "p7.png", "text": "nested meta p7"}) + "\n")
    return root


def settings(inp, out, **kw):
    base = dict(input_dir=str(inp), output_dir=str(out), probes=default_probes(DIMS), min_side=32, workers=0,
                batch_size=3, shard_size=4, device="cpu")
    base.update(kw)
    return PrepareSettings(**base)


def run(s, clip=None, **kw):
    return run_prepare(s, log=lambda m: None, progress=Quiet, clip=clip or ColourClip(), **kw)


def read_metadata(out):
    with open(os.path.join(out, "metadata.jsonl"), encoding="utf-8") as f:
        return {e["file_name"]: e for e in map(json.loads, f)}


def tree_digest(root):
    """Every file's path, bytes and mtime under root (to prove the originals are untouched)."""
    digest = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(folder, name)
            digest.update(path.encode())
            digest.update(open(path, "rb").read())
            digest.update(str(os.stat(path).st_mtime_ns).encode())
    return digest.hexdigest()


# -- labels ------------------------------------------------------------------------------------------
def test_labels_follow_known_saturation_and_brightness(tmp_path):
    inp, out = palette_folder(str(tmp_path / "in")), str(tmp_path / "out")
    before = tree_digest(inp)
    s = settings(inp, out, rules={"color": Rule("quantile", 0.5), "lighting": Rule("margin", 0.0)})
    result = run(s)
    meta = read_metadata(out)
    names = {n: ("" if k < 4 else "nested__deeper__") + n + ".png" for k, (n, *_) in enumerate(PALETTE)}
    assert set(meta) == set(names.values())
    by_saturation = sorted(PALETTE, key=lambda p: -p[2])
    for rank, (name, h, sat, val) in enumerate(by_saturation):
        labels = meta[names[name]]["labels"]
        assert labels["color"] == ("superior" if rank < 4 else "inferior"), name  # the top half by saturation
        assert labels["lighting"] == ("superior" if val > 0.5 else "inferior"), name  # P(bright) > P(dark)
    assert result.superior == {"color": 4, "lighting": 4}
    assert result.thresholds["lighting"] == 0.5
    # captions: NAME.txt, the root metadata.jsonl ("text" or "caption"), the nearest metadata.jsonl wins
    assert meta["p0.png"]["text"] == "picture p0" and meta["p1.png"]["text"] == "meta p1"
    assert meta["p3.png"]["text"] == "meta p3" and meta["nested__deeper__p5.png"]["text"] == "nested meta p5"
    assert meta["nested__deeper__p7.png"]["text"] == "nested meta p7"
    # the trainer's own dataset check accepts the folder as it is
    report = scan_dataset(out, DIMS)
    assert report.problems == [] and len(report.items) == 8
    assert report.label_counts == {"color": 4, "lighting": 4}
    # symbolic links to the originals, which are unchanged
    for k, (name, *_) in enumerate(PALETTE):
        original = os.path.join(inp, "" if k < 4 else os.path.join("nested", "deeper"), name + ".png")
        assert os.path.islink(os.path.join(out, names[name])) and os.path.realpath(os.path.join(out, names[name])) == original
    assert tree_digest(inp) == before


def test_scores_csv_holds_raw_scores_that_order_like_the_pictures(tmp_path):
    inp, out = palette_folder(str(tmp_path / "in")), str(tmp_path / "out")
    run(settings(inp, out, aesthetic_predictor=brightness_predictor(str(tmp_path / "aes.pth"))))
    with open(os.path.join(out, "prepare", "scores.csv"), newline="", encoding="utf-8") as f:
        rows = {r["source"].split("/")[-1][:-4]: r for r in csv.DictReader(f)}
    by = {name: (s, v) for name, _, s, v in PALETTE}
    order_color = sorted(rows, key=lambda n: float(rows[n]["score_color"]))
    order_light = sorted(rows, key=lambda n: float(rows[n]["score_lighting"]))
    order_aes = sorted(rows, key=lambda n: float(rows[n]["aesthetic"]))
    assert order_color == sorted(by, key=lambda n: by[n][0])
    assert order_light == sorted(by, key=lambda n: by[n][1]) == order_aes
    for name, (sat, val) in by.items():  # the predictor's score is 5 + 10·0.6·(v - 0.5), v after 8-bit rounding
        assert float(rows[name]["aesthetic"]) == pytest.approx(5 + 6 * (val - 0.5), abs=0.03)


def test_user_defined_dimension_and_margin_rules(tmp_path):
    inp, out = palette_folder(str(tmp_path / "in")), str(tmp_path / "out")
    s = settings_from_args([inp, out, "--dimensions", "color,warmth", "--probe", "warmth=a warm photo.|a cold photo.;warm light|cold light",
                            "--margin", "color=0.2", "--quantile", "0.25", "--min-side", "32", "--workers", "0"])
    assert [p.name for p in s.probes] == ["color", "warmth"]
    assert s.rule("color") == Rule("margin", 0.2) and s.rule("warmth") == Rule("quantile", 0.25)
    result = run(s)
    meta = read_metadata(out)
    # margin 0.2: P(vibrant) - P(dull) >= 0.2  <=>  sigmoid(2·4·0.6(s - 0.5)) >= 0.6
    cut = 0.5 + math.log(0.6 / 0.4) / (8 * 0.6)
    for k, (name, h, sat, val) in enumerate(PALETTE):
        entry = meta[("" if k < 4 else "nested__deeper__") + name + ".png"]
        assert entry["labels"]["color"] == ("superior" if sat > cut else "inferior")
    assert result.superior["warmth"] == 6  # 0.25 quantile: the top 75 % of 8


# -- filters -------------------------------------------------------------------------------------------
def test_broken_small_and_duplicate_images_are_dropped_and_listed(tmp_path):
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    a = hsv_image(os.path.join(inp, "a.png"), 0.0, 0.8, 0.6)
    caption(a, "a")
    hsv_image(os.path.join(inp, "a_close.png"), 0.0, 0.81, 0.63)  # near duplicate of a, brighter
    b = hsv_image(os.path.join(inp, "b.png"), 1 / 3, 0.5, 0.5)
    os.makedirs(os.path.join(inp, "copies"))
    with open(os.path.join(inp, "copies", "b_copy.png"), "wb") as f:
        f.write(open(b, "rb").read())  # exact duplicate; it has a caption, the original has none
    caption(os.path.join(inp, "copies", "b_copy.png"), "b copy")
    hsv_image(os.path.join(inp, "c.png"), 2 / 3, 0.3, 0.4)
    hsv_image(os.path.join(inp, "tiny.png"), 0.5, 0.5, 0.5, size=(20, 90))
    open(os.path.join(inp, "empty.jpg"), "wb").close()
    with open(os.path.join(inp, "garbage.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not an image at all")
    Image.new("RGB", (200, 200), (10, 200, 30)).save(os.path.join(inp, "whole.jpg"), quality=95)
    data = open(os.path.join(inp, "whole.jpg"), "rb").read()
    with open(os.path.join(inp, "truncated.jpg"), "wb") as f:
        f.write(data[: len(data) // 2])
    os.remove(os.path.join(inp, "whole.jpg"))
    clip = ColourClip()
    result = run(settings(inp, out, aesthetic_predictor=brightness_predictor(str(tmp_path / "aes.pth")),
                          default_caption="a photo"), clip=clip)
    dropped = {fid: {rel: reason for rel, reason in items} for fid, items in result.dropped.items()}
    assert set(dropped["unreadable"]) == {"empty.jpg", "garbage.png", "truncated.jpg"}
    assert all(reason for reason in dropped["unreadable"].values())
    assert dropped["small"] == {"tiny.png": "20x90 px, short side below 32"}
    assert dropped["duplicate"] == {"b.png": "same content as copies/b_copy.png"}
    assert list(dropped["near_duplicate"]) == ["a.png"] and "a_close.png" in dropped["near_duplicate"]["a.png"]
    assert result.names == ["a_close.png", "c.png", "copies__b_copy.png"]
    assert clip.embedded == 4  # a, a_close, b_copy, c: never the small, duplicate or broken ones
    with open(os.path.join(out, "prepare", "report.json"), encoding="utf-8") as f:
        report = json.load(f)
    assert report["counts"] == {"found": 9, "in_dataset": 3, "unreadable": 3, "small": 1, "duplicate": 1, "watermark": 0,
                                "near_duplicate": 1, "aesthetic": 0, "excluded": 0, "no_caption": 0}
    assert scan_dataset(out, DIMS).problems == []


def test_near_duplicates_keep_the_better_score_without_a_predictor(tmp_path):
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    hsv_image(os.path.join(inp, "dull.png"), 0.0, 0.80, 0.60)
    hsv_image(os.path.join(inp, "vivid.png"), 0.0, 0.82, 0.61)  # higher on colour and light
    hsv_image(os.path.join(inp, "other.png"), 0.5, 0.5, 0.5)
    result = run(settings(inp, out, default_caption="x"))
    assert result.names == ["other.png", "vivid.png"]
    assert "mean dimension score" in dict(result.dropped["near_duplicate"])["dull.png"]
    result = run(settings(inp, str(tmp_path / "out2"), default_caption="x", near_duplicate=None))
    assert len(result.names) == 3


def _greedy_reference(embeds, scores, threshold):
    """The definition, with the whole matrix: in score order, drop an image similar to a kept one."""
    sims = embeds @ embeds.T
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    kept, dropped = [], []
    for i in order:
        best = max(kept, key=lambda j: float(sims[i, j]), default=None)
        if best is not None and float(sims[i, best]) > threshold:
            dropped.append((i, best))
        else:
            kept.append(i)
    return sorted(dropped)


@pytest.mark.parametrize("block", [1, 3, 7, 64])
def test_blocked_near_duplicates_equal_the_whole_matrix_greedy(block):
    g = torch.Generator().manual_seed(block)
    base = torch.nn.functional.normalize(torch.randn(40, 24, generator=g), dim=-1)
    noisy = torch.nn.functional.normalize(base[:15].repeat(2, 1) + 0.08 * torch.randn(30, 24, generator=g), dim=-1)
    embeds = torch.cat([base, noisy])  # 70 images: 15 groups of 3 near copies, 25 singles
    scores = torch.randn(70, generator=g)
    scores[5] = scores[6]  # a tie: the lower index wins
    got = near_duplicates(embeds, scores, 0.9, block=block)
    assert [(d, k) for d, k, _ in got] == _greedy_reference(embeds, scores, 0.9)
    assert len(got) >= 15
    sims = embeds @ embeds.T
    assert all(abs(cos - float(sims[d, k])) < 1e-5 and cos > 0.9 for d, k, cos in got)


def test_exact_duplicates_and_aesthetic_cut():
    assert exact_duplicates(["x", "y", "x", "x"], [False, False, True, True]) == [(0, 2), (3, 2)]
    assert exact_duplicates(["x", "x"], [False, False]) == [(1, 0)]
    scores = torch.tensor([5.0, 6.5, 4.0, 6.5, 5.5])
    assert aesthetic_cut(scores, 5.5, None) == ([0, 2], 5.5)
    assert aesthetic_cut(scores, None, 0.4) == ([0, 2, 4], 6.5)  # ceil(0.4·5) = 2 kept
    assert aesthetic_cut(scores, None, 0.6) == ([0, 2], 5.5)


def test_aesthetic_threshold_and_top_fraction(tmp_path):
    inp = palette_folder(str(tmp_path / "in"))
    aes = brightness_predictor(str(tmp_path / "aes.pth"))
    result = run(settings(inp, str(tmp_path / "o1"), aesthetic_predictor=aes, min_aesthetic=5.0))
    assert sorted(rel.split("/")[-1] for rel, _ in result.dropped["aesthetic"]) == \
        sorted(f"{n}.png" for n, _, _, v in PALETTE if v < 0.5)
    result = run(settings(inp, str(tmp_path / "o2"), aesthetic_predictor=aes, top_aesthetic=0.25))
    assert sorted(n.split("__")[-1] for n in result.names) == ["p2.png", "p5.png"]  # the two brightest


# -- caches, re-applying thresholds, resume ------------------------------------------------------------
def test_new_thresholds_are_applied_without_encoding_again(tmp_path):
    inp, out = palette_folder(str(tmp_path / "in")), str(tmp_path / "out")
    clip = ColourClip()
    first = run(settings(inp, out, rules={"color": Rule("quantile", 0.5)}), clip=clip)
    assert (first.encoded, clip.embedded) == (8, 8)
    shards = os.listdir(os.path.join(out, "prepare", "cache", "clip", clip.identity))
    assert shards and all(n.endswith(".safetensors") for n in shards)
    again = ColourClip()
    second = run(settings(inp, out, rules={"color": Rule("quantile", 0.75), "lighting": Rule("margin", 0.1)}), clip=again)
    assert (second.encoded, again.calls) == (0, 0)
    assert second.superior["color"] == 2 and first.superior["color"] == 4
    assert second.superior["lighting"] == sum(1 for *_, v in PALETTE if 0.5 + math.log(0.55 / 0.45) / 4.8 < v)
    assert read_metadata(out)["p1.png"]["labels"]["color"] == "superior"  # saturation 0.85: second highest
    assert scan_dataset(out, DIMS).problems == []


def test_interrupted_run_resumes_encoding_only_what_is_missing(tmp_path):
    inp, out = palette_folder(str(tmp_path / "in")), str(tmp_path / "out")
    clip = ColourClip()
    clip.interrupt_after = 2  # two batches of 3: 6 pending >= shard size 4, flushed before the third batch fails
    with pytest.raises(KeyboardInterrupt):
        run(settings(inp, out, batch_size=3, shard_size=4), clip=clip)
    assert not os.path.exists(os.path.join(out, "metadata.jsonl"))
    resumed = ColourClip()
    result = run(settings(inp, out, batch_size=3, shard_size=4), clip=resumed)
    assert result.encoded == resumed.embedded == 2  # 8 images, 6 already in the flushed shard
    fresh = run(settings(inp, str(tmp_path / "fresh")))
    assert read_metadata(out) == read_metadata(str(tmp_path / "fresh"))
    assert result.thresholds == fresh.thresholds


def test_ctrl_c_keeps_every_embedding_and_hash_finished(tmp_path):
    inp, out = palette_folder(str(tmp_path / "in")), str(tmp_path / "out")
    clip = ColourClip()
    clip.interrupt_after = 2  # Ctrl-C in the third batch of 3, far below a shard of 1,024
    with pytest.raises(KeyboardInterrupt):
        run(settings(inp, out, batch_size=3, shard_size=1024), clip=clip)
    resumed = ColourClip()
    result = run(settings(inp, out, batch_size=3, shard_size=1024), clip=resumed)
    assert result.encoded == resumed.embedded == 2  # the 6 images of the two finished batches were kept

    class StopAfterThree(Quiet):  # Ctrl-C while the fourth file is being hashed
        def __init__(self, *args, desc="", **kwargs):
            self.desc, self.n = desc, 0

        def update(self, n=1):
            self.n += n
            if self.desc == "hashing images" and self.n == 3:
                raise KeyboardInterrupt

    fresh = str(tmp_path / "fresh")
    with pytest.raises(KeyboardInterrupt):
        run_prepare(settings(inp, fresh), log=lambda m: None, progress=StopAfterThree, clip=ColourClip())
    from vmix_lib.prepare.records import RecordFile

    assert len(RecordFile(os.path.join(fresh, "prepare", "cache", "files.jsonl")).records) == 3


def test_features_are_written_at_least_every_flush_seconds(tmp_path, monkeypatch):
    import vmix_lib.scoring.features as features

    now = [0.0]
    monkeypatch.setattr(features, "_clock", lambda: now[0])
    cache = features.FeatureCache(str(tmp_path), "model", shard_size=1024, flush_seconds=60.0)
    cache.add(["a"], torch.ones(1, 4))
    now[0] = 59.0
    cache.add(["b"], torch.ones(1, 4))
    assert features.FeatureCache(str(tmp_path), "model")._where == {}  # nothing on disk yet
    now[0] = 60.0
    cache.add(["c"], torch.ones(1, 4))  # a minute after the last write: all three are written
    assert sorted(features.FeatureCache(str(tmp_path), "model")._where) == ["a", "b", "c"]


def test_a_file_that_fails_to_decode_is_reported_again_without_decoding_it_again(tmp_path, monkeypatch):
    import vmix_lib.scoring.features as features

    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    caption(hsv_image(os.path.join(inp, "good.png"), 0.2, 0.5, 0.5), "good")
    Image.new("RGB", (200, 200), (10, 200, 30)).save(os.path.join(inp, "whole.jpg"), quality=95)
    data = open(os.path.join(inp, "whole.jpg"), "rb").read()
    with open(os.path.join(inp, "truncated.jpg"), "wb") as f:
        f.write(data[: len(data) // 2])  # its header is whole: only a full decode finds the cut
    os.remove(os.path.join(inp, "whole.jpg"))
    decoded = []
    real = features.read_image
    monkeypatch.setattr(features, "read_image", lambda path: decoded.append(os.path.basename(path)) or real(path))
    first = run(settings(inp, out, default_caption="x"))
    assert sorted(decoded) == ["good.png", "truncated.jpg"]
    reason = dict(first.dropped["unreadable"])["truncated.jpg"]
    assert reason.startswith("image file is truncated")
    decoded.clear()
    second = run(settings(inp, out, default_caption="x"))
    assert decoded == [] and second.dropped["unreadable"] == [("truncated.jpg", reason)]
    Image.new("RGB", (200, 200), (200, 30, 10)).save(os.path.join(inp, "truncated.jpg"), quality=95)  # repaired:
    os.utime(os.path.join(inp, "truncated.jpg"), ns=(10**9, 10**9))  # a new file identity, decoded again
    third = run(settings(inp, out, default_caption="x"))
    assert decoded == ["truncated.jpg"] and third.dropped["unreadable"] == []


def test_an_edited_image_is_encoded_again_and_its_link_replaced(tmp_path):
    inp, out = palette_folder(str(tmp_path / "in")), str(tmp_path / "out")
    run(settings(inp, out, link_mode="copy"))
    hsv_image(os.path.join(inp, "p0.png"), 0.0, 1.0, 1.0)  # p0 becomes the most saturated picture
    os.utime(os.path.join(inp, "p0.png"), ns=(10**9, 10**9))
    clip = ColourClip()
    result = run(settings(inp, out, link_mode="copy"), clip=clip)
    assert clip.embedded == 1 and result.encoded == 1
    assert open(os.path.join(out, "p0.png"), "rb").read() == open(os.path.join(inp, "p0.png"), "rb").read()
    assert read_metadata(out)["p0.png"]["labels"]["color"] == "superior"


# -- overrides ------------------------------------------------------------------------------------------
def test_overrides_flip_exclude_and_keep_on_the_next_run(tmp_path):
    inp, out = palette_folder(str(tmp_path / "in")), str(tmp_path / "out")
    hsv_image(os.path.join(inp, "p4_close.png"), 4 / 8, 0.94, 0.46)  # a near duplicate of p4 (lower brightness)
    s = settings(inp, out, rules={"color": Rule("quantile", 0.5)}, default_caption="x")
    first = run(s)
    meta = read_metadata(out)
    assert meta["p1.png"]["labels"]["color"] == "superior" and meta["p0.png"]["labels"]["lighting"] == "inferior"
    assert "p4_close.png" not in meta and first.superior["color"] == 4
    overrides = os.path.join(out, "prepare", "overrides.csv")
    assert open(overrides).read().endswith("file_name,dimension,label\n")  # the template, written once
    with open(overrides, "a", encoding="utf-8") as f:
        f.write("p1.png,color,inferior\n")
        f.write("nested/deeper/p6.png,lighting,inferior\n")  # by input path; already inferior: no change
        f.write("p0.png,lighting,inferior\np0.png,lighting,superior\n")  # the later row wins
        f.write("p2.png,*,exclude\n")
        f.write("p4_close.png,*,keep\n")
        f.write("gone.png,color,superior\n")
    clip = ColourClip()
    second = run(s, clip=clip)
    assert clip.calls == 0
    meta = read_metadata(out)
    assert meta["p1.png"]["labels"]["color"] == "inferior"
    assert meta["p0.png"]["labels"]["lighting"] == "superior"
    assert "p2.png" not in meta and not os.path.lexists(os.path.join(out, "p2.png"))
    assert "p4_close.png" in meta and os.path.isfile(os.path.join(out, "p4_close.png"))
    assert dict(second.dropped["excluded"]) == {"p2.png": "excluded in overrides.csv"}
    assert any("gone.png" in n for n in second.notes)
    report = json.load(open(os.path.join(out, "prepare", "report.json")))
    assert report["dimensions"]["color"]["overridden"] == 1 and report["dimensions"]["lighting"]["overridden"] == 1
    page = open(os.path.join(out, "review", "color.html"), encoding="utf-8").read()
    assert 'class="overridden" data-name="p1.png" data-label="inferior"' in page
    assert scan_dataset(out, DIMS).problems == []


def test_keep_brings_back_an_exact_duplicate_and_a_small_image(tmp_path):
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    caption(hsv_image(os.path.join(inp, "a.png"), 0.0, 0.8, 0.6), "a")
    with open(os.path.join(inp, "twin.png"), "wb") as f:
        f.write(open(os.path.join(inp, "a.png"), "rb").read())
    caption(os.path.join(inp, "twin.png"), "the twin")
    caption(hsv_image(os.path.join(inp, "b.png"), 0.5, 0.3, 0.4), "b")
    caption(hsv_image(os.path.join(inp, "tiny.png"), 0.25, 0.9, 0.9, size=(20, 20)), "tiny")
    s = settings(inp, out)
    first = run(s)
    assert first.names == ["a.png", "b.png"]
    assert dict(first.dropped["duplicate"]) == {"twin.png": "same content as a.png"} and list(dict(first.dropped["small"])) == ["tiny.png"]
    with open(os.path.join(out, "prepare", "overrides.csv"), "a", encoding="utf-8") as f:
        f.write("twin.png,*,keep\ntiny.png,*,keep\n")
    clip = ColourClip()
    second = run(s, clip=clip)
    assert clip.embedded == 2  # only the two brought back are encoded now
    assert second.names == ["a.png", "b.png", "tiny.png", "twin.png"] and second.notes == []
    assert second.dropped["duplicate"] == [] and second.dropped["small"] == []
    meta = read_metadata(out)
    assert meta["twin.png"]["labels"] == meta["a.png"]["labels"] and meta["twin.png"]["text"] == "the twin"
    assert os.path.isfile(os.path.join(out, "twin.png")) and scan_dataset(out, DIMS).problems == []


@pytest.mark.parametrize("text,message", [
    ("p1.png,color\n", "line 1 must have three columns"),
    ("file_name,dimension,label\np1.png,colour,superior\n", "line 2: 'colour' is not a dimension"),
    ("# comment\np1.png,color,better\n", "line 2: the label must be superior or inferior"),
    ("p1.png,*,superior\n", r"with dimension \* the label must be exclude or keep"),
])
def test_malformed_overrides_are_refused_in_one_sentence(tmp_path, text, message):
    path = str(tmp_path / "o.csv")
    open(path, "w").write(text)
    with pytest.raises(PrepareError, match=message) as e:
        read_overrides(path, DIMS)
    assert "\n" not in str(e.value)


# -- the output folder -------------------------------------------------------------------------------------
def test_dataset_names_are_unique_flat_and_stable():
    names = dataset_names(["a/b.png", "a__b.jpg", "x.png", "X.jpg", "x-2.png", "c/d/e.webp"])
    assert names["a/b.png"] == "a__b.png" and names["c/d/e.webp"] == "c__d__e.webp"
    stems = [os.path.splitext(n)[0].lower() for n in names.values()]
    assert len(set(stems)) == len(stems) and all("/" not in n for n in names.values())
    assert dataset_names(list(reversed(list(names)))) == names


@pytest.mark.parametrize("mode", ["symlink", "hardlink", "copy"])
def test_link_modes_and_switching_between_them(tmp_path, mode):
    inp, out = palette_folder(str(tmp_path / "in")), str(tmp_path / "out")
    before = tree_digest(inp)
    run(settings(inp, out, link_mode=mode))
    target, source = os.path.join(out, "p0.png"), os.path.join(inp, "p0.png")
    assert os.path.islink(target) == (mode == "symlink")
    assert os.path.samefile(target, source) == (mode != "copy")
    assert open(target, "rb").read() == open(source, "rb").read()
    other = "copy" if mode != "copy" else "symlink"
    result = run(settings(inp, out, link_mode=other))
    assert os.path.islink(target) == (other == "symlink") and len(result.names) == 8
    assert scan_dataset(out, DIMS).problems == [] and tree_digest(inp) == before


def test_output_folder_that_is_not_ours_or_inside_the_input_is_refused(tmp_path):
    inp = palette_folder(str(tmp_path / "in"))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep me")
    with pytest.raises(PrepareError, match="not empty and was not written by vmix prepare"):
        run(settings(inp, str(foreign)))
    assert os.listdir(foreign) == ["mine.txt"]
    with pytest.raises(PrepareError, match="must not contain each other"):
        run(settings(inp, os.path.join(inp, "dataset")))
    out = str(tmp_path / "out")
    run(settings(inp, out))
    open(os.path.join(out, "notes.txt"), "w").write("mine")
    with pytest.raises(PrepareError, match=r"holds 1 file\(s\) this tool did not write \(notes.txt\)"):
        run(settings(inp, out))
    assert open(os.path.join(out, "notes.txt")).read() == "mine"


def test_interrupted_placing_is_tidied_up_by_the_next_run(tmp_path, monkeypatch):
    from vmix_lib.prepare import output

    inp, out = palette_folder(str(tmp_path / "in")), str(tmp_path / "out")
    real, calls = output.DatasetFolder._place, []

    def flaky(self, name, source):
        calls.append(name)
        if len(calls) == 4:
            # the copy is half written when the interruption comes
            open(os.path.join(self.folder, "." + name + ".partial"), "wb").write(b"half")
            raise KeyboardInterrupt
        real(self, name, source)

    monkeypatch.setattr(output.DatasetFolder, "_place", flaky)
    with pytest.raises(KeyboardInterrupt):
        run(settings(inp, out, link_mode="copy"))
    monkeypatch.setattr(output.DatasetFolder, "_place", real)
    result = run(settings(inp, out, link_mode="copy"))
    assert len(result.names) == 8
    assert sorted(os.listdir(out)) == sorted(result.names + ["metadata.jsonl", "prepare", "review"])  # no partial file left
    assert scan_dataset(out, DIMS).problems == []


def test_the_trainers_formats_are_read_and_other_files_counted_by_extension(tmp_path):
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    caption(hsv_image(os.path.join(inp, "a.png"), 0.1, 0.5, 0.5), "a png")
    caption(hsv_image(os.path.join(inp, "sub", "b.bmp"), 0.6, 0.5, 0.5), "a bmp")
    for name in ("c.gif", "sub/d.GIF", "e.tiff", "README"):
        open(os.path.join(inp, name), "wb").close()
    open(os.path.join(inp, ".hidden.gif"), "wb").close()  # hidden files are not counted
    messages = []
    result = run_prepare(settings(inp, out), log=messages.append, progress=Quiet, clip=ColourClip())
    assert result.names == ["a.png", "sub__b.bmp"]
    line = ("skipped 4 file(s) that are not in an image format the trainer reads (.png, .jpg, .jpeg, .webp, .bmp): "
            ".gif 2, (no extension) 1, .tiff 1; convert them to include them")
    assert result.notes == [line] and messages.count(f"  note: {line}") == 1
    assert json.load(open(os.path.join(out, "prepare", "report.json")))["skipped_files"] == {".gif": 2, ".tiff": 1, "": 1}
    assert scan_dataset(out, DIMS).problems == []  # the trainer reads the .bmp
    only_gifs = str(tmp_path / "gifs")
    os.makedirs(only_gifs)
    open(os.path.join(only_gifs, "x.gif"), "wb").close()
    with pytest.raises(PrepareError) as e:
        run(settings(only_gifs, str(tmp_path / "out2")))
    assert str(e.value) == f"no images (.png, .jpg, .jpeg, .webp, .bmp) under {only_gifs}; skipped 1 other file(s): .gif 1"


def test_no_image_left_is_one_error(tmp_path):
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    os.makedirs(inp)
    for name in ("a.png", "b.jpg"):
        with open(os.path.join(inp, name), "wb") as f:
            f.write(b"not an image")
    messages = []
    with pytest.raises(PrepareError) as e:
        run_prepare(settings(inp, out), log=messages.append, progress=Quiet, clip=ColourClip())
    assert str(e.value) == (f"no image is left in the dataset: all 2 were dropped (the counts above; "
                            f"{os.path.join(out, 'review', 'index.html')} shows why each one was)")
    assert not any("warning" in m or "trainer:" in m for m in messages)
    assert os.path.isfile(os.path.join(out, "review", "index.html"))  # what the sentence points to


def test_the_trainer_advice_is_what_the_trainer_accepts(tmp_path):
    import tomllib

    from vmix_lib.prepare.run import trainer_settings
    from vmix_lib.train.config import resolve_config, settings_from_mapping

    base = ["--checkpoint", "m.safetensors", "--output-dir", "o"]
    s = settings_from_args([str(tmp_path / "in"), str(tmp_path / "my data"), "--dimensions", "focus,color"])
    flags, toml = trainer_settings(s)
    assert flags == ["--dataset-dir", str(tmp_path / "my data"), "--dimensions", "focus,color"]
    cfg, _ = resolve_config(base + flags)
    assert [d.name for d in cfg.dimensions] == ["focus", "color"] and cfg.dataset_dir == str(tmp_path / "my data")
    values, dims = settings_from_mapping(tomllib.loads(toml), "hint", None)
    assert values == {"dataset_dir": str(tmp_path / "my data")} and [d.name for d in dims] == ["focus", "color"]
    s = settings_from_args([str(tmp_path / "in"), "C:\\data\\out", "--probe", "warmth=a warm photo|a cold photo"])
    flags, toml = trainer_settings(s)  # a new dimension: only a config file can define it
    assert flags is None
    values, dims = settings_from_mapping(tomllib.loads(toml), "hint", None)
    assert values["dataset_dir"].endswith("C:\\data\\out") and [d.name for d in dims] == s.dimension_names


def test_images_without_captions_are_listed_and_left_out(tmp_path):
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    caption(hsv_image(os.path.join(inp, "with.png"), 0.1, 0.5, 0.5), "has one")
    hsv_image(os.path.join(inp, "sub", "without.png"), 0.6, 0.5, 0.5)
    open(os.path.join(inp, "sub", "empty.txt"), "w").close()
    hsv_image(os.path.join(inp, "empty.png"), 0.3, 0.5, 0.5)
    open(os.path.join(inp, "empty.txt"), "w").write("   \n")
    result = run(settings(inp, out))
    assert result.names == ["with.png"]
    assert sorted(rel for rel, _ in result.dropped["no_caption"]) == ["empty.png", "sub/without.png"]
    assert open(os.path.join(out, "prepare", "missing_captions.txt")).read() == "empty.png\nsub/without.png\n"
    assert scan_dataset(out, DIMS).problems == []


# -- review pages ---------------------------------------------------------------------------------------------
def test_review_pages_are_self_contained_and_sorted_by_score(tmp_path):
    inp, out = palette_folder(str(tmp_path / "in")), str(tmp_path / "out")
    run(settings(inp, out, rules={"color": Rule("quantile", 0.5)}, aesthetic_predictor=brightness_predictor(str(tmp_path / "a.pth"))))
    review = os.path.join(out, "review")
    assert sorted(os.listdir(review)) == ["color.html", "hist-aesthetic.png", "hist-color.png", "hist-lighting.png",
                                          "index.html", "lighting.html"]
    page = open(os.path.join(review, "color.html"), encoding="utf-8").read()
    import re

    sources = re.findall(r'src="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/") for s in sources)  # nothing outside the file
    assert "http" not in page.replace("http-equiv", "")
    sup, inf = page.split('class="col sup"')[1].split('class="col inf"')
    order_sup = re.findall(r'data-name="([^"]+)"', sup)
    order_inf = re.findall(r'data-name="([^"]+)"', inf)
    expected = [("" if k < 4 else "nested__deeper__") + n + ".png" for k, (n, *_) in enumerate(PALETTE)]
    by_sat = [expected[k] for k in sorted(range(8), key=lambda k: -PALETTE[k][2])]
    assert order_sup == by_sat[:4] and order_inf == by_sat[4:]
    assert "threshold <b>" in page and "superior (4)" in page
    index = open(os.path.join(review, "index.html"), encoding="utf-8").read()
    assert 'href="color.html"' in index and "in the dataset" in index
    for name in ("hist-color.png", "hist-aesthetic.png"):
        with Image.open(os.path.join(review, name)) as im:
            assert im.format == "PNG" and im.size[0] >= 300


def test_histogram_marks_the_threshold_with_pillow(tmp_path):
    path = histogram_png([0.1, 0.2, 0.2, 0.8, 0.9], 0.5, "x", str(tmp_path / "h.png"), use_matplotlib=False)
    with Image.open(path) as im:
        pixels = im.convert("RGB")
        colours = set(pixels.getdata())
    assert (58, 154, 85) in colours and (154, 160, 166) in colours and (204, 34, 34) in colours


def test_review_pages_sample_evenly_when_there_are_more_images_than_the_limit(tmp_path):
    inp, out = palette_folder(str(tmp_path / "in")), str(tmp_path / "out")
    run(settings(inp, out, review_limit=2, rules={"color": Rule("quantile", 0.5)}))
    page = open(os.path.join(out, "review", "color.html"), encoding="utf-8").read()
    assert page.count("<figure") == 4 and "showing 2, evenly spaced by rank" in page


# -- settings --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,message", [
    (["--quantile", "1.2"], "must be at least 0 and below 1"),
    (["--quantile", "0.5", "--margin", "0.1"], "give one global rule"),
    (["--quantile", "focus=0.5", "--margin", "focus=0.1"], "has two rules"),
    (["--quantile", "colour=0.5"], "is not a dimension being labelled"),
    (["--probe", "Warm=a|b"], "short lowercase identifier"),
    (["--dimensions", "color,warmth"], "no built-in probe phrases for dimension 'warmth'"),
    (["--dimensions", "color", "--probe", "warmth=a|b"], "which --dimensions does not list"),
    (["--min-aesthetic", "5"], "need the predictor"),
    (["--near-duplicates", "1.5"], "cosine between 0 and 1"),
    (["--top-aesthetic", "0", "--aesthetic-predictor", "x.pth"], "fraction of images to keep"),
    (["--threads", "-1"], "--threads must be at least 0"),
])
def test_bad_settings_are_one_sentence(argv, message):
    with pytest.raises(PrepareError, match=message) as e:
        settings_from_args(["in", "out"] + argv)
    assert "\n" not in str(e.value)


def test_default_settings_label_the_six_dimensions():
    s = settings_from_args(["in", "out"])
    assert s.dimension_names == ["color", "lighting", "composition", "focus", "texture", "emotion"]
    assert s.rule("focus") == Rule("quantile", 0.7) and s.near_duplicate == 0.95 and s.link_mode == "symlink"
    s = settings_from_args(["in", "out", "--probe", "warmth=a warm photo|a cold photo", "--near-duplicates", "off"])
    assert s.dimension_names[-1] == "warmth" and len(s.dimension_names) == 7 and s.near_duplicate is None
    assert threshold(torch.tensor([0.1, 0.2, 0.3, 0.4]), Rule("margin", 0.5)) == 0.75


def test_record_file_survives_a_line_cut_by_an_interruption(tmp_path):
    from vmix_lib.prepare.records import RecordFile

    path = str(tmp_path / "r.jsonl")
    records = RecordFile(path, flush_every=2)
    records.put("a", {"v": 1})
    records.put("b", {"v": 2})  # flushed
    records.put("c", {"v": 3})  # pending: lost by the "interruption"
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"key": "d", "val')  # a line cut short
    again = RecordFile(path)
    assert again.records == {"a": {"v": 1}, "b": {"v": 2}}
    again.put("e", {"v": 5})
    again.flush()
    assert RecordFile(path).records == {"a": {"v": 1}, "b": {"v": 2}, "e": {"v": 5}}
