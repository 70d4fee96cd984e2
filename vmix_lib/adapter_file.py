"""The VMix adapter file: one .safetensors holding everything inference needs.

Tensors (d = context width, N = dimensions, inner = the layer's to_v output width):
    aes_emb                         [2N, d]    rows 0..N-1 positive labels, N..2N-1 negatives
    projection.token.weight         [77, N]    Linear over the token axis N -> 77
    projection.token.bias           [77]
    projection.norm.weight          [d]        LayerNorm(d)
    projection.norm.bias            [d]
    projection.out.weight           [d, d]     zero-initialised Linear(d, d)
    projection.out.bias             [d]
    values.<layer>.weight           [inner, d] W_a per attn2, <layer> the WebUI name, e.g.
                                               values.input_blocks.1.1.transformer_blocks.0.attn2.weight
                                               (diffusers names are accepted and mapped on load)
Metadata: key "vmix" holds JSON with format "vmix-adapter", format_version, family ("sd15"/"sdxl"),
context_dim, tokens (77), dimensions [{name, positive, negative}], train_lambda, training {free-form}.
Dtypes: F32, F16 or BF16 (save_adapter keeps AesEmb and the projection in F32 and writes W_a in the
requested dtype).  load_adapter keeps each W_a in the file's dtype (an fp16 SDXL adapter stays 350 MB
in memory; V_a is computed from it in float32) and returns AesEmb and the projection in float32.  The tensor set and shapes must be exactly
those of the family's layout; every value must be finite.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from .dimensions import AestheticDimension, check_dimensions, dimensions_from_json
from .layers import FAMILY_TITLES, LAYOUTS, TOKENS, diffusers_to_webui
from .mixing import VMixAdapter

FORMAT = "vmix-adapter"
FORMAT_VERSION = 1
METADATA_KEY = "vmix"
EXTENSION = ".safetensors"
PICKLE_EXTENSIONS = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2}
_MAX_HEADER = 100 * 1024 * 1024


class AdapterError(ValueError):
    """A VMix adapter file cannot be used; the message names the file and the problem."""

    def __init__(self, path: str, problem: str):
        self.path = path
        self.problem = problem
        super().__init__(f"VMix adapter {os.path.basename(path)!r} {problem}.")


@dataclass(frozen=True)
class AdapterInfo:
    """What the metadata says, read without loading the tensors (for menus and infotext)."""

    path: str
    family: str
    context_dim: int
    tokens: int
    dimensions: Tuple[AestheticDimension, ...]
    train_lambda: float
    format_version: int
    training: Dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return os.path.splitext(os.path.basename(self.path))[0]

    @property
    def family_title(self) -> str:
        return FAMILY_TITLES.get(self.family, self.family)


def _expected_shapes(family: str, n_dims: int, d: int, layers: Optional[Mapping[str, int]] = None) -> Dict[str, Tuple[int, ...]]:
    shapes: Dict[str, Tuple[int, ...]] = {
        "aes_emb": (2 * n_dims, d),
        "projection.token.weight": (TOKENS, n_dims),
        "projection.token.bias": (TOKENS,),
        "projection.norm.weight": (d,),
        "projection.norm.bias": (d,),
        "projection.out.weight": (d, d),
        "projection.out.bias": (d,),
    }
    for name, inner in (layers.items() if layers is not None else ((i.name, i.inner_dim) for i in LAYOUTS[family])):
        shapes[f"values.{name}.weight"] = (inner, d)
    return shapes


def _read_header(path: str) -> Tuple[Dict[str, Any], int]:
    """Parse the safetensors header ourselves so that every defect gets a precise message."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise AdapterError(path, "is empty or truncated (no safetensors header)")
            (length,) = struct.unpack("<Q", raw)
            if length > min(size - 8, _MAX_HEADER):
                raise AdapterError(path, "is truncated or not a safetensors file (header length exceeds the file)")
            header_bytes = f.read(length)
    except OSError as e:
        raise AdapterError(path, f"cannot be read ({e.strerror or e})") from None
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise AdapterError(path, "is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise AdapterError(path, "is not a safetensors file (its header is not a JSON object)")
    data_size = size - 8 - length
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("data_offsets"), list) or len(entry["data_offsets"]) != 2:
            raise AdapterError(path, f"has a malformed entry for tensor {name!r}")
        begin, end = entry["data_offsets"]
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
            raise AdapterError(path, f"has a malformed entry for tensor {name!r}")
        shape = entry.get("shape")
        if not isinstance(entry.get("dtype"), str) or not isinstance(shape, list) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
        ):
            raise AdapterError(path, f"has a malformed entry for tensor {name!r}")
        if end > data_size:
            raise AdapterError(path, f"is truncated (tensor {name!r} ends past the end of the file); download or copy it again")
    return header, data_size


