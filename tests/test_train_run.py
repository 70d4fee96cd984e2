"""``python -m vmix_lib.train`` end to end on small single-file checkpoints: outputs, resume, refusals."""
import csv
import json
import os

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from vmix_lib.train.__main__ import main
from vmix_lib.train.previews import ddim_sample, ddim_timesteps, lambda_sweep
from vmix_lib.train.tiny_models import write_tiny_model

from test_train_helpers import alphas_cumprod, file_tensors, tiny_unet, write_dataset


@pytest.fixture(scope="module")
def tiny_sd15(tmp_path_factory):
    return write_tiny_model(str(tmp_path_factory.mktemp("sd15")), "sd15")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("data")), count=4)


def _args(model, dataset, out, *extra):
    checkpoint, config_dir, tokenizer_dir = model
    return [
        "--checkpoint", checkpoint, "--model-config-dir", config_dir, "--tokenizer-dir", tokenizer_dir,
        "--dataset-dir", dataset, "--output-dir", str(out), "--name", "t", "--resolution", "32",
        "--batch-size", "2", "--lr", "1e-3", "--preview-steps", "2", "--preview-lambdas", "0,1", "--save-precision", "fp32",
        *extra,
    ]


def _losses(out):
    with open(os.path.join(out, "t-loss.csv"), newline="") as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]


