"""The VMix hook: a forward hook on every cross-attention value projection (``attn2.to_v``).

Because both branches share the attention map, Eq. 9 is exactly "add λ·V_a to the values of the
text tokens", so the hook returns ``to_v(context) + λ·tile(V_a)`` and whatever attention kernel,
LoRA, hypernetwork or attn2 replacement the WebUI runs keeps working unchanged.

Rules (DESIGN §4): hooks are inert unless armed; λ = 0 leaves outputs bit-identical; V_a is
computed once per adapter, α and device (AestheticValues, shared across generations) and never per
step; removal restores the UNet exactly.

Several mixers on one UNet (DESIGN §9): any number of mixers may be *installed* on the same UNet
(an evaluation of N adapters, previews beside a trainer, two graph branches in ComfyUI), but at most
one is *armed* at a time: ``arm()`` disarms the other mixers on that UNet, so adapters never add up
by accident, and each job arms the one it means.  Installing a mixer never removes another live
mixer's hooks; it removes only hooks whose mixer is gone (left by a crash or a reload).
``remove_vmix_hooks`` still strips everything (a WebUI job's clean start), and a mixer whose hooks
were stripped refuses to ``arm()`` with an error instead of silently adding nothing (a mixer not
installed yet may be armed: it acts once installed).
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .layers import FAMILY_TITLES, FamilyReport, LayerInfo, detect_family, find_cross_attention_layers
from .dimensions import resolve_alphas
from .mixing import VMixAdapter

log = logging.getLogger("vmix")

_HOOK_MARK = "_vmix_value_hook"
_OWNER = "_vmix_mixer"  # weakref to the mixer a hook belongs to
_MIXERS: "weakref.WeakSet[ValueMixer]" = weakref.WeakSet()


class AdapterMismatch(ValueError):
    """The adapter does not fit the UNet; nothing was hooked."""


@dataclass
class BindReport:
    model: FamilyReport
    missing: List[str] = field(default_factory=list)  # UNet attn2 layers the adapter has no W_a for
    extra: List[str] = field(default_factory=list)  # adapter layers the UNet does not have
    mismatched: List[Tuple[str, Tuple[int, int], Tuple[int, int]]] = field(default_factory=list)
    context_mismatch: Optional[Tuple[int, int]] = None  # (adapter width, UNet width)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.extra or self.mismatched or self.context_mismatch)

    def reason(self, adapter: VMixAdapter) -> str:
        """One clause saying why the adapter does not fit, e.g. for 'VMix: skipped (...)'."""
        title = FAMILY_TITLES.get(adapter.family, adapter.family)
        if self.context_mismatch or not self.model.supported or self.model.family != adapter.family:
            return f"this {title} adapter does not fit the loaded model, which is {self.model.description}"
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} layers missing from the adapter (first: {self.missing[0]})")
        if self.extra:
            parts.append(f"{len(self.extra)} adapter layers not in the model (first: {self.extra[0]})")
        if self.mismatched:
            name, want, got = self.mismatched[0]
            parts.append(f"{len(self.mismatched)} layers of another shape (first: {name}, adapter {list(want)}, model {list(got)})")
        return f"this {title} adapter does not fit the loaded model: " + "; ".join(parts)


def check_fit(adapter: VMixAdapter, layers: Sequence[LayerInfo]) -> BindReport:
    report = BindReport(detect_family(list(layers)))
    have = {info.name: (info.inner_dim, info.context_dim) for info in layers}
    want = adapter.layer_shapes()
    widths = {info.context_dim for info in layers}
    if layers and widths != {adapter.context_dim}:
        report.context_mismatch = (adapter.context_dim, max(widths))
    report.missing = [n for n in have if n not in want]
    report.extra = [n for n in want if n not in have]
    report.mismatched = [(n, want[n], have[n]) for n in want if n in have and tuple(want[n]) != tuple(have[n])]
    return report


def _orphaned(key: int, fn) -> bool:
    """A VMix hook no live mixer owns (its mixer was collected, or removed it from its list)."""
    mixer = getattr(fn, _OWNER, lambda: None)()
    return mixer is None or all(handle.id != key for handle in mixer._handles)


def remove_vmix_hooks(root: nn.Module, only_orphans: bool = False) -> int:
    """Remove every VMix hook found under ``root``, including ones left by a crashed or reloaded run
    (``only_orphans``: only hooks no live mixer owns)."""
    removed = 0
    for module in root.modules():
        hooks = module._forward_hooks
        for key in [k for k, fn in hooks.items() if getattr(fn, _HOOK_MARK, False) and (not only_orphans or _orphaned(k, fn))]:
            del hooks[key]
            module._forward_hooks_with_kwargs.pop(key, None)
            module._forward_hooks_always_called.pop(key, None)
            removed += 1
    return removed


def count_vmix_hooks(root: nn.Module) -> int:
    """How many VMix hooks sit on ``root``'s modules."""
    return sum(1 for module in root.modules() for fn in module._forward_hooks.values() if getattr(fn, _HOOK_MARK, False))


