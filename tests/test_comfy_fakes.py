"""Stand-ins for the parts of ComfyUI the VMix nodes touch, built on the WebUI stand-ins' real torch
UNet (test_webui_fakes: the real attn2 names, Forge's BasicTransformerBlock attn2 path, which
ComfyUI's is), plus tests that they behave like the originals where the nodes depend on it.

Written from ComfyUI 0.3.64 (a125cd84, 2025-10-12), not copied:
- comfy/patcher_extension.py: wrappers live in {wrapper type: {key: [callables]}}; a wrapper is called
  as wrapper(executor, *args, **kwargs) and calls executor(*args, **kwargs) for the next one, the
  last calling the original; ``executor.class_obj`` is the object whose method is wrapped;
- comfy/model_patcher.py: clone() shares ``model``, deep-copies ``model_options``, copies each
  wrapper list (the same callables) and ``object_patches``; get_model_object() prefers object
  patches; set_model_attn2_replace copies transformer_options/patches_replace before adding;
- comfy/sampler_helpers.py prepare_model_patcher + comfy/samplers.py CFGGuider.sample: a copy of the
  patcher's model_options gets the patcher's wrappers merged into transformer_options["wrappers"];
  OUTER_SAMPLE wrappers run around outer_sample (class_obj: the guider, .model_patcher);
- comfy/samplers.py _calc_cond_batch: each UNet call gets a fresh transformer_options merged from
  model_options' with cond_or_uncond (0 positive, 1 negative, one entry per chunk of rows) and sigmas;
- comfy/model_base.py apply_model -> APPLY_MODEL wrappers -> diffusion_model(x, t, context=, control=,
  transformer_options=); comfy/ldm/.../openaimodel.py UNetModel.forward -> DIFFUSION_MODEL wrappers
  around _forward(x, timesteps, context, y, control, transformer_options);
- comfy_api/torch_helpers/torch_compile.py: TorchCompileModel adds an APPLY_MODEL wrapper keyed
  "torch.compile" and model_options["torch_compile_kwargs"].

Other test modules import this one (pytest puts tests/ on sys.path).
"""
from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import List, Sequence

import torch

from test_webui_fakes import (  # noqa: F401  (single_thread: autouse fixture)
    QUERY_DIM, TINY_CONTEXT, DiffusionModel, Predictor, single_thread, tiny_layout,
)

OUTER_SAMPLE, APPLY_MODEL, DIFFUSION_MODEL = "outer_sample", "apply_model", "diffusion_model"


# ---------------------------------------------------------------- patcher_extension


class Executor:
    """Calls the wrappers in order around ``original``; each gets (executor, *args, **kwargs)."""

    def __init__(self, original, class_obj, wrappers: Sequence, index: int = 0):
        self.original, self.class_obj, self.wrappers, self.index = original, class_obj, list(wrappers), index

    def __call__(self, *args, **kwargs):
        return Executor(self.original, self.class_obj, self.wrappers, self.index + 1).execute(*args, **kwargs)

    def execute(self, *args, **kwargs):
        if self.index == len(self.wrappers):
            return self.original(*args, **kwargs)
        return self.wrappers[self.index](self, *args, **kwargs)


def all_wrappers(kind: str, transformer_options) -> list:
    return [w for ws in (transformer_options or {}).get("wrappers", {}).get(kind, {}).values() for w in ws]


def copy_nested(d: dict) -> dict:
    return {k: copy_nested(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v for k, v in d.items()}


def merge_into(target: dict, source: dict) -> dict:
    for k, v in source.items():
        if isinstance(v, dict):
            merge_into(target.setdefault(k, {}), v)
        elif isinstance(v, list):
            target.setdefault(k, []).extend(v)
        else:
            target[k] = v
    return target


# ---------------------------------------------------------------- models


class UNetModel(DiffusionModel):
    """openaimodel.UNetModel: forward runs the DIFFUSION_MODEL wrappers around _forward."""

    def forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):
        return Executor(self._forward, self, all_wrappers(DIFFUSION_MODEL, transformer_options)).execute(
            x, timesteps, context, y, control, transformer_options, **kwargs)

    def _forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):
        return DiffusionModel.forward(self, x, timesteps, context, y, transformer_options=transformer_options)


