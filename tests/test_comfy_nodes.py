"""The nodes as ComfyUI calls them: the models/vmix folder in folder_paths, Load VMix Adapter on a real
adapter file (the format the CLI and the WebUI write), Apply VMix's inputs."""
import os
from types import SimpleNamespace

import pytest
import torch

from test_comfy_fakes import comfy_model, data, make_comfy_unet, sample, single_thread  # noqa: F401
from test_webui_fakes import LAYOUTS, make_adapter, make_unet, tiny_layout, write_adapter
from vmix_lib.comfy import nodes
from vmix_lib.comfy.patch import LoadedAdapter, VMixPatch

LAYOUT = tiny_layout()


class FolderPaths:
    """ComfyUI's folder_paths: models_dir, folder_names_and_paths {name: ([folders], extensions)},
    get_filename_list / get_full_path / get_folder_paths (files under the folders, filtered by extension)."""

    def __init__(self, base):
        self.models_dir = str(base / "models")
        self.folder_names_and_paths = {"checkpoints": ([str(base / "models" / "checkpoints")], {".safetensors"})}

    def get_folder_paths(self, name):
        return list(self.folder_names_and_paths[name][0])

    def get_filename_list(self, name):
        folders, extensions = self.folder_names_and_paths[name]
        found = set()
        for folder in folders:
            for root, _, files in os.walk(folder):
                for f in files:
                    if not extensions or os.path.splitext(f)[1].lower() in extensions:
                        found.add(os.path.relpath(os.path.join(root, f), folder))
        return sorted(found)

    def get_full_path(self, name, filename):
        if name not in self.folder_names_and_paths:
            return None
        for folder in self.folder_names_and_paths[name][0]:
            path = os.path.join(folder, filename)
            if os.path.isfile(path):
                return path
        return None


@pytest.fixture
def fp(tmp_path):
    module = FolderPaths(tmp_path)
    nodes.set_folder_paths(module)
    yield module
    nodes.set_folder_paths(None)


def test_register_folder_adds_models_vmix_and_keeps_extra_paths(fp, tmp_path):
    fp.folder_names_and_paths["vmix"] = (["/data/vmix"], set())  # extra_model_paths.yaml came first
    nodes.register_folder()
    assert fp.folder_names_and_paths["vmix"] == (["/data/vmix", str(tmp_path / "models" / "vmix")], {".safetensors"})
    nodes.register_folder()  # idempotent
    assert fp.folder_names_and_paths["vmix"][0] == ["/data/vmix", str(tmp_path / "models" / "vmix")]


def test_loader_lists_only_safetensors(fp, tmp_path):
    nodes.register_folder()
    folder = tmp_path / "models" / "vmix"
    folder.mkdir(parents=True)
    for name in ("b.safetensors", "a.safetensors", "old.ckpt", "notes.txt"):
        (folder / name).write_bytes(b"x")
    assert nodes.VMixAdapterLoader.INPUT_TYPES()["required"]["adapter_name"][0] == ["a.safetensors", "b.safetensors"]


def test_loader_without_registration_lists_nothing(fp):
    assert nodes.adapter_names() == []


def test_a_real_adapter_file_loads_unchanged_and_applies(fp, tmp_path):
    """An adapter written by the project's save_adapter (what the CLI trainer and the WebUI tab call)."""
    nodes.register_folder()
    folder = tmp_path / "models" / "vmix"
    folder.mkdir(parents=True)
    written = write_adapter(folder / "real-sd15.safetensors", "sd15")
    node = nodes.VMixAdapterLoader()
    (out,) = node.load("real-sd15.safetensors")
    assert isinstance(out, LoadedAdapter) and out.adapter.family == "sd15" and out.name == "real-sd15.safetensors"
    for name in written.layer_names[:3]:
        assert torch.equal(out.adapter.value(name).weight, written.value(name).weight.half())
    assert torch.equal(out.adapter.aes_emb, written.aes_emb)
    assert node.load("real-sd15.safetensors")[0] is out  # not read again while the file is unchanged
    assert "dimensions: 1 color, 2 lighting" in out.describe()
    # it fits a real SD1.5 layout (meta: shapes only) and not an SDXL one
    sd15 = comfy_model(make_unet(LAYOUTS["sd15"], device="meta"))
    (patched,) = nodes.VMixApply().apply(sd15, out, 1.0, 0.0, 1.0, True, "", **{f"alpha_{i}": 1.0 for i in range(1, 9)})
    assert VMixPatch.of(patched) is not None
    sdxl = comfy_model(make_unet(LAYOUTS["sdxl"], device="meta"))
    with pytest.raises(ValueError, match=r"^VMix adapter 'real-sd15.safetensors': this SD1.5 adapter does not fit"):
        nodes.VMixApply().apply(sdxl, out, 1.0, 0.0, 1.0, True, "")


