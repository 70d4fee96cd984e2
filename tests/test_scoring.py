"""vmix_lib.scoring: CLIP loading and embeddings, the LAION predictor, antonym probes, the feature cache."""
import os
import pickle

import pytest
import torch
from PIL import Image

from vmix_lib.scoring import ScoringError
from vmix_lib.scoring.aesthetic import AestheticPredictor, load_aesthetic_predictor
from vmix_lib.scoring.clip import load_clip
from vmix_lib.scoring.features import FeatureCache, embed_image_files
from vmix_lib.scoring.images import find_images, read_image
from vmix_lib.scoring.probes import (DEFAULT_PROBES, antonym_probability, default_probes, encode_probes,
                                     parse_probe, probe_scores)
from vmix_lib.scoring.tiny import random_predictor_state, write_random_predictor, write_tiny_clip


def _pictures(n=4, size=(40, 30)):
    return [Image.new("RGB", size, (40 * i, 200 - 30 * i, 90)) for i in range(n)]


# -- CLIP ------------------------------------------------------------------------------------
def test_embeddings_are_the_models_own_projected_features(clip):
    images = _pictures()
    pixels = clip.image_processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        raw = clip.model.visual_projection(clip.model.vision_model(pixel_values=pixels).pooler_output)
    got = clip.embed_images(images)
    assert torch.allclose(got, torch.nn.functional.normalize(raw, dim=-1), atol=1e-6)
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(images)), atol=1e-6)


def test_long_prompts_are_truncated_keeping_the_end_token(clip):
    long = "cat dog red " * 60
    ids = clip.tokenize([long])["input_ids"][0]
    assert ids.shape[0] == 77 and ids[-1].item() == clip.tokenizer.eos_token_id
    full = clip.tokenizer([long])["input_ids"][0]
    assert len(full) > 77
    by_hand = torch.tensor([full[:76] + [clip.tokenizer.eos_token_id]])
    sliced = torch.tensor([full[:77]])  # what slicing after tokenizing does (torchmetrics#2883)
    with torch.no_grad():
        feats = [torch.nn.functional.normalize(clip.model.get_text_features(input_ids=x).pooler_output, dim=-1) for x in (by_hand, sliced)]
    got = clip.embed_texts([long])
    assert torch.allclose(got, feats[0], atol=1e-6)
    assert not torch.allclose(got, feats[1], atol=1e-3)


def test_identity_changes_with_the_weights(tmp_path, clip):
    other = load_clip(write_tiny_clip(str(tmp_path / "other"), seed=1))
    assert other.identity != clip.identity
    assert load_clip(clip.source).identity == clip.identity


@pytest.mark.parametrize("case", ["missing", "file", "empty_folder", "hub_offline", "bad_vocab"])
def test_clip_errors_are_one_sentence(tmp_path, clip_dir, case):
    if case == "missing":
        source = str(tmp_path / "nope")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    elif case == "file":
        source = str(tmp_path / "clip.safetensors")
        open(source, "wb").write(b"x")
    elif case == "empty_folder":
        source = str(tmp_path)
    elif case == "hub_offline":
        source = "someone/no-such-clip-model"
    else:
        import shutil

        source = str(tmp_path / "copy")
        shutil.copytree(clip_dir, source)
        for name in ("vocab.json", "tokenizer.json"):
            if os.path.exists(os.path.join(source, name)):
                open(os.path.join(source, name), "w").write("{}")
    with pytest.raises(ScoringError) as e:
        load_clip(source)
    message = str(e.value)
    assert "\n" not in message and "Traceback" not in message
    assert ("nope" in message or "folder" in message or "someone/no-such-clip-model" in message)


@pytest.mark.parametrize("given", ["{tmp}/models/clip-vit-large-patch14", "./clip", "../no-such-folder/clip", "~/no-such-clip-9f3a",
                                   "models/clip/", "a/b/c", "models/clip", "models\\clip"])
def test_a_missing_local_clip_folder_is_named_as_a_folder_not_a_hub_id(tmp_path, monkeypatch, given):
    """Anything that can only be a path and does not exist: 'the CLIP folder X does not exist' (it was
    reported as a hub id not in the cache); ``models/clip`` is a path when a models/ folder is here."""
    monkeypatch.chdir(tmp_path)
    os.makedirs("models")
    source = given.format(tmp=tmp_path)
    with pytest.raises(ScoringError) as e:
        load_clip(source)
    assert str(e.value) == (f"the CLIP folder {os.path.expanduser(source)} does not exist; name a folder with config.json and "
                            "the weights, or a hub id such as openai/clip-vit-large-patch14")


