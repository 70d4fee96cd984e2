"""``python -m vmix_lib.train --config cfg.toml [--flag value ...]``: see vmix_lib/train/config.py.

Also under ``accelerate launch -m vmix_lib.train`` / ``torchrun -m vmix_lib.train`` (runtime.py).
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence


_TRAINER_PACKAGES = {"torch", "diffusers", "transformers", "safetensors", "PIL", "numpy", "tqdm", "tokenizers", "accelerate"}


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .errors import TrainError

    try:
        from .config import resolve_config
        from .run import run_training
        from .runtime import relaunch_cpu_processes, requested_cpu_processes

        cfg, args = resolve_config(argv)
        processes = requested_cpu_processes()  # accelerate launch --cpu --num_processes N started this one process
        if processes:
            return relaunch_cpu_processes(processes, sys.argv[1:] if argv is None else argv)
        run_training(cfg, dry_run=args.dry_run)
    except TrainError as e:
        print(f"vmix train: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in _TRAINER_PACKAGES:
            raise
        print(f"vmix train: error: the package {e.name!r} is missing; install the trainer's packages with "
              "pip install -r requirements-train.txt", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        import torch

        if isinstance(e, torch.cuda.OutOfMemoryError):
            print("vmix train: error: the GPU ran out of memory; lower batch_size (raise grad_accum to keep the "
                  "global batch), turn on gradient_checkpointing, lower the LoRA rank, or (objective distill) set "
                  "max_teacher_rows, e.g. 4", file=sys.stderr)
            return 2
        raise
    finally:
        _end_process_group()
    return 0


def _end_process_group() -> None:
    """Leave the process group torchrun / accelerate launch made us join (quietly, also after errors)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
