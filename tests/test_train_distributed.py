"""The trainer on two CPU processes (torchrun + gloo, the documented CPU command), against one process.

* 2 processes x batch 2 equal 1 process x batch 4 (same global batch and seed) within float tolerance:
  same losses, same adapter and LoRA - with caption/aesthetic dropout, gradient accumulation and a
  short last batch (6 images in global micro-batches of 4).
* Only the main process writes adapters, LoRA, resume states and logs, each once; the latent cache is
  shared out (each image encoded once, by one of the two processes).
* Resume under two processes continues bit for bit; a two-process state resumed by one process
  continues with a note, equal to the straight run within tolerance.

Each launch has a timeout: a hang fails the test instead of stalling CI.
"""
import csv
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from vmix_lib.train.__main__ import main
from vmix_lib.train.tiny_models import write_tiny_model

from test_train_helpers import file_tensors, write_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY = os.path.join(ROOT, "tests", "train_entry.py")
TIMEOUT = 300  # seconds per launch (about 15 s on an idle 2-core machine)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    model = write_tiny_model(str(root / "model"), "sd15")
    data = write_dataset(str(root / "data"), count=6)
    return root, model, data


def _args(setup, out, *extra):
    _, (checkpoint, config_dir, tokenizer_dir), data = setup
    return [
        "--checkpoint", checkpoint, "--model-config-dir", config_dir, "--tokenizer-dir", tokenizer_dir,
        "--dataset-dir", data, "--output-dir", str(out), "--name", "t", "--resolution", "32", "--device", "cpu",
        "--lr", "1e-3", "--grad-accum", "2", "--lora-rank", "2", "--caption-dropout", "0.5", "--aesthetic-dropout", "0.5",
        "--save-every", "2", "--preview-every", "0", "--save-precision", "fp32", "--data-workers", "0", "--seed", "3",
        *extra,
    ]


def _two_processes(command, what, cwd=None, **env_extra):
    """Run a two-process launch of the trainer on the CPU (gloo); returns (return code, output)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               **env_extra)
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo's hostname-based interface choice is flaky on CI
    process = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"{what} did not finish in {TIMEOUT} s:\n{output[-3000:]}")
    return process.returncode, output


def _torchrun(args, writes):
    """``torchrun --standalone --nproc_per_node 2`` of the trainer; returns its output."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", ENTRY, *args]
    returncode, output = _two_processes(command, "the two-process run", VMIX_TEST_WRITES=str(writes))
    assert returncode == 0, output[-5000:]
    return output


def _writes(path):
    """{written path: [ranks]} with the temporary suffixes (.tmp, .<rank>.tmp) taken off."""
    out = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            rank, name = line.rstrip("\n").split(" ", 1)
            name = name[:-4] if name.endswith(".tmp") else name
            if name.endswith((".0", ".1")):
                name = name[:-2]
            out.setdefault(name, []).append(int(rank))
    return out


def _losses(out):
    with open(os.path.join(out, "t-loss.csv"), newline="") as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]


def _close(a_dir, b_dir, atol):
    for name in ("t.safetensors", "t-lora.safetensors"):
        a, b = file_tensors(os.path.join(a_dir, name)), file_tensors(os.path.join(b_dir, name))
        assert set(a) == set(b)
        for key in a:
            assert torch.allclose(a[key], b[key], atol=atol, rtol=0), (name, key, (a[key] - b[key]).abs().max())


def _identical(a_dir, b_dir):
    for name in ("t.safetensors", "t-lora.safetensors"):
        a, b = file_tensors(os.path.join(a_dir, name)), file_tensors(os.path.join(b_dir, name))
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), name