def remove_all() -> None:
    """Remove the hooks of every live ValueMixer (lifecycle start, postprocess, script unload)."""
    for mixer in list(_MIXERS):
        mixer.remove()


class AestheticValues:
    """V_a = W_a·f_a of every layer for one adapter and one aesthetic input f_a.

    Each layer's V_a is computed once per device, in float32, when first needed; its casts to the
    UNet's dtype and its tilings to 77·k tokens are kept beside it.  λ, block weights, row strengths
    and the step range are applied in the hook, so mixers of later generations share these tensors
    while the adapter, α and the UNet's device and dtype stay the same (``matches``).
    """

    MAX_FORMS = 8  # cached tensors per layer (float32 bases, casts, tilings) before the casts are dropped

    def __init__(self, adapter: VMixAdapter, f_a: torch.Tensor, key: Optional[tuple] = None):
        self.adapter = adapter
        self.f_a = f_a
        self.key = key  # what f_a was made from, e.g. the α of each dimension
        self._tensors: Dict[tuple, torch.Tensor] = {}
        self.computed = 0  # W_a·f_a products computed (for tests and the benchmark)

    @classmethod
    def for_alphas(cls, adapter: VMixAdapter, alphas: Optional[Mapping[str, float]] = None) -> "AestheticValues":
        """f_a from the per-dimension α (missing = 1), computed once without gradients."""
        weights = resolve_alphas(adapter.dimensions, alphas)
        with torch.no_grad():
            f_a = adapter.aesthetic_context(adapter.aesthetic_input(alphas))
        return cls(adapter, f_a, key=tuple(weights))

    def matches(self, adapter: VMixAdapter, alphas: Optional[Mapping[str, float]] = None) -> bool:
        try:
            return adapter is self.adapter and self.key == tuple(resolve_alphas(adapter.dimensions, alphas))
        except ValueError:
            return False

    @property
    def per_row(self) -> bool:
        return self.f_a.dim() == 3

    @property
    def rows(self) -> int:
        return self.f_a.shape[0] if self.f_a.dim() == 3 else 1

    def tracks_gradients(self, name: str) -> bool:
        return self.f_a.requires_grad or self.adapter.value(name).weight.requires_grad

    def get(self, name: str, chunks: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """V_a of layer ``name`` on ``device`` in ``dtype``, tiled to ``chunks`` × 77 tokens."""
        if torch.is_grad_enabled() and self.tracks_gradients(name):
            # Training: a fresh graph per forward, so gradient checkpointing's recomputation
            # records the same tensors as the first pass (a cached V_a would not be re-saved).
            values = self.adapter.aesthetic_values(name, self.f_a, device=device)
            values = torch.cat([values] * chunks, dim=-2) if chunks > 1 else values
            return values.to(dtype)
        key = (name, device, dtype, chunks)
        values = self._tensors.get(key)
        if values is None:
            base_key = (name, device)
            base = self._tensors.get(base_key)
            if base is None:
                with torch.no_grad():
                    base = self.adapter.aesthetic_values(name, self.f_a, device=device)
                self.computed += 1
                self._tensors[base_key] = base
            values = torch.cat([base] * chunks, dim=-2) if chunks > 1 else base
            values = values.to(dtype)
            if len(self._tensors) >= self.MAX_FORMS * len(self.adapter.layer_names):
                # Kept across generations: let prompt lengths and dtypes that came and went go.
                for stale in [k for k in self._tensors if len(k) == 4]:
                    del self._tensors[stale]
            self._tensors[key] = values
        return values

    def clear(self) -> None:
        self._tensors.clear()


class ValueMixer:
    """Binds a VMixAdapter to a UNet's attn2.to_v layers and adds λ·V_a while armed.

    Per-call controls the caller may change at any time:
      strength         global λ
      layer_strengths  {layer name: factor} (block weights; missing = 1)
      row_strengths    per-row factors for the next calls, e.g. [1, 1, 0, 0] for cond/uncond rows
                       (None = all rows 1; a length that does not match the rows warns once)
      gate             per-step switch (start/end of the sampling range)
      guard            optional callable; the hook acts only while it returns True

    ``values`` (an AestheticValues for this adapter) shares V_a with earlier mixers instead of
    computing it from ``alphas`` again.
    """

    def __init__(
        self,
        adapter: VMixAdapter,
        strength: float = 1.0,
        alphas: Optional[Mapping[str, float]] = None,
        layer_strengths: Optional[Mapping[str, float]] = None,
        guard: Optional[Callable[[], bool]] = None,
        strict: bool = False,
        values: Optional[AestheticValues] = None,
    ):
        self.adapter = adapter
        self.strength = float(strength)
        self.layer_strengths: Dict[str, float] = dict(layer_strengths or {})
        self._row_strengths: Optional[Tuple[float, ...]] = None
        self.gate = True
        self.guard = guard
        self.strict = strict  # raise errors from inside the hook instead of logging them once
        self.armed = False
        self._handles: List[torch.utils.hooks.RemovableHandle] = []
        self._unet_ref: Optional[weakref.ref] = None
        self._values: Optional[AestheticValues] = None
        self._rows_cache: Dict[tuple, tuple] = {}
        self._warned: set = set()
        # names of the layers whose to_v ran while armed: an attention that another extension
        # replaced without calling to_v shows up as missing here (the WebUI glue says so)
        self.reached: set = set()
        unknown = set(self.layer_strengths) - set(adapter.layer_names)
        if unknown:
            raise ValueError(f"unknown layer in block weights: {sorted(unknown)[0]}")
        if values is not None:
            if values.adapter is not adapter:
                raise ValueError("the shared aesthetic values belong to another adapter")
            self._values = values
        else:
            self.set_alphas(alphas)
        _MIXERS.add(self)

    @property
    def row_strengths(self) -> Optional[Tuple[float, ...]]:
        return self._row_strengths

    @row_strengths.setter
    def row_strengths(self, factors: Optional[Sequence[float]]) -> None:
        # Normalised once per UNet call here, not in each layer's hook.
        self._row_strengths = None if factors is None else tuple(float(f) for f in factors)

    # -- aesthetic condition ----------------------------------------------------------------
    def set_alphas(self, alphas: Optional[Mapping[str, float]] = None) -> None:
        """Set the per-dimension α (missing = 1) and recompute f_a once, without gradients."""
        self._values = AestheticValues.for_alphas(self.adapter, alphas)

    def set_aesthetic_context(self, f_a: torch.Tensor) -> None:
        """Use ``f_a`` [77, d] (shared by all rows) or [rows, 77, d] (per row, e.g. in training)."""
        self._values = AestheticValues(self.adapter, f_a)

    @property
    def values(self) -> Optional[AestheticValues]:
        """The V_a this mixer adds (to share with the next generation's mixer)."""
        return self._values

    # -- lifecycle --------------------------------------------------------------------------
    @property
    def installed(self) -> bool:
        return bool(self._handles)

    def is_installed_on(self, unet: nn.Module) -> bool:
        """True while this mixer's hooks are on ``unet``'s modules (not stripped by remove_vmix_hooks)."""
        if not self.installed or self._unet_ref is None or self._unet_ref() is not unet:
            return False
        for handle in self._handles:
            hooks = handle.hooks_dict_ref()
            if hooks is None or handle.id not in hooks:
                return False
        return True

    def install(self, unet: nn.Module, layers: Optional[Sequence[LayerInfo]] = None) -> "ValueMixer":
        """Hook every attn2.to_v of ``unet``.  Raises AdapterMismatch before touching anything."""
        if self.is_installed_on(unet):
            return self
        layers = find_cross_attention_layers(unet) if layers is None else list(layers)
        report = check_fit(self.adapter, layers)
        if not report.ok:
            raise AdapterMismatch(report.reason(self.adapter))
        armed = self.armed  # moving to another UNet (refiner, hires checkpoint) keeps the state
        self.remove()
        remove_vmix_hooks(unet, only_orphans=True)  # other live mixers keep theirs (one armed at a time)
        for info in layers:
            hook = self._make_hook(info.name)
            self._handles.append(info.module.to_v.register_forward_hook(hook))
        self._unet_ref = weakref.ref(unet)
        if armed:
            self.arm()
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._unet_ref = None
        self.armed = False

    def arm(self) -> None:
        """Make the hooks act (once installed, if not yet), and disarm every other mixer on the same UNet."""
        unet = self._unet_ref() if self._unet_ref is not None else None
        if self._handles and (unet is None or not self.is_installed_on(unet)):
            raise RuntimeError("this VMix mixer's hooks were removed from its UNet (remove_vmix_hooks, or the model "
                               "was reloaded); install it again before arming it")
        if unet is not None:
            for other in list(_MIXERS):
                if other is not self and other.armed and other._unet_ref is not None and other._unet_ref() is unet:
                    other.armed = False
        self.armed = True

    def disarm(self) -> None:
        self.armed = False

    def __enter__(self) -> "ValueMixer":
        self.arm()  # after install: ``with mixer.applied(unet):``
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def applied(self, unet: nn.Module) -> "ValueMixer":
        """``with mixer.applied(unet): ...`` installs and arms, and removes on exit."""
        return self.install(unet)

    # -- the hook ---------------------------------------------------------------------------
    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("VMix: %s", message)

    def _values_for(self, name: str, count: int, device: torch.device, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """V_a for ``name`` on ``device``/``dtype``, tiled to ``count`` tokens (AestheticValues caches it)."""
        tokens = self.adapter.tokens
        chunks, rest = divmod(count, tokens)
        if rest or not chunks:
            self._warn_once(f"tokens{count}", f"context of {count} tokens is not a multiple of {tokens}; left unchanged")
            return None
        return self._values.get(name, chunks, device, dtype)

    def precompute(self, device=None, dtype: torch.dtype = torch.float32, tokens: Optional[int] = None) -> None:
        """Compute V_a of every layer now (e.g. when a generation starts) rather than in its first step.

        ``device``/``dtype`` are those of the UNet's to_v outputs; ``tokens`` the context length (77·k).
        Values already computed (by this mixer or one it shares AestheticValues with) are reused.
        """
        device = torch.device(device) if device is not None else self.adapter.aes_emb.device
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())  # as tensors report it
        if self._values is None:
            return
        with torch.no_grad():  # for sampling, which runs without gradients
            for name in self.adapter.layer_names:
                self._values_for(name, tokens or self.adapter.tokens, device, dtype)

    def _row_factors(self, rows: int, out: torch.Tensor) -> Optional[Tuple[torch.Tensor, bool]]:
        """Per-row factors as a [rows, 1, 1] tensor on out's device, and whether any is nonzero."""
        factors = self._row_strengths
        if factors is None:
            return None
        if len(factors) != rows:
            self._warn_once(f"rows{len(factors)}/{rows}", f"{len(factors)} row strengths for {rows} rows; using 1 for all rows")
            return None
        key = (factors, out.device, out.dtype)
        entry = self._rows_cache.get(key)
        if entry is None:
            # Decided here, on the host: testing the tensor would sync the GPU in every layer.
            entry = (torch.tensor(factors, dtype=out.dtype).to(out.device).view(rows, 1, 1), any(factors))
            self._rows_cache[key] = entry
        return entry

    def _apply(self, name: str, out: torch.Tensor) -> Optional[torch.Tensor]:
        strength = self.strength * self.layer_strengths.get(name, 1.0) if self.layer_strengths else self.strength
        values = self._values
        if strength == 0.0 or values is None or out.dim() != 3:
            return None
        rows = out.shape[0]
        if values.per_row and values.rows != rows:
            self._warn_once(f"batch{rows}", f"per-row aesthetic input for {values.rows} rows, got {rows}; left unchanged")
            return None
        values = self._values_for(name, out.shape[-2], out.device, out.dtype)
        if values is None:
            return None
        factors = self._row_factors(rows, out)
        if factors is not None:
            factors, nonzero = factors
            if not nonzero:
                return None
            return torch.addcmul(out, factors, values, value=strength)  # out + λ·row·V_a, one kernel
        return torch.add(out, values, alpha=strength)

    def _make_hook(self, name: str):
        mixer_ref = weakref.ref(self)

        def vmix_value_hook(module, args, output):
            mixer = mixer_ref()
            if mixer is None or not mixer.armed:
                return None
            mixer.reached.add(name)
            if not mixer.gate or not isinstance(output, torch.Tensor):
                return None
            try:
                if mixer.guard is not None and not mixer.guard():
                    return None
                return mixer._apply(name, output)
            except Exception as e:  # never let a VMix bug break a generation
                if mixer.strict:
                    raise
                mixer._warn_once("error", f"disabled for this generation after an error in layer {name}: {e}")
                mixer.armed = False
                return None

        setattr(vmix_value_hook, _HOOK_MARK, True)
        setattr(vmix_value_hook, _OWNER, mixer_ref)
        return vmix_value_hook
