"""python -m vmix_lib.evaluate: prompts, settings, metrics against hand computations and torchmetrics,
the offline path end to end on a tiny random SD1.5-layout checkpoint, folders, the report, resume."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from vmix_lib.evaluate import metrics
from vmix_lib.evaluate.cli import main
from vmix_lib.evaluate.errors import EvaluationError
from vmix_lib.evaluate.prompts import MJHQ_CATEGORIES, builtin_prompts, load_prompts
from vmix_lib.evaluate.settings import AdapterRef, build_settings, parse_lambdas
from vmix_lib.scoring.tiny import write_random_predictor


@pytest.fixture(scope="module")
def predictor_file(tmp_path_factory):
    return write_random_predictor(str(tmp_path_factory.mktemp("aes") / "sac+logos+ava1-l14-linearMSE.pth"))


def _pictures(n, seed=0, size=(40, 30)):
    g = np.random.default_rng(seed)
    return [Image.fromarray(g.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


# -- prompts -----------------------------------------------------------------------------------
def test_builtin_prompts_cover_the_mjhq_categories():
    prompts = builtin_prompts()
    assert len(prompts) == 40 and len({p.id for p in prompts}) == 40 and len({p.text for p in prompts}) == 40
    assert {p.category for p in prompts} == set(MJHQ_CATEGORIES)
    assert all(sum(p.category == c for p in prompts) == 4 for c in MJHQ_CATEGORIES)
    assert [p.category for p in load_prompts("builtin", ["food"])] == ["food"] * 4


def test_mjhq_meta_category_filter_and_seeded_sample(tmp_path):
    meta = {f"{i:04x}": {"category": MJHQ_CATEGORIES[i % 10], "prompt": f"prompt {i}"} for i in range(200)}
    path = tmp_path / "meta_data.json"
    path.write_text(json.dumps(meta))
    people = load_prompts(str(path), ["people"])
    assert len(people) == 20 and all(p.category == "people" for p in people)
    a, b, c = (load_prompts(str(path), ["people", "food"], limit=7, seed=s) for s in (1, 1, 2))
    assert a == b and a != c and len(a) == 7 and {p.category for p in a} <= {"people", "food"}
    assert a[0].text == meta[a[0].id]["prompt"]
    with pytest.raises(EvaluationError, match="category 'cats' is not in meta_data.json"):
        load_prompts(str(path), ["cats"])
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(EvaluationError, match="is not in MJHQ-30K's meta_data.json layout"):
        load_prompts(str(bad))
    text = tmp_path / "prompts.txt"
    text.write_text("# my prompts\na cat\n\n  a dog  \n")
    assert [p.text for p in load_prompts(str(text))] == ["a cat", "a dog"]
    with pytest.raises(EvaluationError, match="does not exist"):
        load_prompts(str(tmp_path / "none.txt"))


# -- settings ----------------------------------------------------------------------------------
def test_settings_off_lambdas_dimensions_and_several_adapters():
    ref = AdapterRef("a", None, ("color", "lighting", "emotion"))
    names = [s.name for s in build_settings([ref], parse_lambdas("0,0.5,1,1.5,2"), ["all", "none", "each"])]
    assert names == ["off", "λ=0", "λ=0.5", "λ=1", "λ=1.5", "λ=2", "dims=all λ=1", "dims=none λ=1",
                     "dims=color λ=1", "dims=lighting λ=1", "dims=emotion λ=1"]
    each = {s.label: s.alpha_dict for s in build_settings([ref], [], ["each"], include_off=False)}
    assert each["lighting"] == {"color": 0.0, "lighting": 1.0, "emotion": 0.0}
    two = build_settings([ref, AdapterRef("b", None, ("color",))], [1.0], ["color"])
    assert [s.name for s in two] == ["off", "a λ=1", "a dims=color λ=1", "b λ=1", "b dims=color λ=1"]
    assert len({s.slug for s in two}) == len(two)
    with pytest.raises(EvaluationError, match="'texture' is neither all, none, each nor a dimension of adapter 'a'"):
        build_settings([ref], [1.0], ["texture"])
    with pytest.raises(EvaluationError, match="dimensions are unknown"):
        build_settings([AdapterRef("webui_name")], [1.0], ["each"])
    with pytest.raises(EvaluationError, match="outside 0 – 3"):
        parse_lambdas("0,4")
    with pytest.raises(EvaluationError, match="'x' is not a number"):
        parse_lambdas("1,x")


# -- metrics -----------------------------------------------------------------------------------
def test_clip_score_equals_torchmetrics_clipscore(clip):
    images = _pictures(5)
    long_prompt = "cat dog red " * 40  # > 77 tokens: the end token must be kept (torchmetrics#2883)
    texts = ["a cat", "a red dog", long_prompt, "sks", "a dog on a cat"]
    ours = metrics.clip_scores(clip.embed_images(images), clip.embed_texts(texts))
    tm = metrics.torchmetrics_clip_score(clip)
    for image, text, score in zip(images, texts, ours):  # per image
        tm.reset()
        tm.update([metrics.pil_to_uint8(image)], [text])
        assert float(tm.compute()) == pytest.approx(max(float(score), 0.0), abs=1e-4)
    tm.reset()
    tm.update([metrics.pil_to_uint8(i) for i in images], texts)
    assert float(tm.compute()) == pytest.approx(metrics.clip_score_of_mean(float(ours.mean())), abs=1e-4)
    # by hand: 100 · cos of the model's own projected features
    with torch.no_grad():
        pixels = clip.image_processor(images=images, return_tensors="pt")["pixel_values"]
        img = clip.model.get_image_features(pixel_values=pixels).pooler_output
    assert torch.allclose(ours, 100 * torch.nn.functional.cosine_similarity(img, clip.embed_texts(texts), dim=-1), atol=1e-3)


def test_clip_score_mean_is_clamped_after_averaging():
    assert metrics.clip_score_of_mean(-0.5) == 0.0 and metrics.clip_score_of_mean(3.0) == 3.0
    est = metrics.bootstrap([-3.0, 1.0, 1.0], clamp_at_zero=True)  # mean −1/3 → 0, as CLIPScore.compute
    assert est.mean == 0.0 and est.low == 0.0
    assert metrics.bootstrap([-3.0, 5.0], clamp_at_zero=False).mean == 1.0


def test_bootstrap_interval():
    values = [1.0, 2.0, 3.0, 4.0, 10.0]
    est = metrics.bootstrap(values, resamples=4000, seed=3)
    assert est.mean == 4.0 and est.n == 5
    assert min(values) <= est.low < est.mean < est.high <= max(values)
    # by hand: the same resamples with numpy, percentile 2.5 / 97.5
    rng = np.random.default_rng(3)
    means = np.asarray(values)[rng.integers(0, 5, size=(4000, 5))].mean(axis=1)
    assert (est.low, est.high) == (float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5)))
    assert metrics.bootstrap([2.0, 2.0, 2.0]).to_json() == {"mean": 2.0, "ci95": [2.0, 2.0], "n": 3}
    assert metrics.bootstrap([float("nan")]).n == 0


def _fid_by_hand(a, b):
    a, b = a.double().numpy(), b.double().numpy()
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)  # tr sqrt(S1 S2) = tr sqrt(S1^½ S2 S1^½)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(inner, 0, None)).sum())


def _kid_by_hand(x, y, degree=3, coef=1.0):
    x, y = x.double().numpy(), y.double().numpy()
    gamma = 1.0 / x.shape[1]
    k = lambda a, b: (gamma * a @ b.T + coef) ** degree
    m = x.shape[0]
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean())


def test_fid_and_kid_from_cached_features_match_hand_computations():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(300, 8, generator=g)
    fake = torch.randn(300, 8, generator=g) * 1.3 + 0.4
    assert metrics.frechet_distance(real, fake) == pytest.approx(_fid_by_hand(real, fake), rel=1e-6)
    assert metrics.frechet_distance(real, real) == pytest.approx(0.0, abs=1e-6)
    mean, std, size = metrics.kernel_distance(real, fake, subsets=3)  # subset = all 300: no sampling
    assert size == 300 and mean == pytest.approx(_kid_by_hand(real, fake), rel=1e-6) and std == pytest.approx(0.0, abs=1e-9)
    small = metrics.distances(real[:50], fake[:40])
    assert small["kid_subset"] == 40 and "fewer than 2000 images" in small["note"]
    assert metrics.distances(real[:1], fake)["note"] == "needs at least 2 images on each side"


def test_inception_features_need_torch_fidelity(monkeypatch):
    import importlib.util

    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch_fidelity" else real_find(name, *a))
    with pytest.raises(EvaluationError, match="needs torch-fidelity and torchvision"):
        metrics.InceptionFeatures("weights.pth")


# -- the pictures of the report -------------------------------------------------------------------
def _no_two_overlap(boxes):
    overlap = lambda a, b: a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
    placed = [b for b in boxes if b is not None]
    return all(not overlap(a, b) for i, a in enumerate(placed) for b in placed[i + 1:])


def test_lambda_labels_are_placed_where_no_other_label_marker_or_legend_is():
    from vmix_lib.evaluate.report import _overlap, place_labels

    frame, legend = (0, 0, 300, 200), (200, 0, 300, 30)
    apart = [(40, 100), (120, 60), (200, 150)]
    assert place_labels(apart, [(30, 12)] * 3, frame, [legend]) == [(46, 87, 76, 99), (126, 47, 156, 59), (206, 137, 236, 149)]
    crowded = [(100 + 2 * k, 100 - k) for k in range(6)] + [(290, 5), (250, 20)]  # λ points a few pixels apart; the corner
    boxes = place_labels(crowded, [(40, 12)] * len(crowded), frame, [legend])
    assert _no_two_overlap(boxes) and [b is None for b in boxes] == [False] * 6 + [True, False]  # no room under the legend
    markers = [(x - 4, y - 4, x + 4, y + 4) for x, y in crowded]
    for box in filter(None, boxes):
        assert not any(_overlap(box, m) for m in markers + [legend])
        assert frame[0] <= box[0] and box[2] <= frame[2] and frame[1] <= box[1] and box[3] <= frame[3]


def test_tradeoff_plot_labels_of_close_lambdas_do_not_overprint(tmp_path):
    """Five λ of nearly one Aes/CLIP score (a weak adapter): the Pillow plot's label boxes are disjoint."""
    from PIL import ImageDraw

    from vmix_lib.evaluate import report
    from vmix_lib.scoring.images import label_font

    m = lambda v: {"mean": v, "ci95": [v - 0.01, v + 0.01]}
    series = [{"name": "", "group": "offline", "baseline": (m(30.0), m(5.0)),
               "points": [(lam, f"λ={lam:g}", m(30.0 + 0.001 * k), m(5.0 + 0.002 * k)) for k, lam in enumerate((0, 0.5, 1, 1.5, 2))]}]
    draw = ImageDraw.Draw(Image.new("RGB", (760, 520)))
    draw.font = label_font()
    frame = (70, 40, 730, 465)
    xy = lambda x, y: (70 + (x - 29.9) / 0.3 * 660, 465 - (y - 4.9) / 0.3 * 425)
    labels, boxes = report.tradeoff_label_boxes(series, xy, draw, frame)
    assert [t for _, _, t in labels] == ["off", "λ=0", "λ=0.5", "λ=1", "λ=1.5", "λ=2"]
    assert boxes[0] is not None and _no_two_overlap(boxes)
    assert report.plot_tradeoff(series, str(tmp_path / "t.png")) == str(tmp_path / "t.png")


