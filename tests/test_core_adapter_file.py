"""The adapter file: exact round trip, fp16, diffusers layer names, and one clear AdapterError
(naming the file) for every kind of malformed file; binding to the wrong UNet hooks nothing."""
import json
import os
import pickle
import re
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vmix_lib.adapter_file import AdapterError, load_adapter, read_adapter_info, save_adapter
from vmix_lib.dimensions import DEFAULT_DIMENSIONS
from vmix_lib.hook import AdapterMismatch, ValueMixer, check_fit
from vmix_lib.layers import SD15_LAYOUT, find_cross_attention_layers
from vmix_lib.mixing import VMixAdapter
from vmix_lib.train.checkpoint_loading import shipped_unet_config

TRAINING = {"steps": 1200, "dataset": "my-aesthetic-set", "lr": 1e-4, "lora": None}
FIRST = "values.input_blocks.1.1.transformer_blocks.0.attn2.weight"
LAST = "values.output_blocks.11.1.transformer_blocks.0.attn2.weight"


def sd15_adapter(seed=0):
    torch.manual_seed(seed)
    adapter = VMixAdapter(DEFAULT_DIMENSIONS, 768, {i.name: i.inner_dim for i in SD15_LAYOUT}, "sd15", train_lambda=1.0)
    with torch.no_grad():
        adapter.aes_emb.normal_()
        for p in adapter.projection.parameters():
            p.normal_()
    return adapter


def webui_to_diffusers(name):
    """Inverse of layers.diffusers_to_webui for SD1.5/SDXL (2 layers per block)."""
    parts = name.split(".")
    if parts[0] == "middle_block":
        return f"mid_block.attentions.0.transformer_blocks.{parts[3]}.attn2"
    idx = int(parts[1])
    if parts[0] == "input_blocks":
        return f"down_blocks.{(idx - 1) // 3}.attentions.{(idx - 1) % 3}.transformer_blocks.{parts[4]}.attn2"
    return f"up_blocks.{idx // 3}.attentions.{idx % 3}.transformer_blocks.{parts[4]}.attn2"


@pytest.fixture(scope="module")
def adapter():
    return sd15_adapter()


@pytest.fixture(scope="module")
def good(tmp_path_factory, adapter):
    """A valid SD1.5 adapter file (W_a in fp16 to keep the many variants small): path, tensors, metadata."""
    path = str(tmp_path_factory.mktemp("good") / "good.safetensors")
    save_adapter(adapter, path, training=TRAINING, dtype=torch.float16)
    with safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()["vmix"])
    with open(path, "rb") as f:
        raw = f.read()
    return path, load_file(path), meta, raw


def write(path, tensors, meta=None, raw_meta=None):
    """A safetensors file from tensors and VMix metadata (a dict, or raw_meta as given)."""
    if raw_meta is None and meta is not None:
        raw_meta = {"vmix": json.dumps(meta)}
    save_file(tensors, str(path), metadata=raw_meta)
    return path


def edit_header(raw, edit):
    """Re-serialise a safetensors file with its JSON header changed by ``edit(header)``."""
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    edit(header)
    data = json.dumps(header).encode()
    return struct.pack("<Q", len(data)) + data + raw[8 + length :]


# -- round trip -------------------------------------------------------------------------------
def test_round_trip_is_exact(tmp_path, adapter):
    path = save_adapter(adapter, tmp_path / "vmix-sd15.safetensors", training=TRAINING)
    assert path.endswith("vmix-sd15.safetensors") and not os.path.exists(path + ".tmp")
    loaded = load_adapter(path)
    original, restored = adapter.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for key in original:
        assert restored[key].dtype == torch.float32
        assert torch.equal(original[key], restored[key]), key
    assert loaded.dimensions == list(DEFAULT_DIMENSIONS)
    assert (loaded.family, loaded.context_dim, loaded.tokens, loaded.train_lambda) == ("sd15", 768, 77, 1.0)
    assert loaded.layer_names == [i.name for i in SD15_LAYOUT]
    assert loaded.training_info == TRAINING
    assert not any(p.requires_grad for p in loaded.parameters())
    info = read_adapter_info(path)
    assert (info.name, info.family, info.family_title, info.context_dim, info.tokens) == ("vmix-sd15", "sd15", "SD1.5", 768, 77)
    assert info.dimensions == tuple(DEFAULT_DIMENSIONS) and info.training == TRAINING
    assert (info.format_version, info.train_lambda) == (1, 1.0)
    # and the loaded adapter computes the same aesthetic values
    f_a = adapter.aesthetic_context(adapter.aesthetic_input({"color": 0.5}))
    assert torch.equal(loaded.aesthetic_context(loaded.aesthetic_input({"color": 0.5})), f_a)