def test_a_missing_or_damaged_file_is_one_sentence(fp, tmp_path):
    nodes.register_folder()
    folder = tmp_path / "models" / "vmix"
    folder.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"VMix adapter 'gone.safetensors' is not in .*models/vmix"):
        nodes.VMixAdapterLoader().load("gone.safetensors")
    (folder / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError) as e:
        nodes.VMixAdapterLoader().load("broken.safetensors")
    assert str(e.value).startswith("VMix adapter 'broken.safetensors' ") and "\n" not in str(e.value)


def test_is_changed_follows_the_file(fp, tmp_path):
    nodes.register_folder()
    folder = tmp_path / "models" / "vmix"
    folder.mkdir(parents=True)
    path = folder / "a.safetensors"
    path.write_bytes(b"1")
    first = nodes.VMixAdapterLoader.IS_CHANGED("a.safetensors")
    path.write_bytes(b"22")
    assert nodes.VMixAdapterLoader.IS_CHANGED("a.safetensors") != first


def test_apply_node_inputs_and_alpha_slots():
    required = nodes.VMixApply.INPUT_TYPES()["required"]
    assert list(required)[:3] == ["model", "vmix_adapter", "strength"]
    assert [k for k in required if k.startswith("alpha_")] == [f"alpha_{i}" for i in range(1, 9)]
    assert list(required)[-4:] == ["start", "end", "apply_to_uncond", "block_weights"]
    assert required["strength"][1]["max"] == 3.0 and required["apply_to_uncond"][1]["default"] is True

    adapter = make_adapter(LAYOUT)
    model = comfy_model(make_comfy_unet(LAYOUT))
    source = LoadedAdapter(adapter, "tiny.safetensors")
    alphas = {f"alpha_{i}": 1.0 for i in range(1, 9)}
    alphas.update(alpha_2=0.25, alpha_8=0.0)  # slot 8: past the adapter's 6 dimensions, unused
    (patched,) = nodes.VMixApply().apply(model, source, 1.5, 0.1, 0.8, False, "OUT:0.5", **alphas)
    patch = VMixPatch.of(patched)
    assert patch.settings.strength == 1.5 and patch.settings.start == 0.1 and patch.settings.uncond is False
    assert patch.mixer.values.key == (1.0, 0.25, 1.0, 1.0, 1.0, 1.0)
    assert set(patch.mixer.layer_strengths.values()) == {0.5}
    (same,) = nodes.VMixApply().apply(model, source, 0.0, 0.0, 1.0, True, "", **alphas)
    assert same is model
    with pytest.raises(ValueError, match="must come from a Load VMix Adapter node"):
        nodes.VMixApply().apply(model, SimpleNamespace(), 1.0, 0.0, 1.0, True, "")
    x, c, u = data()
    assert not torch.equal(sample(patched, x, [c, u])[0], sample(model, x, [c, u])[0])


def test_node_mappings():
    assert set(nodes.NODE_CLASS_MAPPINGS) == {"VMixAdapterLoader", "VMixApply"}
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS == {"VMixAdapterLoader": "Load VMix Adapter", "VMixApply": "Apply VMix"}
    for cls in nodes.NODE_CLASS_MAPPINGS.values():
        assert callable(getattr(cls, cls.FUNCTION)) and cls.CATEGORY == "VMix" and cls.DESCRIPTION
