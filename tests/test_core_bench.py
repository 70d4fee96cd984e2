"""The benchmark's code path (``python -m vmix_lib.bench``) on tiny UNets: the same function the
CPU and GPU runs use, with device cpu.  Nothing here is a timing assertion; it checks that the three
variants run, agree, leave nothing hooked and that V_a is not recomputed when only λ changes."""
import math

import pytest
import torch

from vmix_lib import bench
from vmix_lib.train.checkpoint_loading import clean_config
from vmix_lib.train.tiny_models import tiny_configs


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("family, dtype, tolerance", [("sd15", torch.float32, 1e-4), ("sdxl", torch.bfloat16, 0.1)])
def test_bench_family_runs_the_three_variants(family, dtype, tolerance):
    config = clean_config(tiny_configs(family)["unet"])
    lines = []
    result = bench.bench_family(family, repeats=2, warmup=1, out=lines.append, device="cpu", dtype=dtype,
                                latent=8, batch=2, config=config)
    text = "\n".join(lines)
    assert "2 timed rounds after 1 warm-up, variants interleaved; wall-clock seconds per UNet step" in text
    assert f"latent (2, 4, 8, 8) (64² px, batch 2: cond + uncond)" in text
    for key in ("hook_ratio", "two_branch_ratio", "hook_paired", "off_seconds", "hook_seconds", "prepare_seconds"):
        assert math.isfinite(result[key]) and result[key] > 0, key
    assert result["recomputed_same_alpha"] == 0  # the next generation shares V_a
    assert result["effect"] > 10 * result["max_diff"]  # the branch acts, and both forms agree
    assert result["max_diff"] < tolerance * max(1.0, result["scale"])
    w_dtype = "fp32" if dtype == torch.float32 else "bf16"  # W_a kept in the UNet's precision, as a file would
    assert f"V_a at generation start (adapter on the CPU, W_a {w_dtype};" in text


def test_inputs_follow_the_size_and_the_sdxl_time_ids():
    config = clean_config(tiny_configs("sdxl")["unet"])
    sample, context, kwargs = bench.unet_inputs("sdxl", latent=16, batch=4, config=config, dtype=torch.bfloat16)
    assert sample.shape == (4, 4, 16, 16) and context.shape == (4, 77, config["cross_attention_dim"])
    assert kwargs["added_cond_kwargs"]["time_ids"][0].tolist() == [128.0, 128.0, 0.0, 0.0, 128.0, 128.0]
    assert {sample.dtype, context.dtype} == {torch.bfloat16}
    assert bench.default_latent("sd15", torch.device("cuda")) == 64
    assert bench.default_latent("sdxl", torch.device("cuda")) == 128
    assert bench.default_latent("sdxl", torch.device("cpu")) == bench.LATENT


@pytest.mark.parametrize("argv, words", [
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
    (["--size", "500"], "--size must be a multiple of 64"),
    (["--batch", "0"], "at least 1"),
    (["--no-files", "--files-only"], "not allowed with"),
])
def test_bad_arguments_are_one_sentence(argv, words, capsys):
    with pytest.raises(SystemExit):
        bench.main(argv)
    assert words in capsys.readouterr().err
