"""How many torch CPU threads the command-line tools use (trainer, dataset preparation, offline
evaluation).

On the CPU, a model this project calls tiny (a test or smoke-run model, under ``TINY_PARAMETERS``)
runs fastest on one thread: its tensors are so small that OpenMP's threads spend their time waiting
on each other, and when other programs share the cores they wait far longer (a 60-step tiny training
took 288 s on torch's default 2 threads and 14-28 s on one, on a shared 2-core machine).  A real
model keeps torch's default.  The rule, in order:

    an explicit setting (--threads N, N > 0)      N threads
    OMP_NUM_THREADS set in the environment        left as the environment says (torchrun sets 1)
    a model under TINY_PARAMETERS                 1 thread
    otherwise                                     torch's default (one per core)
"""
from __future__ import annotations

import os
from typing import Optional

TINY_PARAMETERS = 10_000_000


def choose_threads(requested: int, parameters: int, what: str, flag: str = "--threads") -> tuple:
    """(threads to set, or None to leave torch as it is; the line that says why)."""
    import torch

    if requested > 0:
        return requested, f"CPU threads: {requested} ({flag} {requested})"
    if os.environ.get("OMP_NUM_THREADS", "").strip():
        return None, f"CPU threads: {torch.get_num_threads()} (OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS'].strip()})"
    size = f"{parameters / 1e6:.3g} M parameters"
    if parameters < TINY_PARAMETERS:
        return 1, (f"CPU threads: 1 (auto: the {what} has {size}, under {TINY_PARAMETERS // 1_000_000} M, where one "
                   f"thread is fastest; {flag} N to choose)")
    return None, f"CPU threads: {torch.get_num_threads()} (auto: torch's default for the {what} of {size}; {flag} N to choose)"


def apply_threads(requested: int, parameters: int, what: str, device_type: str, flag: str = "--threads") -> Optional[str]:
    """Set torch's CPU threads by the rule above when the model runs on the CPU (on a GPU only an
    explicit setting applies); returns the line to print, or None when nothing applies."""
    if device_type != "cpu" and requested <= 0:
        return None
    import torch

    threads, line = choose_threads(requested, parameters, what, flag)
    if threads is not None and threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return line