@pytest.mark.parametrize("dtype,tag", [(torch.float16, "F16"), (torch.bfloat16, "BF16")])
def test_half_precision_save(tmp_path, adapter, dtype, tag):
    full = save_adapter(adapter, tmp_path / "full.safetensors")
    half = save_adapter(adapter, tmp_path / "half.safetensors", dtype=dtype)
    with safe_open(half, "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert {v for k, v in dtypes.items() if k.startswith("values.")} == {tag}
    assert {v for k, v in dtypes.items() if not k.startswith("values.")} == {"F32"}  # AesEmb, projection
    assert os.path.getsize(half) < 0.55 * os.path.getsize(full)
    loaded = load_adapter(half)
    for name in adapter.layer_names:  # W_a stay in the file's dtype in memory
        weight = loaded.value(name).weight
        assert weight.dtype == dtype and torch.equal(weight, adapter.value(name).weight.to(dtype))
    assert loaded.aes_emb.dtype == torch.float32 and torch.equal(loaded.aes_emb, adapter.aes_emb)
    assert {p.dtype for p in loaded.projection.parameters()} == {torch.float32}
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    # V_a is computed in float32 from them: the same values as a float32 adapter holding those weights
    widened = load_adapter(half, dtype=torch.float32)
    assert {p.dtype for p in widened.parameters()} == {torch.float32}
    f_a = loaded.aesthetic_context(loaded.aesthetic_input({"color": 0.5}))
    for name in adapter.layer_names:
        v_a = loaded.aesthetic_values(name, f_a)
        assert v_a.dtype == torch.float32 and torch.equal(v_a, widened.aesthetic_values(name, f_a))


def test_diffusers_layer_names_are_accepted(tmp_path, good):
    _, tensors, meta, _ = good
    renamed = {}
    for key, tensor in tensors.items():
        if key.startswith("values."):
            key = f"values.{webui_to_diffusers(key[len('values.'):-len('.weight')])}.weight"
        renamed[key] = tensor
    assert "values.up_blocks.3.attentions.2.transformer_blocks.0.attn2.weight" in renamed
    loaded = load_adapter(write(tmp_path / "diffusers.safetensors", renamed, meta))
    assert torch.equal(loaded.value("output_blocks.11.1.transformer_blocks.0.attn2").weight, tensors[LAST].float())
    both = dict(tensors, **{"values.down_blocks.0.attentions.0.transformer_blocks.0.attn2.weight": tensors[FIRST].clone()})
    with pytest.raises(AdapterError, match="twice"):
        load_adapter(write(tmp_path / "both.safetensors", both, meta))


def test_save_refuses_what_the_loader_would_refuse(tmp_path, adapter):
    broken = sd15_adapter()
    with torch.no_grad():
        broken.projection.out.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        save_adapter(broken, tmp_path / "nan.safetensors")
    with pytest.raises(ValueError, match="non-finite"):  # fp16 overflow
        big = sd15_adapter()
        with torch.no_grad():
            big.value(SD15_LAYOUT[0].name).weight[0, 0] = 1e6
        save_adapter(big, tmp_path / "big.safetensors", dtype=torch.float16)
    with pytest.raises(ValueError, match="JSON"):
        save_adapter(adapter, tmp_path / "x.safetensors", training={"when": object()})
    partial = VMixAdapter(DEFAULT_DIMENSIONS, 768, {SD15_LAYOUT[0].name: 320}, "sd15")
    with pytest.raises(ValueError, match="SD1.5 layout"):
        save_adapter(partial, tmp_path / "partial.safetensors")
    with pytest.raises(ValueError, match=".safetensors"):
        save_adapter(adapter, tmp_path / "adapter.pt")
    assert sorted(os.listdir(tmp_path)) == []  # nothing half-written left behind


# -- malformed files ---------------------------------------------------------------------------
def drop(tensors, key):
    return {k: v for k, v in tensors.items() if k != key}


def with_tensor(tensors, key, value):
    return dict(tensors, **{key: value})


def poisoned(tensors, key, value):
    t = tensors[key].clone()
    t.view(-1)[7] = value
    return with_tensor(tensors, key, t)


def without_field(meta, field):
    return {k: v for k, v in meta.items() if k != field}


# Each case: (id, builder(good tensors, good metadata, good bytes) -> (tensors, metadata) or raw
# bytes, words that the message must contain).
CASES = [
    ("truncated", lambda t, m, raw: raw[: len(raw) // 2], ["truncated", "download or copy it again"]),
    ("truncated-header", lambda t, m, raw: raw[:200], ["truncated"]),
    ("empty", lambda t, m, raw: b"", ["empty"]),
    ("garbage", lambda t, m, raw: bytes(range(256)) * 64, ["not a safetensors file"]),
    ("garbage-header", lambda t, m, raw: struct.pack("<Q", 64) + b"\x89PNG" * 16 + b"0" * 100, ["not a safetensors file", "not JSON"]),
    ("header-not-object", lambda t, m, raw: struct.pack("<Q", 2) + b"[]", ["not a safetensors file"]),
    ("deeply-nested-header", lambda t, m, raw: struct.pack("<Q", 200000) + b"[" * 200000, ["not a safetensors file"]),
    ("header-length-too-big", lambda t, m, raw: struct.pack("<Q", 2**62) + raw[8:], ["header length exceeds the file"]),
    ("missing-tensor", lambda t, m, raw: (drop(t, LAST), m), ["lacks 1 tensor", LAST]),
    ("missing-projection", lambda t, m, raw: (drop(t, "projection.norm.bias"), m), ["lacks 1 tensor", "projection.norm.bias"]),
    ("extra-tensor", lambda t, m, raw: (with_tensor(t, "lora_unet_up.weight", torch.zeros(2)), m), ["unexpected tensor", "lora_unet_up.weight"]),
    ("wrong-shape", lambda t, m, raw: (with_tensor(t, FIRST, torch.zeros(320, 1024)), m), [FIRST, "[320, 1024]", "expected [320, 768]"]),
    ("wrong-aes-emb-rows", lambda t, m, raw: (with_tensor(t, "aes_emb", torch.zeros(10, 768)), m), ["'aes_emb'", "[10, 768]", "[12, 768]"]),
    ("int-dtype", lambda t, m, raw: (with_tensor(t, "aes_emb", torch.zeros(12, 768, dtype=torch.int32)), m), ["'aes_emb'", "I32", "F32, F16 or BF16"]),
    ("float64-dtype", lambda t, m, raw: (with_tensor(t, FIRST, torch.zeros(320, 768, dtype=torch.float64)), m), [FIRST, "F64"]),
    ("nan", lambda t, m, raw: (poisoned(t, "projection.out.weight", float("nan")), m), ["non-finite", "'projection.out.weight'"]),
    ("inf", lambda t, m, raw: (poisoned(t, LAST, float("inf")), m), ["non-finite", LAST]),
    ("no-metadata", lambda t, m, raw: (t, None), ["no 'vmix' metadata", "not a VMix adapter"]),
    ("lora-metadata", lambda t, m, raw: (t, {"raw": {"ss_network_module": "networks.lora"}}), ["no 'vmix' metadata"]),
    ("bad-metadata-json", lambda t, m, raw: (t, {"raw": {"vmix": "{format: vmix-adapter"}}), ["'vmix' metadata", "not valid JSON"]),
    ("metadata-not-object", lambda t, m, raw: (t, {"raw": {"vmix": "[1, 2]"}}), ["not a JSON object"]),
    ("wrong-format", lambda t, m, raw: (t, dict(m, format="lora")), ["format 'lora'", "'vmix-adapter'"]),
    ("unknown-family", lambda t, m, raw: (t, dict(m, family="sd3")), ["model family 'sd3'", "not supported", "sd15, sdxl"]),
    ("newer-format", lambda t, m, raw: (t, dict(m, format_version=2)), ["format version 2", "newer", "update sd-webui-vmix"]),
    ("format-version-zero", lambda t, m, raw: (t, dict(m, format_version=0)), ["invalid format version 0"]),
    ("format-version-string", lambda t, m, raw: (t, dict(m, format_version="1")), ["'format_version'", "not an integer"]),
    ("format-version-bool", lambda t, m, raw: (t, dict(m, format_version=True)), ["'format_version'", "not an integer"]),
    ("family-number", lambda t, m, raw: (t, dict(m, family=15)), ["'family'", "not a string"]),
    ("context-dim-float", lambda t, m, raw: (t, dict(m, context_dim=768.0)), ["'context_dim'", "not an integer"]),
    ("context-dim-other", lambda t, m, raw: (t, dict(m, context_dim=1024)), ["context width 1024", "SD1.5 uses 768"]),
    ("tokens-other", lambda t, m, raw: (t, dict(m, tokens=75)), ["75 tokens", "77"]),
    ("dimensions-not-list", lambda t, m, raw: (t, dict(m, dimensions={"color": "vibrant color"})), ["'dimensions'", "not a list"]),
    ("dimension-entry-incomplete", lambda t, m, raw: (t, dict(m, dimensions=[{"name": "color", "positive": "x"}] * 6)), ["'dimensions' list", "{name, positive, negative}"]),
    ("dimension-duplicate", lambda t, m, raw: (t, dict(m, dimensions=[m["dimensions"][0]] * 6)), ["unusable dimensions", "appears twice"]),
    ("dimensions-fewer", lambda t, m, raw: (t, dict(m, dimensions=m["dimensions"][:5])), ["'aes_emb'", "[12, 768]", "expected [10, 768]"]),
    ("train-lambda-string", lambda t, m, raw: (t, dict(m, train_lambda="1")), ["'train_lambda'", "not a number"]),
    ("train-lambda-nan", lambda t, m, raw: (t, {"raw": {"vmix": json.dumps(m).replace('"train_lambda": 1.0', '"train_lambda": NaN')}}), ["non-finite train_lambda"]),
    ("training-not-object", lambda t, m, raw: (t, dict(m, training="1200 steps")), ["'training'", "not a JSON object"]),
    ("shape-not-list", lambda t, m, raw: edit_header(raw, lambda h: h["aes_emb"].update(shape=12)), ["malformed entry", "'aes_emb'"]),
    ("dtype-not-string", lambda t, m, raw: edit_header(raw, lambda h: h["aes_emb"].update(dtype=None)), ["malformed entry", "'aes_emb'"]),
    ("offsets-not-ints", lambda t, m, raw: edit_header(raw, lambda h: h["aes_emb"].update(data_offsets=[0, "8"])), ["malformed entry"]),
    ("size-does-not-match-dtype", lambda t, m, raw: edit_header(raw, lambda h: h["aes_emb"].update(dtype="F16")), ["'aes_emb'", "stored size does not match"]),
    ("offsets-past-end", lambda t, m, raw: edit_header(raw, lambda h: h[LAST].update(data_offsets=[0, 10**12])), ["truncated", LAST]),
] + [
    (f"missing-{field}", (lambda field: lambda t, m, raw: (t, without_field(m, field)))(field), ["lacks the metadata field", f"'{field}'"])
    for field in ("format", "format_version", "family", "context_dim", "tokens", "dimensions", "train_lambda")
]


def build_case(tmp_path, good, builder, case_id):
    _, tensors, meta, raw = good
    path = tmp_path / f"case-{case_id}.safetensors"
    made = builder(tensors, meta, raw)
    if isinstance(made, bytes):
        path.write_bytes(made)
    else:
        tensors, meta = made
        if meta is not None and "raw" in meta:
            write(path, tensors, raw_meta=meta["raw"])
        else:
            write(path, tensors, meta)
    return str(path)


def assert_clear_error(err, path, words):
    message = str(err.value)
    assert type(err.value) is AdapterError
    assert message.startswith(f"VMix adapter '{os.path.basename(path)}' ") and message.endswith(".")
    assert "\n" not in message and "Traceback" not in message
    for word in words:
        assert word in message, (word, message)
    assert err.value.path == str(path)


@pytest.mark.parametrize("case_id,builder,words", CASES, ids=[c[0] for c in CASES])
def test_malformed_file_gives_one_clear_error(tmp_path, good, case_id, builder, words):
    path = build_case(tmp_path, good, builder, case_id)
    with pytest.raises(AdapterError) as err:
        load_adapter(path)
    assert_clear_error(err, path, words)


def test_metadata_problems_are_found_without_reading_tensors(tmp_path, good):
    for case_id, builder, words in CASES:
        if "metadata" in case_id or case_id.startswith(("missing-format", "missing-family", "newer", "unknown")):
            path = build_case(tmp_path, good, builder, case_id)
            with pytest.raises(AdapterError) as err:
                read_adapter_info(path)
            assert_clear_error(err, path, words)


class _Trap:
    """Unpickling this would create a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("ext", [".ckpt", ".pt", ".pth", ".bin", ".pkl"])
def test_pickle_files_are_refused_unopened(tmp_path, ext, adapter):
    marker = tmp_path / "unpickled"
    path = tmp_path / f"vmix{ext}"
    with open(path, "wb") as f:
        pickle.dump({"state": adapter.projection.state_dict(), "trap": _Trap(str(marker))}, f)
    for call in (load_adapter, read_adapter_info):
        with pytest.raises(AdapterError) as err:
            call(str(path))
        assert_clear_error(err, str(path), ["pickle file", "arbitrary code", ".safetensors files only"])
    assert not marker.exists()


def test_paths_that_are_not_adapter_files(tmp_path):
    cases = [
        (tmp_path / "absent.safetensors", ["does not exist"]),
        (tmp_path / "notes.txt", ["not a .safetensors file"]),
        (tmp_path / "folder.safetensors", ["is a folder"]),
    ]
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "folder.safetensors").mkdir()
    for path, words in cases:
        for call in (load_adapter, read_adapter_info):
            with pytest.raises(AdapterError) as err:
                call(path)  # a Path works as well as a str
            assert_clear_error(err, str(path), words)


# -- binding to a UNet ---------------------------------------------------------------------------
def meta_unet(config):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**config)


SD15_UNET = shipped_unet_config("sd15")
SDXL_UNET = shipped_unet_config("sdxl")


def hook_count(module):
    return sum(len(m._forward_hooks) for m in module.modules())


def test_loaded_adapter_binds_to_the_real_sd15_layout(good):
    unet = meta_unet(SD15_UNET)
    mixer = ValueMixer(load_adapter(good[0]))
    assert check_fit(mixer.adapter, find_cross_attention_layers(unet)).ok
    with mixer.applied(unet):
        assert hook_count(unet) == 16 and mixer.is_installed_on(unet)
    assert hook_count(unet) == 0


def test_wrong_family_is_refused_before_anything_is_hooked(good):
    unet = meta_unet(SDXL_UNET)
    mixer = ValueMixer(load_adapter(good[0]))
    mixer.arm()
    with pytest.raises(AdapterMismatch) as err:
        mixer.install(unet)
    message = str(err.value)
    assert "SD1.5 adapter does not fit the loaded model" in message and "SDXL" in message and "\n" not in message
    assert hook_count(unet) == 0 and not mixer.installed
    with pytest.raises(AdapterMismatch):
        with mixer.applied(unet):
            pass
    assert hook_count(unet) == 0


def test_bind_report_lists_missing_extra_and_mismatched_layers(good, webui):
    adapter = load_adapter(good[0])
    rows = [(i.name, i.context_dim, i.inner_dim, i.heads) for i in SD15_LAYOUT]
    rows = rows[1:] + [("output_blocks.12.1.transformer_blocks.0.attn2", 768, 320, 8)]  # one gone, one new
    rows[0] = (rows[0][0], 768, 336, 8)  # another width
    with torch.device("meta"):
        tree = webui.Tree(rows)
    report = check_fit(adapter, find_cross_attention_layers(tree))
    assert report.missing == ["output_blocks.12.1.transformer_blocks.0.attn2"]
    assert report.extra == [SD15_LAYOUT[0].name]
    assert report.mismatched == [(rows[0][0], (320, 768), (336, 768))]
    assert not report.ok and "does not fit" in report.reason(adapter)
    with pytest.raises(AdapterMismatch):
        ValueMixer(adapter).install(tree)
    assert hook_count(tree) == 0


def test_a_loaded_adapter_owns_its_memory(tmp_path, adapter):
    """load_file maps the file; an adapter kept in the WebUI's cache must survive the file being
    overwritten in place (a plain `cp` onto it), which would otherwise kill the process (SIGBUS)."""
    import subprocess
    import sys

    for dtype in (torch.float16,):
        path = save_adapter(adapter, tmp_path / f"owned-{dtype}.safetensors", dtype=dtype)
        code = (
            "import sys, torch\n"
            "from vmix_lib.adapter_file import load_adapter\n"
            "a = load_adapter(sys.argv[1])\n"
            "open(sys.argv[1], 'wb').close()\n"
            "print(sum(float(t.double().sum()) for t in a.state_dict().values()) != 0)\n"
        )
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        result = subprocess.run([sys.executable, "-c", code, str(path)], cwd=root, capture_output=True, text=True)
        assert (result.returncode, result.stdout.strip()) == (0, "True"), result.stderr[-500:]


@pytest.mark.parametrize("dtype, value", [
    (torch.float16, float("nan")), (torch.float32, float("inf")), (torch.bfloat16, float("-inf")),
])
def test_every_non_finite_value_is_found(tmp_path, adapter, dtype, value):
    from safetensors.torch import load_file as read_tensors, save_file as write_tensors

    path = save_adapter(adapter, tmp_path / "good.safetensors", dtype=dtype)
    tensors = read_tensors(str(path))
    key = sorted(k for k in tensors if k.startswith("values."))[-1]
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[-1] = value  # the very last value of the last W_a
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    write_tensors(tensors, str(tmp_path / "bad.safetensors"), metadata=metadata)
    with pytest.raises(AdapterError, match=f"has non-finite values \\(NaN or inf\\) in tensor '{re.escape(key)}'"):
        load_adapter(tmp_path / "bad.safetensors")
    big = torch.full((4096,), torch.finfo(dtype).max, dtype=dtype)  # finite values whose sum overflows dtype
    from vmix_lib.adapter_file import _all_finite

    assert _all_finite(big) and _all_finite(-big) and not _all_finite(torch.cat([big, torch.tensor([value], dtype=dtype)]))


def test_loading_while_a_webui_loads_a_checkpoint(tmp_path, adapter, monkeypatch):
    """While they load a checkpoint, which A1111 does in another thread as the UI (and so the adapter
    menu) is built, A1111 replaces Module.load_state_dict and Module.to and forces Linear onto meta
    (modules/sd_disable_initialization.py) and Forge swaps torch.nn.Linear/LayerNorm for its own
    operations (backend/operations.py).  Found in the real A1111: the adapter check at UI build time
    raised "load_state_dict() got an unexpected keyword argument 'assign'" and the WebUI exited."""
    path = save_adapter(adapter, tmp_path / "during.safetensors", dtype=torch.float16)
    expected = load_adapter(path).state_dict()

    def refuse(*args, **kwargs):
        raise TypeError("load_state_dict() got an unexpected keyword argument 'assign'")

    class ForgeLinear(torch.nn.Module):  # like Forge's operations: no weight until loaded, a dummy parameter
        def __init__(self, *args, **kwargs):
            super().__init__()
            self.dummy = torch.nn.Parameter(torch.empty(1))
            self.weight = None

    linear_init = torch.nn.Linear.__init__
    monkeypatch.setattr(torch.nn.Module, "load_state_dict", refuse)
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *args, **kwargs: None)
    monkeypatch.setattr(torch.nn.Linear, "__init__", lambda self, *a, **k: linear_init(self, *a, **{**k, "device": "meta"}))
    monkeypatch.setattr(torch.nn, "Linear", ForgeLinear)
    monkeypatch.setattr(torch.nn, "LayerNorm", ForgeLinear)
    loaded = load_adapter(path)
    monkeypatch.undo()
    state = loaded.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)
    assert {type(m).__name__ for m in loaded.modules()} == {"VMixAdapter", "AestheticProjection", "Linear",
                                                            "LayerNorm", "ModuleDict"}