def test_tradeoff_plot_labels_do_not_overprint_with_matplotlib(tmp_path, monkeypatch):
    plt = pytest.importorskip("matplotlib.pyplot")
    from vmix_lib.evaluate import report

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to measure its labels
    m = lambda v: {"mean": v, "ci95": [v - 0.01, v + 0.01]}
    series = [{"name": name, "group": "offline", "baseline": (m(30.0), m(5.0)),
               "points": [(lam, f"λ={lam:g}", m(30.0 + sign * 0.001 * k), m(5.0 + 0.002 * k)) for k, lam in enumerate((0, 0.5, 1, 1.5, 2))]}
              for name, sign in (("a", 1), ("b", -1))]
    report.plot_tradeoff(series, str(tmp_path / "t.png"))
    fig = figures[0]
    renderer = fig.canvas.get_renderer()
    texts = fig.axes[0].texts
    boxes = [tuple(t.get_window_extent(renderer).extents) for t in texts]
    assert "off" in [t.get_text() for t in texts] and len(texts) >= 6 and _no_two_overlap(boxes)


def test_probe_cells_are_marked_only_when_the_printed_interval_leaves_0():
    """0.000 [0.000, 0.000] was marked green (its unprinted lower end was above 0)."""
    from vmix_lib.evaluate.report import interval_class

    cell = lambda low, high: {"mean": (low + high) / 2, "ci95": [low, high], "n": 8}
    assert interval_class(cell(0.0002, 0.0004)) == "" and interval_class(cell(-0.0004, -0.0001)) == ""
    assert interval_class(cell(0.0012, 0.004)) == "pos" and interval_class(cell(-0.004, -0.0006)) == "neg"
    assert interval_class(cell(-0.01, 0.02)) == "" and interval_class(None) == "" and interval_class(cell(0.0002, 0.0004), 4) == "pos"
    assert interval_class({"mean": None, "ci95": [None, None]}) == ""