def test_hub_ids_are_not_paths(tmp_path, monkeypatch):
    from vmix_lib.scoring.paths import looks_like_path

    monkeypatch.chdir(tmp_path)
    assert not looks_like_path("openai/clip-vit-large-patch14") and not looks_like_path("clip-vit-base")
    os.makedirs("openai")  # a folder of that name here: the user means the path
    assert looks_like_path("openai/clip-vit-large-patch14")
    with pytest.raises(ScoringError, match="hub id 'someone/no-such-clip-model'"):
        load_clip("someone/no-such-clip-model")


# -- the aesthetic predictor -----------------------------------------------------------------
def test_predictor_is_the_reference_affine_map(tmp_path):
    state = random_predictor_state(768, seed=3)
    path = write_random_predictor(str(tmp_path / "sac+logos+ava1-l14-linearMSE.pth"), seed=3)
    predictor = load_aesthetic_predictor(path, expected_dim=768)
    x = torch.nn.functional.normalize(torch.randn(5, 768, generator=torch.Generator().manual_seed(0)), dim=-1)
    by_hand = x.double()
    for i in (0, 2, 4, 6, 7):  # Linear layers, no activations; dropout is off in eval
        by_hand = by_hand @ state[f"layers.{i}.weight"].double().T + state[f"layers.{i}.bias"].double()
    assert torch.allclose(predictor(x).double(), by_hand.squeeze(-1), atol=1e-5)


def test_predictor_pth_and_safetensors_agree(tmp_path):
    a = load_aesthetic_predictor(write_random_predictor(str(tmp_path / "p.pth"), seed=5))
    b = load_aesthetic_predictor(write_random_predictor(str(tmp_path / "p.safetensors"), seed=5))
    x = torch.nn.functional.normalize(torch.randn(3, 768), dim=-1)
    assert torch.equal(a(x), b(x))


def test_predictor_bundled_with_clip_weights_loads(tmp_path):
    from safetensors.torch import save_file

    state = dict(random_predictor_state(seed=2), **{"vision_model.post_layernorm.weight": torch.ones(4), "logit_scale": torch.zeros(())})
    save_file(state, str(tmp_path / "model.safetensors"))
    assert isinstance(load_aesthetic_predictor(str(tmp_path / "model.safetensors")), AestheticPredictor)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("case", ["missing_key", "wrong_shape", "nan", "code", "not_dict", "extension", "absent", "clip_dim", "truncated"])
def test_malformed_predictors_are_refused_in_one_sentence(tmp_path, case):
    path = str(tmp_path / "pred.pth")
    state = random_predictor_state(768)
    expected_dim = None
    if case == "missing_key":
        del state["layers.6.bias"]
    elif case == "wrong_shape":
        state["layers.2.weight"] = torch.zeros(128, 512)
    elif case == "nan":
        state["layers.4.weight"][0, 0] = float("nan")
    elif case == "clip_dim":
        expected_dim = 512
    if case == "code":
        with open(path, "wb") as f:
            pickle.dump({"layers.0.weight": _Evil()}, f)
    elif case == "not_dict":
        torch.save([torch.zeros(1)], path)
    elif case == "extension":
        path = str(tmp_path / "pred.onnx")
        open(path, "wb").write(b"0")
    elif case == "absent":
        path = str(tmp_path / "nothing.pth")
    elif case == "truncated":
        torch.save(state, path)
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
    else:
        torch.save(state, path)
    with pytest.raises(ScoringError) as e:
        load_aesthetic_predictor(path, expected_dim=expected_dim)
    message = str(e.value)
    assert "\n" not in message and os.path.basename(path) in message


def test_a_folder_given_as_predictor_is_told_to_name_the_file(tmp_path):
    with pytest.raises(ScoringError) as e:
        load_aesthetic_predictor(str(tmp_path))
    assert str(e.value) == (f"aesthetic predictor {tmp_path} is a folder; name the predictor file itself, a .pth or "
                            ".safetensors file such as sac+logos+ava1-l14-linearMSE.pth")


# -- probes ----------------------------------------------------------------------------------
def test_antonym_probability_is_the_pairwise_softmax_averaged():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(3, 8, generator=g), dim=-1)
    pos = torch.nn.functional.normalize(torch.randn(2, 8, generator=g), dim=-1)
    neg = torch.nn.functional.normalize(torch.randn(2, 8, generator=g), dim=-1)
    expected = torch.zeros(3)
    for p in range(2):
        logits = torch.stack([100 * img @ pos[p], 100 * img @ neg[p]], dim=1)
        expected += logits.softmax(dim=1)[:, 0] / 2
    assert torch.allclose(antonym_probability(img, pos, neg, 100.0), expected, atol=1e-6)


def test_probe_scores_follow_the_text_features(clip):
    """An image embedding equal to a positive prompt's embedding scores above 0.5 on its dimension."""
    probes = default_probes(["color", "focus"])
    encoded = encode_probes(clip, probes)
    pos, neg = encoded["color"]
    image_like_positive = torch.nn.functional.normalize(pos.mean(0, keepdim=True), dim=-1)
    image_like_negative = torch.nn.functional.normalize(neg.mean(0, keepdim=True), dim=-1)
    scores = probe_scores(clip, torch.cat([image_like_positive, image_like_negative]), probes, encoded)
    assert scores["color"][0] > 0.5 > scores["color"][1]
    assert set(scores) == {"color", "focus"}


