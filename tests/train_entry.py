"""Entry point for the multi-process trainer tests (run by torchrun; this module holds no tests).

``python -m vmix_lib.train`` with one addition: every file written through safetensors or
torch.save is recorded as "RANK PATH" in the file named by VMIX_TEST_WRITES, so that a test can
check which process wrote what.
"""
import os
import sys


def _recording(save, path_arg: int):
    def wrapper(*args, **kwargs):
        path = args[path_arg] if len(args) > path_arg else kwargs.get("filename", kwargs.get("f"))
        with open(os.environ["VMIX_TEST_WRITES"], "a", encoding="utf-8") as log:
            log.write(f"{os.environ.get('RANK', '0')} {os.path.abspath(str(path))}\n")
        return save(*args, **kwargs)

    return wrapper


if __name__ == "__main__":
    import safetensors.torch
    import torch

    safetensors.torch.save_file = _recording(safetensors.torch.save_file, 1)
    torch.save = _recording(torch.save, 1)
    from vmix_lib.train.__main__ import main

    sys.exit(main(sys.argv[1:]))