def test_two_processes_equal_one_write_once_and_resume(setup, tmp_path, capsys):
    one, two, split = tmp_path / "one", tmp_path / "two", tmp_path / "split"
    # one process, batch 4 x accumulation 2
    assert main(_args(setup, one, "--batch-size", "4", "--max-steps", "4")) == 0
    moved = file_tensors(str(one / "t.safetensors"))["projection.out.weight"].abs().max()
    assert moved > 1e-3  # trained: the zero-initialised projection moved

    # two processes, batch 2 each: the same global batch of 4 x 2
    output = _torchrun(_args(setup, two, "--batch-size", "2", "--max-steps", "4"), tmp_path / "writes.txt")
    assert "global batch 8 = 2 per process x 2 processes x 2 accumulation" in output
    assert "runtime: 2 processes on 1 machine (MULTI_CPU, gloo, device cpu)" in output
    assert output.count("Done: ") == 1 and output.count("VMix trainer:") == 1  # the main process prints
    assert [s for s, _ in _losses(two)] == [1, 2, 3, 4]
    for (_, loss_one), (_, loss_two) in zip(_losses(one), _losses(two)):
        assert loss_two == pytest.approx(loss_one, rel=1e-5)
    _close(one, two, atol=2e-5)  # lr 1e-3 x 4 steps moves weights by up to 4e-3

    writes = _writes(tmp_path / "writes.txt")
    outputs = {k: v for k, v in writes.items() if os.sep + "cache" + os.sep not in k}
    assert outputs == {str(two / n): [0] for n in (
        "t-step000002.safetensors", "t-lora-step000002.safetensors", "t-step000002.state.pt",
        "t.safetensors", "t-lora.safetensors", "t-step000004.state.pt")}
    cache = {k: v for k, v in writes.items() if k not in outputs}
    assert len(cache) == 6 and all(len(ranks) == 1 for ranks in cache.values())  # each image once ...
    assert sorted(r for ranks in cache.values() for r in ranks) == [0, 0, 0, 1, 1, 1]  # ... shared out
    assert sorted(os.listdir(two)) == sorted(["cache", "t-config.json", "t-loss.csv", "t-loss.png", "t-lora.safetensors",
                                              "t-lora-step000002.safetensors", "t-step000002.safetensors",
                                              "t-step000004.state.pt", "t.safetensors"])

    # two processes to step 2, then two processes resume to step 4: bit for bit the straight run
    _torchrun(_args(setup, split, "--batch-size", "2", "--max-steps", "2"), tmp_path / "writes2.txt")
    one_from_two = tmp_path / "one_from_two"
    shutil.copytree(split, one_from_two)
    output = _torchrun(_args(setup, split, "--batch-size", "2", "--max-steps", "4", "--resume", "latest"),
                       tmp_path / "writes3.txt")
    assert "Resumed from t-step000002.state.pt at step 2." in output
    _identical(two, split)
    assert _losses(two) == _losses(split)

    # the two-process state continued by one process (batch 4): a note, and the same run within tolerance
    capsys.readouterr()
    assert main(_args(setup, one_from_two, "--batch-size", "4", "--max-steps", "4", "--resume", "latest")) == 0
    log = capsys.readouterr().out
    assert "Note: the state was saved by 2 processes, this run has 1. The global micro-batch is the same" in log
    _close(two, one_from_two, atol=2e-5)


def test_accelerate_launch_cpu_with_two_processes_trains_on_two(setup, tmp_path):
    """``accelerate launch --cpu --num_processes 2`` starts one process; the trainer starts the two
    (torchrun's launcher) instead of failing, which under accelerate launch would end in its traceback."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "vmix_lib.train",
               *_args(setup, tmp_path / "run", "--batch-size", "2", "--max-steps", "1")]
    returncode, output = _two_processes(command, "accelerate launch", cwd=ROOT)
    assert returncode == 0 and "Traceback" not in output, output[-5000:]
    assert "vmix train: accelerate launch --cpu starts a single process whatever --num_processes says; starting the 2 CPU " \
           "processes with torchrun's launcher instead" in output
    assert "runtime: 2 processes on 1 machine (MULTI_CPU, gloo, device cpu)" in output
    assert [s for s, _ in _losses(tmp_path / "run")] == [1] and os.path.isfile(tmp_path / "run" / "t.safetensors")


def test_the_process_count_is_read_from_the_accelerate_command(monkeypatch):
    from vmix_lib.train.runtime import requested_cpu_processes

    launch = ["/venv/bin/python3", "/venv/bin/accelerate", "launch", "--cpu"]
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert requested_cpu_processes(launch + ["--num_processes", "3", "-m", "vmix_lib.train", "--config", "c.toml"]) == 3
    assert requested_cpu_processes(launch + ["--num-processes=4", "train_entry.py"]) == 4
    assert requested_cpu_processes(["python", "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "-m",
                                    "vmix_lib.train"]) == 2
    assert requested_cpu_processes(launch + ["-m", "vmix_lib.train", "--num_processes", "5"]) is None  # the script's own
    assert requested_cpu_processes(launch + ["--num_processes", "1", "-m", "vmix_lib.train"]) is None
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun's processes (and the relaunched ones): nothing to do
    assert requested_cpu_processes(launch + ["--num_processes", "2", "-m", "vmix_lib.train"]) is None
