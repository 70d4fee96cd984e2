"""Dataset folder parsing: captions, labels (sidecar / metadata.jsonl), and every problem listed exactly."""
import json
import os

import pytest
import torch

from vmix_lib.train.dataset import DatasetError, load_dataset, load_image, scan_dataset
from vmix_lib.train.errors import TrainError

from test_train_helpers import write_dataset, write_image

DIMS = ["color", "lighting", "composition"]


def _write(folder, name, text):
    with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
        f.write(text)


def test_sidecar_and_metadata_labels(tmp_path):
    folder = str(tmp_path)
    for stem in ("a", "b", "c", "d"):
        write_image(os.path.join(folder, stem + ".png"))
    for stem in ("a", "b", "c"):
        _write(folder, stem + ".txt", f"caption {stem}\n")
    _write(folder, "a.json", json.dumps({"color": "superior", "lighting": "Inferior", "composition": " SUPERIOR "}))
    _write(folder, "metadata.jsonl", "\n".join([
        json.dumps({"file_name": "b.png", "labels": {"lighting": "superior"}}),
        "",
        json.dumps({"file_name": "d.png", "text": "caption from metadata", "labels": {}}),
    ]))
    items = load_dataset(folder, DIMS)
    assert [(it.name, it.caption, it.labels) for it in items] == [
        ("a.png", "caption a", (1.0, 0.0, 1.0)),
        ("b.png", "caption b", (0.0, 1.0, 0.0)),
        ("c.png", "caption c", (0.0, 0.0, 0.0)),  # no labels anywhere: all inferior, as in the paper
        ("d.png", "caption from metadata", (0.0, 0.0, 0.0)),
    ]
    assert items[0].size == (40, 32)
    report = scan_dataset(folder, DIMS)
    assert report.label_counts == {"color": 1, "lighting": 1, "composition": 1}


def test_every_problem_is_listed_exactly(tmp_path):
    folder = str(tmp_path)
    write_dataset(folder, count=2)  # img0 (color superior), img1: fine
    write_image(os.path.join(folder, "nocap.png"))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    _write(folder, "broken.txt", "a broken picture")
    write_image(os.path.join(folder, "dims.png"))
    _write(folder, "dims.txt", "x")
    _write(folder, "dims.json", json.dumps({"colour": "superior", "lighting": "good"}))
    write_image(os.path.join(folder, "empty.png"))
    _write(folder, "empty.txt", "  \n")
    _write(folder, "orphan.txt", "no picture")
    write_image(os.path.join(folder, "twice.png"))
    write_image(os.path.join(folder, "twice.jpg"))
    write_image(os.path.join(folder, "meta.png"))
    _write(folder, "meta.txt", "m")
    _write(folder, "meta.json", json.dumps(["color"]))
    _write(folder, "metadata.jsonl", "{not json\n" + json.dumps({"file_name": "gone.png"}) + "\n"
           + json.dumps({"file_name": "img1.png", "labels": {"color": "superior"}, "score": 3}) + "\n")
    with pytest.raises(DatasetError) as err:
        load_dataset(folder, DIMS)
    assert err.value.problems == [
        "metadata.jsonl line 1 is not valid JSON (Expecting property name enclosed in double quotes)",
        "metadata.jsonl line 3 has unknown field 'score' (allowed: file_name, labels, text)",
        "two images share the name 'twice': twice.jpg and twice.png (captions and labels would be ambiguous)",
        "orphan.txt belongs to no image (no orphan.png/.jpg/...)",
        "metadata.jsonl line 2 names gone.png, which is not an image in the folder",
        "unreadable image: broken.png (cannot identify image file '" + os.path.join(folder, "broken.png") + "')",
        "unknown dimension 'colour' in dims.json (known: color, lighting, composition)",
        "label 'good' for 'lighting' in dims.json is not \"superior\" or \"inferior\"",
        "empty caption: empty.txt",
        "labels in meta.json are not an object like {\"color\": \"superior\"}",
        "missing caption: nocap.png (expected nocap.txt)",
    ]
    message = str(err.value)
    assert message.startswith(f"the dataset in {folder} has 11 problems:\n  metadata.jsonl line 1")
    assert message.endswith("Fix them, or run with --skip-bad to train without the affected images.")


def test_skip_bad_prints_what_it_skips(tmp_path):
    folder = str(tmp_path)
    write_dataset(folder, count=3)
    write_image(os.path.join(folder, "nocap.png"))
    lines = []
    items = load_dataset(folder, DIMS, skip_bad=True, log=lines.append)
    assert [it.name for it in items] == ["img0.png", "img1.png", "img2.png"]
    assert lines == [
        "--skip-bad: ignoring these 1 problem(s); skipped images: nocap.png",
        "  missing caption: nocap.png (expected nocap.txt)",
    ]


def test_conflicting_sources_and_empty_folders(tmp_path):
    folder = str(tmp_path)
    write_dataset(folder, count=1)  # img0.txt + img0.json
    _write(folder, "metadata.jsonl", json.dumps({"file_name": "img0.png", "text": "t", "labels": {"color": "inferior"}}) + "\n"
           + json.dumps({"file_name": "img0.png"}))
    with pytest.raises(DatasetError) as err:
        load_dataset(folder, DIMS)
    assert err.value.problems == [
        "metadata.jsonl line 2 repeats img0.png (first on line 1)",
        "img0.png has a caption both in img0.txt and in metadata.jsonl",
        "img0.png has labels both in img0.json and in metadata.jsonl",
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match=r"has 1 problem:\n  no images \(.png, .jpg, .jpeg, .webp, .bmp\) in the folder"):
        load_dataset(str(empty), DIMS)
    with pytest.raises(TrainError, match=r"dataset folder .*missing does not exist"):
        load_dataset(str(tmp_path / "missing"), DIMS)


def test_load_image_resizes_short_side_and_centre_crops(tmp_path):
    from PIL import Image

    path = str(tmp_path / "wide.png")
    img = Image.new("RGB", (80, 40), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 20, 40))  # blue left quarter: cropped away
    img.save(path)
    pixels, original, crop = load_image(path, 16)
    assert pixels.shape == (3, 16, 16) and original == (40, 80) and crop == (0, 8)
    assert torch.allclose(pixels[:, 8, 8], torch.tensor([1.0, -1.0, -1.0]))
    assert pixels.min() >= -1 and pixels.max() <= 1

    rgba = str(tmp_path / "alpha.png")
    Image.new("RGBA", (16, 16), (0, 0, 0, 0)).save(rgba)  # fully transparent: white, not black
    pixels, _, _ = load_image(rgba, 16)
    assert torch.equal(pixels, torch.ones(3, 16, 16))
