"""``python -m vmix_lib.train --objective distill`` end to end on small single-file checkpoints:
outputs and metadata, resume bit for bit, SDXL's conditioning, the settings' refusals, and two
CPU processes against one."""
import json
import os

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from vmix_lib.adapter_file import read_adapter_info
from vmix_lib.train import loop
from vmix_lib.train.__main__ import main
from vmix_lib.train.config import resolve_config
from vmix_lib.train.distill import builtin_prompts
from vmix_lib.train.errors import TrainError
from vmix_lib.train.tiny_models import write_tiny_model

from test_train_distributed import _torchrun
from test_train_helpers import file_tensors

PROMPTS = "# content prompts\na cat on a sofa\n\na house by a lake\na bowl of soup\n"


@pytest.fixture(scope="module")
def tiny_sd15(tmp_path_factory):
    return write_tiny_model(str(tmp_path_factory.mktemp("sd15")), "sd15")


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text(PROMPTS, encoding="utf-8")
    return str(path)


def _args(model, out, *extra):
    checkpoint, config_dir, tokenizer_dir = model
    return [
        "--checkpoint", checkpoint, "--model-config-dir", config_dir, "--tokenizer-dir", tokenizer_dir,
        "--objective", "distill", "--output-dir", str(out), "--name", "t", "--resolution", "32",
        "--batch-size", "2", "--lr", "1e-3", "--xt-steps", "4", "--preview-steps", "2", "--preview-lambdas", "0,1",
        "--save-precision", "fp32", "--device", "cpu", *extra,
    ]


def _losses(out):
    with open(os.path.join(out, "t-loss.csv"), encoding="utf-8") as f:
        return [line.split(",")[:2] for line in f.read().splitlines()[1:]]


