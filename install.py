"""Run by the WebUI at start-up.  VMix needs nothing the WebUI does not already ship (torch,
safetensors, gradio), so this only checks and explains; it installs nothing."""
import sys


def _check():
    problems = []
    if sys.version_info < (3, 9):
        problems.append(f"Python {sys.version.split()[0]} is too old; VMix needs Python 3.9 or newer (the WebUI uses 3.10).")
    try:
        import torch

        major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
        if (major, minor) < (2, 0):
            problems.append(f"torch {torch.__version__} is too old; VMix needs torch 2.0 or newer (AUTOMATIC1111 1.6+ ships it).")
    except ImportError:
        problems.append("torch is not installed in this environment; start VMix from the WebUI's own environment.")
    except ValueError:
        pass  # an unusual version string: let it run
    try:
        import safetensors  # noqa: F401  (only whether it imports)
    except ImportError:
        problems.append("the safetensors package is missing; it ships with the WebUI, so reinstall the WebUI's requirements.")
    for problem in problems:
        print(f"[VMix] {problem}")


_check()
