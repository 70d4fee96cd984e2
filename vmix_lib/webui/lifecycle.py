"""When the VMix hooks exist, and the per-call facts they need, in AUTOMATIC1111 and Forge.

One ``LifecycleController`` per WebUI process.  A generation (one ``process_images``) runs:

    begin(p)              remove every VMix hook and patch left anywhere (a job that raised skips
                          ``postprocess``), start a new generation token
    activate / fail       the runner's decision: a ValueMixer to apply, or a message to stop with
    ensure_installed(p)   from process_batch, before_hr and process_before_every_sampling: hook the
                          UNet that is about to sample (idempotent; follows a model swap)
    on_cfg_denoiser(..)   once per denoiser call: step range gate and row layout (A1111), model
                          swap by the refiner (both)
    end(p)                postprocess: remove everything of this generation

The ValueMixer's guard makes every hook inert unless its generation is the current one and the
WebUI job that started it is still running, so a hook left behind by a crash changes nothing.

Per-call facts:
  A1111  rows are [cond ..., uncond ...] across one UNet call or several consecutive ones
         (batch_cond_uncond off, different token lengths, skip_early_cond); a forward pre-hook on the
         diffusion model counts rows from the start of each denoiser call.  The step range uses the
         denoiser's own call counter (denoiser.step / denoiser.total_steps, as the refiner does).
  Forge  ``transformer_options`` carries ``cond_or_uncond`` (0 = cond, 1 = uncond, one entry per
         chunk of rows, in any order) and ``sigmas``; a list ``attn2_patch`` that is a plain
         module-level function (clones deep-copy callable objects and bound methods, not functions)
         records them right before each attn2 calls to_v.  The range is a sigma window from the
         model's ``percent_to_sigma``, as Forge's ControlNet and IP-Adapter use.
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, List, Mapping, MutableMapping, Optional, Protocol, Tuple

import torch
import torch.nn as nn

from ..hook import AdapterMismatch, ValueMixer, count_vmix_hooks, remove_all, remove_vmix_hooks
from . import compat, infotext

log = logging.getLogger("vmix")

PRE_HOOK_MARK = "_vmix_unet_pre_hook"
_EPS = 1e-9


class VMixError(RuntimeError):
    """Raised at the first UNet call to stop a generation with a clear message.

    The WebUI's HTTP API answers an exception with ``vars(e).get("status_code", 500)`` and
    ``vars(e).get("detail")`` (A1111 and Forge modules/api/api.py handle_exception), so a stopped
    API request gets 422 Unprocessable Entity with the sentence as its detail.  The running WebUI
    raises a subclass that is also fastapi's HTTPException (Host.stop_error), which handle_exception
    answers without printing a traceback into the console.
    """

    def __init__(self, message: str):
        super().__init__(message)
        self.status_code = 422
        self.detail = message

    def __str__(self) -> str:
        return self.detail


class Host(Protocol):
    """What the controller needs from the WebUI (vmix_lib.webui.host implements it)."""

    def job_key(self) -> Any: ...  # changes when a WebUI job ends or another begins
    def unet_of(self, p) -> Optional[nn.Module]: ...  # the diffusion model p samples with
    def patcher_of(self, p) -> Optional[Any]: ...  # Forge: p.sd_model.forge_objects.unet; A1111: None
    def set_patcher(self, p, patcher) -> None: ...
    def current_unet(self) -> Optional[nn.Module]: ...  # the model sampling now (after a refiner switch)
    def current_patcher(self) -> Optional[Any]: ...
    def warn(self, message: str) -> None: ...
    # optional: def stop_error(self, message: str) -> VMixError  (the exception that stops a job)
    # optional: def stop_before_sampling(self, p, sentence: str) -> bool  (runner: a UI job stops before sampling)
    # optional: def model_title(self, p) -> Optional[str]  (Forge/Neo: "Flux", "Qwen-Image", ... for non-UNets)


# ---------------------------------------------------------------- Forge patch (plain function)

_ACTIVE: List[Optional["weakref.ref[LifecycleController]"]] = [None]


def vmix_attn2_patch(n, context, value, extra_options):
    """Forge ``attn2_patch``: records cond_or_uncond and sigmas for the to_v hook; changes nothing."""
    ref = _ACTIVE[0]
    controller = ref() if ref is not None else None
    if controller is not None:
        controller._forge_call(context, extra_options)
    return n, context, value


def _patch_list(patcher) -> Optional[list]:
    options = getattr(patcher, "model_options", None)
    if not isinstance(options, dict):
        return None
    return options.get("transformer_options", {}).get("patches", {}).get("attn2_patch")


def has_forge_patch(patcher) -> bool:
    patches = _patch_list(patcher)
    return bool(patches) and any(fn is vmix_attn2_patch for fn in patches)


def strip_forge_patch(patcher) -> None:
    """Remove vmix_attn2_patch from a patcher that was patched in place."""
    options = getattr(patcher, "model_options", None)
    if not isinstance(options, dict):
        return
    patches = options.get("transformer_options", {}).get("patches")
    if not isinstance(patches, dict) or "attn2_patch" not in patches:
        return
    kept = [fn for fn in patches["attn2_patch"] if fn is not vmix_attn2_patch]
    if kept:
        patches["attn2_patch"] = kept
    else:
        del patches["attn2_patch"]


def sigma_window(patcher, start: float, end: float) -> Optional[Tuple[float, float]]:
    """(sigma at start, sigma at end) from the model's percent_to_sigma; None if it has none."""
    model = getattr(patcher, "model", None)
    predictor = getattr(model, "predictor", None) or getattr(model, "model_sampling", None)
    percent_to_sigma = getattr(predictor, "percent_to_sigma", None)
    if percent_to_sigma is None:
        return None
    return float(percent_to_sigma(start)), float(percent_to_sigma(end))


