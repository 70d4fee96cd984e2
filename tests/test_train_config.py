"""Trainer settings: files (TOML/JSON/YAML), flags over files, paths, dimensions, and the errors."""
import json
import os

import pytest

from vmix_lib.dimensions import DEFAULT_DIMENSIONS
from vmix_lib.train.__main__ import main
from vmix_lib.train.config import FLAG_NAMES, SETTINGS, build_parser, read_config_file, resolve_config, settings_from_mapping
from vmix_lib.train.errors import TrainError

TOML = """
dimensions = ["color", { name = "mood", positive = "dramatic mood", negative = "qzv" }]

[model]
checkpoint = "models/base.safetensors"

[data]
dataset_dir = "data"
caption_dropout = 0.1

[train]
output_dir = "/abs/out"
lr = 2e-5
max_steps = 10

[preview]
preview_lambdas = [0, 1, 2]
"""


def _config(tmp_path, text=TOML, name="cfg.toml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_toml_sections_paths_and_dimensions(tmp_path):
    cfg, args = resolve_config(["--config", _config(tmp_path)])
    assert cfg.checkpoint == os.path.join(str(tmp_path), "models", "base.safetensors")  # relative to the file
    assert cfg.dataset_dir == os.path.join(str(tmp_path), "data")
    assert cfg.output_dir == "/abs/out"
    assert (cfg.lr, cfg.max_steps, cfg.caption_dropout, cfg.preview_lambdas) == (2e-5, 10, 0.1, [0.0, 1.0, 2.0])
    assert (cfg.batch_size, cfg.mixed_precision, cfg.lora_rank, cfg.cache_latents) == (1, "auto", 0, True)  # defaults
    assert [d.name for d in cfg.dimensions] == ["color", "mood"]
    assert cfg.dimensions[0] == DEFAULT_DIMENSIONS[0] and cfg.dimensions[1].negative == "qzv"
    assert not args.dry_run


def test_flags_override_the_file_and_paths_follow_the_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg, _ = resolve_config([
        "--config", _config(tmp_path), "--lr", "3e-4", "--dataset-dir", "other", "--no-cache-latents",
        "--preview-lambdas", "0,1.5", "--preview-prompt", "a cat, sitting", "--preview-prompt", "a dog",
        "--lora-rank", "8", "--mixed-precision", "bf16",
    ])
    assert cfg.lr == 3e-4 and cfg.dataset_dir == os.path.join(str(tmp_path), "other") and cfg.cache_latents is False
    assert cfg.preview_lambdas == [0.0, 1.5] and cfg.preview_prompts == ["a cat, sitting", "a dog"]
    assert cfg.lora_rank == 8 and cfg.mixed_precision == "bf16" and cfg.max_steps == 10


def test_family_defaults_from_the_paper():
    cfg, _ = resolve_config(["--checkpoint", "m.safetensors", "--dataset-dir", "d", "--output-dir", "o"])
    assert (cfg.family_default("lr", "sd15"), cfg.family_default("lr", "sdxl")) == (1e-4, 1e-5)
    assert (cfg.family_default("resolution", "sd15"), cfg.family_default("resolution", "sdxl")) == (512, 1024)
    assert [d.name for d in cfg.dimensions] == [d.name for d in DEFAULT_DIMENSIONS]


def test_json_and_yaml_files(tmp_path):
    data = {"checkpoint": "m.safetensors", "dataset_dir": "d", "output_dir": "o", "train": {"batch_size": 3}}
    cfg, _ = resolve_config(["--config", _config(tmp_path, json.dumps(data), "c.json")])
    assert cfg.batch_size == 3
    yaml = pytest.importorskip("yaml")
    cfg, _ = resolve_config(["--config", _config(tmp_path, yaml.safe_dump(dict(data, lora={"lora_rank": 4})), "c.yaml")])
    assert cfg.lora_rank == 4


@pytest.mark.parametrize(
    "text, message",
    [
        ("[train]\nlearning_rate = 1", r"unknown setting 'learning_rate' in \[train\] of .*cfg.toml"),
        ("[train]\nbatch_sise = 1", r"unknown setting 'batch_sise' .*\(did you mean 'batch_size'\?\)"),
        ("[data]\nlr = 1e-4", r"setting 'lr' belongs in \[train\], not \[data\], in .*cfg.toml"),
        ("[train]\nmax_steps = 1.5", r"max_steps in .*cfg.toml must be an integer, got 1.5"),
        ("[train]\nbatch_size = 0", r"batch_size in .*cfg.toml must be at least 1, got 0"),
        ("[data]\ncaption_dropout = 2", r"caption_dropout in .*cfg.toml must be at most 1, got 2"),
        ("[train]\nmixed_precision = 'fp8'", r"mixed_precision in .*cfg.toml must be one of auto, no, fp16, bf16, got 'fp8'"),
        ("[data]\ncache_latents = 'yes'", r"cache_latents in .*cfg.toml must be true or false, got 'yes'"),
        ("dimensions = ['colour']", r"dimension 'colour' in .*cfg.toml is not a built-in one \(color, lighting"),
        ("dimensions = ['color', 'color']", r"the dimensions in .*cfg.toml: dimension 'color' appears twice"),
        ("dimensions = [{name = 'x'}]", r"dimension 1 in .*cfg.toml must be a built-in name or a table with name, positive and negative"),
        ("[train\n", r"config file .*cfg.toml cannot be parsed \("),
        ("[train]\nname = 'a/b'", r"name 'a/b' cannot be used as a file name stem"),
    ],
)
def test_bad_settings_get_one_sentence(tmp_path, text, message):
    base = "checkpoint = 'm.safetensors'\ndataset_dir = 'd'\noutput_dir = 'o'\n"
    with pytest.raises(TrainError, match=message):
        resolve_config(["--config", _config(tmp_path, base + text)])


def test_missing_required_and_missing_file(tmp_path):
    with pytest.raises(TrainError, match=r"^no checkpoint given; set checkpoint in the config file or pass --checkpoint$"):
        resolve_config(["--dataset-dir", "d", "--output-dir", "o"])
    with pytest.raises(TrainError, match=r"config file .*nope.toml does not exist"):
        resolve_config(["--config", str(tmp_path / "nope.toml")])
    with pytest.raises(TrainError, match=r"must end in .toml, .json, .yaml or .yml"):
        resolve_config(["--config", _config(tmp_path, "", "c.ini")])


def test_cli_prints_one_line_and_exit_code_2(tmp_path, capsys):
    assert main(["--config", _config(tmp_path, "[train]\nbatch_size = -1\n")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vmix train: error: batch_size in ") and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_info:  # argparse's own check of flag values
        main(["--lr", "fast"])
    assert exit_info.value.code == 2
    assert "argument --lr: invalid float value: 'fast'" in capsys.readouterr().err


def test_every_config_key_is_a_flag(tmp_path):
    """The README's promise: every key a config file accepts is also a flag (its name with dashes)."""
    keys = [s.name for s in SETTINGS] + ["dimensions"]  # the settings, and the one key beside them
    probe = tmp_path / "all.toml"
    probe.write_text("dimensions = ['color']\n", encoding="utf-8")
    assert settings_from_mapping(read_config_file(str(probe)), "all.toml", None)[1][0].name == "color"
    options = {option for action in build_parser()._actions for option in action.option_strings}
    assert [key for key in keys if FLAG_NAMES.get(key, "--" + key.replace("_", "-")) not in options] == []


def test_dimensions_flag_takes_built_in_names_and_the_files_own(tmp_path, monkeypatch):
    base = ["--checkpoint", "m.safetensors", "--dataset-dir", "d", "--output-dir", "o"]
    cfg, _ = resolve_config(base + ["--dimensions", "focus, color"])
    assert cfg.dimensions == [DEFAULT_DIMENSIONS[3], DEFAULT_DIMENSIONS[0]]
    cfg, _ = resolve_config(["--config", _config(tmp_path), "--dimensions", "mood"])  # defined in the file
    assert [(d.name, d.positive, d.negative) for d in cfg.dimensions] == [("mood", "dramatic mood", "qzv")]
    cfg, _ = resolve_config(["--config", _config(tmp_path), "--dimensions", "texture,mood"])  # a built-in one the file leaves out
    assert [d.name for d in cfg.dimensions] == ["texture", "mood"]
    with pytest.raises(TrainError) as e:
        resolve_config(base + ["--dimensions", "color,warmth"])
    assert str(e.value) == (
        "--dimensions names 'warmth', which is neither built in (color, lighting, composition, focus, texture, emotion) "
        "nor defined in a config file; define it there as a table: dimensions = [{ name = \"warmth\", "
        "positive = \"<label phrase>\", negative = \"<rare token>\" }]")
    with pytest.raises(TrainError, match=r"^--dimensions color,color: dimension 'color' appears twice$"):
        resolve_config(base + ["--dimensions", "color,color"])
    with pytest.raises(TrainError, match=r"^--dimensions 'color,' must be dimension names separated by commas, e.g. "
                                         r"--dimensions color,lighting$"):
        resolve_config(base + ["--dimensions", "color,"])


def test_settings_remember_where_they_were_given(tmp_path):
    cfg, _ = resolve_config(["--config", _config(tmp_path), "--lr", "3e-4"])
    assert (cfg.origin("lr"), cfg.origin("max_steps"), cfg.origin("batch_size")) == ("--lr", _config(tmp_path), "")