class BaseModel(torch.nn.Module):
    """model_base.BaseModel: diffusion_model, model_sampling, apply_model with APPLY_MODEL wrappers."""

    def __init__(self, unet, model_sampling=None):
        super().__init__()
        self.diffusion_model = unet
        self.model_sampling = model_sampling or Predictor()

    def apply_model(self, x, t, c_crossattn=None, control=None, transformer_options={}):
        return Executor(self._apply_model, self, all_wrappers(APPLY_MODEL, transformer_options)).execute(
            x, t, c_crossattn, control, transformer_options)

    def _apply_model(self, x, t, c_crossattn, control, transformer_options):
        return self.diffusion_model(x, t, context=c_crossattn, control=control, transformer_options=transformer_options)


def make_comfy_unet(layout=None, seed: int = 0) -> UNetModel:
    torch.manual_seed(seed)
    return UNetModel(layout or tiny_layout()).eval().requires_grad_(False)


class ModelPatcher:
    def __init__(self, model):
        self.model = model
        self.model_options = {"transformer_options": {}}
        self.wrappers: dict = {}
        self.object_patches: dict = {}

    def clone(self):
        n = ModelPatcher(self.model)  # the modules are shared by every clone
        n.model_options = copy.deepcopy(self.model_options)
        n.object_patches = self.object_patches.copy()
        n.wrappers = {kind: {key: list(ws) for key, ws in by_key.items()} for kind, by_key in self.wrappers.items()}
        return n

    def add_wrapper_with_key(self, kind, key, wrapper):
        self.wrappers.setdefault(kind, {}).setdefault(key, []).append(wrapper)

    def remove_wrappers_with_key(self, kind, key):
        self.wrappers.get(kind, {}).pop(key, None)

    def get_wrappers(self, kind, key):
        return self.wrappers.get(kind, {}).get(key, [])

    def get_model_object(self, name):
        if name in self.object_patches:
            return self.object_patches[name]
        return getattr(self.model, name)

    def add_object_patch(self, name, obj):
        self.object_patches[name] = obj

    def set_model_attn2_patch(self, patch):
        patches = self.model_options["transformer_options"].setdefault("patches", {})
        patches["attn2_patch"] = patches.get("attn2_patch", []) + [patch]

    def set_model_attn2_replace(self, patch, block_name, number, transformer_index=None):
        to = dict(self.model_options["transformer_options"])
        to["patches_replace"] = dict(to.get("patches_replace", {}))
        to["patches_replace"]["attn2"] = dict(to["patches_replace"].get("attn2", {}))
        key = (block_name, number) if transformer_index is None else (block_name, number, transformer_index)
        to["patches_replace"]["attn2"][key] = patch
        self.model_options["transformer_options"] = to


def comfy_model(unet=None, model_sampling=None) -> ModelPatcher:
    return ModelPatcher(BaseModel(unet if unet is not None else make_comfy_unet(), model_sampling))


def torch_compile_node(patcher: ModelPatcher) -> ModelPatcher:
    """TorchCompileModel: a clone with the compile wrapper (here it only swaps in the same module)."""
    m = patcher.clone()

    def apply_torch_compile_wrapper(executor, *args, **kwargs):
        return executor(*args, **kwargs)

    m.add_wrapper_with_key(APPLY_MODEL, "torch.compile", apply_torch_compile_wrapper)
    m.model_options["torch_compile_kwargs"] = {"backend": "inductor"}
    return m


# ---------------------------------------------------------------- sampling


class CFGGuider:
    def __init__(self, patcher: ModelPatcher):
        self.model_patcher = patcher
        self.model_options = patcher.model_options

    def sample(self, x, contexts, cond_or_uncond, sigmas):
        original = self.model_options
        self.model_options = copy_nested(original)
        wrappers = self.model_options["transformer_options"].setdefault("wrappers", {})
        merge_into(wrappers, self.model_patcher.wrappers)
        try:
            return Executor(self.outer_sample, self, all_wrappers(OUTER_SAMPLE, self.model_options["transformer_options"])).execute(
                x, contexts, cond_or_uncond, sigmas)
        finally:
            self.model_options = original

    def outer_sample(self, x, contexts, cond_or_uncond, sigmas):
        return [model_call(self.model_patcher.model, self.model_options, x, contexts, cond_or_uncond, sigma) for sigma in sigmas]


