"""Stand-ins for the parts of AUTOMATIC1111 and Forge the VMix glue touches, built from real torch
modules, plus tests that they behave like the originals where the glue depends on it.

Mirrored from the sources read for this project (A1111 v1.10.1 82a973c, Forge main dfdcbab):
- the diffusion model tree: ``input_blocks.<i>.1.transformer_blocks.<j>.attn2`` etc., each attn2
  with heads/to_q/to_k/to_v/to_out, to_v called on the context (or Forge's ``value``);
- Forge's BasicTransformerBlock._forward attn2 section (backend/nn/unet.py): ``attn2_patch`` list
  functions get (n, context, value, extra_options) with value = context, then a replace keyed
  (block_name, id, index) or (block_name, id) gets to_q(n), to_k(context), to_v(value) and returns
  the pre-to_out tensor; else attn2(n, context=, value=, transformer_options=);
- Forge's ModelPatcher.clone() deep-copies model_options (backend/patcher/base.py) and
  set_model_patch appends to transformer_options["patches"][name];
- Forge's sampling puts cond_or_uncond (COND=0, UNCOND=1, one entry per chunk) and sigmas into a
  shallow copy of transformer_options for every UNet call (backend/sampling/sampling_function.py);
- A1111's CFGDenoiser: on_cfg_denoiser(CFGDenoiserParams) before the UNet calls of one denoiser
  call, rows [cond..., uncond...] in one call or consecutive calls (sd_samplers_cfg_denoiser.py).

Other test modules import this one (pytest puts tests/ on sys.path).
"""
from __future__ import annotations

import copy
import math
from types import SimpleNamespace
from typing import Dict, List, Sequence

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from vmix_lib.dimensions import DEFAULT_DIMENSIONS
from vmix_lib.layers import LAYOUTS, LayerInfo, find_cross_attention_layers
from vmix_lib.mixing import VMixAdapter
from vmix_lib.webui.host import WebUIHost, job_key_of
from vmix_lib.webui.library import AdapterLibrary

