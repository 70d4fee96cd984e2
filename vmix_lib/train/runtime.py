"""The trainer's runtime: HuggingFace accelerate for 1 device, N GPUs, or several machines.

One process per device.  The same command trains on one device or many; only the launcher changes:

    python -m vmix_lib.train --config cfg.toml                                  1 GPU (or the CPU)
    accelerate launch --multi_gpu --num_processes 4 -m vmix_lib.train --config cfg.toml
    torchrun --nproc_per_node 4 -m vmix_lib.train --config cfg.toml             the same with torchrun
    accelerate launch --multi_gpu --num_machines 2 --num_processes 16 --machine_rank R \\
        --main_process_ip HOST --main_process_port 29500 -m vmix_lib.train --config cfg.toml
    torchrun --standalone --nproc_per_node 2 -m vmix_lib.train --config cfg.toml --device cpu
                                                                                2 CPU processes (gloo)

On a machine without CUDA the trainer asks accelerate for the CPU (``Accelerator(cpu=True)``), which
is what makes torchrun's processes join one gloo group; without it each process would train alone
(reference: training-and-evaluation.md §4).  ``accelerate launch --cpu`` starts a single process
whatever ``--num_processes`` says, so that process starts the N processes itself with torchrun's
launcher (``relaunch_cpu_processes``); where the launcher's command line cannot be read (it is read
from /proc, i.e. on Linux) the trainer stops with the torchrun command instead.  (A clean refusal is
not possible there: accelerate launch turns any failure of the script into its own traceback.)

Also here: how a global micro-batch is split over the processes (``split_for_process``) and the
per-sample random draws (``sample_generator``) that make a run's result independent of how many
processes share the work.
"""
from __future__ import annotations

import hashlib
import os
from datetime import timedelta
from typing import List, Optional, Sequence, Tuple

import torch

from .errors import TrainError

# The distributed types this trainer's loop supports (plain DDP); DeepSpeed/FSDP/XLA are refused.
_DDP_TYPES = ("NO", "MULTI_GPU", "MULTI_CPU")


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "y", "on")


def launched_processes() -> int:
    """WORLD_SIZE as set by torchrun / accelerate launch (1 when started with plain python)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def check_launch() -> None:
    """Refuse the launch that silently gives one process: ``accelerate launch --cpu --num_processes N``
    (where ``relaunch_cpu_processes`` could not take over)."""
    if _lone_accelerate_cpu_launch():
        raise TrainError(
            "accelerate launch --cpu starts a single process whatever --num_processes says; for several CPU processes "
            "run: torchrun --standalone --nproc_per_node N -m vmix_lib.train ... --device cpu"
        )


def _lone_accelerate_cpu_launch() -> bool:
    """This process was started by ``accelerate launch --cpu`` asked for several processes (it then
    sets MASTER_ADDR, but starts only this one, without WORLD_SIZE)."""
    return _flag("ACCELERATE_USE_CPU") and bool(os.environ.get("MASTER_ADDR")) and "WORLD_SIZE" not in os.environ


def _num_processes(args: Sequence[str]) -> Optional[int]:
    """--num_processes / --num-processes of an ``accelerate launch`` command line (before the script's own arguments)."""
    for i, arg in enumerate(args):
        if arg == "vmix_lib.train" or arg.endswith(".py"):  # the script: what follows are its own arguments
            break
        name, sep, value = arg.partition("=")
        if name in ("--num_processes", "--num-processes"):
            value = value if sep else (args[i + 1] if i + 1 < len(args) else "")
            return int(value) if value.isdigit() else None
    return None


def requested_cpu_processes(parent_cmdline: Optional[Sequence[str]] = None) -> Optional[int]:
    """N of the ``accelerate launch --cpu --num_processes N`` that started this lone process, or None
    (not such a launch, or its command line cannot be read)."""
    if not _lone_accelerate_cpu_launch():
        return None
    if parent_cmdline is None:
        try:
            with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
                parent_cmdline = f.read().decode("utf-8", "replace").split("\0")
        except OSError:
            return None
    n = _num_processes(list(parent_cmdline))
    return n if n and n > 1 else None


def relaunch_cpu_processes(processes: int, argv: Sequence[str], log=print) -> int:
    """Start ``processes`` CPU training processes with torchrun's launcher (the documented
    ``torchrun --standalone --nproc_per_node N -m vmix_lib.train ... --device cpu``) and wait for them;
    returns their exit status.  A Ctrl-C reaches them too: they save and stop, and this waits."""
    import subprocess
    import sys

    args = list(argv)
    if "--device" not in args and not any(a.startswith("--device=") for a in args):
        args += ["--device", "cpu"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "-m", "vmix_lib.train", *args]
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    log(f"vmix train: accelerate launch --cpu starts a single process whatever --num_processes says; starting the "
        f"{processes} CPU processes with torchrun's launcher instead (torchrun --standalone --nproc_per_node {processes} "
        "-m vmix_lib.train ... --device cpu)")
    process = subprocess.Popen(command, env=env)
    while True:
        try:
            return process.wait()
        except KeyboardInterrupt:
            continue  # the processes got the same Ctrl-C: they save and stop


def resolve_device(name: str) -> torch.device:
    """The device type this process trains on (accelerate picks the index: cuda:LOCAL_RANK)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TrainError(f"device {name!r} is not a torch device name (try auto, cpu, cuda, cuda:1)") from None
    if device.type not in ("cpu", "cuda"):
        raise TrainError(f"device {name!r} is not supported by the trainer; use auto, cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"device {name!r} was asked for, but this PyTorch sees no CUDA GPU")
    if device.type == "cuda" and device.index is not None:
        if launched_processes() > 1:
            raise TrainError(
                f"device {name!r} names one GPU, but {launched_processes()} processes were launched; use device = auto "
                "(each process takes the GPU of its LOCAL_RANK) and pick GPUs with CUDA_VISIBLE_DEVICES"
            )
        if device.index >= torch.cuda.device_count():
            raise TrainError(f"device {name!r} does not exist; this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return device


def resolve_precision(setting: str, device: torch.device) -> str:
    """accelerate's mixed_precision ("no", "fp16", "bf16") for a config value (auto/no/fp16/bf16)."""
    if setting == "auto":
        # `accelerate launch --mixed_precision bf16` is honoured when the config leaves it to auto.
        launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "").lower()
        if launched in ("fp16", "bf16"):
            setting = launched
    if device.type != "cuda":
        if setting in ("fp16", "bf16"):
            raise TrainError(f"mixed_precision = {setting!r} needs a CUDA GPU; on {device.type} the trainer runs in fp32 (use auto or no)")
        return "no"
    if setting == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return setting


