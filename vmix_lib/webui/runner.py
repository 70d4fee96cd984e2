"""What the VMix script does for one generation, independent of which WebUI runs it.

``process`` resolves the settings (UI/API arguments, then X/Y/Z overrides), loads the adapter,
checks that it fits the loaded model, writes the infotext and hands a ValueMixer to the lifecycle
controller.  Nothing here raises into the WebUI's script runner (which would print a traceback and
carry on): problems end as one of

    skip   the job runs without VMix; one console warning; infotext "VMix: skipped (<reason>)"
           (no adapter installed, a malformed adapter file, an adapter for another model family)
    stop   the job stops with one sentence, which is the console's one line about it
           (invalid arguments: unknown or unsafe adapter names, out-of-range values, bad block
           weights; and the "skip" cases when Settings > VMix says to stop on a mismatch):
             UI jobs   before sampling, the way the WebUI's Interrupt button stops them
                       (``stop_before_sampling``), the sentence under the infotext.  An exception
                       would reach the UI's job wrapper, which prints it with its traceback
                       (A1111 modules/call_queue.py:73-83 errors.report(exc_info=True); Forge
                       modules_forge/main_thread.py:27-37 traceback.print_exc()).
             API jobs  at the first UNet call with VMixError (p.is_api): the HTTP API answers
                       422 with the sentence and prints nothing (see lifecycle.VMixError).
           A stop decided after process() (the model changed before sampling) always raises.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

from .. import __version__
from ..adapter_file import AdapterError
from ..dimensions import resolve_alphas
from ..hook import AestheticValues, ValueMixer, check_fit
from ..layers import FAMILY_TITLES, find_cross_attention_layers
from . import compat, infotext
from .arguments import ArgumentDefaults, VMixArgumentError, VMixSettings, apply_overrides, parse_script_args
from .blocks import parse_block_weights
from .library import AdapterLibrary, console_text
from .lifecycle import Generation, Host, LifecycleController

ON_MISMATCH_SKIP = "skip"
ON_MISMATCH_STOP = "stop"
OVERRIDES_ATTR = "vmix_overrides"


@dataclass(frozen=True)
class RunnerOptions:
    """Settings > VMix, as the runner needs them."""

    default_strength: float = 1.0
    uncond_default: bool = True
    on_mismatch: str = ON_MISMATCH_SKIP


class CannotApply(Exception):
    """The adapter cannot be applied to this job (missing, malformed, wrong model family).
    ``console``: the sentence with the folder's full path, for the server's console."""

    def __init__(self, message: str, console: Optional[str] = None):
        super().__init__(message)
        self.console = console or message


class InvalidArgument(VMixArgumentError):
    """A VMixArgumentError whose console form names the folder's full path."""

    def __init__(self, message: str, console: Optional[str] = None):
        super().__init__(message)
        self.console = console or message


def stop_before_sampling(p, state, sentence: str) -> bool:
    """Stop a UI job before it samples anything: True when done, False for an HTTP API job.

    Called from ``process``.  A1111 and Forge check ``state.interrupted`` before each batch, right
    after the scripts' process (A1111 1.10.1 modules/processing.py:914-939, Forge :906-931; A1111
    1.6-1.7 check ``state.interrupted`` alone), so no image is made; ``postprocess`` still runs
    and the UI's job wrapper resets the flag afterwards (modules/call_queue.py:54-59).  The
    sentence is a processing comment, which the UI shows under the infotext
    (modules/txt2img.py:120, img2img.py:253: ``processed.comments``).  No grid either: with
    "Do not save grids consisting of one picture" off, an empty grid would fail (images.py:49-52).

    An API job (p.is_api, set by modules/api/api.py for txt2img and img2img since A1111 1.6) must
    answer 422 instead, so it stops at the first UNet call (lifecycle.VMixError).
    """
    if getattr(p, "is_api", False) or state is None:
        return False
    comment = getattr(p, "comment", None)
    if callable(comment):
        comment(sentence)
    p.do_not_save_grid = True
    state.interrupted = True
    return True


@dataclass
class Prepared:
    mixer: Optional[ValueMixer]
    adapter_name: Optional[str]
    short_hash: Optional[str]
    alphas: dict
    dimension_names: Sequence[str]


