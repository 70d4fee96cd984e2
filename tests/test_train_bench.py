"""The trainer's benchmarks (python -m vmix_lib.train.bench) on the tiny UNet: what they compare
must agree, or their timings compare different work."""
import torch

from vmix_lib.train import bench


def test_accelerate_step_and_the_plain_step_end_with_the_same_weights():
    result = bench.run("tiny", latent=8, batch=2, accumulation=2, rounds=1, steps=1, warmup=1, lora_rank=2,
                       device=torch.device("cpu"))
    assert result["same_weights"] is True and result["steps"] == 2


def test_batched_teacher_equals_one_call_per_row(capsys):
    result = bench.run_teacher("tiny", latent=8, batch=2, rounds=1, steps=1, warmup=0, device=torch.device("cpu"))
    assert result["rows"] == 2 * 13 and result["max_diff"] < 1e-5
    assert bench.main(["--distill-teacher", "--latent", "8", "--batch", "1", "--rounds", "1", "--steps", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert "1 samples x 13 rows = 13 rows" in out and "per row / batched, median of 1 paired rounds:" in out