# -- image folders, the report, the CLI --------------------------------------------------------
def _folder(path, images, prompts, jsonl=False):
    os.makedirs(path, exist_ok=True)
    rows = []
    for i, (image, prompt) in enumerate(zip(images, prompts)):
        image.save(os.path.join(path, f"{i:03d}.png"))
        if jsonl:
            rows.append(json.dumps({"file_name": f"{i:03d}.png", "text": prompt}))
        else:
            with open(os.path.join(path, f"{i:03d}.txt"), "w") as f:
                f.write(prompt)
    if jsonl:
        with open(os.path.join(path, "metadata.jsonl"), "w") as f:
            f.write("\n".join(rows) + "\n")
    return str(path)


def test_folders_are_scored_and_paired_by_file_name(tmp_path, clip, clip_dir, predictor_file, capsys):
    from vmix_lib.scoring.aesthetic import load_aesthetic_predictor
    from vmix_lib.scoring.probes import default_probes, probe_scores

    prompts = ["a cat", "a red dog", "a car", "a house"]
    base, other = _pictures(4, seed=1), _pictures(4, seed=2)
    off = _folder(tmp_path / "off", base, prompts)
    vm = _folder(tmp_path / "vmix", other[:2] + base[2:], prompts, jsonl=True)
    ref = _folder(tmp_path / "ref", _pictures(6, seed=3), ["x"] * 6)
    out = tmp_path / "out"
    assert main(["--images", f"off={off}", "--images", f"vmix={vm}", "--clip", clip_dir, "--aesthetic-predictor", predictor_file,
                 "--reference", ref, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "report:" in printed and "vmix" in printed
    data = json.load(open(out / "results" / "results.json"))
    rows = {(r["setting"], r["prompt_id"]): r for r in data["images"]}
    # by hand: Aes = predictor(unit CLIP embedding); CLIP score = 100 cos; shift and content vs the off image
    predictor = load_aesthetic_predictor(predictor_file)
    emb = {k: clip.embed_images([im])[0] for k, im in (("b1", base[1]), ("o1", other[1]))}
    txt = clip.embed_texts(["a red dog"])[0]
    r = rows[("vmix", "001")]
    assert r["aes"] == pytest.approx(float(predictor(emb["o1"][None])), abs=1e-4)
    assert r["clip_score"] == pytest.approx(float(100 * emb["o1"] @ txt), abs=1e-3)
    assert r["content_similarity"] == pytest.approx(float(emb["o1"] @ emb["b1"]), abs=1e-5)
    probes = default_probes()
    p_o, p_b = (probe_scores(clip, emb[k][None], probes) for k in ("o1", "b1"))
    assert r["shift_color"] == pytest.approx(float(p_o["color"][0] - p_b["color"][0]), abs=1e-5)
    assert rows[("vmix", "002")]["content_similarity"] == pytest.approx(1.0, abs=1e-5)  # same picture
    summary = {s["setting"]: s for s in data["settings"]}
    assert summary["vmix"]["images"] == 4 and summary["vmix"]["distance"]["n_real"] == 6
    assert data["clip_score_check"]["agree"] is True
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "http://" not in html and "https://" not in html and html.count("data:image/") >= 9  # plot-free here: grid + 8 thumbs
    assert (out / "grid.png").is_file() and (out / "results" / "per_image.csv").is_file()
    header = open(out / "results" / "per_setting.csv").readline().strip().split(",")
    assert {"aes", "aes_ci_low", "aes_ci_high", "clip_score", "fid", "kid"} <= set(header)
    # a folder image without a prompt: one sentence
    Image.new("RGB", (8, 8)).save(tmp_path / "off" / "zzz.png")
    assert main(["--images", f"off={off}", "--clip", clip_dir, "--out", str(out)]) == 1
    assert capsys.readouterr().err.strip() == (f"VMix evaluation: 1 image(s) in {off} have no prompt (first: zzz.png); put NAME.txt "
                                               "beside each image or list them in metadata.jsonl.")


def test_malformed_predictor_and_missing_clip_are_one_sentence(tmp_path, clip_dir, capsys):
    folder = _folder(tmp_path / "f", _pictures(2), ["a", "b"])
    bad = tmp_path / "aes.pth"
    torch.save({"layers.0.weight": torch.zeros(3, 3)}, bad)
    assert main(["--images", folder, "--clip", clip_dir, "--aesthetic", str(bad), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("VMix evaluation: aesthetic predictor aes.pth does not have the LAION predictor's layers")
    assert main(["--images", folder, "--clip", str(tmp_path / "no-clip"), "--out", str(tmp_path / "o")]) == 1
    assert capsys.readouterr().err.strip() == (f"VMix evaluation: the CLIP folder {tmp_path / 'no-clip'} does not exist; name a "
                                               "folder with config.json and the weights, or a hub id such as openai/clip-vit-large-patch14.")


def test_a_prepare_output_as_reference_counts_only_its_dataset_images(tmp_path, clip_dir, capsys):
    """vmix prepare's output holds review/ histograms beside the dataset: FID/KID compare with the
    images metadata.jsonl lists, and one line says what was counted and what was skipped."""
    from test_prepare import palette_folder, run, settings

    dataset = str(tmp_path / "dataset")
    run(settings(palette_folder(str(tmp_path / "pictures")), dataset))
    assert sorted(os.listdir(os.path.join(dataset, "review"))).count("hist-color.png") == 1  # what was counted before
    folder = _folder(tmp_path / "f", _pictures(3), ["a", "b", "c"])
    out = tmp_path / "o"
    assert main(["--images", folder, "--clip", clip_dir, "--reference", dataset, "--out", str(out)]) == 0
    line = (f"reference {dataset}: 8 image(s) that metadata.jsonl lists; skipped 2 image file(s) it does not list "
            "(review/: 2)")
    assert line in capsys.readouterr().err.splitlines()
    data = json.load(open(out / "results" / "results.json"))
    assert data["reference_images"] == line and data["settings"][0]["distance"]["n_real"] == 8
    assert f"against the {line}." in (out / "report.html").read_text(encoding="utf-8")
    # before metadata.jsonl is written (an interrupted prepare): every image but prepare's own folders
    os.remove(os.path.join(dataset, "metadata.jsonl"))
    from vmix_lib.evaluate.sources import read_reference_folder

    found = read_reference_folder(dataset)
    assert len(found.paths) == 8 and found.description == (
        f"reference {dataset}: 8 image(s); skipped 2 image file(s) of vmix prepare's own folders (review/: 2)")


def test_aesthetic_predictor_is_the_flag_of_prepare_and_aesthetic_a_hidden_alias():
    from vmix_lib.evaluate.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["--aesthetic-predictor", "a.pth"]).aesthetic_predictor == "a.pth"
    assert parser.parse_args(["--aesthetic", "b.pth"]).aesthetic_predictor == "b.pth"
    flags = {f for action in parser._actions if action.help != "==SUPPRESS==" for f in action.option_strings}
    assert "--aesthetic-predictor" in flags and "--aesthetic" not in flags and "--no-clip" in flags


def test_no_clip_scores_fid_on_inception_features_and_names_what_was_not_computed(tmp_path, monkeypatch, capsys):
    """--no-clip: no CLIP is loaded; FID/KID on Inception features (a stand-in here: torch-fidelity is
    not a test requirement); the report says which metrics were not computed instead of showing none."""
    import vmix_lib.scoring.clip

    class MeanColour:  # InceptionFeatures' interface: features = per-channel means and spreads
        identity = "mean-colour-1"

        def __init__(self, weights, device):
            assert weights == "weights.pth"

        @staticmethod
        def pixel_values(images):
            return torch.stack([metrics.pil_to_uint8(i).float() for i in images])

        def embed_pixels(self, pixels):
            return torch.cat([pixels.mean(dim=(2, 3)), pixels.std(dim=(2, 3))], dim=1)

    monkeypatch.setattr(metrics, "InceptionFeatures", MeanColour)
    monkeypatch.setattr(vmix_lib.scoring.clip, "load_clip", lambda *a, **k: pytest.fail("CLIP was loaded"))
    off = _folder(tmp_path / "off", _pictures(4, seed=1), ["a", "b", "c", "d"])
    vm = _folder(tmp_path / "vmix", _pictures(4, seed=2), ["a", "b", "c", "d"])
    ref = _folder(tmp_path / "ref", _pictures(5, seed=3), ["x"] * 5)
    out = tmp_path / "out"
    base = ["--images", f"off={off}", "--images", f"vmix={vm}", "--no-clip", "--out", str(out)]
    assert main(base + ["--reference", ref, "--fid-features", "inception", "--inception-weights", "weights.pth"]) == 0
    captured = capsys.readouterr()
    not_computed = "scored without CLIP (--no-clip): CLIP score, Aes score, probes and content kept were not computed"
    assert f"note: {not_computed}" in captured.err.splitlines()
    assert captured.out.splitlines()[0].split() == ["setting", "n", "FID", "(KID)"]  # no empty metric columns
    data = json.load(open(out / "results" / "results.json"))
    assert data["clip"] is None and not_computed in data["notes"]
    for s in data["settings"]:
        assert not {"aes", "clip_score", "content_similarity"} & set(s) and s["distance"]["fid"] is not None
        assert s["distance"]["features"].startswith("Inception")
    html = (out / "report.html").read_text(encoding="utf-8")
    assert not_computed in html and "<th>CLIP score</th>" not in html and "<th>Aes score</th>" not in html
    # what --no-clip cannot do is one sentence, before anything is made
    for extra, message in (
        ([], "nothing to measure without CLIP: give --reference with --fid-features inception for FID/KID, or make the "
             "images alone with --generate-only"),
        (["--aesthetic-predictor", "aes.pth"], "the Aes score is computed on CLIP ViT-L/14 image embeddings, so "
             "--aesthetic-predictor needs CLIP: give a CLIP model (--clip) instead of --no-clip, or drop --aesthetic-predictor"),
        (["--reference", ref], "FID/KID on CLIP features needs CLIP; with --no-clip use --fid-features inception (and --inception-weights)"),
        (["--probe", "warm=warm|cold"], "probes are CLIP zero-shot scores, so --probe needs CLIP; drop --no-clip or --probe"),
        (["--clip", "somewhere"], "--no-clip and --clip somewhere contradict each other; give one of them"),
    ):
        assert main(base[:-1] + [str(tmp_path / "o2")] + extra) == 1
        assert capsys.readouterr().err.strip() == f"VMix evaluation: {message}."
        assert not (tmp_path / "o2").exists()


# -- offline, end to end ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny random SD1.5-layout checkpoint and a live adapter for it, written as the trainer writes
    an adapter for a custom-layout UNet (vmix_lib/train/run.py _save_custom_layout_adapter)."""
    from vmix_lib.dimensions import DEFAULT_DIMENSIONS
    from vmix_lib.mixing import VMixAdapter, build_aes_emb
    from vmix_lib.train.checkpoint_loading import load_base_model
    from vmix_lib.train.run import _save_custom_layout_adapter
    from vmix_lib.train.text import TextConditioner
    from vmix_lib.train.tiny_models import write_tiny_model

    folder = tmp_path_factory.mktemp("tiny")
    checkpoint, configs, tokenizer = write_tiny_model(str(folder / "model"))
    base = load_base_model(checkpoint, "auto", configs, None, tokenizer)
    aes_emb = build_aes_emb(TextConditioner("sd15", base.tokenizers, base.text_encoders).pooled, DEFAULT_DIMENSIONS)
    torch.manual_seed(0)
    adapter = VMixAdapter.for_unet(base.unet, aes_emb, "sd15", DEFAULT_DIMENSIONS)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a trained adapter's branch is not zero
        adapter.projection.out.weight.copy_(torch.randn(adapter.context_dim, adapter.context_dim, generator=g))
        for name in adapter.layer_names:
            adapter.value(name).weight.mul_(20)
    path = str(folder / "tiny-adapter.safetensors")
    _save_custom_layout_adapter(adapter, path, {"steps": 0}, torch.float32)
    return checkpoint, configs, tokenizer, path


def test_custom_layout_adapters_load_only_against_the_unets_layers(tiny_model):
    from vmix_lib.adapter_file import AdapterError, load_adapter
    from vmix_lib.layers import find_cross_attention_layers
    from vmix_lib.train.tiny_models import build_tiny_models

    path = tiny_model[3]
    with pytest.raises(AdapterError, match="says context width 32, but SD1.5 uses 768"):
        load_adapter(path)  # the WebUI's loader keeps refusing it
    unet = build_tiny_models("sd15")[0]
    layers = {l.name: l.inner_dim for l in find_cross_attention_layers(unet)}
    adapter = load_adapter(path, layers=layers)
    assert adapter.layer_names == list(layers) and adapter.context_dim == 32
    wrong = dict(layers, **{next(iter(layers)): 999})
    with pytest.raises(AdapterError, match="of shape"):
        load_adapter(path, layers=wrong)


def test_offline_end_to_end_on_a_tiny_checkpoint(tmp_path, tiny_model, clip_dir, predictor_file, capsys, monkeypatch):
    checkpoint, configs, tokenizer, adapter = tiny_model
    out = tmp_path / "eval"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na red dog\n")
    args = ["--offline", checkpoint, "--model-config-dir", configs, "--tokenizer-dir", tokenizer, "--adapter", adapter,
            "--lambdas", "0,1", "--dimensions", "none", "--prompts", str(prompts), "--steps", "3", "--width", "32",
            "--height", "32", "--clip", clip_dir, "--aesthetic-predictor", predictor_file, "--out", str(out), "--device", "cpu"]
    assert main(args + ["--scheduler", "ddim"]) == 0
    printed = capsys.readouterr().out
    assert "λ=0 vs off: 2/2 images identical pixel for pixel" in printed
    data = json.load(open(out / "results" / "results.json"))
    assert [s["setting"] for s in data["settings"]] == ["off", "λ=0", "λ=1", "dims=none λ=1"]
    assert data["generation"] == {"made": 8, "failed": 0, "existing": 0} and not data["failures"]
    files = sorted(os.path.relpath(os.path.join(d, f), out / "images") for d, _, fs in os.walk(out / "images") for f in fs)
    assert files == [f"{s}/p{i:05d}-s{i}.png" for s in ("dimsnone-lambda1", "lambda0", "lambda1", "off") for i in (0, 1)]
    off, one = (np.asarray(Image.open(out / "images" / s / "p00000-s0.png")) for s in ("off", "lambda1"))
    assert off.shape == (32, 32, 3) and np.abs(off.astype(int) - one.astype(int)).max() > 0  # the adapter acts
    for name in ("tradeoff.png", "grid.png", "report.html", "results/per_image.csv"):
        assert (out / name).is_file()
    # Rerun: every image exists, nothing is generated (the sampler is never called) and nothing re-encoded.
    from vmix_lib.evaluate.offline import OfflineSource

    monkeypatch.setattr(OfflineSource, "generate", lambda *a: pytest.fail("an existing image was made again"))
    from vmix_lib.evaluate.cli import build_parser, options_from_args
    from vmix_lib.evaluate.run import evaluate

    again = evaluate(options_from_args(build_parser().parse_args(args)), log=lambda m: None)
    assert again["generation"] == {"made": 0, "failed": 0, "existing": 8} and again["timing"]["features_computed"] == 0
    assert [s["clip_score"] for s in again["settings"]] == [s["clip_score"] for s in data["settings"]]


@pytest.mark.parametrize("scheduler", ["euler", "dpm++"])
def test_offline_schedulers_and_seeds(tmp_path, tiny_model, scheduler):
    from vmix_lib.evaluate.offline import OfflineSource
    from vmix_lib.evaluate.settings import Setting, adapter_ref
    from vmix_lib.evaluate.webui_client import GenerationParams

    checkpoint, configs, tokenizer, adapter = tiny_model
    ref = adapter_ref(adapter)
    source = OfflineSource(checkpoint, GenerationParams(steps=3, width=32, height=32), scheduler, configs, tokenizer, device="cpu")
    on = Setting("λ=1", ref, 1.0, None, "lambda")
    source.prepare([Setting("off"), on])
    a, _ = source.generate("a cat", 5, Setting("off"))
    b, _ = source.generate("a cat", 5, Setting("off"))
    c, _ = source.generate("a cat", 6, Setting("off"))
    d, _ = source.generate("a cat", 5, Setting("λ=0", ref, 0.0, None, "lambda"))
    e, _ = source.generate("a cat", 5, on)
    source.close()
    arr = lambda im: np.asarray(im).astype(int)
    assert np.array_equal(arr(a), arr(b)) and np.array_equal(arr(a), arr(d))  # same seed; λ = 0 is VMix off
    assert not np.array_equal(arr(a), arr(c)) and not np.array_equal(arr(a), arr(e))


def test_offline_two_adapters_each_act_as_when_alone(tmp_path, tiny_model):
    """Several adapters in one offline evaluation: each one's images differ from off and equal its own
    single-adapter run (installing the second adapter once stripped the first one's hooks, so the
    first gave VMix-off pictures and a report of 'no effect')."""
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    from vmix_lib.evaluate.offline import OfflineSource
    from vmix_lib.evaluate.settings import Setting, adapter_ref
    from vmix_lib.evaluate.webui_client import GenerationParams

    checkpoint, configs, tokenizer, first = tiny_model
    second = str(tmp_path / "other-adapter.safetensors")
    with safe_open(first, "pt") as f:
        metadata = f.metadata()
    tensors = {k: (-v if k.startswith("values.") else v) for k, v in load_file(first).items()}
    save_file(tensors, second, metadata=metadata)
    params = GenerationParams(steps=3, width=32, height=32)
    refs = {"a": adapter_ref(first), "b": adapter_ref(second)}
    on = {k: Setting(f"{k} λ=2", ref, 2.0, None, "lambda") for k, ref in refs.items()}
    arr = lambda im: np.asarray(im).astype(int)

    def images(settings, order):
        source = OfflineSource(checkpoint, params, "ddim", configs, tokenizer, device="cpu")
        source.prepare([Setting("off"), *settings])
        try:
            return {key: arr(source.generate("a cat", 5, setting)[0]) for key, setting in order}
        finally:
            source.close()

    alone = {k: images([s], [(k, s)])[k] for k, s in on.items()}
    both = images([on["a"], on["b"]], [("off", Setting("off")), ("a", on["a"]), ("b", on["b"]), ("a again", on["a"])])
    assert not np.array_equal(alone["a"], alone["b"])
    for key in ("a", "b"):
        assert not np.array_equal(both[key], both["off"]), f"adapter {key} did nothing"
        assert np.array_equal(both[key], alone[key])
    assert np.array_equal(both["a again"], alone["a"])


def test_offline_errors_are_one_sentence(tmp_path, tiny_model, clip_dir, capsys):
    checkpoint, configs, tokenizer, adapter = tiny_model
    base = ["--offline", checkpoint, "--model-config-dir", configs, "--tokenizer-dir", tokenizer, "--clip", clip_dir,
            "--out", str(tmp_path / "o"), "--limit", "1", "--steps", "2"]
    assert main(base + ["--width", "36", "--height", "32"]) == 1
    assert capsys.readouterr().err.strip().endswith("--width 36 must be a multiple of 8 for this model.")
    assert main(base + ["--adapter", "just_a_name", "--width", "32", "--height", "32"]) == 1
    assert "needs its file for offline generation" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(base + ["--precision", "bf16", "--width", "32", "--height", "32"]) == 1
        assert capsys.readouterr().err.strip().endswith("--precision bf16 needs a CUDA GPU; on the CPU sampling runs in fp32 (use auto or fp32).")
    assert main(["--offline", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "o"), "--clip", clip_dir]) == 1
    assert capsys.readouterr().err.strip() == f"VMix evaluation: checkpoint {tmp_path / 'nope.safetensors'} does not exist."


def test_every_input_is_checked_before_the_model_loads_or_any_image_is_made(tmp_path, tiny_model, clip_dir, monkeypatch, capsys):
    """An image-less reference folder, a bad size, a predictor folder...: one sentence before the
    checkpoint is loaded (an empty reference was found only after every image was made)."""
    from vmix_lib.evaluate.offline import OfflineSource

    checkpoint, configs, tokenizer, adapter = tiny_model
    monkeypatch.setattr(OfflineSource, "prepare", lambda *a: pytest.fail("the checkpoint was loaded"))
    monkeypatch.setattr(OfflineSource, "generate", lambda *a: pytest.fail("an image was made"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README.txt").write_text("no pictures here")
    out = tmp_path / "o"
    base = ["--offline", checkpoint, "--model-config-dir", configs, "--tokenizer-dir", tokenizer, "--adapter", adapter,
            "--clip", clip_dir, "--limit", "1", "--steps", "2", "--height", "32", "--out", str(out)]
    for extra, message in (
        (["--reference", str(empty)], f"reference folder {empty} holds no .png, .jpg or .webp images"),
        (["--reference", str(tmp_path / "none")], f"--reference {tmp_path / 'none'} is not a folder; name the folder of the reference images"),
        (["--width", "36"], "--width 36 must be a multiple of 8 for this model"),
        (["--cache-dir", str(empty / "README.txt")], f"--cache-dir {empty / 'README.txt'} is a file; name a folder"),
        (["--baseline", "of"], "--baseline 'of' is not a setting of this run (settings: off, λ=0, λ=0.5, λ=1, λ=1.5, λ=2)"),
        (["--aesthetic-predictor", str(empty)], f"aesthetic predictor {empty} is a folder; name the predictor file itself, a .pth "
                                                 "or .safetensors file such as sac+logos+ava1-l14-linearMSE.pth"),
    ):
        assert main(base + ["--width", "32"] + extra) == 1, extra
        assert capsys.readouterr().err.strip() == f"VMix evaluation: {message}."
        assert not out.exists()


def test_adapters_of_one_name_from_two_folders_are_told_apart_offline(tmp_path, tiny_model, capsys):
    """run1/vmix.safetensors and run2/vmix.safetensors: offline they are 'run1/vmix' and 'run2/vmix'
    (the refusal named the first adapter only); the WebUI knows them by file name: refused, both named."""
    import shutil

    from vmix_lib.evaluate.cli import build_parser, options_from_args

    checkpoint, configs, tokenizer, adapter = tiny_model
    a, b = tmp_path / "run1" / "vmix.safetensors", tmp_path / "run2" / "vmix.safetensors"
    for path in (a, b):
        path.parent.mkdir()
        shutil.copy(adapter, path)
    offline = ["--offline", checkpoint, "--model-config-dir", configs, "--tokenizer-dir", tokenizer, "--lambdas", "1",
               "--limit", "1", "--steps", "2", "--width", "32", "--height", "32", "--out", str(tmp_path / "o")]
    opts = options_from_args(build_parser().parse_args(offline + ["--adapter", str(a), "--adapter", str(b)]))
    assert [(s.name, s.adapter and s.adapter.path) for s in opts.settings] == [
        ("off", None), ("run1/vmix λ=1", str(a)), ("run2/vmix λ=1", str(b))]
    assert main(offline + ["--adapter", str(a), "--adapter", str(b), "--generate-only"]) == 0
    assert sorted(os.listdir(tmp_path / "o" / "images")) == ["off", "run1-vmix-lambda1", "run2-vmix-lambda1"]
    for extra, message in (
        (["--webui", "http://127.0.0.1:7860", "--adapter", str(a), "--adapter", str(b)],
         f"the adapters {a} and {b} are both called 'vmix', and the WebUI knows an adapter by its file name only; rename one of "
         "the files (offline evaluation tells them apart by their folders)"),
        (["--adapter", str(a), "--adapter", str(a)], f"--adapter {a} is given twice; give each adapter once"),
        (["--webui", "http://127.0.0.1:7860", "--adapter", "vmix", "--adapter", str(b)],
         f"--adapter 'vmix' is given twice (the WebUI name 'vmix' and the file {b}); give each adapter once"),
    ):
        with pytest.raises(EvaluationError) as e:
            options_from_args(build_parser().parse_args(offline + extra))
        assert str(e.value) == message


def test_an_adapter_of_the_other_family_is_named_with_both_families(tmp_path, tiny_model, clip_dir, capsys):
    """An SDXL adapter on an SD1.5 checkpoint: one sentence with both families, before the model loads
    (it listed the tensors the hook could not place)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    checkpoint, configs, tokenizer, adapter = tiny_model
    with safe_open(adapter, "pt") as f:
        metadata = f.metadata()
    meta = json.loads(metadata["vmix"])
    other = str(tmp_path / "xl-adapter.safetensors")
    save_file(load_file(adapter), other, metadata=dict(metadata, vmix=json.dumps(dict(meta, family="sdxl"))))
    assert main(["--offline", checkpoint, "--model-config-dir", configs, "--tokenizer-dir", tokenizer, "--adapter", other,
                 "--clip", clip_dir, "--limit", "1", "--steps", "2", "--width", "32", "--height", "32",
                 "--out", str(tmp_path / "o")]) == 1
    assert capsys.readouterr().err.strip() == (
        f"VMix evaluation: VMix adapter 'xl-adapter.safetensors' is an SDXL adapter, but the checkpoint "
        f"{os.path.basename(checkpoint)!r} is SD1.5; evaluate it with a checkpoint of its family.")
    assert not (tmp_path / "o").exists()


def test_python_api_source_and_resume(tmp_path, clip_dir):
    """A model held in memory (e.g. a research model) evaluated through a plain function."""
    from vmix_lib.evaluate.prompts import Prompt
    from vmix_lib.evaluate.run import Options, evaluate
    from vmix_lib.evaluate.sources import CallableSource

    calls = []

    def generate(prompt, seed, setting):
        calls.append((prompt, seed, setting.name))
        shade = int(60 * (setting.strength if setting.adapter else 0)) + seed
        return Image.new("RGB", (24, 24), (80 + shade, 90, 160 - shade))

    settings = build_settings([AdapterRef("mine", None, ("color",))], [0.0, 2.0])
    opts = Options(out_dir=str(tmp_path / "o"), prompts=[Prompt("a", "a cat"), Prompt("b", "a dog")], settings=settings,
                   sources=[CallableSource(generate, "research-model")], clip=clip_dir, seeds_per_prompt=2, resamples=100)
    results = evaluate(opts, log=lambda m: None)
    assert len(calls) == 3 * 2 * 2 and {c[1] for c in calls if c[0] == "a cat"} == {0, 1}
    assert {c[1] for c in calls if c[0] == "a dog"} == {2, 3}  # seeds per prompt, the same in every setting
    assert results["lambda0_equals_off"] == [{"setting": "λ=0", "baseline": "off", "identical": 4, "pairs": 4}]
    summary = {s["setting"]: s for s in results["settings"]}
    assert summary["λ=2"]["images"] == 4 and summary["λ=2"]["content_similarity"]["mean"] < 1.0
    assert results["sources"][0]["source"] == "research-model"
    calls.clear()
    assert evaluate(opts, log=lambda m: None)["generation"]["made"] == 0 and calls == []


def test_offline_sampling_of_a_tiny_unet_uses_one_cpu_thread_unless_told(tmp_path, tiny_model, monkeypatch):
    from vmix_lib.evaluate.offline import OfflineSource
    from vmix_lib.evaluate.settings import Setting
    from vmix_lib.evaluate.webui_client import GenerationParams

    checkpoint, configs, tokenizer, _ = tiny_model
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        for requested, expected in ((0, 1), (2, 2)):
            torch.set_num_threads(3)
            source = OfflineSource(checkpoint, GenerationParams(steps=1, width=32, height=32), "ddim", configs, tokenizer,
                                   device="cpu", threads=requested)
            source.prepare([Setting("off")])
            source.close()
            assert torch.get_num_threads() == expected
            assert source.threads_line.startswith(f"CPU threads: {expected} (")
            assert ("auto: the UNet has" in source.threads_line) == (requested == 0)
    finally:
        torch.set_num_threads(before)
