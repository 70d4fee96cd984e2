"""The demonstration (python -m vmix_lib.demo) at a small scale: VMix's behaviour end to end.

One small run (module fixture) trains a base model and an adapter from scratch on the synthetic
data, then sweeps λ.  Asserted: saturation rises strictly with λ when "color" is on, moves far
less when it is off, the content (foreground mask) is preserved, and λ = 0 equals the base model
bit for bit.
"""
import json
import os

import pytest
import torch

from vmix_lib import demo, demo_data as data

# Margins seen over seeds 0, 1, 2 are in the lead's report; the thresholds leave room below them.
MIN_STEP = 0.005  # smallest rise of mean saturation between neighbouring λ, color on
OFF_RATIO = 0.25  # saturation spread with color off, relative to color on
MIN_IOU = 0.75  # foreground IoU of every λ against λ = 0, color on


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    report = demo.run_demo(demo.TEST, str(out), log=lambda msg: None)
    return report, out


def _by_setting(report):
    return {r.setting: r for r in report["_results"]}


def test_lambda_zero_is_the_base_model_bit_for_bit(run):
    report, _ = run
    assert report["lambda0_equals_base_bitwise"] is True
    for res in report["_results"]:
        assert torch.equal(res.images[res.lambdas.index(0.0)], report["_base_images"])


def test_saturation_rises_monotonically_with_lambda_when_color_is_on(run):
    color = _by_setting(run[0])["color"]
    assert color.lambdas == sorted(color.lambdas) and color.lambdas[0] == 0.0
    steps = [b - a for a, b in zip(color.saturation, color.saturation[1:])]
    assert min(steps) > MIN_STEP, color.saturation


def test_saturation_stays_put_when_color_is_off(run):
    by = _by_setting(run[0])
    on = demo.spread(by["color"].saturation)
    for name in ("lighting", "none"):
        assert demo.spread(by[name].saturation) < OFF_RATIO * on, (name, by[name].saturation, on)


def test_lighting_dimension_raises_brightness(run):
    by = _by_setting(run[0])
    lighting = by["lighting"].value
    assert lighting[-1] - lighting[0] > 2 * abs(by["none"].value[-1] - by["none"].value[0]), (lighting, by["none"].value)


def test_content_is_preserved(run):
    for res in run[0]["_results"]:
        assert min(res.iou) >= MIN_IOU, (res.setting, res.iou)


def test_outputs_written(run):
    report, out = run
    with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
        saved = json.load(f)
    assert saved["lambda0_equals_base_bitwise"] is True
    assert [r["setting"] for r in saved["results"]] == list(demo.TEST.settings)
    assert saved["results"][0]["saturation"] == _by_setting(report)[saved["results"][0]["setting"]].saturation
    with open(os.path.join(out, "results.csv"), encoding="utf-8") as f:
        rows = f.read().strip().splitlines()
    assert len(rows) == 1 + len(demo.TEST.settings) * len(demo.TEST.lambdas)
    from PIL import Image

    with Image.open(os.path.join(out, "grid.png")) as grid:
        assert grid.size[0] > len(demo.TEST.lambdas) * demo.TEST.size


# -- the pieces, checked exactly ----------------------------------------------------------------
def test_tokenizer_layout_and_unknown_word():
    tok = data.WordTokenizer(["a circle at the top"])
    ids = tok(["a circle", ""])
    assert ids.shape == (2, 77)
    assert ids[0, 0] == tok.BOS and ids[0, 3] == tok.EOS and (ids[0, 3:] == tok.EOS).all()
    assert ids[1, 0] == tok.BOS and (ids[1, 1:] == tok.EOS).all()
    with pytest.raises(ValueError, match="'hexagon' is not in"):
        tok(["a hexagon"])


def test_measures_recover_the_drawn_properties():
    g = torch.Generator().manual_seed(0)
    images = data.make_images(64, 32, g, superior_fraction=(0.5, 0.5))
    m = data.measure(images.images)
    # Edge pixels are darker copies of the same colour: HSV saturation is exact on them too.
    inside = ~torch.isnan(m.per_image_saturation)
    assert torch.allclose(m.per_image_saturation[inside], images.saturation[inside], atol=1e-4)
    assert data.position_correct(m.masks, images.position).all()
    vivid = images.labels[:, 0] > 0
    assert images.saturation[vivid].min() >= data.SUPERIOR_SATURATION[0]
    assert images.saturation[~vivid].max() <= data.ORDINARY_SATURATION[1]


def test_mask_iou_and_centroids():
    a = torch.zeros(2, 8, 8, dtype=torch.bool)
    b = a.clone()
    a[0, 2:4, 2:4] = True
    b[0, 2:4, 3:5] = True
    assert torch.allclose(data.mask_iou(a, b), torch.tensor([2 / 6, 1.0]))
    c = data.centroids(a)
    assert torch.allclose(c[0], torch.tensor([3.0, 3.0])) and torch.isnan(c[1]).all()