def test_probe_definitions():
    assert [p.name for p in DEFAULT_PROBES] == ["color", "lighting", "composition", "focus", "texture", "emotion"]
    assert all(len(p.pairs) >= 3 for p in DEFAULT_PROBES)
    probe = parse_probe("warmth=a warm photo.|a cold photo.; warm light|cold light")
    assert probe.name == "warmth" and probe.pairs == (("a warm photo.", "a cold photo."), ("warm light", "cold light"))
    for bad in ("warmth", "warmth=", "warmth=a warm photo.", "=a|b"):
        with pytest.raises(ScoringError):
            parse_probe(bad)
    with pytest.raises(ScoringError, match="define it as"):
        default_probes(["warmth"])


# -- images and the feature cache ------------------------------------------------------------
def test_find_images_is_recursive_sorted_and_skips_hidden(tmp_path):
    for rel in ("b.png", "a/c.JPG", "a/d.webp", ".hidden/e.png", "a/.f.png", "notes.txt", "a/g.jpeg"):
        os.makedirs(os.path.dirname(str(tmp_path / rel)), exist_ok=True)
        open(str(tmp_path / rel), "wb").write(b"")
    assert find_images(str(tmp_path)) == ["a/c.JPG", "a/d.webp", "a/g.jpeg", "b.png"]
    assert find_images(str(tmp_path), recursive=False) == ["b.png"]
    with pytest.raises(ScoringError):
        find_images(str(tmp_path / "none"))


def test_read_image_flattens_alpha_on_white_and_refuses_truncation(tmp_path):
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(str(tmp_path / "a.png"))
    assert read_image(str(tmp_path / "a.png")).getpixel((0, 0)) == (255, 255, 255)
    Image.new("RGB", (64, 64), (1, 2, 3)).save(str(tmp_path / "b.jpg"), quality=95)
    data = open(str(tmp_path / "b.jpg"), "rb").read()
    open(str(tmp_path / "c.jpg"), "wb").write(data[: len(data) // 2])
    with pytest.raises(OSError):
        read_image(str(tmp_path / "c.jpg"))


def test_feature_cache_encodes_only_what_is_missing(tmp_path, clip):
    folder = tmp_path / "imgs"
    folder.mkdir()
    paths = []
    for i, im in enumerate(_pictures(5)):
        im.save(str(folder / f"{i}.png"))
        paths.append(str(folder / f"{i}.png"))
    open(str(folder / "broken.png"), "wb").write(b"\x89PNG not really")
    paths.insert(2, str(folder / "broken.png"))
    calls = []

    def embed(pixels):
        calls.append(pixels.shape[0])
        return clip.embed_pixels(pixels)

    first = embed_image_files(paths, FeatureCache(str(tmp_path / "cache"), clip.identity, shard_size=2), clip.pixel_values, embed, batch_size=2)
    assert first.computed == 5 and sum(calls) == 5
    assert [os.path.basename(p) for p, _ in first.failures] == ["broken.png"]
    assert torch.allclose(first.embeds, clip.embed_images([read_image(p) for p in first.paths]), atol=1e-6)
    calls.clear()
    again = embed_image_files(paths, FeatureCache(str(tmp_path / "cache"), clip.identity), clip.pixel_values, embed, batch_size=2)
    assert again.computed == 0 and calls == [] and torch.equal(again.embeds, first.embeds)
    # an edited file is encoded again, the others come from the cache
    Image.new("RGB", (40, 30), (0, 0, 255)).save(paths[0])
    os.utime(paths[0], ns=(1, 1))
    third = embed_image_files(paths, FeatureCache(str(tmp_path / "cache"), clip.identity), clip.pixel_values, embed, batch_size=2)
    assert third.computed == 1 and calls == [1]
    assert not torch.equal(third.embeds[0], first.embeds[0]) and torch.equal(third.embeds[1:], first.embeds[1:])


def test_damaged_cache_shard_is_named(tmp_path, clip):
    cache = FeatureCache(str(tmp_path), clip.identity)
    cache.add(["k"], torch.ones(1, 4))
    cache.flush()
    shard = os.path.join(cache.folder, "shard-000000.safetensors")
    open(shard, "wb").write(b"garbage")
    with pytest.raises(ScoringError, match="delete it"):
        FeatureCache(str(tmp_path), clip.identity)


def test_device_option():
    from vmix_lib.scoring.device import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ScoringError, match="not a torch device name"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ScoringError, match="no CUDA GPU"):
            resolve_device("cuda")