def model_call(base: BaseModel, model_options, x, contexts, cond_or_uncond, sigma):
    """One _calc_cond_batch UNet call: rows in chunks (cond_or_uncond entries), fresh transformer_options."""
    to = merge_into({}, model_options.get("transformer_options", {}))
    to["cond_or_uncond"] = list(cond_or_uncond)
    to["sigmas"] = torch.full((x.shape[0] // len(cond_or_uncond),), float(sigma))
    return base.apply_model(x, torch.zeros(x.shape[0]), c_crossattn=torch.cat(contexts), transformer_options=to)


def sample(patcher: ModelPatcher, x, contexts, cond_or_uncond=(0, 1), sigmas=(1.0,)) -> List[torch.Tensor]:
    """KSampler through CFGGuider: one UNet call per sigma; returns each call's output."""
    return CFGGuider(patcher).sample(x, contexts, list(cond_or_uncond), list(sigmas))


def direct_call(patcher: ModelPatcher, x, contexts, cond_or_uncond=(0, 1), sigma=1.0):
    """A UNet call outside any sampling run (no OUTER_SAMPLE wrapper; a node calling the model itself)."""
    options = copy_nested(patcher.model_options)
    merge_into(options["transformer_options"].setdefault("wrappers", {}), patcher.wrappers)
    return model_call(patcher.model, options, x, contexts, cond_or_uncond, sigma)


def data(seed: int = 0, rows: int = 4):
    torch.manual_seed(seed)
    half = rows // 2
    return torch.randn(rows, 4, QUERY_DIM), torch.randn(half, 77, TINY_CONTEXT), torch.randn(half, 77, TINY_CONTEXT)


# ---------------------------------------------------------------- the stand-ins themselves


def test_wrappers_nest_in_order_and_see_their_object():
    seen = []

    def outer(executor, *args, **kwargs):
        seen.append(("outer", type(executor.class_obj).__name__))
        return executor(*args, **kwargs) + 1

    def inner(executor, *args, **kwargs):
        seen.append(("inner", type(executor.class_obj).__name__))
        return executor(*args, **kwargs) * 10

    assert Executor(lambda v: v, SimpleNamespace(), [outer, inner]).execute(2) == 21
    assert seen == [("outer", "SimpleNamespace"), ("inner", "SimpleNamespace")]


def test_clone_shares_modules_and_wrapper_callables_but_not_lists():
    patcher = comfy_model()

    def wrapper(executor, *args, **kwargs):
        return executor(*args, **kwargs)

    patcher.add_wrapper_with_key(DIFFUSION_MODEL, "k", wrapper)
    clone = patcher.clone()
    assert clone.model is patcher.model
    assert clone.get_wrappers(DIFFUSION_MODEL, "k")[0] is wrapper
    clone.remove_wrappers_with_key(DIFFUSION_MODEL, "k")
    assert patcher.get_wrappers(DIFFUSION_MODEL, "k") == [wrapper]


def test_sampling_reaches_the_diffusion_model_wrappers_with_the_call_facts():
    patcher = comfy_model()
    seen = []

    def wrapper(executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        seen.append((executor.class_obj is patcher.model.diffusion_model, transformer_options["cond_or_uncond"],
                     float(transformer_options["sigmas"][0])))
        return executor(x, timesteps, context, y, control, transformer_options, **kwargs)

    patcher.add_wrapper_with_key(DIFFUSION_MODEL, "k", wrapper)
    x, c, u = data()
    plain = sample(comfy_model(patcher.model.diffusion_model), x, [c, u])
    assert torch.equal(sample(patcher, x, [c, u], (1, 0), sigmas=(3.0,))[0], comfy_model(
        patcher.model.diffusion_model).model.apply_model(x, None, torch.cat([c, u]), transformer_options={}))
    assert seen == [(True, [1, 0], 3.0)]
    assert torch.equal(plain[0], patcher.model.diffusion_model(x, context=torch.cat([c, u])))
    assert "wrappers" not in patcher.model_options["transformer_options"]  # merged into a copy only