def _check_metadata(path: str, header: Mapping[str, Any], allow_custom_layout: bool = False) -> AdapterInfo:
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or METADATA_KEY not in meta:
        raise AdapterError(path, f"has no '{METADATA_KEY}' metadata, so it is not a VMix adapter (LoRA and other files go elsewhere)")
    try:
        data = json.loads(meta[METADATA_KEY])
    except (TypeError, json.JSONDecodeError):
        raise AdapterError(path, f"has '{METADATA_KEY}' metadata that is not valid JSON") from None
    if not isinstance(data, dict):
        raise AdapterError(path, f"has '{METADATA_KEY}' metadata that is not a JSON object")

    def need(key, kind, what):
        if key not in data:
            raise AdapterError(path, f"lacks the metadata field {key!r}")
        value = data[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise AdapterError(path, f"has metadata field {key!r} that is not {what}")
        return value

    if need("format", str, "a string") != FORMAT:
        raise AdapterError(path, f"has metadata format {data['format']!r}, expected {FORMAT!r}")
    version = need("format_version", int, "an integer")
    if version > FORMAT_VERSION:
        raise AdapterError(path, f"uses format version {version}, newer than this extension supports ({FORMAT_VERSION}); update sd-webui-vmix")
    if version < 1:
        raise AdapterError(path, f"has an invalid format version {version}")
    family = need("family", str, "a string")
    if family not in LAYOUTS:
        raise AdapterError(path, f"is for model family {family!r}, which is not supported (supported: {', '.join(LAYOUTS)})")
    context_dim = need("context_dim", int, "an integer")
    expected_dim = LAYOUTS[family][0].context_dim
    custom = allow_custom_layout and isinstance(data.get("training"), dict) and data["training"].get("custom_layout") is True
    if context_dim != expected_dim and not custom:
        raise AdapterError(path, f"says context width {context_dim}, but {FAMILY_TITLES[family]} uses {expected_dim}")
    tokens = need("tokens", int, "an integer")
    if tokens != TOKENS:
        raise AdapterError(path, f"says {tokens} tokens, but VMix adapters use {TOKENS}")
    raw_dims = need("dimensions", list, "a list")
    try:
        if not all(isinstance(i, dict) and all(isinstance(i.get(k), str) for k in ("name", "positive", "negative")) for i in raw_dims):
            raise KeyError
        dims = tuple(dimensions_from_json(raw_dims))
    except (KeyError, TypeError):
        raise AdapterError(path, "has a 'dimensions' list whose entries are not {name, positive, negative} strings") from None
    problem = check_dimensions(dims)
    if problem:
        raise AdapterError(path, f"has unusable dimensions: {problem}")
    train_lambda = need("train_lambda", float, "a number")
    if not math.isfinite(train_lambda):
        raise AdapterError(path, "has a non-finite train_lambda")
    training = data.get("training", {})
    if not isinstance(training, dict):
        raise AdapterError(path, "has metadata field 'training' that is not a JSON object")
    return AdapterInfo(path, family, context_dim, tokens, dims, train_lambda, version, training)


def _check_path(path: str) -> str:
    path = os.fspath(path)
    lower = path.lower()
    if lower.endswith(PICKLE_EXTENSIONS):
        raise AdapterError(path, "is a pickle file, which can run arbitrary code when loaded; VMix adapters are .safetensors files only")
    if not lower.endswith(EXTENSION):
        raise AdapterError(path, "is not a .safetensors file")
    if os.path.isdir(path):
        raise AdapterError(path, "is a folder, not a file")
    if not os.path.isfile(path):
        raise AdapterError(path, "does not exist")
    return path


def read_adapter_info(path: str, allow_custom_layout: bool = False) -> AdapterInfo:
    """Validate the header and metadata only (fast; no tensor data is read).

    ``allow_custom_layout`` accepts the trainer's files for non-SD test/research UNets (see load_adapter).
    """
    path = _check_path(path)
    header, _ = _read_header(path)
    return _check_metadata(path, header, allow_custom_layout)


def _assign(adapter: VMixAdapter, state: Dict[str, torch.Tensor], path: str) -> None:
    """Put the file's tensors into the module built on ``meta``, as its parameters and buffers.

    Not through ``load_state_dict``: AUTOMATIC1111 replaces ``torch.nn.Module.load_state_dict`` (and
    ``Module.to``) process-wide while it loads a checkpoint, which it does in another thread while
    the UI, and so the adapter menu, is built.
    """
    for key, tensor in state.items():
        owner, _, name = key.rpartition(".")
        module = adapter.get_submodule(owner) if owner else adapter
        if name in module._buffers:
            module._buffers[name] = tensor
        else:
            module._parameters[name] = torch.nn.Parameter(tensor, requires_grad=False)
    left = [n for n, t in [*adapter.named_parameters(), *adapter.named_buffers()] if t.is_meta]
    if left:  # the layout check above makes this unreachable; never hand out a half-filled module
        raise AdapterError(path, f"could not be assembled (no data for {left[0]!r})")


def _all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite, in one pass without a mask as large as the tensor: a float32 sum
    is NaN or ±inf whenever a value is (NaN propagates, inf + -inf is NaN).  Finite F16 values cannot
    overflow it; where F32/BF16 values do, the exact element-wise test decides."""
    if math.isfinite(float(tensor.sum(dtype=torch.float32))):
        return True
    return tensor.dtype != torch.float16 and bool(torch.isfinite(tensor).all())


def _canonical_name(name: str) -> str:
    if name.startswith("values.") and name.endswith(".weight"):
        layer = name[len("values."):-len(".weight")]
        mapped = diffusers_to_webui(layer)
        if mapped is not None:
            return f"values.{mapped}.weight"
    return name


def load_adapter(
    path: str, device: str | torch.device = "cpu", dtype: Optional[torch.dtype] = None,
    layers: Optional[Mapping[str, int]] = None,
) -> VMixAdapter:
    """Load and fully validate an adapter file; raises AdapterError with one clear sentence.

    W_a stay in the file's dtype unless ``dtype`` is given (e.g. float32 to train them further);
    AesEmb and the projection are always float32 (they are tiny and feed a LayerNorm).

    ``layers`` ({layer name: to_v width} of a UNet) is for files the trainer wrote for a UNet of a
    custom, non-SD layout (metadata ``training.custom_layout``: tests, research models): their
    layer set is checked against it instead of the family's.  Other files ignore it.
    """
    path = _check_path(path)
    header, _ = _read_header(path)
    info = _check_metadata(path, header, allow_custom_layout=layers is not None)
    if not (layers is not None and info.training.get("custom_layout") is True):
        layers = None
    expected = _expected_shapes(info.family, len(info.dimensions), info.context_dim, layers)
    entries = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        canonical = _canonical_name(name)
        if canonical in entries:
            raise AdapterError(path, f"holds layer {canonical!r} twice (under two names)")
        entries[canonical] = (name, entry)
    missing = [n for n in expected if n not in entries]
    if missing:
        raise AdapterError(path, f"lacks {len(missing)} tensor(s) of a {FAMILY_TITLES[info.family]} adapter, first {missing[0]!r}")
    extra = [n for n in entries if n not in expected]
    if extra:
        raise AdapterError(path, f"holds {len(extra)} unexpected tensor(s), first {entries[extra[0]][0]!r}")
    for canonical, (name, entry) in entries.items():
        if entry.get("dtype") not in _DTYPES:
            raise AdapterError(path, f"stores tensor {name!r} as {entry.get('dtype')}, expected F32, F16 or BF16")
        shape = tuple(entry["shape"])
        if shape != expected[canonical]:
            raise AdapterError(path, f"has tensor {name!r} of shape {list(shape)}, expected {list(expected[canonical])}")
        begin, end = entry["data_offsets"]
        if end - begin != math.prod(shape) * _ITEMSIZE[entry["dtype"]]:
            raise AdapterError(path, f"has tensor {name!r} whose stored size does not match its shape and dtype")
    try:
        from safetensors.torch import load_file

        tensors = load_file(path, device="cpu")
    except Exception as e:  # safetensors' own message, in our sentence
        raise AdapterError(path, f"cannot be read as safetensors ({e})") from None
    # Built on the meta device and filled by assignment: no float32 copy of 175 M SDXL weights is
    # ever allocated, and the file's tensors become the module's (no second copy either).
    with torch.device("meta"):
        adapter = VMixAdapter(
            info.dimensions,
            info.context_dim,
            dict(layers) if layers is not None else {layer.name: layer.inner_dim for layer in LAYOUTS[info.family]},
            info.family,
            tokens=info.tokens,
            train_lambda=info.train_lambda,
        )
    state = {}
    for canonical, (name, _) in entries.items():
        # load_file maps the file: copy each tensor into memory of its own (a file replaced in place
        # while the adapter is cached must not take the WebUI down), in the dtype it is kept in.
        tensor = tensors.pop(name)
        if not _all_finite(tensor):
            raise AdapterError(path, f"has non-finite values (NaN or inf) in tensor {name!r}")
        if canonical.startswith("values."):
            canonical = "values." + canonical[len("values."):-len(".weight")].replace(".", "__") + ".weight"
            state[canonical] = tensor.to(dtype=dtype or tensor.dtype, copy=True)
        else:
            state[canonical] = tensor.to(dtype=torch.float32, copy=True)
    _assign(adapter, state, path)
    adapter.source_path = path
    adapter.training_info = info.training
    adapter = adapter.eval().requires_grad_(False)
    return adapter if torch.device(device).type == "cpu" else adapter.to(device)


def adapter_state(adapter: VMixAdapter, dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
    """The file's tensors from an adapter module (WebUI layer names)."""
    out: Dict[str, torch.Tensor] = {"aes_emb": adapter.aes_emb}
    for key, tensor in adapter.projection.state_dict().items():
        out[f"projection.{key}"] = tensor
    for name in adapter.layer_names:
        out[f"values.{name}.weight"] = adapter.value(name).weight
    cast = dtype or torch.float32
    # AesEmb and the projection are tiny; keep them in float32 whatever the W_a dtype.
    return {
        k: v.detach().to("cpu", torch.float32 if not k.startswith("values.") else cast).contiguous()
        for k, v in out.items()
    }


def save_adapter(
    adapter: VMixAdapter,
    path: str,
    training: Optional[Mapping[str, Any]] = None,
    dtype: Optional[torch.dtype] = None,
) -> str:
    """Write ``adapter`` to ``path`` (.safetensors); ``dtype`` sets the W_a precision (default fp32)."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    if not path.lower().endswith(EXTENSION):
        raise ValueError(f"adapter files must end in {EXTENSION}: {path}")
    if adapter.family not in LAYOUTS:
        raise ValueError(f"adapter family {adapter.family!r} is not one of {', '.join(LAYOUTS)}")
    state = adapter_state(adapter, dtype)
    problem = check_dimensions(adapter.dimensions)
    if problem:
        raise ValueError(f"adapter {problem}; not saved to {path}")
    expected = _expected_shapes(adapter.family, len(adapter.dimensions), LAYOUTS[adapter.family][0].context_dim)
    for name in sorted(set(expected) ^ set(state)) or [n for n in expected if tuple(state[n].shape) != expected[n]]:
        # the loader accepts exactly the family's layout; refuse to write a file it would reject
        raise ValueError(f"adapter does not have the {FAMILY_TITLES[adapter.family]} layout (tensor {name!r}); not saved to {path}")
    for name, tensor in state.items():
        if not torch.isfinite(tensor).all():  # the loader would refuse the file
            raise ValueError(f"adapter tensor {name!r} has non-finite values (NaN or inf); not saved to {path}")
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "family": adapter.family,
        "context_dim": adapter.context_dim,
        "tokens": adapter.tokens,
        "dimensions": [d.to_json() for d in adapter.dimensions],
        "train_lambda": adapter.train_lambda,
        "training": dict(training or {}),
    }
    try:
        meta_json = json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"adapter metadata must be plain JSON (training info included): {e}") from None
    tmp = path + ".tmp"
    try:
        save_file(state, tmp, metadata={METADATA_KEY: meta_json})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors writes 0600; an adapter is meant to be shared
        os.replace(tmp, path)  # never leave a half-written adapter under the real name
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path