# ---------------------------------------------------------------- UNet pre-hooks


def remove_pre_hooks(module: nn.Module) -> int:
    """Remove VMix forward pre-hooks from ``module`` itself (leftovers included)."""
    hooks = module._forward_pre_hooks
    keys = [k for k, fn in hooks.items() if getattr(fn, PRE_HOOK_MARK, False)]
    for key in keys:
        del hooks[key]
        getattr(module, "_forward_pre_hooks_with_kwargs", {}).pop(key, None)
    return len(keys)


def count_all_hooks(root: nn.Module) -> int:
    """VMix to_v hooks and UNet pre-hooks anywhere under ``root`` (for the "Reload UI" report)."""
    pre = sum(1 for m in root.modules() for fn in m._forward_pre_hooks.values() if getattr(fn, PRE_HOOK_MARK, False))
    return count_vmix_hooks(root) + pre


def in_range(fraction: float, start: float, end: float) -> bool:
    return fraction >= start - _EPS and (end >= 1.0 or fraction < end - _EPS)


def _rows(value) -> Optional[int]:
    shape = getattr(value, "shape", None)
    if shape is None and isinstance(value, Mapping) and "crossattn" in value:
        shape = getattr(value["crossattn"], "shape", None)
    try:
        return int(shape[0]) if shape is not None else None
    except (TypeError, IndexError):
        return None


def step_fraction(params) -> Optional[float]:
    """How far sampling is (0 at the first denoiser call) from CFGDenoiserParams."""
    denoiser = getattr(params, "denoiser", None)
    step, total = getattr(denoiser, "step", None), getattr(denoiser, "total_steps", None)
    if isinstance(step, int) and isinstance(total, (int, float)) and total > 0:
        return step / total
    step, total = getattr(params, "sampling_step", None), getattr(params, "total_sampling_steps", None)
    if isinstance(step, int) and isinstance(total, int) and total > 0:
        return step / total
    return None


# ---------------------------------------------------------------- one generation


@dataclass(eq=False)
class Generation:
    token: int
    p_ref: Any
    job_key: Any
    params: MutableMapping
    mixer: Optional[ValueMixer] = None
    start: float = 0.0
    end: float = 1.0
    uncond: bool = True
    failure: Optional[str] = None
    forge: Optional[bool] = None
    installed_once: bool = False
    sigma_window: Optional[Tuple[float, float]] = None
    # A1111 row layout of the current denoiser call
    n_cond: Optional[int] = None
    n_total: Optional[int] = None
    cursor: int = 0
    # Forge: the last UNet call's facts, held so identity checks cannot be fooled by id reuse
    last_cou: Any = None
    last_sigmas: Any = None
    rejected: List[Any] = field(default_factory=list)  # weakrefs to UNets the adapter does not fit
    pre_hooks: List[Tuple[Any, Any]] = field(default_factory=list)  # (weakref to module, handle)
    notes: List[str] = field(default_factory=list)
    denoiser_calls: int = 0  # sampling calls seen while VMix was on (for the bypass check in after_batch)
    # the runner's skip-or-stop decision for a model that turns out unusable after process()
    cannot_apply: Optional[Callable[[str], None]] = None

    def owns(self, p) -> bool:
        target = self.p_ref() if isinstance(self.p_ref, weakref.ref) else self.p_ref
        return target is p


