"""The demonstration's models judged by the evaluation tool (python -m vmix_lib.demo --evaluate DIR).

The models are the session's demo.TEST run (tests/conftest.py, shared with tests/test_demo.py); the
evaluation is vmix_lib.evaluate's own run (settings, resume, bootstrap, paired shifts, report) with
vmix_lib/demo/evaluation.py's DemoSource and the demo's measures as an ImageMetric.  Asserted: λ = 0
is VMix off pixel for pixel and in every number; "color" alone at λ = 2 raises saturation over off
by a margin, for both adapters; every output is written; a rerun makes no image again and, given a
CLIP model, adds the CLIP metrics to the same images.  Then the extension point alone, on images
made by a Python function, against hand computations.
"""
import csv
import json
import os
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from vmix_lib.demo import experiment as demo
from vmix_lib.demo.evaluation import CONFIG_FILE, check_folder, evaluate_demo
from vmix_lib.evaluate.errors import EvaluationError
from vmix_lib.evaluate.metrics import ImageMetric
from vmix_lib.evaluate.prompts import Prompt
from vmix_lib.evaluate.run import Options, evaluate
from vmix_lib.evaluate.settings import AdapterRef, build_settings
from vmix_lib.evaluate.sources import CallableSource

PROMPTS = 9  # the first 9 sweep prompts: every named position once
# Measured on these 9 prompts at seeds 0, 1, 2 of demo.TEST (seed 0 is the one run here), "color" and
# "lighting" alone at λ = 2, paired shifts from off.  Saturation shift with color alone: (data)
# 0.169, 0.152, 0.140 and (distill) 0.093, 0.070, 0.102, the lower ends of their 95 %
# intervals all above 0 (lowest 0.016).  Color's saturation shift minus lighting's: (data) 0.297,
# 0.174, 0.256 and (distill) 0.098, 0.150, 0.157; lighting's brightness shift minus color's: (data)
# 0.152, 0.234, 0.308 and (distill) 0.088, 0.150, 0.193.
MIN_COLOR_SATURATION_SHIFT = 0.03
MIN_OWN_DIMENSION_LEAD = 0.04


def _quiet(**kwargs):
    from tqdm import tqdm

    return tqdm(disable=True, **kwargs)


@pytest.fixture(scope="module")
def evaluated(demo_test_run, tmp_path_factory):
    run = demo_test_run[0]
    out = str(tmp_path_factory.mktemp("demo-eval"))
    first = evaluate_demo(run.base, run.adapters, demo.TEST, out, prompts=PROMPTS, log=lambda m: None, progress=_quiet)
    return first, out


def _by(results):
    return {s["setting"]: s for s in results["settings"]}


def test_settings_are_the_evaluation_tools(evaluated):
    names = list(_by(evaluated[0]))
    lams = [f"λ={v:g}" for v in demo.TEST.lambdas]
    dims = [f"dims={d} λ=2" for d in ("all", "none", "color", "lighting")]
    assert names == ["off"] + [f"{a} {s}" for a in ("data", "distill") for s in lams + dims]
    assert all(s["images"] == PROMPTS and s["failed"] == 0 for s in evaluated[0]["settings"])


def test_lambda_zero_is_off_pixel_for_pixel_and_in_every_number(evaluated):
    results, out = evaluated
    checks = results["lambda0_equals_off"]
    assert [(c["setting"], c["identical"], c["pairs"]) for c in checks] == [("data λ=0", PROMPTS, PROMPTS), ("distill λ=0", PROMPTS, PROMPTS)]
    by = _by(results)
    for adapter in ("data", "distill"):
        zero, two = by[f"{adapter} λ=0"], by[f"{adapter} λ=2"]
        assert zero["saturation"] == by["off"]["saturation"] and zero["brightness"] == by["off"]["brightness"]
        assert zero["saturation_shift"]["mean"] == 0.0 and zero["brightness_shift"]["mean"] == 0.0
        assert zero["foreground_iou"]["mean"] == 1.0 and zero["position_kept"]["mean"] == 1.0
        assert zero["centre_moved_px"]["mean"] == 0.0
        assert two["saturation_shift"]["mean"] != 0.0  # λ > 0 does change the images: the equality is not vacuous
    for name in os.listdir(os.path.join(out, "images", "off")):
        a = np.asarray(Image.open(os.path.join(out, "images", "off", name)))
        b = np.asarray(Image.open(os.path.join(out, "images", "data-lambda0", name)))
        assert a.shape == (demo.TEST.size, demo.TEST.size, 3) and np.array_equal(a, b)


@pytest.mark.parametrize("adapter", ["data", "distill"])
def test_color_alone_raises_saturation_over_off(evaluated, adapter):
    color = _by(evaluated[0])[f"{adapter} dims=color λ=2"]["saturation_shift"]
    assert color["mean"] > MIN_COLOR_SATURATION_SHIFT, color
    assert color["ci95"][0] > 0, color  # the paired interval lies above 0


@pytest.mark.parametrize("adapter", ["data", "distill"])
def test_each_dimension_moves_what_it_names_more_than_the_other(evaluated, adapter):
    by = _by(evaluated[0])
    color, lighting = by[f"{adapter} dims=color λ=2"], by[f"{adapter} dims=lighting λ=2"]
    assert color["saturation_shift"]["mean"] - lighting["saturation_shift"]["mean"] > MIN_OWN_DIMENSION_LEAD, (color, lighting)
    assert lighting["brightness_shift"]["mean"] - color["brightness_shift"]["mean"] > MIN_OWN_DIMENSION_LEAD, (color, lighting)