QUERY_DIM = 8  # the UNet's own channel width does not matter to the glue; keep it tiny


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny tensors: one thread is faster, and with 2 cores shared by other processes OpenMP's spin
    waits make two threads an order of magnitude slower.  Restored after each module; modules
    that import this fixture get it automatically."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class CrossAttention(nn.Module):
    def __init__(self, query_dim: int, context_dim: int, inner: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (inner // heads) ** -0.5
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x, context=None, value=None, mask=None, transformer_options=None, **kwargs):
        q = self.to_q(x)
        k = self.to_k(context)
        v = self.to_v(value if value is not None else context)
        return self.to_out(attention(q, k, v, self.heads))


def attention(q, k, v, heads):
    b, n, inner = q.shape
    split = lambda t: t.reshape(b, -1, heads, inner // heads).transpose(1, 2)
    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(b, n, inner)


class TransformerBlock(nn.Module):
    """The attn2 part of BasicTransformerBlock: A1111 style, or Forge's _forward with patches."""

    def __init__(self, context_dim: int, inner: int, heads: int):
        super().__init__()
        self.norm2 = nn.LayerNorm(QUERY_DIM)
        self.attn2 = CrossAttention(QUERY_DIM, context_dim, inner, heads)

    def forward(self, x, context, transformer_options=None):
        if transformer_options is None:  # A1111: self.attn2(self.norm2(x), context=context)
            return x + self.attn2(self.norm2(x), context=context)
        extra_options = {k: v for k, v in transformer_options.items() if k not in ("patches", "patches_replace")}
        patches = transformer_options.get("patches", {})
        replace = transformer_options.get("patches_replace", {}).get("attn2", {})
        block = transformer_options.get("block")
        index = transformer_options.get("block_index", 0)
        n = self.norm2(x)
        context_attn2, value_attn2 = context, None
        if "attn2_patch" in patches:
            value_attn2 = context_attn2
            for p in patches["attn2_patch"]:
                n, context_attn2, value_attn2 = p(n, context_attn2, value_attn2, extra_options)
        key = (block[0], block[1], index) if block is not None else None
        if key not in replace:
            key = block
        if key in replace:
            if value_attn2 is None:
                value_attn2 = context_attn2
            q = self.attn2.to_q(n)
            k = self.attn2.to_k(context_attn2)
            v = self.attn2.to_v(value_attn2)
            n = self.attn2.to_out(replace[key](q, k, v, extra_options))
        else:
            n = self.attn2(n, context=context_attn2, value=value_attn2, transformer_options=extra_options)
        for p in patches.get("attn2_output_patch", []):
            n = p(n, extra_options)
        return x + n


class SpatialTransformer(nn.Module):
    def __init__(self, depth: int, context_dim: int, inner: int, heads: int):
        super().__init__()
        self.transformer_blocks = nn.ModuleList(TransformerBlock(context_dim, inner, heads) for _ in range(depth))


def _blocks(entries: Dict[int, SpatialTransformer]) -> nn.ModuleList:
    size = max(entries) + 1 if entries else 0
    return nn.ModuleList(
        nn.ModuleList([nn.Identity(), entries[i]]) if i in entries else nn.ModuleList([nn.Identity()])
        for i in range(size)
    )


class DiffusionModel(nn.Module):
    """input_blocks / middle_block / output_blocks with the WebUI's attn2 names for a layout."""

    def __init__(self, layout: Sequence[LayerInfo]):
        super().__init__()
        groups: Dict[tuple, List[LayerInfo]] = {}
        for info in layout:
            parts = info.name.split(".")
            key = ("middle", 0) if parts[0] == "middle_block" else (parts[0].split("_")[0], int(parts[1]))
            groups.setdefault(key, []).append(info)

        def transformer(infos):
            return SpatialTransformer(len(infos), infos[0].context_dim, infos[0].inner_dim, infos[0].heads)

        self.input_blocks = _blocks({i: transformer(v) for (g, i), v in groups.items() if g == "input"})
        self.middle_block = nn.ModuleList([nn.Identity(), transformer(groups[("middle", 0)])])
        self.output_blocks = _blocks({i: transformer(v) for (g, i), v in groups.items() if g == "output"})
        self.calls = 0

    def forward(self, x, timesteps=None, context=None, y=None, transformer_options=None, **kwargs):
        self.calls += 1
        to = dict(transformer_options) if transformer_options is not None else None

        def run(blocks, name):
            nonlocal x
            for i, block in enumerate(blocks):
                if len(block) < 2:
                    continue
                for j, tb in enumerate(block[1].transformer_blocks):
                    if to is not None:
                        to["block"] = (name, 0 if name == "middle" else i)
                        to["block_index"] = j
                    x = tb(x, context, to)

        run(self.input_blocks, "input")
        run([self.middle_block], "middle")
        run(self.output_blocks, "output")
        return x


TINY_CONTEXT, TINY_INNER, TINY_HEADS = 8, 16, 2


def tiny_layout(family: str = "sd15") -> List[LayerInfo]:
    """The real layer names of ``family`` with tiny widths (a real-width forward costs seconds here)."""
    return [LayerInfo(l.name, TINY_CONTEXT, TINY_INNER, TINY_HEADS) for l in LAYOUTS[family]]


def make_unet(layout: Sequence[LayerInfo], seed: int = 0, device=None) -> DiffusionModel:
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        return DiffusionModel(layout).eval().requires_grad_(False)


def make_adapter(layout: Sequence[LayerInfo], family: str = "sd15", seed: int = 1, dimensions=DEFAULT_DIMENSIONS) -> VMixAdapter:
    """An adapter for ``layout`` with random weights and a non-zero projection (so λ has an effect)."""
    torch.manual_seed(seed)
    d = layout[0].context_dim
    adapter = VMixAdapter(dimensions, d, {l.name: l.inner_dim for l in layout}, family)
    with torch.no_grad():
        adapter.aes_emb.normal_()
        adapter.projection.out.weight.normal_(std=0.05)
        adapter.projection.out.bias.normal_(std=0.05)
        for name in adapter.layer_names:
            adapter.value(name).weight.normal_(std=d ** -0.5)
    return adapter.eval().requires_grad_(False)


def value_hook_count(unet: nn.Module) -> int:
    """How many VMix to_v hooks sit on ``unet``'s modules."""
    return sum(1 for m in unet.modules() for fn in m._forward_hooks.values() if getattr(fn, "_vmix_value_hook", False))


def placeholder_library(folder, adapter: VMixAdapter) -> AdapterLibrary:
    """A library listing one adapter, "tiny", whose loader returns ``adapter`` (no file is read)."""
    (folder / "tiny.safetensors").write_bytes(b"placeholder: the loader returns the tiny adapter")
    return AdapterLibrary(lambda: str(folder), loader=lambda path, device: adapter)


# ---------------------------------------------------------------- the WebUI around the model


class A1111Model:
    """p.sd_model in A1111: the UNet at .model.diffusion_model."""

    def __init__(self, unet):
        self.model = SimpleNamespace(diffusion_model=unet)


class Predictor:
    """Forge's k-diffusion predictor: percent_to_sigma like Prediction (0 -> huge, 1 -> 0)."""

    def __init__(self, sigma_min=0.03, sigma_max=14.6):
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def percent_to_sigma(self, percent):
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        lo, hi = math.log(self.sigma_min), math.log(self.sigma_max)
        return math.exp((hi - lo) * (1.0 - percent) + lo)


class ModelPatcher:
    """Forge's UnetPatcher surface used by VMix and by a built-in IP-Adapter."""

    def __init__(self, model):
        self.model = model
        self.model_options = {"transformer_options": {}}

    def clone(self):
        n = ModelPatcher(self.model)  # the modules are shared by every clone
        n.model_options = copy.deepcopy(self.model_options)
        return n

    def set_model_patch(self, patch, name):
        to = self.model_options["transformer_options"]
        to.setdefault("patches", {})
        to["patches"][name] = to["patches"].get(name, []) + [patch]

    def set_model_attn2_patch(self, patch):
        self.set_model_patch(patch, "attn2_patch")

    def set_model_attn2_replace(self, patch, block_name, number, transformer_index=None):
        to = dict(self.model_options["transformer_options"])
        to["patches_replace"] = dict(to.get("patches_replace", {}))
        to["patches_replace"]["attn2"] = dict(to["patches_replace"].get("attn2", {}))
        key = (block_name, number) if transformer_index is None else (block_name, number, transformer_index)
        to["patches_replace"]["attn2"][key] = patch
        self.model_options["transformer_options"] = to


class ForgeModel:
    """p.sd_model in Forge: forge_objects.unet is a patcher around a KModel with .diffusion_model."""

    def __init__(self, unet, predictor=None):
        kmodel = SimpleNamespace(diffusion_model=unet, predictor=predictor or Predictor())
        self.forge_objects = SimpleNamespace(unet=ModelPatcher(kmodel))


class P:
    """A StableDiffusionProcessing stand-in: what the glue reads from p (A1111 1.10.1
    modules/processing.py: is_api :226, set True only by modules/api/api.py:469/540; comments :232
    and comment() :296-297; n_iter, do_not_save_grid)."""

    is_api = False

    def __init__(self, sd_model, **attrs):
        self.sd_model = sd_model
        self.extra_generation_params = {}
        self.comments = {}
        self.n_iter = 1
        self.do_not_save_grid = False
        self.__dict__.update(attrs)

    def comment(self, text):
        self.comments[text] = 1


class TestHost(WebUIHost):
    """The real host's model lookups (attribute paths for A1111 and Forge) with the WebUI state
    (job, loaded model, console) replaced."""

    __test__ = False

    def __init__(self, model=None):
        self.state = SimpleNamespace(job="txt2img", job_timestamp="20250101000000", interrupted=False,
                                     stopping_generation=False)  # shared.state
        self.model = model  # what sd_models.model_data.sd_model would be
        self.warnings: List[str] = []

    def job_key(self):
        return job_key_of(self.state)

    def end_job(self):
        """state.end(): the job is over."""
        self.state.job = ""

    def begin_job(self, timestamp):
        """state.begin(): a new job."""
        self.state.job, self.state.job_timestamp = "txt2img", timestamp

    def current_unet(self):
        from vmix_lib.webui.host import _diffusion_model

        return _diffusion_model(self.model)

    def current_patcher(self):
        forge_objects = getattr(self.model, "forge_objects", None)
        return getattr(forge_objects, "unet", None) if forge_objects is not None else None

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def stop_before_sampling(self, p, sentence: str) -> bool:
        from vmix_lib.webui.runner import stop_before_sampling

        return stop_before_sampling(p, self.state, sentence)


# ---------------------------------------------------------------- sampling stand-ins


def cfg_params(x_rows, cond, uncond, step=0, total=10):
    """CFGDenoiserParams as A1111 1.10 passes them (x holds all rows of the denoiser call)."""
    return SimpleNamespace(x=torch.zeros(x_rows, 1), image_cond=None, sigma=None, sampling_step=step,
                           total_sampling_steps=total, text_cond=cond, text_uncond=uncond,
                           denoiser=SimpleNamespace(step=step, total_steps=total))


def a1111_denoise(unet, x, cond, uncond, layout="batched", callback=None, step=0, total=10, batch=None):
    """One A1111 denoiser call: the cfg_denoiser callback, then the UNet call(s) in ``layout``.

    x: [rows, N, QUERY_DIM] with rows = cond rows + uncond rows; returns the UNet output rows.
    layouts: "batched" (one call), "separate" (batch_cond_uncond off: chunks of ``batch`` rows),
    "uneven" (different token lengths: the cond rows in one call, then the uncond rows).
    """
    n_cond = cond.shape[0]
    if callback is not None:
        callback(cfg_params(x.shape[0], cond, uncond, step, total))
    if layout == "batched":
        return unet(x, context=torch.cat([cond, uncond]))
    if layout == "separate":
        context = torch.cat([cond, uncond])
        b = batch or uncond.shape[0]
        return torch.cat([unet(x[a:a + b], context=context[a:a + b]) for a in range(0, x.shape[0], b)])
    if layout == "uneven":
        return torch.cat([unet(x[:n_cond], context=cond), unet(x[n_cond:], context=uncond)])
    raise ValueError(layout)


def forge_unet_call(patcher, x, contexts, cond_or_uncond, sigma):
    """One Forge UNet call: chunks of rows (cond_or_uncond entries), transformer_options copied."""
    to = patcher.model_options.get("transformer_options", {}).copy()
    to["cond_or_uncond"] = list(cond_or_uncond)
    to["sigmas"] = torch.full((x.shape[0] // len(cond_or_uncond),), float(sigma))
    return patcher.model.diffusion_model(x, torch.zeros(x.shape[0]), context=torch.cat(contexts), transformer_options=to)


# ---------------------------------------------------------------- a job, from the UI and from the API


def process_images(p, runner, state, sample):
    """process_images_inner around the scripts (A1111 1.10.1 modules/processing.py; Forge the same
    at :906-931): scripts' process (:914-915), then per batch the interrupt check (:938-939) before
    process_batch / process_before_every_sampling and sampling (``sample()``: the UNet calls), the
    grid only when allowed (:1124), Processed's comments (:525) and the scripts' postprocess
    (:1147-1148).  An exception raised while sampling leaves here without postprocess."""
    runner.process(p, p.script_args)
    images = []
    for _ in range(p.n_iter):
        if state.interrupted or state.stopping_generation:
            break
        runner.before_sampling(p)
        images.append(sample())
    grid = not p.do_not_save_grid
    comments = "".join(f"{comment}\n" for comment in p.comments)
    runner.postprocess(p)
    return SimpleNamespace(images=images, comments=comments, grid=grid)


def plaintext_to_html(text, classname=None):
    """A1111 1.10.1 modules/ui_common.py:32-35 (Forge the same)."""
    import html

    content = "<br>\n".join(html.escape(x) for x in text.split("\n"))
    return f"<p class='{classname}'>{content}</p>" if classname else f"<p>{content}</p>"


def ui_job(webui, state, job):
    """A Generate click: modules/txt2img.py txt2img (:102-120) inside the UI's job wrappers.

    Returns (the page's outputs, what the wrappers printed to the console).
    A1111 1.10.1 modules/call_queue.py: wrap_gradio_call resets the state flags in a finally
    (:52-59); wrap_gradio_call_no_job catches any Exception and errors.report(..., exc_info=True)
    prints "*** Error completing request", "*** Arguments: ..." and the indented traceback
    (:73-89, modules/errors.py:38-49).  Forge: txt2img runs the job on its main thread, whose
    Task.work catches any Exception and prints traceback.print_exc() and the exception
    (modules_forge/main_thread.py:27-37); the wrapper then shows last_exception without printing
    (modules/call_queue.py:75-82)."""
    import html
    import traceback

    console = []
    try:
        try:
            processed = job()
            outputs = [processed.images, plaintext_to_html(processed.comments, classname="comments")]
        finally:
            state.interrupted = state.stopping_generation = False
            state.job = ""
    except Exception as e:
        if webui == "a1111":
            console += ["*** Error completing request", "*** Arguments: ..."]
            console += traceback.format_exc().splitlines() + ["---"]
        else:
            console += traceback.format_exc().splitlines() + [str(e)]
        outputs = [None, f"<div class='error'>{html.escape(f'{type(e).__name__}: {e}')}</div>"]
    return outputs, console


# ---------------------------------------------------------------- the stand-ins themselves


@pytest.fixture(scope="module")
def unet():
    return make_unet(tiny_layout())


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_tree_has_the_webui_attn2_names(family):
    real = make_unet(LAYOUTS[family], device="meta")  # real widths; meta: no memory, no forward
    layers = find_cross_attention_layers(real)
    assert [(l.name, l.context_dim, l.inner_dim) for l in layers] == [(l.name, l.context_dim, l.inner_dim) for l in LAYOUTS[family]]


def test_forge_block_path_equals_a1111_path_without_patches(unet):
    torch.manual_seed(0)
    x, ctx = torch.randn(2, 4, QUERY_DIM), torch.randn(2, 77, TINY_CONTEXT)
    assert torch.equal(unet(x, context=ctx), unet(x, context=ctx, transformer_options={}))


def test_forge_clone_deep_copies_options_but_shares_modules_and_functions(unet):
    def plain(n, c, v, o):
        return n, c, v

    class CallableObject:
        def __call__(self, n, c, v, o):
            return n, c, v

    patcher = ModelPatcher(SimpleNamespace(diffusion_model=unet))
    patcher.set_model_attn2_patch(plain)
    patcher.set_model_attn2_patch(CallableObject())
    clone = patcher.clone()
    fns = clone.model_options["transformer_options"]["patches"]["attn2_patch"]
    assert fns[0] is plain  # deepcopy returns functions as they are
    assert fns[1] is not patcher.model_options["transformer_options"]["patches"]["attn2_patch"][1]
    assert clone.model.diffusion_model is unet


def test_forge_replace_patch_receives_projected_qkv(unet):
    seen = {}

    def replace(q, k, v, extra_options):
        seen["shapes"] = (q.shape, k.shape, v.shape)
        return attention(q, k, v, TINY_HEADS)

    patcher = ModelPatcher(SimpleNamespace(diffusion_model=unet))
    patcher.set_model_attn2_replace(replace, "input", 1)
    torch.manual_seed(0)
    x, ctx = torch.randn(2, 4, QUERY_DIM), torch.randn(2, 77, TINY_CONTEXT)
    out = forge_unet_call(patcher, x, [ctx[:1], ctx[1:]], [0, 1], 1.0)
    assert seen["shapes"] == (torch.Size([2, 4, TINY_INNER]), torch.Size([2, 77, TINY_INNER]), torch.Size([2, 77, TINY_INNER]))
    assert torch.allclose(out, unet(x, context=ctx), atol=1e-6)


def write_adapter(path, layout_family: str = "sd15", seed: int = 1, dtype=torch.float16, dimensions=DEFAULT_DIMENSIONS):
    """A real adapter file (real layer shapes) with random weights; fp16 keeps it at 19 MB for SD1.5."""
    from vmix_lib.adapter_file import save_adapter

    adapter = make_adapter(LAYOUTS[layout_family], layout_family, seed, dimensions)
    save_adapter(adapter, str(path), training={"test": True}, dtype=dtype)
    return adapter


def write_damaged_adapter(source, path, value=float("nan")):
    """A copy of the adapter file ``source`` whose header and metadata are fine but one W_a holds
    ``value`` (NaN): what a bad export or a flipped disk block leaves; only the full load sees it."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source), "pt") as f:
        metadata = f.metadata()
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    key = sorted(k for k in tensors if k.startswith("values."))[0]
    tensors[key][0, 0] = value
    save_file(tensors, str(path), metadata=metadata)
    return key
