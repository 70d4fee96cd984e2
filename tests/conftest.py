"""Shared test helpers: a WebUI-style attention module with switchable kernels, a module tree
with WebUI attn2 names, the real attn2 inventory fixture, and a VMix adapter with a live branch.
"""
import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

# One torch thread for the suite and the processes it starts (torchrun, accelerate launch), unless the
# user chose: the tests' tensors are tiny, and on a shared 2-core machine torch's default of a thread
# per core made them several times slower (a 60-step tiny training: 288 s against 14-28 s).
_ONE_THREAD = not os.environ.get("OMP_NUM_THREADS", "").strip()
if _ONE_THREAD:
    os.environ["OMP_NUM_THREADS"] = "1"

# The same CPU kernels on every x86 machine: the demonstration's learned-behaviour checks
# (tests/test_demo*.py) train small models from scratch, and the AVX-512/AMX kernels that torch, MKL
# and oneDNN pick on newer CPUs round differently, enough to move those numbers (seed 0's distilled
# lighting step: 0.0055 there against 0.026 with AVX2; the thresholds were measured with AVX2).
# Set before torch is imported, as the libraries read them once; a user's own setting wins.
import platform  # noqa: E402

if platform.machine().lower() in ("x86_64", "amd64"):
    for _name, _value in (("ATEN_CPU_CAPABILITY", "avx2"), ("MKL_ENABLE_INSTRUCTIONS", "AVX2"), ("ONEDNN_MAX_CPU_ISA", "AVX2")):
        os.environ.setdefault(_name, _value)

import pytest  # noqa: E402
import torch  # noqa: E402

if _ONE_THREAD:
    torch.set_num_threads(1)
import torch.nn as nn
import torch.nn.functional as F

DATA_DIR = Path(__file__).parent / "data"


# -- attention kernels, each (q, k, v [B, T, H·D], heads, scale) -> [B, Nq, H·D] ------------------
def _split(t, heads):
    return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)


def _merge(t):
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)


def naive_kernel(q, k, v, heads, scale):
    q, k, v = (_split(t, heads) for t in (q, k, v))
    return _merge((q @ k.transpose(-1, -2) * scale).softmax(-1) @ v)


def sdp_kernel(q, k, v, heads, scale):
    q, k, v = (_split(t, heads) for t in (q, k, v))
    return _merge(F.scaled_dot_product_attention(q, k, v, scale=scale))


def sliced_kernel(q, k, v, heads, scale, slice_size=7):
    """Query slices, each with its own softmax over all keys (A1111's split attention)."""
    q, k, v = (_split(t, heads) for t in (q, k, v))
    out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype)
    for i in range(0, q.shape[2], slice_size):
        scores = q[:, :, i : i + slice_size] @ k.transpose(-1, -2) * scale
        out[:, :, i : i + slice_size] = scores.softmax(-1) @ v
    return _merge(out)


def key_chunked_kernel(q, k, v, heads, scale, chunk=50):
    """Keys in chunks that straddle the 77-token boundaries, online softmax (sub-quadratic style)."""
    q, k, v = (_split(t, heads) for t in (q, k, v))
    peak = acc = norm = None
    for j in range(0, k.shape[2], chunk):
        scores = q @ k[:, :, j : j + chunk].transpose(-1, -2) * scale
        new_peak = scores.amax(-1, keepdim=True) if peak is None else torch.maximum(peak, scores.amax(-1, keepdim=True))
        weights = (scores - new_peak).exp()
        part, mass = weights @ v[:, :, j : j + chunk], weights.sum(-1, keepdim=True)
        if peak is None:
            acc, norm = part, mass
        else:
            fix = (peak - new_peak).exp()
            acc, norm = acc * fix + part, norm * fix + mass
        peak = new_peak
    return _merge(acc / norm)


KERNELS = {"naive": naive_kernel, "sdp": sdp_kernel, "sliced": sliced_kernel, "key_chunked": key_chunked_kernel}