def test_full_run_writes_every_output(tiny_sd15, dataset, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(_args(tiny_sd15, dataset, out, "--max-steps", "4", "--save-every", "2", "--preview-every", "2",
                      "--lora-rank", "2", "--lora-conv-rank", "1", "--preview-prompt", "a cat"))
    assert code == 0
    log = capsys.readouterr().out
    assert "SD1.5 checkpoint tiny-sd15.safetensors (epsilon), objective data\n  data: 4 images; superior labels: color 2, lighting 0" in log
    assert "  global batch 2 = 2 per process x 1 process x 1 accumulation; 4 steps = 8 samples" in log
    names = set(os.listdir(out))
    assert {"t.safetensors", "t-lora.safetensors", "t-step000002.safetensors", "t-lora-step000002.safetensors",
            "t-step000004.state.pt", "t-config.json", "t-loss.csv", "t-loss.png", "previews", "cache"} <= names
    assert "t-step000002.state.pt" not in names  # only the newest resume state is kept
    assert sorted(os.listdir(out / "previews")) == ["t-step000002.png", "t-step000004.png"]
    with Image.open(out / "previews" / "t-step000004.png") as grid:
        # 2 lambdas x (1 prompt + that prompt with each of the 6 dimensions alone), 32 px tiles shown
        # at 128 px, a 150 px margin for the row labels
        assert grid.size == (150 + 2 * 128, 7 * 128 + 34)
    assert [s for s, _ in _losses(out)] == [1, 2, 3, 4]
    assert len(os.listdir(out / "cache")) == 4

    adapter = file_tensors(str(out / "t.safetensors"))
    assert adapter["aes_emb"].shape == (12, 32)  # 6 default dimensions, positive and negative rows
    assert "values.input_blocks.1.1.transformer_blocks.0.attn2.weight" in adapter
    assert adapter["projection.out.weight"].abs().sum() > 0
    with safe_open(str(out / "t.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["vmix"])
    assert meta["family"] == "sd15" and meta["training"]["steps"] == 4 and meta["training"]["lora"] == "t-lora.safetensors"
    lora = file_tensors(str(out / "t-lora.safetensors"))
    assert "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in lora
    assert "lora_unet_output_blocks_2_1_conv.lora_up.weight" in lora  # up-sampler of the block without attention
    assert os.stat(out / "t.safetensors").st_mode & 0o044 == 0o044 & ~_umask()


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_resume_continues_bit_for_bit(tiny_sd15, dataset, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ("--save-every", "2", "--preview-every", "2", "--lora-rank", "2", "--caption-dropout", "0.5",
              "--aesthetic-dropout", "0.5", "--grad-accum", "2")
    assert main(_args(tiny_sd15, dataset, straight, "--max-steps", "4", *common)) == 0
    assert main(_args(tiny_sd15, dataset, split, "--max-steps", "2", *common)) == 0
    assert main(_args(tiny_sd15, dataset, split, "--max-steps", "4", "--resume", "latest", *common)) == 0
    for name in ("t.safetensors", "t-lora.safetensors"):
        a, b = file_tensors(str(straight / name)), file_tensors(str(split / name))
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), name
    assert _losses(straight) == _losses(split)


def test_existing_runs_are_never_overwritten_and_resume_checks(tiny_sd15, dataset, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(tiny_sd15, dataset, out, "--max-steps", "1", "--preview-every", "0")) == 0
    before = (out / "t.safetensors").read_bytes()
    capsys.readouterr()
    assert main(_args(tiny_sd15, dataset, out, "--max-steps", "1", "--preview-every", "0")) == 2
    err = capsys.readouterr().err
    assert f"{out} already holds a run named 't' (t-step000001.state.pt); continue it with --resume latest" in err
    assert (out / "t.safetensors").read_bytes() == before
    assert main(_args(tiny_sd15, dataset, out, "--max-steps", "1", "--resume", "latest")) == 2
    assert "the run is already at step 1; raise max_steps above it to train further" in capsys.readouterr().err
    assert main(_args(tiny_sd15, dataset, out, "--max-steps", "2", "--resume", "latest", "--lora-rank", "4")) == 2
    assert "the resume state was trained with other LoRA settings" in capsys.readouterr().err
    assert main(_args(tiny_sd15, dataset, tmp_path / "empty", "--max-steps", "2", "--resume", "latest")) == 2
    assert "holds no t-step*.state.pt file" in capsys.readouterr().err


def test_dry_run_checks_and_writes_nothing(tiny_sd15, dataset, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(tiny_sd15, dataset, out, "--dry-run")) == 0
    printed = capsys.readouterr().out
    assert "Dry run: the config, dataset, checkpoint header, model configs and tokenizers are usable." in printed
    # 4 images, 2 labelled color superior, none superior in the other 5 default dimensions: one warning
    assert printed.count("warning") == 1 and (
        "  data: 4 images; superior labels: color 2, lighting 0, composition 0, focus 0, texture 0, emotion 0\n"
        "  warning: under 1 % of the 4 images are labelled superior in lighting (0), composition (0), focus (0), texture (0), "
        "emotion (0): the adapter learns next to nothing for a dimension without superior examples; label some superior "
        "(python -m vmix_lib.prepare, or the dataset's .json / metadata.jsonl labels) or train without them: --dimensions color\n"
    ) in printed
    assert main(_args(tiny_sd15, dataset, out, "--dry-run", "--dimensions", "color")) == 0  # the advice, taken
    printed = capsys.readouterr().out
    assert "  data: 4 images; superior labels: color 2\n" in printed and "warning" not in printed
    assert not out.exists()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"nope")
    assert main(_args(tiny_sd15, str(tmp_path / "bad"), out, "--dry-run")) == 2
    err = capsys.readouterr().err
    assert "has 2 problems:\n  missing caption: x.png (expected x.txt)\n  unreadable image: x.png (cannot identify" in err


def test_sdxl_run_with_added_conditioning(tmp_path, dataset):
    model = write_tiny_model(str(tmp_path / "xl"), "sdxl")
    out = tmp_path / "run"
    assert main(_args(model, dataset, out, "--max-steps", "2", "--preview-every", "2", "--no-cache-latents")) == 0
    with safe_open(str(out / "t.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["vmix"])["family"] == "sdxl"
        assert f.get_slice("aes_emb").get_shape() == [12, 64]  # CLIP-L pooled ‖ OpenCLIP-G pooled
    assert not (out / "cache").exists()


def test_ddim_schedule_and_lambda_zero_column_is_the_base_model():
    assert ddim_timesteps(4) == [751, 501, 251, 1]
    from vmix_lib.dimensions import DEFAULT_DIMENSIONS
    from vmix_lib.hook import ValueMixer
    from vmix_lib.mixing import VMixAdapter
    from vmix_lib.train.loop import diffusers_unet_forward

    unet = tiny_unet()
    forward = diffusers_unet_forward(unet)
    acp = alphas_cumprod()
    ctx = torch.randn(1, 77, 8, generator=torch.Generator().manual_seed(0))
    encode = lambda prompts: (ctx.expand(len(prompts), 77, 8) * (0 if prompts[0] == "" else 1), None)
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    base = ddim_sample(forward, noise, ctx, ctx * 0, acp, steps=3, cfg=5.0)
    adapter = VMixAdapter.for_unet(unet, torch.randn(12, 8), "sd15", DEFAULT_DIMENSIONS)
    torch.nn.init.normal_(adapter.projection.out.weight, std=0.5)
    mixer = ValueMixer(adapter).install(unet)
    mixer.arm()
    columns = []
    grid = lambda_sweep(mixer, forward, encode, lambda lat: columns.append(lat) or lat[:, :3].clamp(-1, 1), ["p"], [0.0, 1.0],
                        (4, 8, 8), acp, steps=3, cfg=5.0, seed=0)
    mixer.remove()
    assert torch.equal(columns[0], base)  # λ = 0: the hook adds nothing
    assert not torch.allclose(columns[1], base)
    assert grid.size == (256, 128 + 34) and mixer.strength == 1.0


def test_images_that_fail_to_decode_while_caching_are_listed(tiny_sd15, tmp_path, capsys):
    import numpy as np

    data = write_dataset(str(tmp_path / "data"), count=2)
    noise = (np.random.RandomState(0).rand(64, 64, 3) * 255).astype("uint8")
    Image.fromarray(noise).save(tmp_path / "full.jpg", quality=90)
    raw = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "data" / "cut.jpg").write_bytes(raw[: int(len(raw) * 0.7)])  # header fine, data truncated
    (tmp_path / "data" / "cut.txt").write_text("a cut picture")
    out = tmp_path / "run"
    assert main(_args(tiny_sd15, data, out, "--max-steps", "1", "--preview-every", "0")) == 2
    err = capsys.readouterr().err
    assert "has 1 problem:\n  unreadable image: cut.jpg (image file is truncated" in err
    assert main(_args(tiny_sd15, data, out, "--max-steps", "1", "--preview-every", "0", "--skip-bad")) == 0
    assert "--skip-bad: skipping 1 image(s) that failed to decode: cut.jpg" in capsys.readouterr().out


def _mixed_shapes(folder):
    """Two wide (64x32), two tall (32x64) and two square (40x40) images with captions."""
    os.makedirs(folder, exist_ok=True)
    for i, size in enumerate([(64, 32), (64, 32), (32, 64), (32, 64), (40, 40), (40, 40)]):
        Image.new("RGB", size, (40 * i, 120, 200)).save(os.path.join(folder, f"m{i}.png"))
        with open(os.path.join(folder, f"m{i}.txt"), "w", encoding="utf-8") as f:
            f.write(f"a shape {i}")
    return folder


def test_bucketed_sdxl_run_conditions_on_the_real_crop(tmp_path, capsys, monkeypatch):
    import vmix_lib.train.loop as loop

    model = write_tiny_model(str(tmp_path / "xl"), "sdxl")
    data = _mixed_shapes(str(tmp_path / "mixed"))
    seen = []
    real = loop.diffusers_unet_forward

    def recording(unet):
        forward = real(unet)

        def wrapped(x, t, context, added=None):
            if torch.is_grad_enabled():  # training steps, not previews
                seen.append((tuple(x.shape), tuple(tuple(r) for r in added["time_ids"].tolist())))
            return forward(x, t, context, added)

        return wrapped

    monkeypatch.setattr(loop, "diffusers_unet_forward", recording)
    out = tmp_path / "run"
    assert main(_args(model, data, out, "--max-steps", "3", "--preview-every", "3", "--caption-dropout", "0")) == 0
    log = capsys.readouterr().out
    assert "  aspect-ratio buckets: 9 of about 32x32 px (sides 16-64, step 8), 3 used: 24x40: 2, 32x32: 2, 40x24: 2" in log
    # One epoch = one batch per bucket.  time_ids = original (h, w), crop (top, left), target (h, w):
    assert sorted(seen) == sorted([
        ((2, 4, 6, 10), ((32.0, 64.0, 0.0, 4.0, 24.0, 40.0),) * 2),  # 64x32 -> 48x24, 4 px cut left and right
        ((2, 4, 10, 6), ((64.0, 32.0, 4.0, 0.0, 40.0, 24.0),) * 2),  # 32x64 -> 24x48, 4 rows cut top and bottom
        ((2, 4, 8, 8), ((40.0, 40.0, 0.0, 0.0, 32.0, 32.0),) * 2),  # 40x40 -> 32x32, nothing cut
    ])
    cached = [file_tensors(str(out / "cache" / f)) for f in os.listdir(out / "cache")]
    assert sorted(tuple(c["latents"].shape) for c in cached) == [(4, 6, 10)] * 2 + [(4, 8, 8)] * 2 + [(4, 10, 6)] * 2
    assert sorted(c["size_crop"].tolist() for c in cached) == [[32, 64, 0, 4]] * 2 + [[40, 40, 0, 0]] * 2 + [[64, 32, 4, 0]] * 2
    with Image.open(out / "previews" / "t-step000003.png") as grid:
        assert grid.size == (150 + 2 * 128, 8 * 128 + 34)  # at the training resolution: 2 prompts + 6 dimensions alone

    seen.clear()
    square = tmp_path / "square"
    assert main(_args(model, data, square, "--max-steps", "3", "--preview-every", "0", "--no-bucket")) == 0
    assert "  square centre crops at 32x32 px (bucket = false)" in capsys.readouterr().out
    assert {shape for shape, _ in seen} == {(2, 4, 8, 8)}
    assert {row for _, rows in seen for row in rows} == {
        (32.0, 64.0, 0.0, 16.0, 32.0, 32.0), (64.0, 32.0, 16.0, 0.0, 32.0, 32.0), (40.0, 40.0, 0.0, 0.0, 32.0, 32.0)}


def test_bad_bucket_settings_and_lone_cpu_launch(tiny_sd15, dataset, tmp_path, capsys, monkeypatch):
    assert main(_args(tiny_sd15, dataset, tmp_path / "r", "--bucket-step", "12", "--dry-run")) == 2
    assert "aspect-ratio buckets: resolution 32 is not a multiple of bucket_step 12" in capsys.readouterr().err
    assert main(_args(tiny_sd15, dataset, tmp_path / "r", "--bucket-step", "4", "--dry-run")) == 2
    assert capsys.readouterr().err == "vmix train: error: bucket_step 4 (--bucket-step) must be a multiple of 8 for this model, e.g. 8\n"
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")  # what `accelerate launch --cpu --num_processes 2` leaves
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(_args(tiny_sd15, dataset, tmp_path / "r", "--dry-run")) == 2
    assert "accelerate launch --cpu starts a single process whatever --num_processes says; for several CPU processes run: " \
           "torchrun --standalone --nproc_per_node N -m vmix_lib.train ... --device cpu" in capsys.readouterr().err


def test_a_state_of_the_previous_trainer_version_continues_with_a_note(tiny_sd15, dataset, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(tiny_sd15, dataset, out, "--max-steps", "2", "--preview-every", "0")) == 0
    path = out / "t-step000002.state.pt"
    state = torch.load(path, weights_only=True)
    old = {k: v for k, v in state.items() if k not in ("objective", "processes")}  # version 1's fields
    old.update(version=1, images=4, samples_seen=4, data_generator=torch.Generator().get_state(), torch_rng=torch.get_rng_state())
    old["fingerprint"] = {k: v for k, v in state["fingerprint"].items() if k != "objective"}
    torch.save(old, path)
    capsys.readouterr()
    assert main(_args(tiny_sd15, dataset, out, "--max-steps", "3", "--preview-every", "0", "--resume", "latest")) == 0
    log = capsys.readouterr().out
    assert "Note: the resume state was written by an earlier version of the trainer" in log
    assert "Note: the data order changed since the saved state: the data continue in epoch 2 at 0% of it" in log
    assert [s for s, _ in _losses(out)] == [1, 2, 3]


def test_pixel_sizes_the_model_cannot_use_name_the_setting_the_value_and_where(tiny_sd15, dataset, tmp_path, capsys):
    assert main(_args(tiny_sd15, dataset, tmp_path / "r", "--resolution", "30", "--dry-run")) == 2
    assert capsys.readouterr().err == "vmix train: error: resolution 30 (--resolution) must be a multiple of 8 for this model, e.g. 24 or 32\n"
    config = tmp_path / "c.toml"
    config.write_text("[preview]\npreview_resolution = 4\n", encoding="utf-8")
    assert main(_args(tiny_sd15, dataset, tmp_path / "r", "--config", str(config), "--dry-run")) == 2
    assert capsys.readouterr().err == f"vmix train: error: preview_resolution 4 ({config}) must be a multiple of 8 for this model, e.g. 8\n"


def test_cpu_threads_one_for_a_tiny_unet_unless_told(tiny_sd15, dataset, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert main(_args(tiny_sd15, dataset, tmp_path / "a", "--max-steps", "1", "--preview-every", "0")) == 0
        assert "  CPU threads: 1 (auto: the UNet has 1.11 M parameters, under 10 M, where one thread is fastest; " \
               "--threads N to choose)\n" in capsys.readouterr().out
        assert torch.get_num_threads() == 1
        assert main(_args(tiny_sd15, dataset, tmp_path / "b", "--max-steps", "1", "--preview-every", "0", "--threads", "2")) == 0
        assert "  CPU threads: 2 (--threads 2)\n" in capsys.readouterr().out and torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert main(_args(tiny_sd15, dataset, tmp_path / "c", "--max-steps", "1", "--preview-every", "0")) == 0
        assert "  CPU threads: 2 (OMP_NUM_THREADS=2)\n" in capsys.readouterr().out and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_cpu_thread_rule_for_a_real_size_model(monkeypatch):
    from vmix_lib.cpu_threads import choose_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    threads, line = choose_threads(0, 859_520_964, "UNet")  # SD1.5's UNet: torch's default stays
    assert threads is None and line == f"CPU threads: {torch.get_num_threads()} (auto: torch's default for the UNet of 860 M parameters; --threads N to choose)"
    assert choose_threads(0, 9_999_999, "UNet")[0] == 1 and choose_threads(3, 9_999_999, "UNet")[0] == 3


def test_preview_rows_name_their_prompt_and_dimensions(tiny_sd15, dataset, tmp_path, monkeypatch):
    import vmix_lib.train.previews as previews_module

    seen = {}
    real = previews_module.lambda_sweep
    monkeypatch.setattr(previews_module, "lambda_sweep", lambda *a, **kw: seen.update(kw) or real(*a, **kw))
    assert main(_args(tiny_sd15, dataset, tmp_path / "r", "--max-steps", "1", "--preview-every", "1", "--dimensions",
                      "color,lighting", "--preview-prompt", "a cat", "--preview-prompt", "a dog")) == 0
    assert seen["row_labels"] == ["a cat\nall dimensions", "a dog\nall dimensions", "a cat\nonly color", "a cat\nonly lighting"]
    assert seen["title"] == "step 1: one column per lambda; each row: its prompt and the dimensions labelled superior"


def test_preview_labels_draw_accented_letters_not_boxes():
    from vmix_lib.scoring.images import FONT_FILES, _open_font, font_covers
    from vmix_lib.train.previews import make_grid

    if not any(_open_font(n, 12) and all(font_covers(n, _open_font(n, 12), c) for c in "éüñ") for n in FONT_FILES):
        pytest.skip("this system has no scalable font with é, ü and ñ")
    tile = Image.new("RGB", (32, 32), (128, 128, 128))

    def grid(word):
        return make_grid([[tile]], ["lambda 1"], title=f"a {word} photo", row_labels=[f"a {word} photo\nall dimensions"]).tobytes()

    missing = grid("caf\U0010fffd Z\U0010fffdrich se\U0010fffdor")  # a code point no font has: drawn as a box
    assert grid("café Zürich señor") != missing
    assert grid("cafe Zurich senor") != grid("cafe Zurich senor".replace("e", "\U0010fffd"))  # the comparison sees glyphs
