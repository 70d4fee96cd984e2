"""The repository's root __init__.py: ComfyUI's custom-node loader gets the nodes; the WebUIs'
loaders (scripts/*.py, preload.py, install.py, with the extension folder on sys.path) and anything
else that imports the folder get nothing and import nothing."""
import importlib.util
import os
import subprocess
import sys
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_like_comfyui(package_name: str):
    """nodes.load_custom_node for a folder: spec_from_file_location(<path with '.' -> '_x_'>, <dir>/__init__.py)."""
    spec = importlib.util.spec_from_file_location(package_name, os.path.join(ROOT, "__init__.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[package_name] = module
    spec.loader.exec_module(module)
    return module


def forget(prefix: str):
    for name in [m for m in sys.modules if m == prefix or m.startswith(prefix + ".")]:
        del sys.modules[name]


def test_comfyui_loader_gets_the_nodes_and_the_folder(monkeypatch, tmp_path):
    registered = {}
    fake_folder_paths = types.SimpleNamespace(models_dir=str(tmp_path), folder_names_and_paths=registered)
    monkeypatch.setitem(sys.modules, "comfy", types.ModuleType("comfy"))
    monkeypatch.setitem(sys.modules, "folder_paths", fake_folder_paths)
    name = ROOT.replace(".", "_x_")  # what ComfyUI names it
    try:
        module = load_like_comfyui(name)
        assert set(module.NODE_CLASS_MAPPINGS) == {"VMixAdapterLoader", "VMixApply"}
        assert module.NODE_DISPLAY_NAME_MAPPINGS["VMixApply"] == "Apply VMix"
        assert registered["vmix"] == ([os.path.join(str(tmp_path), "vmix")], {".safetensors"})
        assert f"{name}.vmix_lib.comfy.nodes" in sys.modules  # relative imports: no sys.path change
        assert not hasattr(module, "WEB_DIRECTORY")  # javascript/ is the WebUI's, not a ComfyUI web folder
    finally:
        forget(name)


def test_outside_comfyui_the_root_package_does_nothing():
    """Imported as a package without ComfyUI (a tool scanning the folder): no nodes, no imports."""
    code = (
        "import importlib.util, os, sys\n"
        f"root = {ROOT!r}\n"
        "before = set(sys.modules)\n"
        "spec = importlib.util.spec_from_file_location('sd_webui_vmix', os.path.join(root, '__init__.py'))\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['sd_webui_vmix'] = m; spec.loader.exec_module(m)\n"
        "print(m.NODE_CLASS_MAPPINGS, sorted(set(sys.modules) - before - {'sd_webui_vmix'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "{} []" and out.stderr == ""


def test_the_webui_loaders_never_import_the_root_package():
    """A1111/Forge: preload.py by file (script_loading.load_module), install.py as a program, and the
    extension folder on sys.path while scripts load; `vmix_lib` stays the top-level package."""
    code = (
        "import argparse, importlib.util, os, sys\n"
        f"root = {ROOT!r}\n"
        "sys.path.insert(0, root)\n"
        "spec = importlib.util.spec_from_file_location('preload.py', os.path.join(root, 'preload.py'))\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); m.preload(argparse.ArgumentParser())\n"
        "import vmix_lib, vmix_lib.webui.lifecycle\n"
        "print(vmix_lib.__file__ == os.path.join(root, 'vmix_lib', '__init__.py'))\n"
        "print(sorted(n for n in sys.modules if n.endswith('.vmix_lib') or n.startswith('vmix_lib.comfy') or n in ('comfy', 'folder_paths')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.split("\n")[:2] == ["True", "[]"]
    install = subprocess.run([sys.executable, os.path.join(ROOT, "install.py")], capture_output=True, text=True, check=True)
    assert install.stdout == "" and install.stderr == ""


def test_the_webui_glue_and_the_core_never_import_comfyui():
    code = (
        "import sys\n"
        "import vmix_lib.webui.app, vmix_lib.webui.runner, vmix_lib.comfy.patch, vmix_lib.comfy.nodes\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('comfy', 'folder_paths', 'comfy_api', 'nodes')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