def make_accelerator(device: torch.device, precision: str = "no", timeout_minutes: Optional[float] = None):
    """An ``accelerate.Accelerator`` for ``device`` ("cpu" or "cuda[:i]") and mixed precision.

    Models and data are placed by the trainer (``device_placement=False``).  In a single process
    a previous Accelerator of another device or precision (tests, notebooks, the demonstration
    followed by a training run) is forgotten first: accelerate keeps its state in process-wide
    singletons that would otherwise refuse the new settings.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import InitProcessGroupKwargs

    cpu = device.type == "cpu"
    if launched_processes() == 1 and PartialState._shared_state:
        state = PartialState()
        same_device = (state.device.type == "cpu") == cpu and (cpu or device.index in (None, state.device.index))
        same_precision = not AcceleratorState._shared_state or AcceleratorState().mixed_precision == precision
        if not (same_device and same_precision and state.distributed_type.name == "NO"):
            AcceleratorState._reset_state(reset_partial_state=True)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device.index)  # accelerate's single-process device is the current one
    options = {"timeout": timedelta(minutes=timeout_minutes)} if timeout_minutes else {}
    if device.type == "cuda" and launched_processes() > 1 and not torch.distributed.is_nccl_available():
        options["backend"] = "gloo"  # Windows builds have no NCCL (kohya does the same)
    handlers = [InitProcessGroupKwargs(**options)] if options else []
    accelerator = Accelerator(cpu=cpu, mixed_precision=precision, device_placement=False, kwargs_handlers=handlers)
    kind = accelerator.distributed_type.name
    if kind not in _DDP_TYPES:
        raise TrainError(
            f"accelerate is configured for {kind}; the trainer runs plain data parallel (DDP) only: choose multi-GPU "
            "without DeepSpeed/FSDP in `accelerate config`, or pass --multi_gpu to accelerate launch"
        )
    return accelerator


def describe(accelerator) -> str:
    """'2 processes on 1 machine (MULTI_CPU, gloo)', '1 process (cuda:0)', ..."""
    n = accelerator.num_processes
    if n == 1:
        return f"1 process ({accelerator.device})"
    machines = max(1, n // local_processes(accelerator))
    backend = accelerator.state.backend or "?"
    return (f"{n} processes on {machines} machine{'s' if machines > 1 else ''} "
            f"({accelerator.distributed_type.name}, {backend}, device {accelerator.device.type})")


def local_processes(accelerator) -> int:
    """Processes on this machine (LOCAL_WORLD_SIZE from torchrun / accelerate launch)."""
    try:
        return max(1, min(accelerator.num_processes, int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))))
    except ValueError:
        return accelerator.num_processes


class SingleProcess:
    """The part of ``accelerate.Accelerator`` the trainer's loop uses, for one process on one device.

    The WebUI's VMix tab trains inside the WebUI's own process: accelerate may be missing there or
    an older version, and its process-wide state (PartialState, AcceleratorState) must not be left
    behind.  Same arithmetic as accelerate in one process: the loss divided by the micro-batches of
    the step, autocast for fp16/bf16, a GradScaler for fp16 (gradients unscaled before clipping,
    the step skipped on overflow).
    """

    num_processes = 1
    process_index = 0
    is_main_process = True

    def __init__(self, device: torch.device, mixed_precision: str = "no"):
        if mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed precision must be no, fp16 or bf16, got {mixed_precision!r}")
        self.device = torch.device(device)
        self.mixed_precision = mixed_precision
        self.gradient_accumulation_steps = 1
        self.step = 0
        self.scaler = torch.amp.GradScaler(self.device.type) if mixed_precision == "fp16" else None
        self._optimizer = None

    def autocast(self):
        import contextlib

        if self.mixed_precision == "no":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.float16 if self.mixed_precision == "fp16" else torch.bfloat16)

    def prepare(self, model, optimizer):
        self._optimizer = optimizer
        return model, _ScaledOptimizer(optimizer, self.scaler)

    def accumulate(self, model):
        import contextlib

        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss = loss / self.gradient_accumulation_steps
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def clip_grad_norm_(self, parameters, max_norm: float):
        if self.scaler is not None:
            self.scaler.unscale_(self._optimizer)
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)

    def reduce(self, tensor: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return tensor

    def wait_for_everyone(self) -> None:
        pass


class _ScaledOptimizer:
    """The optimizer's step through the GradScaler (when there is one), as accelerate's wrapper does."""

    def __init__(self, optimizer, scaler):
        self.optimizer, self.scaler = optimizer, scaler

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def step(self) -> None:
        if self.scaler is None:
            self.optimizer.step()
            return
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state) -> None:
        self.optimizer.load_state_dict(state)


# -- work sharing --------------------------------------------------------------------------------
def split_for_process(total: int, processes: int, rank: int) -> Tuple[Tuple[int, ...], Tuple[float, ...], float]:
    """(positions, weights, loss_scale) of process ``rank`` in a global micro-batch of ``total`` samples.

    Contiguous parts whose sizes differ by at most one.  With fewer samples than processes every
    process still runs one sample (DDP needs all of them in each step): the extra ones repeat a
    sample with weight 0.  ``loss_scale`` = processes / total, so that
        DDP mean over processes of (loss_scale · Σ weight·loss) = mean loss over the global micro-batch.
    """
    if total < 1 or not 0 <= rank < processes:
        raise ValueError(f"cannot split {total} samples for process {rank} of {processes}")
    if total < processes:
        return (rank % total,), (1.0 if rank < total else 0.0,), processes / total
    size, extra = divmod(total, processes)
    start = rank * size + min(rank, extra)
    count = size + (1 if rank < extra else 0)
    return tuple(range(start, start + count)), (1.0,) * count, processes / total


def sample_seed(seed: int, serial: int) -> int:
    """A 63-bit seed for sample number ``serial`` of a run seeded with ``seed``."""
    digest = hashlib.blake2b(f"vmix:{seed}:{serial}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sample_generator(seed: int, serial: int) -> torch.Generator:
    """CPU generator of one sample's random draws (dropouts, timestep, noise).

    Drawing per sample rather than per batch is what makes a run independent of the process
    count: sample k gets the same noise whether it is trained on process 0 of 1 or process 3 of 8.
    """
    return torch.Generator().manual_seed(sample_seed(seed, serial))


def gather_lists(accelerator, items: Sequence) -> List:
    """Concatenate a picklable list from every process, in rank order (the same result everywhere)."""
    if accelerator.num_processes == 1:
        return list(items)
    from accelerate.utils import gather_object

    return list(gather_object(list(items)))
