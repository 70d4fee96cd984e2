"""``python -m vmix_lib.prepare`` with real (tiny, random) transformers models saved to folders and loaded
by path: CLIP, a ViT watermark classifier, a BLIP captioner; the trainer's dry run on the output;
bad model files refused in one sentence."""
import json
import os
import random
import shlex

import pytest
import torch
from PIL import Image

from vmix_lib.prepare.__main__ import main
from vmix_lib.prepare.models import load_captioner, load_image_classifier
from vmix_lib.prepare.tiny import write_tiny_captioner, write_tiny_classifier
from vmix_lib.scoring.images import read_image
from vmix_lib.scoring.tiny import write_random_predictor, write_tiny_clip
from vmix_lib.train.dataset import scan_dataset

from test_prepare import DIMS, Quiet, caption, hsv_image, palette_folder, read_metadata, run, settings

SIX = ["color", "lighting", "composition", "focus", "texture", "emotion"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "clip": write_tiny_clip(str(root / "clip")),
        "aesthetic": write_random_predictor(str(root / "aesthetic.pth")),
        "watermark": write_tiny_classifier(str(root / "watermark")),
        "captioner": write_tiny_captioner(str(root / "captioner"), word="red"),
    }


def noise_image(path, seed, size=(48, 40)):
    rng = random.Random(seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.frombytes("RGB", size, bytes(rng.randrange(256) for _ in range(size[0] * size[1] * 3))).save(path)
    return path


def mixed_folder(root):
    """Good captioned pictures, nested ones, broken files, an exact duplicate, caption-less ones."""
    for i in range(6):
        caption(noise_image(os.path.join(root, f"good{i}.png"), i), f"a noisy picture {i}")
    caption(noise_image(os.path.join(root, "album", "trip", "beach.jpg"), 10), "a beach")
    noise_image(os.path.join(root, "album", "nocaption.webp"), 11)
    noise_image(os.path.join(root, "nocaption2.png"), 12)
    with open(os.path.join(root, "album", "good0_again.png"), "wb") as f:
        f.write(open(os.path.join(root, "good0.png"), "rb").read())
    with open(os.path.join(root, "broken.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\nbroken")
    data = open(os.path.join(root, "good1.png"), "rb").read()
    with open(os.path.join(root, "truncated.png"), "wb") as f:
        f.write(data[: len(data) // 2])
    return root


# -- the command, end to end, and the trainer's dry run ---------------------------------------------------
def test_command_on_a_mixed_folder_and_the_trainers_dry_run(tmp_path, models, capsys):
    from vmix_lib.train.__main__ import main as train_main
    from vmix_lib.train.tiny_models import write_tiny_model

    inp, out = mixed_folder(str(tmp_path / "pictures")), str(tmp_path / "dataset")
    argv = [inp, out, "--clip", models["clip"], "--aesthetic-predictor", models["aesthetic"], "--min-side", "32",
            "--workers", "0", "--near-duplicates", "0.999"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "unreadable or truncated: 2" in printed and "exact duplicates: 1" in printed and "no caption: 2" in printed
    meta = read_metadata(out)
    assert set(meta) == {f"good{i}.png" for i in range(6)} | {"album__trip__beach.jpg"}
    assert all(set(e["labels"]) == set(SIX) and set(e["labels"].values()) <= {"superior", "inferior"} for e in meta.values())
    report = json.load(open(os.path.join(out, "prepare", "report.json")))
    assert {d["source"] for d in report["dropped"]["unreadable"]} == {"broken.png", "truncated.png"}
    assert {d["source"] for d in report["dropped"]["no_caption"]} == {"album/nocaption.webp", "nocaption2.png"}
    assert [d["source"] for d in report["dropped"]["duplicate"]] == ["album/good0_again.png"]

    hint = next(line for line in printed.splitlines() if line.startswith("  trainer: "))
    assert hint == (f"  trainer: python -m vmix_lib.train --config YOUR.toml --dataset-dir {out} --dimensions {','.join(SIX)} "
                    f"(or in the config file: dataset_dir = \"{out}\"; dimensions = [{', '.join(json.dumps(d) for d in SIX)}])")
    advice = shlex.split(hint.split("YOUR.toml ")[1].split(" (or in")[0])  # the trainer takes its advice as it is
    checkpoint, config_dir, tokenizer_dir = write_tiny_model(str(tmp_path / "tiny"), "sd15")
    code = train_main(["--checkpoint", checkpoint, "--model-config-dir", config_dir, "--tokenizer-dir", tokenizer_dir,
                       *advice, "--output-dir", str(tmp_path / "run"), "--resolution", "32", "--dry-run"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "data: 7 images" in printed.out and "Dry run" in printed.out

    # the same folder again with a default caption: the two caption-less images join, nothing is encoded again
    assert main(argv + ["--default-caption", "a photo"]) == 0
    printed = capsys.readouterr().out
    assert "CLIP embeddings computed now: 0" in printed
    meta = read_metadata(out)
    assert meta["album__nocaption.webp"]["text"] == "a photo" and len(meta) == 9
    assert scan_dataset(out, SIX).problems == []


def test_command_with_no_image_left_says_so_once_and_exits_2(tmp_path, models, capsys):
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    os.makedirs(inp)
    open(os.path.join(inp, "broken.png"), "wb").write(b"not an image")
    assert main([inp, out, "--clip", models["clip"], "--workers", "0"]) == 2
    printed = capsys.readouterr()
    assert printed.err.endswith(f"\nvmix prepare: error: no image is left in the dataset: all 1 were dropped (the counts above; "
                                f"{os.path.join(out, 'review', 'index.html')} shows why each one was)\n")
    assert printed.err.count("error") == 1 and "Traceback" not in printed.err  # the rest of stderr: progress bars
    assert "warning" not in printed.out and "trainer:" not in printed.out and "unreadable or truncated: 1" in printed.out


def test_command_uses_one_cpu_thread_for_tiny_models(tmp_path, models, capsys, monkeypatch):
    from vmix_lib.scoring.clip import load_clip

    inp = mixed_folder(str(tmp_path / "pictures"))
    parameters = sum(p.numel() for p in load_clip(models["clip"]).model.parameters())
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert main([inp, str(tmp_path / "a"), "--clip", models["clip"], "--min-side", "32", "--workers", "0"]) == 0
        assert (f"CPU threads: 1 (auto: the largest model has {parameters / 1e6:.3g} M parameters, under 10 M, where one "
                "thread is fastest; --threads N to choose)\n") in capsys.readouterr().out
        assert torch.get_num_threads() == 1
        assert main([inp, str(tmp_path / "b"), "--clip", models["clip"], "--min-side", "32", "--workers", "0", "--threads", "2"]) == 0
        assert "CPU threads: 2 (--threads 2)\n" in capsys.readouterr().out and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_labels_with_the_tiny_clip_match_its_own_zero_shot_probabilities(tmp_path, models):
    """Through the real CLIP (random weights) the tool's scores equal the model's own pairwise softmax."""
    from vmix_lib.scoring.clip import load_clip
    from vmix_lib.scoring.probes import default_probes

    inp, out = palette_folder(str(tmp_path / "in")), str(tmp_path / "out")
    clip = load_clip(models["clip"])
    result = run(settings(inp, out, near_duplicate=None), clip=clip)
    assert len(result.names) == 8
    import csv

    rows = list(csv.DictReader(open(os.path.join(out, "prepare", "scores.csv"), encoding="utf-8")))
    probe = default_probes(["color"])[0]
    images = [read_image(os.path.join(inp, r["source"])) for r in rows]
    pixels = clip.image_processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        img = torch.nn.functional.normalize(clip.model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        scale = clip.model.logit_scale.exp()
        expected = torch.zeros(len(rows))
        for pos, neg in probe.pairs:
            tok = clip.tokenizer([pos, neg], padding=True, return_tensors="pt")
            txt = torch.nn.functional.normalize(clip.model.get_text_features(**tok).pooler_output, dim=-1)
            expected += (scale * img @ txt.T).softmax(dim=-1)[:, 0] / len(probe.pairs)
    got = torch.tensor([float(r["score_color"]) for r in rows])
    assert torch.allclose(got, expected, atol=2e-5)


# -- watermark / text classifier -------------------------------------------------------------------------
def test_watermark_filter_drops_what_the_classifier_flags(tmp_path, models):
    inp, out = palette_folder(str(tmp_path / "in")), str(tmp_path / "out")
    classifier = load_image_classifier(models["watermark"])
    assert classifier.labels == ["clean", "watermark"] and classifier.resolve_reject_labels(()) == [1]
    files = sorted(os.path.join(folder, f) for folder, _, names in os.walk(inp) for f in names if f.endswith(".png"))
    probs = classifier.probabilities(classifier.pixel_values([read_image(f) for f in files]))[:, 1]
    cut = float(probs.median())
    expected = sorted(os.path.relpath(f, inp) for f, p in zip(files, probs.tolist()) if p >= cut)
    assert 0 < len(expected) < 8
    result = run(settings(inp, out, watermark_model=models["watermark"], watermark_threshold=cut, near_duplicate=None))
    assert sorted(rel for rel, _ in result.dropped["watermark"]) == expected
    assert all("P(watermark)" in reason for _, reason in result.dropped["watermark"])
    # cached: a rerun with another threshold runs neither CLIP nor the classifier on any image
    from vmix_lib.prepare import models as models_module

    result = run(settings(inp, out, watermark_model=models["watermark"], watermark_threshold=1.0, near_duplicate=None),
                 classifier=_counting(classifier))
    assert result.dropped["watermark"] == [] and result.encoded == 0 and classifier.counted == 0
    assert models_module  # imported for the monkeypatch-free counting above


def _counting(classifier):
    original = classifier.probabilities
    classifier.counted = 0

    def probabilities(pixels):
        classifier.counted += pixels.shape[0]
        return original(pixels)

    classifier.probabilities = probabilities
    return classifier


def test_watermark_labels_must_be_identifiable(tmp_path):
    from vmix_lib.prepare import PrepareError

    folder = write_tiny_classifier(str(tmp_path / "m"), labels=("cat", "dog"))
    classifier = load_image_classifier(folder)
    with pytest.raises(PrepareError, match="name it with --watermark-labels"):
        classifier.resolve_reject_labels(())
    assert classifier.resolve_reject_labels(("DOG",)) == [1]
    with pytest.raises(PrepareError, match=r"has no label 'bird' \(its labels: cat, dog\)"):
        classifier.resolve_reject_labels(("bird",))
    both = load_image_classifier(write_tiny_classifier(str(tmp_path / "n"), labels=("No Watermark", "Watermark", "text")))
    assert both.resolve_reject_labels(()) == [1, 2]


# -- captions --------------------------------------------------------------------------------------------------
def test_captioner_writes_missing_captions_once(tmp_path, models):
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    caption(hsv_image(os.path.join(inp, "has.png"), 0.1, 0.5, 0.5), "my own caption")
    hsv_image(os.path.join(inp, "sub", "needs.png"), 0.6, 0.5, 0.5)
    hsv_image(os.path.join(inp, "needs_too.png"), 0.35, 0.7, 0.3)
    captioner = load_captioner(models["captioner"])
    assert captioner.caption([read_image(os.path.join(inp, "needs_too.png"))], max_new_tokens=3) == ["red red red"]
    s = settings(inp, out, captioner=models["captioner"], caption_max_tokens=4)
    result = run(s)
    meta = read_metadata(out)
    assert meta["has.png"]["text"] == "my own caption"  # kept as the user wrote it
    assert meta["sub__needs.png"]["text"] == meta["needs_too.png"]["text"] == "red red red red"
    assert result.captioned == 2
    report = json.load(open(os.path.join(out, "prepare", "report.json")))
    assert report["captions"] == {"txt": 1, "metadata": 0, "captioner": 2, "default": 0}
    again = run(s)
    assert again.captioned == 0 and read_metadata(out) == meta  # from the cache
    assert scan_dataset(out, DIMS).problems == []


def test_captioner_prompt_is_continued(tmp_path, models):
    captioner = load_captioner(models["captioner"])
    text = captioner.caption([Image.new("RGB", (40, 40), (1, 2, 3))], prompt="a photo of", max_new_tokens=2)
    assert text == ["a photo of red red"]


# -- bad model files: one sentence, exit status 2, nothing written -------------------------------------------
def _broken_clip(tmp_path, models):
    import shutil

    folder = str(tmp_path / "broken_clip")
    shutil.copytree(models["clip"], folder)
    weights = os.path.join(folder, "model.safetensors")
    data = open(weights, "rb").read()
    open(weights, "wb").write(data[: len(data) // 3])
    return folder


@pytest.mark.parametrize("case", ["clip_truncated", "clip_missing", "clip_hub_offline", "predictor_garbage", "predictor_wrong_layout",
                                  "watermark_missing", "watermark_empty_folder", "watermark_is_clip", "watermark_label_unknown",
                                  "captioner_not_cached", "captioner_is_a_file", "captioner_is_a_classifier"])
def test_bad_model_files_are_refused_in_one_sentence(tmp_path, models, capsys, case):
    inp, out = palette_folder(str(tmp_path / "in")), str(tmp_path / "out")
    argv = [inp, out, "--clip", models["clip"], "--min-side", "32", "--workers", "0"]
    if case == "clip_truncated":
        argv[3] = _broken_clip(tmp_path, models)
    elif case == "clip_missing":
        argv[3] = str(tmp_path / "no_such_clip")
    elif case == "clip_hub_offline":
        argv[3] = "nobody/no-such-clip-model"
    elif case == "predictor_garbage":
        open(tmp_path / "p.pth", "wb").write(b"not a pickle")
        argv += ["--aesthetic-predictor", str(tmp_path / "p.pth")]
    elif case == "predictor_wrong_layout":
        torch.save({"weight": torch.zeros(3)}, str(tmp_path / "p.pth"))
        argv += ["--aesthetic-predictor", str(tmp_path / "p.pth")]
    elif case == "watermark_missing":
        argv += ["--watermark-model", str(tmp_path / "none")]
    elif case == "watermark_empty_folder":
        os.makedirs(tmp_path / "empty")
        argv += ["--watermark-model", str(tmp_path / "empty")]
    elif case == "watermark_is_clip":  # transformers would load it with a random classifier head
        argv += ["--watermark-model", models["clip"]]
    elif case == "watermark_label_unknown":
        argv += ["--watermark-model", models["watermark"], "--watermark-labels", "logo"]
    elif case == "captioner_is_a_classifier":
        argv += ["--captioner", models["watermark"]]
    elif case == "captioner_not_cached":
        argv += ["--captioner", "nobody/no-such-captioner"]
    else:
        open(tmp_path / "cap.bin", "wb").write(b"0")
        argv += ["--captioner", str(tmp_path / "cap.bin")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    message = [line for line in err if line.startswith("vmix prepare: error:")]
    assert len(message) == 1 and "Traceback" not in "\n".join(err), err
    assert not os.path.exists(out)  # refused before anything was written


def test_predictor_folder_and_missing_clip_path_name_what_to_give(tmp_path, models, capsys, monkeypatch):
    """--aesthetic-predictor FOLDER: told it is a folder and which file is meant (it said "does not
    exist"); --clip ./clip that is not there: the folder is named, not a hub lookup."""
    inp, out = palette_folder(str(tmp_path / "in")), str(tmp_path / "out")
    os.makedirs(tmp_path / "predictors")
    argv = [inp, out, "--min-side", "32", "--workers", "0"]
    assert main(argv + ["--clip", models["clip"], "--aesthetic-predictor", str(tmp_path / "predictors")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"vmix prepare: error: aesthetic predictor {tmp_path / 'predictors'} is a folder; name the predictor file itself, "
        "a .pth or .safetensors file such as sac+logos+ava1-l14-linearMSE.pth")
    monkeypatch.chdir(tmp_path)
    assert main(argv + ["--clip", "./clip"]) == 2
    assert capsys.readouterr().err.strip() == (
        "vmix prepare: error: the CLIP folder ./clip does not exist; name a folder with config.json and the weights, "
        "or a hub id such as owner/name")
    assert not os.path.exists(out)


def test_benchmark_runs_end_to_end(tmp_path, capsys):
    from vmix_lib.prepare.bench import main as bench_main

    assert bench_main(["--images", "5", "--size", "40", "--workers", "0", "--keep", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "first run:" in printed and "rerun (everything cached):" in printed and "peak memory:" in printed
    assert bench_main(["--near-duplicates-only", "300"]) == 0
    assert "near duplicates among 300 random embeddings" in capsys.readouterr().out