class VMixRunner:
    def __init__(self, host: Host, library: AdapterLibrary, options: Callable[[], RunnerOptions] = RunnerOptions,
                 version: str = __version__):
        self.host = host
        self.library = library
        self.options = options
        self.version = version
        self.controller = LifecycleController(host)
        # V_a of the last generation: the next one reuses it while adapter and α are unchanged
        # (a λ, block-weight or range change needs no new W_a·f_a).
        self._values: Optional[AestheticValues] = None

    # -- script hooks -----------------------------------------------------------------------
    def process(self, p, args: Sequence) -> None:
        gen = self.controller.begin(p)
        infotext.clear(gen.params)
        try:
            options = self.options()
        except Exception:
            options = RunnerOptions()
        try:
            settings = parse_script_args(args, ArgumentDefaults(options.default_strength, options.uncond_default))
            settings = apply_overrides(settings, getattr(p, OVERRIDES_ATTR, None))
        except VMixArgumentError as e:
            return self._stop(gen, str(e), p=p)
        if not settings.enabled:
            return
        partial = Prepared(None, settings.adapter, None, {}, ())
        try:
            prepared = self._prepare(p, settings, partial)
        except VMixArgumentError as e:
            return self._stop(gen, str(e), console=console_text(e), p=p)
        except CannotApply as e:
            return self._cannot_apply(gen, settings, partial, str(e), options, console=console_text(e), p=p)
        except Exception as e:  # a bug of ours: say so once, run the job without VMix
            return self._cannot_apply(gen, settings, partial, f"unexpected error {type(e).__name__}: {e}",
                                      RunnerOptions(on_mismatch=ON_MISMATCH_SKIP))
        gen.params.update(infotext.build(
            settings, adapter_name=prepared.adapter_name, short_hash=prepared.short_hash, alphas=prepared.alphas,
            dimension_names=prepared.dimension_names, version=self.version,
        ))
        self.controller.activate(gen, prepared.mixer, settings.start, settings.end, settings.uncond)
        # The model can still change before sampling (Forge Neo compiles it, or undoes that, in
        # process_batch): the controller then turns VMix off through the same skip/stop decision.
        gen.cannot_apply = lambda reason: self._cannot_apply(gen, settings, Prepared(
            None, prepared.adapter_name, prepared.short_hash, prepared.alphas, prepared.dimension_names), reason, options)

    def before_sampling(self, p) -> None:
        self.controller.ensure_installed(p)

    def after_batch(self, p) -> None:
        self.controller.after_batch(p)

    def postprocess(self, p) -> None:
        self.controller.end(p)

    def on_cfg_denoiser(self, params) -> None:
        self.controller.on_cfg_denoiser(params)

    def shutdown(self) -> Tuple[int, int]:
        """(hooks removed, hooks left): see LifecycleController.shutdown."""
        return self.controller.shutdown()

    # -- the decision -----------------------------------------------------------------------
    def _prepare(self, p, settings: VMixSettings, partial: Prepared) -> Prepared:
        name = settings.adapter
        if name is None:
            name = self.library.default_name()
            if name is None:
                raise CannotApply(self.library.no_adapter_message(), self.library.no_adapter_message(console=True))
        try:
            name = self.library.validate(name)
        except ValueError as e:
            raise InvalidArgument(str(e), console_text(e)) from None
        partial.adapter_name = name
        try:
            adapter = self.library.load(name)
        except AdapterError as e:
            raise CannotApply(str(e).rstrip(".")) from None
        names = adapter.dimension_names
        alphas = settings.alphas_for(names)
        try:
            resolve_alphas(adapter.dimensions, alphas)
        except ValueError as e:
            raise VMixArgumentError(f"VMix dimensions: {e}.") from None
        partial.alphas, partial.dimension_names = alphas, names
        partial.short_hash = self._hash(name)
        title = FAMILY_TITLES.get(adapter.family, adapter.family)
        try:
            layer_strengths = parse_block_weights(settings.block_weights, adapter.layer_names, title)
        except ValueError as e:
            raise VMixArgumentError(str(e)) from None
        unet = self.host.unet_of(p)
        # A torch.compile wrapper is judged by the model it holds; whether it is still compiled when
        # sampling starts (Forge Neo switches in process_batch) is the controller's last check.
        base = compat.uncompiled(unet)
        layers = find_cross_attention_layers(base) if base is not None else []
        model_title = self._model_title(p) if not layers else None
        if model_title is not None:
            raise CannotApply(f"this {title} adapter does not fit the loaded model, which is "
                              f"{compat.non_unet_description(model_title)}")
        report = check_fit(adapter, layers)
        if not report.ok:
            raise CannotApply(report.reason(adapter))
        values = self._values
        if values is None or not values.matches(adapter, alphas):
            values = self._values = AestheticValues.for_alphas(adapter, alphas)
        mixer = ValueMixer(adapter, settings.strength, layer_strengths=layer_strengths, values=values)
        return Prepared(mixer, name, partial.short_hash, alphas, names)

    def _model_title(self, p) -> Optional[str]:
        """The host's name for a model that is not an SD1.5/SDXL UNet (Forge/Neo: Flux, Wan, ...)."""
        lookup = getattr(self.host, "model_title", None)
        try:
            return lookup(p) if lookup is not None else None
        except Exception:
            return None

    def _hash(self, name: str) -> Optional[str]:
        try:
            return self.library.short_hash(name)
        except Exception:  # unreadable file, hashing off: the infotext simply has no hash
            return None

    def _stop(self, gen: Generation, message: str, said_stopped: bool = False, console: Optional[str] = None,
              p=None) -> None:
        """Stop the job with ``message``: one console line; a UI job (``p`` given: from process())
        stops before sampling, any other at its first UNet call (the exception the API answers)."""
        console = console or message
        self.host.warn(console if said_stopped else f"{console} The job is stopped.")
        # Kept for the UI too: should anything sample after all, the first UNet call stops it.
        self.controller.fail(gen, message)
        if p is not None:
            stop = getattr(self.host, "stop_before_sampling", None)
            try:
                if stop is not None:
                    stop(p, message if said_stopped else f"{message} The job is stopped.")
            except Exception:  # the UNet call still stops the job
                pass

    def _cannot_apply(self, gen: Generation, settings: VMixSettings, partial: Prepared, reason: str,
                      options: RunnerOptions, console: Optional[str] = None, p=None) -> None:
        console = console or reason
        if options.on_mismatch == ON_MISMATCH_STOP:
            prefix = "" if reason.startswith("VMix") else "VMix: "  # file errors already name VMix
            stopped = ("; the job was stopped because Settings > VMix is set to stop when VMix cannot be applied. "
                       "Pick a matching adapter or turn VMix off.")
            return self._stop(gen, f"{prefix}{reason}{stopped}", said_stopped=True, console=f"{prefix}{console}{stopped}",
                              p=p)
        self.host.warn(f"VMix skipped: {console}.")
        gen.params.update(infotext.build(
            settings, adapter_name=partial.adapter_name, short_hash=partial.short_hash, alphas=partial.alphas,
            dimension_names=partial.dimension_names, version=self.version, skipped=reason,
        ))
