"""``python -m vmix_lib.prepare INPUT_DIR OUTPUT_DIR [options]``: see vmix_lib/prepare/__init__.py."""
from __future__ import annotations

import sys
from typing import Optional, Sequence

_PACKAGES = {"torch", "transformers", "safetensors", "PIL", "numpy", "tqdm", "tokenizers"}


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ..scoring import ScoringError
    from .errors import PrepareError

    try:
        from .run import run_prepare
        from .settings import settings_from_args

        run_prepare(settings_from_args(argv))
    except (PrepareError, ScoringError) as e:
        print(f"vmix prepare: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in _PACKAGES:
            raise
        print(f"vmix prepare: error: the package {e.name!r} is missing; install it with pip install -r requirements-train.txt",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vmix prepare: interrupted; run the same command again to continue (finished work is kept)", file=sys.stderr)
        return 130
    except Exception as e:
        import torch

        if isinstance(e, torch.cuda.OutOfMemoryError):
            print("vmix prepare: error: the GPU ran out of memory; lower --batch-size", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
