"""ComfyUI entry point of sd-webui-vmix: the "Load VMix Adapter" and "Apply VMix" nodes (vmix_lib.comfy).

ComfyUI's custom-node loader imports this file as a package (custom_nodes/<folder>/__init__.py) after
it has imported ``comfy`` and ``folder_paths``; only then are the nodes imported and the models/vmix
folder registered.  Anywhere else (AUTOMATIC1111 and Forge load scripts/, preload.py and install.py,
never this file; a tool that imports the folder as a package) it does nothing and imports nothing.
"""
import sys as _sys

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}

if __package__ and "comfy" in _sys.modules and "folder_paths" in _sys.modules:
    from .vmix_lib.comfy.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, register_folder

    register_folder()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