class CrossAttention(nn.Module):
    """The WebUI's ldm/sgm CrossAttention, attribute for attribute: heads, scale, to_q/to_k/to_v
    without bias, to_out = Sequential(Linear, Dropout).  The kernel is a class attribute, the way
    A1111 swaps CrossAttention.forward for its optimisations; ``record`` (a list) captures q, k, v.
    """

    kernel = "sdp"

    def __init__(self, query_dim, context_dim, heads, dim_head):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.scale = dim_head**-0.5
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))
        self.record = None

    def forward(self, x, context=None, mask=None, **kwargs):
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        if self.record is not None:
            self.record.append((q.detach(), k.detach(), v.detach()))
        return self.to_out(KERNELS[type(self).kernel](q, k, v, self.heads, self.scale))


class WebUITree(nn.Module):
    """attn2 modules at their WebUI names; forward feeds each a fixed query input of its own."""

    def __init__(self, layers, query_tokens=16):
        super().__init__()
        self.names = []
        self.query_tokens = query_tokens
        for name, context_dim, inner, heads in layers:
            parent = self
            *path, leaf = name.split(".")
            for part in path:
                if part not in parent._modules:
                    parent.add_module(part, nn.Module())
                parent = parent._modules[part]
            parent.add_module(leaf, CrossAttention(inner, context_dim, heads, inner // heads))
            self.names.append(name)

    def forward(self, context):
        outputs = {}
        for i, name in enumerate(self.names):
            attn = self.get_submodule(name)
            g = torch.Generator().manual_seed(1000 + i)
            x = torch.randn(context.shape[0], self.query_tokens, attn.to_q.in_features, generator=g)
            outputs[name] = attn(x.to(context.dtype), context=context)
        return outputs


def live_adapter(unet, family, seed=0):
    """A VMixAdapter for ``unet`` whose branch is not zero: random AesEmb and projection output,
    W_a = to_v plus noise (a trained adapter's state, not a fresh one)."""
    from vmix_lib.layers import find_cross_attention_layers
    from vmix_lib.mixing import VMixAdapter

    g = torch.Generator().manual_seed(seed)
    d = find_cross_attention_layers(unet)[0].context_dim
    adapter = VMixAdapter.for_unet(unet, torch.randn(12, d, generator=g), family)
    with torch.no_grad():
        adapter.projection.out.weight.copy_(torch.randn(d, d, generator=g) / math.sqrt(d))
        adapter.projection.out.bias.copy_(torch.randn(d, generator=g) * 0.1)
        for name in adapter.layer_names:
            w = adapter.value(name).weight
            w.add_(torch.randn(w.shape, generator=g) * w.std())
    return adapter.requires_grad_(False)


@pytest.fixture(scope="session")
def webui():
    """Helpers for tests that need WebUI-shaped modules (see the classes above)."""
    return SimpleNamespace(
        CrossAttention=CrossAttention, Tree=WebUITree, kernels=KERNELS, live_adapter=live_adapter
    )


@pytest.fixture(scope="session")
def attn2_layouts():
    """Real A1111 v1.10.1 attn2 inventories of SD1.5 and SDXL (copied from the shared fixture)."""
    return json.loads((DATA_DIR / "webui_attn2_layers.json").read_text())


# -- a tiny random CLIP in a folder, loaded by path as a user's real one (scoring, evaluate) ----------
@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from vmix_lib.scoring.tiny import write_tiny_clip

    return write_tiny_clip(str(tmp_path_factory.mktemp("clip")))


@pytest.fixture(scope="module")
def clip(clip_dir):
    from vmix_lib.scoring.clip import load_clip

    return load_clip(clip_dir)


# -- the demonstration at its test scale, trained once per session (test_demo, test_demo_evaluate) ----
@pytest.fixture(scope="session")
def demo_test_run(tmp_path_factory):
    """The demonstration at its test scale (demo.TEST), trained once for tests/test_demo.py and
    tests/test_demo_evaluate.py: (DemoRun with its models, the output folder)."""
    from vmix_lib.demo import experiment as demo

    out = tmp_path_factory.mktemp("demo")
    return demo.run_demo(demo.TEST, str(out), log=lambda message: None), out