def test_outputs_are_written(evaluated):
    results, out = evaluated
    files = results["files"]
    for key in ("per_image_csv", "per_setting_csv", "json", "tradeoff", "grid", "html"):
        assert os.path.isfile(files[key]) and os.path.getsize(files[key]) > 0, key
    with open(files["per_setting_csv"], newline="", encoding="utf-8") as f:
        rows = {r["setting"]: r for r in csv.DictReader(f)}
    color = rows["data dims=color λ=2"]
    assert float(color["saturation_shift_ci_low"]) <= float(color["saturation_shift"]) <= float(color["saturation_shift_ci_high"])
    with open(files["json"], encoding="utf-8") as f:
        saved = json.load(f)
    assert saved["settings"] == json.loads(json.dumps(results["settings"]))
    assert saved["clip"] is None and saved["sources"][0]["source"] == "demo"
    assert len(saved["images"]) == len(results["settings"]) * PROMPTS
    with open(files["html"], encoding="utf-8") as f:
        page = f.read()
    assert "IoU vs off" in page and "saturation Δ vs off" in page and "data:image/png;base64," in page
    assert "saturation against IoU vs off" in page  # the trade-off plot's axes are the demo's measures
    for key in ("tradeoff", "grid"):
        with Image.open(files[key]) as picture:
            assert picture.size[0] > 300
    with open(os.path.join(out, CONFIG_FILE), encoding="utf-8") as f:
        assert json.load(f)["seed"] == demo.TEST.seed


def test_rerun_makes_no_image_and_adds_clip_metrics(evaluated, demo_test_run, tmp_path):
    from vmix_lib.scoring.tiny import write_tiny_clip

    first, out = evaluated
    run = demo_test_run[0]
    again = evaluate_demo(run.base, run.adapters, demo.TEST, out, clip=write_tiny_clip(str(tmp_path / "clip")), prompts=PROMPTS,
                          log=lambda m: None, progress=_quiet)
    assert again["generation"]["made"] == 0 and again["generation"]["failed"] == 0
    before, after = _by(first), _by(again)
    for name, s in before.items():
        assert after[name]["saturation"] == s["saturation"]
        assert "clip_score" in after[name] and "clip_score" not in s
    assert after["data dims=color λ=2"]["content_similarity"]["mean"] <= 1.0 + 1e-6


def test_a_folder_of_another_configuration_is_refused(evaluated, tmp_path):
    out = evaluated[1]
    check_folder(out, demo.TEST)  # the same configuration: fine
    with pytest.raises(EvaluationError, match="other settings"):
        check_folder(out, replace(demo.TEST, seed=1))
    (tmp_path / "images").mkdir()
    with pytest.raises(EvaluationError, match="not the demo's"):
        check_folder(str(tmp_path), demo.TEST)


def test_main_refuses_another_configurations_folder_before_training(evaluated, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(demo, "run_demo", lambda *a, **k: pytest.fail("trained although the evaluation folder is unusable"))
    assert demo.main(["--quick", "--out", str(tmp_path / "demo"), "--evaluate", evaluated[1]]) == 1
    err = capsys.readouterr().err
    assert "other settings" in err and "--evaluate" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        demo.main(["--out", str(tmp_path / "demo"), "--clip", str(tmp_path)])
    assert "--clip is a setting of --evaluate" in capsys.readouterr().err


# -- the extension point alone ----------------------------------------------------------------
def _picture(value):
    return Image.fromarray(np.full((4, 4, 3), value, dtype=np.uint8))


def test_image_metrics_with_paired_shifts_and_no_clip(tmp_path):
    """A Python source whose image brightness is 10·seed + 100·λ; the metric reads it back exactly."""
    ref = AdapterRef("toy", None, ("color",))
    settings = build_settings([ref], [0.0, 1.0], ["color"])
    source = CallableSource(lambda prompt, seed, s: _picture(10 * seed + int(100 * (s.strength if s.adapter else 0))))
    level = ImageMetric(
        "level", measure=lambda images: [{"level": float(np.asarray(i)[0, 0, 0])} for i in images],
        compare=lambda images, bases: [{"gain": float(np.asarray(i)[0, 0, 0]) - float(np.asarray(b)[0, 0, 0])} for i, b in zip(images, bases)],
        titles={"level": "level", "gain": "gain"}, about="pixel value",
    )
    prompts = [Prompt(f"p{i}", f"prompt {i}") for i in range(4)]
    opts = Options(out_dir=str(tmp_path), prompts=prompts, settings=settings, sources=[source], clip=None,
                   image_metrics=[level], tradeoff=("gain", "level"), device="cpu", resamples=200)
    results = evaluate(opts, log=lambda m: None, progress=_quiet)
    by = _by(results)
    assert by["off"]["level"]["mean"] == pytest.approx(np.mean([0, 10, 20, 30]))  # seeds 0..3
    assert by["λ=1"]["level_shift"] == {"mean": 100.0, "ci95": [100.0, 100.0], "n": 4}
    assert by["λ=1"]["gain"]["mean"] == 100.0 and by["λ=0"]["gain"]["mean"] == 0.0
    assert "gain" not in by["off"] and "level_shift" not in by["off"]
    assert "clip_score" not in by["λ=1"] and results["clip"] is None
    assert os.path.isfile(results["files"]["tradeoff"]) and "pixel value" in open(results["files"]["html"], encoding="utf-8").read()

    broken = ImageMetric("broken", measure=lambda images: [])
    with pytest.raises(EvaluationError, match="image metric 'broken' must return one dict of numbers per image"):
        evaluate(replace(opts, image_metrics=[broken]), log=lambda m: None, progress=_quiet)
    with pytest.raises(EvaluationError, match="give a CLIP model"):
        evaluate(replace(opts, aesthetic=str(tmp_path / "aes.pth")), log=lambda m: None, progress=_quiet)
