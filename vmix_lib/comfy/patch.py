"""VMix on a ComfyUI model, the ComfyUI way: on a ``ModelPatcher.clone()``, through its wrappers.

Every clone of a ComfyUI model shares the diffusion model's modules, so the to_v hooks (vmix_lib.hook)
are seen by every clone while they are installed.  What makes a clone's VMix its own is *when* the
hooks exist and *when* they are armed, and both come from the clone's own wrappers (keyed "vmix",
comfy/patcher_extension.py ``WrappersMP``; ModelPatcher.clone() copies them, the guider merges them
into the sampling run's transformer_options):

  outer_sample     around one sampling run of a model that carries the patch (CFGGuider.outer_sample):
                   refuses torch.compile, reads the sigma window from the sampled model's
                   ``model_sampling.percent_to_sigma``, installs the mixer's hooks on the diffusion
                   model and removes them when the run ends, however it ends.
  diffusion_model  around each call of the diffusion model (UNetModel.forward): reads the call's
                   ``transformer_options`` (``cond_or_uncond``, ``sigmas``), sets the row strengths and
                   the step gate, arms this patch's mixer for the call and disarms it afterwards.

So the hooks exist only while a model with the patch samples, and add λ·V_a only inside its own
diffusion-model calls: a clone without the patch (the graph's other branch, the model before Apply
VMix) runs the same modules bit for bit unchanged, and two Apply VMix nodes on two branches stay
independent.  The hook's rule (several mixers may be installed on one UNet, one armed at a time)
holds because each call arms its own mixer.  Models derived from a patched one (a LoRA loader after
Apply VMix) copy the wrappers and keep VMix, as they keep any patch.  Nothing is global and nothing
is written to the shared model; a diffusion-model call outside a sampling run (a node that calls the
model itself) installs the hooks for that call only.

Pure: this module imports nothing of ComfyUI; it calls the patcher's methods by name.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch.nn as nn

from ..hook import AdapterMismatch, AestheticValues, ValueMixer, check_fit
from ..layers import FAMILY_TITLES, find_cross_attention_layers
from ..mixing import VMixAdapter
from ..webui.blocks import parse_block_weights
from ..webui.compat import is_compiled

log = logging.getLogger("vmix")

KEY = "vmix"  # the key of our wrappers on a ModelPatcher
# comfy/patcher_extension.py WrappersMP (strings, so this module needs no ComfyUI import)
OUTER_SAMPLE = "outer_sample"
DIFFUSION_MODEL = "diffusion_model"
APPLY_MODEL = "apply_model"
# comfy_api/torch_helpers/torch_compile.py: the TorchCompileModel node's wrapper key and model option
COMPILE_WRAPPER_KEY = "torch.compile"
COMPILE_OPTIONS_KEY = "torch_compile_kwargs"
UNCOND = 1  # comfy/samplers.py: cond_or_uncond holds 0 for the positive and 1 for the negative prompt

STRENGTH_RANGE = (0.0, 3.0)
MAX_DIMENSION_SLOTS = 8

COMPILED_REASON = (
    "VMix cannot run on a model compiled with torch.compile (TorchCompileModel or a similar node), because a "
    "compiled UNet ignores the hooks VMix adds; take the compile node out of this model's path."
)
NEEDS_WRAPPERS = (
    "VMix needs ComfyUI 0.3.10 or newer (a MODEL whose patcher has add_wrapper_with_key); update ComfyUI."
)


@dataclass(frozen=True)
class ApplySettings:
    """The Apply VMix node's inputs (the same meaning as the WebUI panel's)."""

    strength: float = 1.0
    alphas: Tuple[float, ...] = ()  # α of the adapter's dimensions in its order; missing = 1
    start: float = 0.0  # fractions of the sampling schedule, as sigmas via percent_to_sigma
    end: float = 1.0
    uncond: bool = True  # also on the negative prompt's rows
    block_weights: str = ""  # vmix_lib.webui.blocks syntax

    def check(self) -> "ApplySettings":
        low, high = STRENGTH_RANGE
        if not low <= self.strength <= high:
            raise ValueError(f"VMix strength must be from {low:g} to {high:g}, got {self.strength:g}.")
        for i, alpha in enumerate(self.alphas):
            if not 0.0 <= alpha <= 1.0:
                raise ValueError(f"VMix alpha_{i + 1} must be from 0 to 1, got {alpha:g}.")
        if not (0.0 <= self.start <= 1.0 and 0.0 <= self.end <= 1.0):
            raise ValueError(f"VMix start and end must be from 0 to 1, got {self.start:g} and {self.end:g}.")
        if not self.start < self.end:
            raise ValueError(f"VMix start ({self.start:g}) must be below end ({self.end:g}); both are fractions of "
                             "the sampling schedule from 0 to 1.")
        return self


class LoadedAdapter:
    """What Load VMix Adapter outputs (ComfyUI type VMIX_ADAPTER): the adapter on the CPU and its file
    name, plus the V_a of the α it was last applied with, so Apply VMix nodes that differ only in λ,
    range or block weights share one W_a·f_a computation."""

    def __init__(self, adapter: VMixAdapter, name: str, path: Optional[str] = None):
        self.adapter = adapter
        self.name = name
        self.path = path
        self._values: Optional[AestheticValues] = None

    @property
    def family_title(self) -> str:
        return FAMILY_TITLES.get(self.adapter.family, self.adapter.family)

    def alphas(self, slots: Sequence[float]) -> Dict[str, float]:
        """α by dimension name from positional slots (adapter order; slots past its dimensions are unused)."""
        return {name: float(alpha) for name, alpha in zip(self.adapter.dimension_names, slots)}

    def values_for(self, alphas: Mapping[str, float]) -> AestheticValues:
        if self._values is None or not self._values.matches(self.adapter, alphas):
            self._values = AestheticValues.for_alphas(self.adapter, alphas)
        return self._values

    def describe(self) -> str:
        dims = ", ".join(f"{i + 1} {name}" for i, name in enumerate(self.adapter.dimension_names))
        return f"VMix adapter {self.name} ({self.family_title}, {len(self.adapter.layer_names)} layers; dimensions: {dims})"

    def __repr__(self) -> str:
        return f"<{self.describe()}>"


# ---------------------------------------------------------------- the model behind a patcher


def model_object(patcher, name: str):
    """``patcher.get_model_object(name)`` (object patches included), else ``patcher.model.<name>``."""
    get = getattr(patcher, "get_model_object", None)
    if get is not None:
        try:
            return get(name)
        except Exception:  # an object that is not there: fall back to the plain attribute
            pass
    return getattr(getattr(patcher, "model", None), name, None)


def sigma_window(patcher, start: float, end: float) -> Optional[Tuple[float, float]]:
    """(sigma at start, sigma at end) from the model's ``model_sampling.percent_to_sigma`` (0 gives a
    huge sigma, 1 gives 0), the way IPAdapter and ControlNet read their ranges; None without one."""
    percent_to_sigma = getattr(model_object(patcher, "model_sampling"), "percent_to_sigma", None)
    if percent_to_sigma is None:
        return None
    return float(percent_to_sigma(start)), float(percent_to_sigma(end))


def compiled(patcher, unet: Optional[nn.Module] = None) -> bool:
    """Whether the model samples under torch.compile: the TorchCompileModel node's wrapper or model
    option (comfy_api set_torch_compile_wrapper), or a compiled module patched in as diffusion_model."""
    options = getattr(patcher, "model_options", None)
    if isinstance(options, dict) and options.get(COMPILE_OPTIONS_KEY) is not None:
        return True
    get_wrappers = getattr(patcher, "get_wrappers", None)
    if get_wrappers is not None and get_wrappers(APPLY_MODEL, COMPILE_WRAPPER_KEY):
        return True
    return is_compiled(unet)


def cond_row_factors(cond_or_uncond, rows: Optional[int]) -> Optional[Tuple[float, ...]]:
    """Row strengths that leave the negative prompt's rows alone: 0 for rows of uncond chunks, 1 for
    the others; None when every row is a cond row or the layout is not the one ComfyUI builds."""
    if not cond_or_uncond or rows is None or rows % len(cond_or_uncond):
        return None
    per_chunk = rows // len(cond_or_uncond)
    factors = tuple(0.0 if kind == UNCOND else 1.0 for kind in cond_or_uncond for _ in range(per_chunk))
    return None if all(f == 1.0 for f in factors) else factors


def _first_float(value) -> Optional[float]:
    try:
        return float(value.reshape(-1)[0]) if hasattr(value, "reshape") else float(value)
    except (TypeError, ValueError, IndexError, RuntimeError):
        return None


# ---------------------------------------------------------------- the patch on a clone


class VMixPatch:
    """One Apply VMix node's work on one clone: the mixer, its settings and the two wrappers.

    Shared, never copied: ModelPatcher.clone() copies wrapper lists (the same bound methods), and
    ``__deepcopy__`` returns the patch itself should anything deep-copy them.
    """

    def __init__(self, loaded: LoadedAdapter, mixer: ValueMixer, settings: ApplySettings,
                 window: Optional[Tuple[float, float]] = None):
        self.loaded = loaded
        self.mixer = mixer
        self.settings = settings
        self.window = window  # (sigma at start, sigma at end); refreshed by each sampling run

    def __deepcopy__(self, memo):
        return self

    def __copy__(self):
        return self

    def __repr__(self) -> str:
        s = self.settings
        return f"<VMixPatch {self.loaded.name} strength={s.strength:g} range={s.start:g}-{s.end:g} uncond={s.uncond}>"

    # -- on a patcher -----------------------------------------------------------------------
    def attach(self, patcher) -> None:
        patcher.add_wrapper_with_key(OUTER_SAMPLE, KEY, self.outer_sample)
        patcher.add_wrapper_with_key(DIFFUSION_MODEL, KEY, self.diffusion_model)

    @staticmethod
    def detach(patcher) -> None:
        patcher.remove_wrappers_with_key(OUTER_SAMPLE, KEY)
        patcher.remove_wrappers_with_key(DIFFUSION_MODEL, KEY)

    @staticmethod
    def of(patcher) -> Optional["VMixPatch"]:
        """The VMix patch a model carries (None when it has none)."""
        get_wrappers = getattr(patcher, "get_wrappers", None)
        for wrapper in (get_wrappers(DIFFUSION_MODEL, KEY) if get_wrappers is not None else []):
            owner = getattr(wrapper, "__self__", None)
            if isinstance(owner, VMixPatch):
                return owner
        return None

    # -- the wrappers -----------------------------------------------------------------------
    def _install(self, unet: nn.Module) -> None:
        try:
            self.mixer.install(unet)
        except AdapterMismatch as e:
            raise ValueError(f"VMix adapter {self.loaded.name!r}: {e}.") from None

    def outer_sample(self, executor, *args, **kwargs):
        """WrappersMP.OUTER_SAMPLE around CFGGuider.outer_sample (executor.class_obj is the guider)."""
        patcher = getattr(executor.class_obj, "model_patcher", None)
        unet = model_object(patcher, "diffusion_model")
        if compiled(patcher, unet):
            raise RuntimeError(COMPILED_REASON)
        window = sigma_window(patcher, self.settings.start, self.settings.end)
        if window is not None:
            self.window = window
        installed_here = False
        if isinstance(unet, nn.Module) and not self.mixer.is_installed_on(unet):
            self._install(unet)
            installed_here = True
        try:
            return executor(*args, **kwargs)
        finally:
            self.mixer.disarm()
            if installed_here:
                self.mixer.remove()

    def diffusion_model(self, executor, *args, **kwargs):
        """WrappersMP.DIFFUSION_MODEL around UNetModel.forward (executor.class_obj is the UNet);
        args are (x, timesteps, context, y, control, transformer_options)."""
        unet = executor.class_obj
        mixer = self.mixer
        temporary = False
        if not mixer.is_installed_on(unet):
            self._install(unet)  # a call outside a sampling run: hooks for this call only
            temporary = True
        try:
            options = kwargs.get("transformer_options", args[5] if len(args) > 5 else None)
            x = args[0] if args else kwargs.get("x")
            self._per_call(options, getattr(x, "shape", (None,))[0])
            mixer.arm()
            return executor(*args, **kwargs)
        finally:
            mixer.disarm()
            if temporary:
                mixer.remove()

    def _per_call(self, options, rows: Optional[int]) -> None:
        mixer = self.mixer
        mixer.gate = True
        mixer.row_strengths = None
        if not isinstance(options, Mapping):
            return
        sigma = _first_float(options.get("sigmas")) if options.get("sigmas") is not None else None
        if self.window is not None and sigma is not None:
            high, low = self.window
            mixer.gate = low <= sigma <= high
        if not self.settings.uncond:
            mixer.row_strengths = cond_row_factors(options.get("cond_or_uncond"), rows)


# ---------------------------------------------------------------- Apply VMix


def _has_wrappers(model) -> bool:
    return all(callable(getattr(model, name, None))
               for name in ("clone", "add_wrapper_with_key", "remove_wrappers_with_key", "get_wrappers"))


def apply_vmix(model, loaded: LoadedAdapter, settings: ApplySettings, warn=log.warning):
    """A clone of ``model`` (a ComfyUI ModelPatcher) that samples with VMix, or ``model`` itself when
    VMix would change nothing (λ = 0, every block weight 0) and it carries no earlier VMix.

    The adapter is checked against the model first (same check as the WebUIs); every problem raises
    ValueError with one sentence, which ComfyUI shows as the node's error.  An Apply VMix after
    another on the same model replaces it (one adapter per model; ``warn`` says so).
    """
    settings = settings.check()
    adapter = loaded.adapter
    if not _has_wrappers(model):
        raise ValueError(NEEDS_WRAPPERS)
    unet = model_object(model, "diffusion_model")
    if compiled(model, unet):
        raise ValueError(COMPILED_REASON)
    layers = find_cross_attention_layers(unet) if isinstance(unet, nn.Module) else []
    report = check_fit(adapter, layers)
    if not report.ok:
        raise ValueError(f"VMix adapter {loaded.name!r}: {report.reason(adapter)}.")
    try:
        layer_strengths = parse_block_weights(settings.block_weights, adapter.layer_names, loaded.family_title)
    except ValueError as e:
        raise ValueError(str(e)) from None
    alphas = loaded.alphas(settings.alphas)

    earlier = VMixPatch.of(model)
    no_effect = settings.strength == 0.0 or (
        len(layer_strengths) == len(adapter.layer_names) and all(v == 0.0 for v in layer_strengths.values()))
    if no_effect and earlier is None:
        return model  # λ = 0: the graph's model itself, so the output is the same bit for bit
    patched = model.clone()
    if earlier is not None:
        VMixPatch.detach(patched)
        warn(f"VMix: this Apply VMix ({loaded.name}) replaces the VMix applied earlier on the same model "
             f"({earlier.loaded.name}); a model takes one VMix adapter at a time.")
    if no_effect:
        return patched
    mixer = ValueMixer(adapter, settings.strength, layer_strengths=layer_strengths,
                       values=loaded.values_for(alphas), strict=True)
    VMixPatch(loaded, mixer, settings, sigma_window(model, settings.start, settings.end)).attach(patched)
    return patched
