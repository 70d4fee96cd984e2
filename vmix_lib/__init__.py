"""sd-webui-vmix core: the VMix aesthetics adapter (arXiv 2412.20800) in pure PyTorch.

Nothing in this package imports the WebUI; ``vmix_lib.webui`` holds the only WebUI glue.
"""
__version__ = "0.1.0"