def _ref(obj):
    try:
        return weakref.ref(obj)
    except TypeError:
        return obj


class LifecycleController:
    def __init__(self, host: Host):
        self.host = host
        self.current: Optional[Generation] = None
        self._token = 0
        self._touched: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()  # modules we ever hooked
        self._inplace: List[Any] = []  # weakrefs to Forge patchers patched in place (refiner)
        self._warned: set = set()

    # -- generation boundaries --------------------------------------------------------------
    def begin(self, p) -> Generation:
        """Start a generation: first remove every VMix hook and patch, wherever it was left."""
        self.end()
        self.cleanup(self._safe(self.host.unet_of, p))
        self._token += 1
        params = getattr(p, "extra_generation_params", None)
        if params is None:
            params = {}
            p.extra_generation_params = params
        gen = Generation(self._token, _ref(p), self._safe(self.host.job_key), params)
        self.current = gen
        _ACTIVE[0] = weakref.ref(self)
        return gen

    def activate(self, gen: Generation, mixer: ValueMixer, start: float, end: float, uncond: bool) -> None:
        gen.mixer = mixer
        gen.start, gen.end, gen.uncond = float(start), float(end), bool(uncond)
        mixer.guard = self._guard_for(gen)
        mixer.gate = in_range(0.0, gen.start, gen.end)
        mixer.row_strengths = None

    def fail(self, gen: Generation, message: str) -> None:
        """Stop this generation with ``message`` at its first UNet call (nothing else is hooked)."""
        if gen.mixer is not None:
            gen.mixer.remove()
        gen.mixer = None
        gen.failure = message

    def end(self, p=None) -> None:
        """Remove this generation's hooks and patches (postprocess).  With ``p``, only if it owns p."""
        gen = self.current
        if gen is None or (p is not None and not gen.owns(p)):
            return
        self.current = None
        if gen.mixer is not None:
            gen.mixer.remove()
        for module_ref, handle in gen.pre_hooks:
            handle.remove()
        gen.pre_hooks.clear()
        gen.last_cou = gen.last_sigmas = None
        self._strip_inplace()

    def after_batch(self, p) -> None:
        """postprocess_batch, before the batch's infotexts are written: if the model sampled while VMix
        was on but some cross-attention layers never ran their ``to_v``, another extension replaced
        that attention and VMix could not act there; say so instead of a silent no-op."""
        gen = self.current
        if gen is None or not gen.owns(p) or gen.mixer is None or gen.failure is not None or not gen.denoiser_calls:
            return
        mixer = gen.mixer
        if mixer.strength == 0.0:
            return
        missing = [name for name in mixer.adapter.layer_names if name not in mixer.reached]
        if missing:
            self.note(gen, f"did not act on {len(missing)} of {len(mixer.adapter.layer_names)} cross-attention layers "
                           f"(first: {missing[0]}): their value projection attn2.to_v was never called while sampling, so "
                           f"another extension replaced that attention; VMix cannot work together with it")

    def cleanup(self, unet: Optional[nn.Module] = None) -> None:
        """Remove all VMix hooks known to this process and any found on ``unet`` (leftovers)."""
        remove_all()
        modules = list(self._touched)
        if unet is not None:
            modules.append(unet)
        for module in modules:
            try:
                remove_vmix_hooks(module)
                remove_pre_hooks(module)
            except Exception as e:  # a module in a strange state must not block generation
                self._warn_once("cleanup", f"could not inspect a model for leftover hooks: {e}")
        self._strip_inplace()

    def shutdown(self) -> Tuple[int, int]:
        """Script unload ("Reload UI"): nothing of VMix may stay on any model.  Returns (hooks
        removed, hooks left) on the loaded model and the models VMix ever hooked."""
        unet = self._safe(self.host.current_unet)
        modules = list({id(m): m for m in [*self._touched, *([unet] if unet is not None else [])]}.values())
        before = sum(self._safe(count_all_hooks, m) or 0 for m in modules)
        self.end()
        self.cleanup(unet)
        if _ACTIVE[0] is not None and _ACTIVE[0]() is self:
            _ACTIVE[0] = None
        after = sum(self._safe(count_all_hooks, m) or 0 for m in modules)
        return before - after, after

    # -- installing -------------------------------------------------------------------------
    def ensure_installed(self, p) -> None:
        """Hook the UNet p is about to sample with; cheap and idempotent when already hooked."""
        gen = self.current
        if gen is None or not gen.owns(p):
            return
        try:
            unet = self.host.unet_of(p)
            if unet is None:
                return
            patcher = self.host.patcher_of(p)
            gen.forge = patcher is not None
            if gen.failure is None and gen.mixer is not None and compat.compiled_for_sampling(
                    unet, getattr(patcher, "model", None)):
                self._turn_off(gen, compat.COMPILED_REASON)
            if gen.failure is not None:
                self._add_pre_hook(gen, unet)
                return
            if gen.mixer is None or self._rejected(gen, unet):
                return
            if not gen.mixer.is_installed_on(unet) and not self._install(gen, unet):
                return
            if patcher is not None:
                if not has_forge_patch(patcher):
                    patcher = patcher.clone()  # Forge's rule: patch a clone, put it back on p
                    patcher.set_model_attn2_patch(vmix_attn2_patch)
                    self.host.set_patcher(p, patcher)
                gen.sigma_window = sigma_window(patcher, gen.start, gen.end)
            elif not gen.uncond:
                self._add_pre_hook(gen, unet)
        except Exception as e:
            self._internal_error(gen, e)

    def _turn_off(self, gen: Generation, reason: str) -> None:
        """The model p samples with cannot take VMix (compiled after process()): remove this
        generation's hooks; the runner then skips (infotext) or stops the job, as its settings say."""
        if gen.mixer is not None:
            gen.mixer.remove()
            gen.mixer = None
        if gen.cannot_apply is not None:
            gen.cannot_apply(reason)
        else:
            self.note(gen, reason)

    def _install(self, gen: Generation, unet: nn.Module, model_wrapper=None) -> bool:
        if compat.compiled_for_sampling(unet, model_wrapper):
            gen.rejected.append(_ref(unet))
            self.note(gen, f"not applied after a model switch in this job: {compat.COMPILED_REASON}")
            return False
        try:
            gen.mixer.install(unet)
        except AdapterMismatch as e:
            gen.mixer.remove()
            gen.rejected.append(_ref(unet))
            self.note(gen, f"not applied after a model switch in this job: {e}")
            return False
        gen.mixer.arm()
        gen.installed_once = True
        self._touched.add(unet)
        return True

    def _rejected(self, gen: Generation, unet: nn.Module) -> bool:
        return any((r() if isinstance(r, weakref.ref) else r) is unet for r in gen.rejected)

    def _add_pre_hook(self, gen: Generation, unet: nn.Module) -> None:
        for module_ref, _ in gen.pre_hooks:
            if module_ref() is unet:
                return
        controller_ref = weakref.ref(self)

        def vmix_unet_pre_hook(module, args, kwargs):
            controller = controller_ref()
            if controller is not None:
                controller._unet_call(args, kwargs)
            return None

        setattr(vmix_unet_pre_hook, PRE_HOOK_MARK, True)
        handle = unet.register_forward_pre_hook(vmix_unet_pre_hook, with_kwargs=True)
        gen.pre_hooks.append((weakref.ref(unet), handle))
        self._touched.add(unet)

    # -- per-call facts ---------------------------------------------------------------------
    def _guard_for(self, gen: Generation):
        def guard() -> bool:
            return self._alive(gen)
        return guard

    def _alive(self, gen: Generation) -> bool:
        if self.current is not gen:
            return False
        try:
            return self.host.job_key() == gen.job_key
        except Exception:
            return False

    def _unet_call(self, args, kwargs) -> None:
        """Forward pre-hook on the diffusion model: stop a failed generation, count A1111 rows."""
        gen = self.current
        if gen is None or not self._alive(gen):
            return
        if gen.failure is not None:
            raise self._stop_error(gen.failure)
        mixer = gen.mixer
        if mixer is None or gen.uncond or gen.forge:
            return
        x = args[0] if args else kwargs.get("x")
        rows = _rows(x)
        first = gen.cursor
        gen.cursor += rows or 0
        if rows is None or gen.n_total is None or gen.n_cond is None or first + rows > gen.n_total:
            mixer.row_strengths = None  # a call outside the known layout: treat every row as cond
            return
        factors = tuple(1.0 if first + i < gen.n_cond else 0.0 for i in range(rows))
        mixer.row_strengths = None if all(f == 1.0 for f in factors) else factors

    def on_cfg_denoiser(self, params) -> None:
        """script_callbacks.on_cfg_denoiser: once per denoiser call, before its UNet calls."""
        gen = self.current
        if gen is None or gen.mixer is None or not self._alive(gen):
            return
        gen.denoiser_calls += 1
        try:
            self._follow_model(gen)
            mixer = gen.mixer
            if mixer is None:
                return
            if not gen.forge or gen.sigma_window is None:
                fraction = step_fraction(params)
                if fraction is not None:
                    mixer.gate = in_range(fraction, gen.start, gen.end)
            if not gen.forge and not gen.uncond:
                gen.n_cond = _rows(getattr(params, "text_cond", None))
                gen.n_total = _rows(getattr(params, "x", None))
                gen.cursor = 0
        except Exception as e:
            self._internal_error(gen, e)

    def _follow_model(self, gen: Generation) -> None:
        """A refiner switch replaces the model mid-sampling, without any script callback."""
        if not gen.installed_once:
            return
        unet = self.host.current_unet()
        if unet is None or gen.mixer.is_installed_on(unet) or self._rejected(gen, unet):
            return
        patcher = self.host.current_patcher() if gen.forge else None
        if not self._install(gen, unet, getattr(patcher, "model", None)):
            return
        if patcher is not None:
            if not has_forge_patch(patcher):
                # Mid-sampling there is no script hook to hand a clone back, so patch in place and
                # take it out again at the end of the generation.
                patcher.set_model_attn2_patch(vmix_attn2_patch)
                self._inplace.append(_ref(patcher))
            gen.sigma_window = sigma_window(patcher, gen.start, gen.end)
        elif not gen.forge and not gen.uncond:
            self._add_pre_hook(gen, unet)

    def _forge_call(self, context, extra_options) -> None:
        gen = self.current
        if gen is None or gen.mixer is None or not self._alive(gen):
            return
        try:
            cond_or_uncond = extra_options.get("cond_or_uncond")
            sigmas = extra_options.get("sigmas")
            if cond_or_uncond is gen.last_cou and sigmas is gen.last_sigmas:
                return  # same UNet call as the previous block
            gen.last_cou, gen.last_sigmas = cond_or_uncond, sigmas
            gen.denoiser_calls += 1
            mixer = gen.mixer
            if gen.sigma_window is not None and sigmas is not None:
                sigma = float(sigmas.reshape(-1)[0]) if isinstance(sigmas, torch.Tensor) else float(sigmas)
                high, low = gen.sigma_window
                mixer.gate = low <= sigma <= high
            if gen.uncond or not cond_or_uncond:
                mixer.row_strengths = None
                return
            rows = int(context.shape[0])
            chunks = len(cond_or_uncond)
            if rows % chunks:
                mixer.row_strengths = None
                return
            per_chunk = rows // chunks
            factors = tuple(1.0 if kind == 0 else 0.0 for kind in cond_or_uncond for _ in range(per_chunk))
            mixer.row_strengths = None if all(f == 1.0 for f in factors) else factors
        except Exception as e:
            self._internal_error(gen, e)

    # -- messages ---------------------------------------------------------------------------
    def _stop_error(self, message: str) -> VMixError:
        make = getattr(self.host, "stop_error", None)
        if make is not None:
            try:
                error = make(message)
                if isinstance(error, VMixError):
                    return error
            except Exception:  # the plain VMixError still stops the job with the message
                pass
        return VMixError(message)

    def note(self, gen: Generation, text: str) -> None:
        """A part of the job ran without VMix: say so in the infotext and once in the console."""
        if text not in gen.notes:
            gen.notes.append(text)
            gen.params[infotext.KEY_NOTE] = "; ".join(gen.notes)
            self.host.warn(f"VMix {text}")

    def _internal_error(self, gen: Generation, error: Exception) -> None:
        log.debug("VMix internal error", exc_info=True)
        if gen.mixer is not None:
            gen.mixer.remove()
            gen.mixer = None
        self.note(gen, f"turned off for the rest of this job after an unexpected error ({type(error).__name__}: {error})")

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self.host.warn(f"VMix: {message}")

    def _strip_inplace(self) -> None:
        for ref in self._inplace:
            patcher = ref() if isinstance(ref, weakref.ref) else ref
            if patcher is not None:
                strip_forge_patch(patcher)
        self._inplace.clear()

    @staticmethod
    def _safe(fn, *args):
        try:
            return fn(*args)
        except Exception:
            return None
