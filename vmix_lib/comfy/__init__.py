"""ComfyUI glue for VMix: the "Load VMix Adapter" and "Apply VMix" nodes.

The only part of vmix_lib that touches ComfyUI, and only in ``nodes.py``, inside functions
(``folder_paths``).  ``patch.py`` is pure: it speaks to ComfyUI's ModelPatcher through the
methods it calls (``clone``, ``add_wrapper_with_key``, ...), so tests run it on a small
comfy-shaped patcher without ComfyUI installed.

The repository's root ``__init__.py`` imports ``nodes`` only when ComfyUI's custom-node loader
imports it; in the WebUIs it does nothing.
"""