def test_distill_run_writes_every_output_and_records_how_it_was_made(tiny_sd15, prompts_file, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(_args(tiny_sd15, out, "--max-steps", "4", "--save-every", "2", "--preview-every", "4",
                      "--prompts-file", prompts_file, "--phrase", "color=vibrant colors|dull colors",
                      "--phrase", "lighting=golden hour", "--eta", "1.5", "--mirror"))
    assert code == 0
    captured = capsys.readouterr()
    log = captured.out
    assert "dir=" in captured.err  # the progress bar shows the size of η·ΣΔ
    assert "objective distill\n  distill: 3 content prompts (" + prompts_file + "); phrases: color 'vibrant colors' vs 'dull colors'; " \
           "lighting 'golden hour' vs ''; composition 'proportional composition' vs ''" in log
    assert "η 1.5; x_t: 4-step DDIM of the student with CFG 3, loss at timesteps 0-999; mirrored" in log
    assert "how much each phrase pair moves the base model" in log and "color 0." in log
    names = set(os.listdir(out))
    assert {"t.safetensors", "t-step000002.safetensors", "t-step000004.state.pt", "t-config.json", "t-loss.csv",
            "t-loss.png", "previews"} <= names
    assert "cache" not in names  # no images, nothing cached
    assert [s for s, _ in _losses(out)] == ["1", "2", "3", "4"]
    with Image.open(out / "previews" / "t-step000004.png") as grid:
        assert grid.size == (150 + 2 * 128, 8 * 128 + 34)  # 2 lambdas x (2 prompts + 6 dimensions alone)

    info = read_adapter_info(str(out / "t.safetensors"), allow_custom_layout=True)
    facts = info.training
    assert facts["objective"] == "distill" and facts["eta"] == 1.5 and facts["mirror"] is True
    assert facts["phrases"]["color"] == {"positive": "vibrant colors", "contrast": "dull colors"}
    assert facts["phrases"]["lighting"] == {"positive": "golden hour", "contrast": ""}
    assert facts["phrases"]["focus"] == {"positive": "sharp focus", "contrast": ""}  # the label by default
    assert facts["prompts"] == 3 and facts["prompts_file"] == "prompts.txt" and facts["steps"] == 4
    trained = file_tensors(str(out / "t.safetensors"))
    assert trained["projection.out.weight"].abs().max() > 1e-4  # the zero-initialised projection moved


def test_the_teacher_is_the_base_model_and_all_passes_of_a_micro_batch_are_batched(tiny_sd15, prompts_file, tmp_path, monkeypatch):
    """Per micro-batch: x_t steps (CFG rows together), one teacher call with every row, one student call."""
    calls = []
    real = loop.diffusers_unet_forward

    def recording(unet):
        forward = real(unet)

        def wrapped(x, t, context, added=None):
            calls.append(x.shape[0])
            return forward(x, t, context, added)

        return wrapped

    monkeypatch.setattr(loop, "diffusers_unet_forward", recording)
    assert main(_args(tiny_sd15, tmp_path / "run", "--max-steps", "1", "--preview-every", "0", "--prompts-file", prompts_file,
                      "--superior-prob", "1", "--xt-guidance", "1", "--min-timestep", "700")) == 0
    # probe (1 draw of 3 prompts), then the step: x_t from noise in 0 steps (t = 751 is the first of 4), the
    # teacher's 3 x (1 + 6) rows in one call, the student's 2 rows
    assert calls[-2:] == [2 * 7, 2]


def test_resume_halfway_continues_bit_for_bit(tiny_sd15, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ("--save-every", "2", "--preview-every", "0", "--grad-accum", "2", "--phrase", "color=vibrant|dull")
    assert main(_args(tiny_sd15, straight, "--max-steps", "4", *common)) == 0
    assert main(_args(tiny_sd15, split, "--max-steps", "2", *common)) == 0
    assert main(_args(tiny_sd15, split, "--max-steps", "4", "--resume", "latest", *common)) == 0
    a, b = file_tensors(str(straight / "t.safetensors")), file_tensors(str(split / "t.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(straight) == _losses(split)


def test_a_resume_with_other_phrases_is_refused(tiny_sd15, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(tiny_sd15, out, "--max-steps", "1", "--preview-every", "0")) == 0
    capsys.readouterr()
    assert main(_args(tiny_sd15, out, "--max-steps", "2", "--preview-every", "0", "--resume", "latest", "--eta", "2")) == 2
    assert "the resume state was trained with other objective than this config" in capsys.readouterr().err


def test_sdxl_distill_conditions_on_size_and_time_ids(tmp_path, monkeypatch, capsys):
    model = write_tiny_model(str(tmp_path / "xl"), "sdxl")
    seen = []
    real = loop.diffusers_unet_forward

    def recording(unet):
        forward = real(unet)

        def wrapped(x, t, context, added=None):
            seen.append((tuple(x.shape), added["time_ids"].tolist()[0], tuple(added["text_embeds"].shape)))
            return forward(x, t, context, added)

        return wrapped

    monkeypatch.setattr(loop, "diffusers_unet_forward", recording)
    out = tmp_path / "run"
    assert main(_args(model, out, "--dry-run")) == 0
    assert "Dry run: the config, dataset, checkpoint header, model configs and tokenizers are usable." in capsys.readouterr().out
    assert not out.exists()
    assert main(_args(model, out, "--max-steps", "1", "--preview-every", "1", "--no-preview-dimensions")) == 0
    assert seen and all(ids == [32.0, 32.0, 0.0, 0.0, 32.0, 32.0] and x[1:] == (4, 8, 8) for x, ids, _ in seen)
    with safe_open(str(out / "t.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["vmix"])
    assert meta["family"] == "sdxl" and meta["training"]["objective"] == "distill"
    assert meta["training"]["prompts_file"] == "built-in" and meta["training"]["prompts"] == len(builtin_prompts()) == 60


def test_the_example_distill_configs_pass_a_dry_run(tmp_path, capsys):
    for family in ("sd15", "sdxl"):
        model = write_tiny_model(str(tmp_path / family), family)
        checkpoint, config_dir, tokenizer_dir = model
        example = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", f"distill_{family}.toml")
        code = main(["--config", example, "--checkpoint", checkpoint, "--model-config-dir", config_dir,
                     "--tokenizer-dir", tokenizer_dir, "--output-dir", str(tmp_path / "out"), "--dry-run"])
        log = capsys.readouterr()
        assert code == 0, log.err
        assert "objective distill" in log.out and "color 'vibrant colors' vs 'dull colors'" in log.out


@pytest.mark.parametrize("extra, message", [
    (("--lora-rank", "2"), "objective distill trains the adapter alone (its teacher is the frozen base model); set lora_rank and lora_conv_rank to 0"),
    (("--phrase", "colour=vivid"), "phrases name the dimension 'colour', which this run does not train (color, lighting"),
    (("--phrase", "color=vivid|vivid"), "the phrases of dimension 'color' are the same ('vivid'); give a different contrast, or none"),
    (("--phrase", "color"), "--phrase must look like NAME=POSITIVE or NAME=POSITIVE|CONTRAST, got 'color'"),
    (("--phrase", "color=|dull"), "--phrase: color has an empty positive phrase"),
    (("--min-timestep", "500", "--max-timestep", "400"), "min_timestep 500 is above max_timestep 400"),
    (("--xt-steps", "10", "--min-timestep", "995", "--max-timestep", "998"), "no step of the 10-step sampler has a timestep in [995, 998]"),
])
def test_bad_distill_settings_get_one_sentence(tiny_sd15, tmp_path, capsys, extra, message):
    assert main(_args(tiny_sd15, tmp_path / "run", "--dry-run", *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("vmix train: error: ") and message in err and "Traceback" not in err


def test_prompt_files_and_the_data_objective_still_needs_a_dataset(tiny_sd15, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n", encoding="utf-8")
    assert main(_args(tiny_sd15, tmp_path / "run", "--dry-run", "--prompts-file", str(empty))) == 2
    assert f"prompts_file {empty} holds no prompt; write one content prompt a line" in capsys.readouterr().err
    assert main(_args(tiny_sd15, tmp_path / "run", "--dry-run", "--prompts-file", str(tmp_path / "missing.txt"))) == 2
    assert f"prompts_file {tmp_path / 'missing.txt'} cannot be read (No such file or directory)" in capsys.readouterr().err
    with pytest.raises(TrainError, match=r"no dataset_dir given; set dataset_dir in the config file or pass --dataset-dir "
                                         r"\(or train without pictures: objective = \"distill\"\)"):
        resolve_config(["--checkpoint", "x.safetensors", "--output-dir", "o"])
    cfg, _ = resolve_config(["--checkpoint", "x.safetensors", "--output-dir", "o", "--objective", "distill"])
    assert cfg.dataset_dir == "" and cfg.phrases == {} and cfg.eta == 1.0
    toml = tmp_path / "c.toml"
    toml.write_text('[distill]\nphrases = { color = ["vibrant colors", "dull colors"], lighting = "soft light" }\n', encoding="utf-8")
    cfg, _ = resolve_config(["--config", str(toml), "--checkpoint", "x.safetensors", "--output-dir", "o", "--objective", "distill"])
    assert cfg.phrases == {"color": ("vibrant colors", "dull colors"), "lighting": ("soft light", "")}
    assert "a red fox" not in " ".join(builtin_prompts())  # held apart from the evaluation's built-in set
    from vmix_lib.evaluate.prompts import builtin_prompts as evaluation_prompts

    assert not set(builtin_prompts()) & {p.text for p in evaluation_prompts()}


def test_two_processes_equal_one(tiny_sd15, tmp_path):
    """1 process x batch 2 against 2 processes x batch 1: the same global micro-batches (prompts, labels,
    step k and noise drawn per global micro-batch), so the same losses and adapter within float tolerance."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = ("--max-steps", "3", "--preview-every", "0", "--save-every", "0", "--seed", "5", "--data-workers", "0")
    assert main(_args(tiny_sd15, one, *common)) == 0
    output = _torchrun(_args(tiny_sd15, two, *common, "--batch-size", "1"), tmp_path / "writes.txt")
    assert "global batch 2 = 1 per process x 2 processes x 1 accumulation" in output
    for (s1, l1), (s2, l2) in zip(_losses(one), _losses(two)):
        assert s1 == s2 and float(l2) == pytest.approx(float(l1), rel=1e-5)
    a, b = file_tensors(str(one / "t.safetensors")), file_tensors(str(two / "t.safetensors"))
    assert set(a) == set(b)
    for key in a:
        assert torch.allclose(a[key], b[key], atol=2e-5, rtol=0), (key, (a[key] - b[key]).abs().max())


def test_a_gpu_out_of_memory_is_one_sentence_naming_the_teacher_split(monkeypatch, capsys):
    from vmix_lib.train import run

    def out_of_memory(cfg, dry_run=False):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(run, "run_training", out_of_memory)
    assert main(["--checkpoint", "x.safetensors", "--output-dir", "o", "--objective", "distill"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the GPU ran out of memory" in err and "set max_teacher_rows, e.g. 4" in err
