"""What Forge Neo does differently from Forge, injected into the same glue (docs/compatibility.md):

- which WebUI this is (modules_forge/forge_version.py says "neo" / "classic");
- the built-in "Torch Compile Integrated" script (extensions-builtin/sd_forge_compile/scripts/
  compile.py) replaces ``forge_objects.unet.model.diffusion_model`` by ``torch.compile(model)`` in
  ``process_batch`` and swaps the original back in ``before_process_batch`` (early 2026), or wraps
  ``KModel.apply_model`` so that each call compiles the model (later): VMix turns itself off for
  such a job with one sentence, and the image is the one VMix-off gives;
- the refiner's "Reload state_dict Only" (modules/sd_samplers_common.py apply_refiner) loads the
  refiner's weights into the same UNet modules mid-sampling and restores them in the refiner
  script's postprocess: the hooks stay on the modules, VMix acts on the refiner weights, nothing
  is left after the job;
- models that are not UNets (Flux, Qwen-Image, Z-Image, Wan, Lumina 2, Anima, Chroma, Flux.2):
  the job runs without VMix and says which model it is.
"""
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from test_webui_fakes import (  # noqa: F401  (single_thread: autouse fixture)
    single_thread,
    QUERY_DIM, TINY_CONTEXT, ForgeModel, P, TestHost, cfg_params, forge_unet_call, make_adapter, make_unet,
    placeholder_library, tiny_layout, value_hook_count,
)
from vmix_lib.layers import LAYOUTS
from vmix_lib.webui import compat, host as webui_host
from vmix_lib.webui.lifecycle import PRE_HOOK_MARK, VMixError, has_forge_patch
from vmix_lib.webui.runner import ON_MISMATCH_STOP, RunnerOptions, VMixRunner

LAYOUT = tiny_layout()
COMPILED = f"skipped ({compat.COMPILED_REASON})"


@pytest.fixture(scope="module")
def adapter():
    return make_adapter(LAYOUT)


def data(seed=0):
    torch.manual_seed(seed)
    return torch.randn(4, 4, QUERY_DIM), torch.randn(2, 77, TINY_CONTEXT), torch.randn(2, 77, TINY_CONTEXT)


def args(strength=1.0, uncond=True):
    return [True, "tiny", strength] + [1.0] * 8 + [0.0, 1.0, uncond, ""]


def pre_hook_count(module):
    return sum(1 for fn in module._forward_pre_hooks.values() if getattr(fn, PRE_HOOK_MARK, False))


# ---------------------------------------------------------------- which WebUI


@pytest.mark.parametrize("modules, version, flavour", [
    ((), None, compat.FLAVOUR_A1111),
    (("modules_forge", "backend.patcher.unet"), "2.0.1v1.10.1", compat.FLAVOUR_FORGE),
    (("modules_forge", "backend.patcher.unet"), "neo", compat.FLAVOUR_NEO),
    (("modules_forge", "ldm_patched"), "classic", compat.FLAVOUR_CLASSIC),
    (("modules_forge", "ldm_patched"), "0.0.17v1.8.0rc", compat.FLAVOUR_LDM_PATCHED),  # old Forge
    (("modules_forge", "ldm_patched"), "1.0.0v2-v1.10.1RC", compat.FLAVOUR_LDM_PATCHED),  # reForge
    (("modules_forge", "backend.patcher.unet"), None, compat.FLAVOUR_FORGE),  # version file unreadable
])
def test_flavour(modules, version, flavour):
    assert compat.detect_flavour(lambda name: name in modules, lambda: version) == flavour


def test_flavour_survives_a_failing_version_reader():
    def broken():
        raise OSError("unreadable")

    assert compat.detect_flavour(lambda name: True, broken) == compat.FLAVOUR_FORGE


def test_startup_notice_only_where_vmix_was_not_run():
    for flavour in (compat.FLAVOUR_A1111, compat.FLAVOUR_FORGE, compat.FLAVOUR_NEO, compat.FLAVOUR_CLASSIC):
        assert compat.startup_notice(flavour) is None
    notice = compat.startup_notice(compat.FLAVOUR_LDM_PATCHED)
    assert notice.startswith("this is Forge with the ldm_patched backend (old Forge or reForge);") and "\n" not in notice


# ---------------------------------------------------------------- torch.compile


class NeoCompileScript:
    """extensions-builtin/sd_forge_compile/scripts/compile.py (TorchCompileForForge): the parts that
    move the diffusion model; "eager" stands in for its inductor presets (same wrapper, no codegen)."""

    config = dict(backend="eager", dynamic=False, fullgraph=False)

    def before_process_batch(self, p):
        kmodel = p.sd_model.forge_objects.unet.model
        if hasattr(kmodel, "_compile_config"):  # the original back, so that LoRA can be applied
            kmodel._compiled_backup = kmodel.diffusion_model
            kmodel.diffusion_model = kmodel._model_backup

    def process_batch(self, p, preset):
        kmodel = p.sd_model.forge_objects.unet.model
        compiled = hasattr(kmodel, "_compile_config")
        if preset == "Disable" or (preset == "Automatic" and not compiled):
            if compiled:
                kmodel.diffusion_model = kmodel._model_backup
                del kmodel._compile_config, kmodel._compiled_backup, kmodel._model_backup
            return
        if compiled:
            kmodel.diffusion_model = kmodel._compiled_backup
            del kmodel._compiled_backup
            return
        kmodel._model_backup = kmodel.diffusion_model
        kmodel.diffusion_model = torch.compile(kmodel.diffusion_model, **self.config)
        kmodel._compile_config = self.config


def neo_job(runner, model, a, compile_preset, before_sampling=True):
    """processing.py order for one batch: process, before_process_batch, forge_objects reset,
    process_batch (VMix's own first: an extension loads after the built-ins in Forge only for the UI
    order, so test the harder order), process_before_every_sampling."""
    original = model.forge_objects.unet
    p = P(model)
    runner.process(p, a)
    compile_script = NeoCompileScript()
    compile_script.before_process_batch(p)
    runner.before_sampling(p)  # VMix.process_batch
    compile_script.process_batch(p, compile_preset)
    model.forge_objects.unet = original  # forge_objects_after_applying_lora.shallow_copy()
    if before_sampling:
        runner.before_sampling(p)  # process_before_every_sampling
    return p


@pytest.fixture
def neo(tmp_path, adapter):
    library = placeholder_library(tmp_path, adapter)
    unet = make_unet(LAYOUT)
    model = ForgeModel(unet)
    host = TestHost(model)
    options = [RunnerOptions()]
    runner = VMixRunner(host, library, lambda: options[0])
    yield runner, host, model, unet, options
    runner.shutdown()
    assert value_hook_count(unet) == 0


def test_is_compiled_knows_both_ways_of_compiling():
    m = make_unet(LAYOUT, device="meta")
    wrapper = torch.compile(m, backend="eager")  # builds the wrapper; nothing is traced before a call
    assert compat.is_compiled(wrapper) and compat.uncompiled(wrapper) is m
    assert not compat.is_compiled(m) and compat.uncompiled(m) is m and not compat.is_compiled(None)
    in_place = make_unet(LAYOUT, device="meta")
    in_place.compile(backend="eager")
    assert compat.is_compiled(in_place) and compat.uncompiled(in_place) is in_place

    def wrapper_fn(*a, **k):
        return None

    wrapper_fn._torch_compile_wrapper = True
    assert compat.compiled_for_sampling(m, SimpleNamespace(apply_model=wrapper_fn))
    assert not compat.compiled_for_sampling(m, SimpleNamespace(apply_model=lambda *a: None))
    assert not compat.compiled_for_sampling(m, None)


def test_compiled_by_neo_after_process_turns_vmix_off_and_gives_the_vmix_off_image(neo):
    """The first job with compile on: VMix sees the plain model in process(), Neo compiles it in
    process_batch; right before sampling VMix notices, removes its hooks and says so."""
    runner, host, model, unet, _ = neo
    x, c, u = data()
    never = forge_unet_call(model.forge_objects.unet, x, [u, c], [1, 0], 1.0)  # before anything
    p = neo_job(runner, model, args(strength=2.0), "guard_filter_fn")
    kmodel = model.forge_objects.unet.model
    assert compat.is_compiled(kmodel.diffusion_model) and kmodel._model_backup is unet
    assert value_hook_count(unet) == 0 and not has_forge_patch(model.forge_objects.unet)
    assert p.extra_generation_params["VMix"] == COMPILED
    assert p.extra_generation_params["VMix strength"] == "2"  # what was asked, as for every skip
    assert host.warnings == [f"VMix skipped: {compat.COMPILED_REASON}."]
    # the compiled model samples (traced now): the VMix-off image, bit for bit
    out = forge_unet_call(model.forge_objects.unet, x, [u, c], [1, 0], 1.0)
    assert torch.equal(out, never)
    runner.before_sampling(p)  # the hires pass asks again: still nothing, no second warning
    assert value_hook_count(unet) == 0 and len(host.warnings) == 1
    runner.postprocess(p)

    # The next job (preset Automatic: stays compiled; Neo swaps the plain model in for process_batch)
    host.begin_job("20250101000100")
    p2 = neo_job(runner, model, args(), "Automatic")
    assert p2.extra_generation_params["VMix"] == COMPILED and value_hook_count(unet) == 0
    assert torch.equal(forge_unet_call(model.forge_objects.unet, x, [u, c], [1, 0], 1.0), never)
    runner.postprocess(p2)

    # Preset Disable: the plain model is back and VMix works again.
    host.begin_job("20250101000200")
    p3 = neo_job(runner, model, args(strength=2.0), "Disable")
    assert not compat.is_compiled(kmodel.diffusion_model) and p3.extra_generation_params["VMix"] == "True"
    assert value_hook_count(unet) == 16
    assert (forge_unet_call(model.forge_objects.unet, x, [u, c], [1, 0], 1.0) - never).abs().max() > 1e-3
    runner.postprocess(p3)
    assert torch.equal(forge_unet_call(model.forge_objects.unet, x, [u, c], [1, 0], 1.0), never)


@pytest.mark.parametrize("compiled_before_process", [False, True])
def test_compiled_with_the_stop_setting_stops_at_the_first_unet_call(neo, compiled_before_process):
    runner, host, model, unet, options = neo
    options[0] = RunnerOptions(on_mismatch=ON_MISMATCH_STOP)
    if compiled_before_process:  # an earlier job compiled it (preset Automatic keeps it)
        kmodel = model.forge_objects.unet.model
        kmodel._model_backup, kmodel._compile_config = unet, NeoCompileScript.config
        kmodel.diffusion_model = torch.compile(unet, backend="eager")
        preset = "Automatic"
    else:
        preset = "dynamic"
    p = neo_job(runner, model, args(), preset)
    wrapper = model.forge_objects.unet.model.diffusion_model
    assert compat.is_compiled(wrapper) and value_hook_count(unet) == 0
    x, c, u = data()
    with pytest.raises(VMixError) as e:  # the wrapper's pre-hook runs before the compiled code
        forge_unet_call(model.forge_objects.unet, x, [u, c], [1, 0], 1.0)
    assert str(e.value) == (f"VMix: {compat.COMPILED_REASON}; the job was stopped because Settings > VMix is set "
                            "to stop when VMix cannot be applied. Pick a matching adapter or turn VMix off.")
    assert vars(e.value)["status_code"] == 422 and host.warnings == [str(e.value)]
    runner.postprocess(p)
    assert pre_hook_count(wrapper) == 0


class NeoPerCallCompileScript:
    """The later compile.py (_wrap_apply_model): KModel.apply_model becomes a wrapper that compiles
    the diffusion model for the call and puts the plain one back after it, so between calls (when
    VMix looks) the diffusion model is not compiled."""

    def process_batch(self, p, preset):
        kmodel = p.sd_model.forge_objects.unet.model
        if preset == "Automatic":
            return
        if preset == "Disable":
            if getattr(kmodel.apply_model, "_torch_compile_wrapper", False):
                kmodel.apply_model = kmodel._orig_apply_model
                del kmodel._orig_apply_model
            return
        original = kmodel.apply_model

        def apply_model_with_compile(*args, **kwargs):
            plain = kmodel.diffusion_model
            kmodel.diffusion_model = torch.compile(plain, backend="eager")
            try:
                return original(*args, **kwargs)
            finally:
                kmodel.diffusion_model = plain

        apply_model_with_compile._torch_compile_wrapper = True
        kmodel._orig_apply_model, kmodel.apply_model = original, apply_model_with_compile


def apply_model_call(patcher, x, contexts, cond_or_uncond, sigma):
    """forge_unet_call through KModel.apply_model (where the later Neo compiles)."""
    to = dict(patcher.model_options.get("transformer_options", {}), cond_or_uncond=list(cond_or_uncond),
              sigmas=torch.full((x.shape[0] // len(cond_or_uncond),), float(sigma)))
    return patcher.model.apply_model(x, torch.zeros(x.shape[0]), context=torch.cat(contexts), transformer_options=to)


def test_per_call_compile_of_later_neo_turns_vmix_off_too(neo):
    runner, host, model, unet, _ = neo
    kmodel = model.forge_objects.unet.model
    kmodel.apply_model = lambda x, t, **kw: kmodel.diffusion_model(x, t, **kw)  # KModel.apply_model
    x, c, u = data()
    never = apply_model_call(model.forge_objects.unet, x, [u, c], [1, 0], 1.0)
    original = model.forge_objects.unet
    p = P(model)
    runner.process(p, args(strength=2.0))
    runner.before_sampling(p)  # process_batch (VMix first): the plain model, hooked
    NeoPerCallCompileScript().process_batch(p, "dynamic")
    model.forge_objects.unet = original
    assert not compat.is_compiled(kmodel.diffusion_model)  # compiled only inside apply_model
    runner.before_sampling(p)  # process_before_every_sampling
    assert value_hook_count(unet) == 0 and p.extra_generation_params["VMix"] == COMPILED
    assert torch.equal(apply_model_call(model.forge_objects.unet, x, [u, c], [1, 0], 1.0), never)
    runner.postprocess(p)
    # preset Disable takes the wrapper away: VMix works again
    host.begin_job("20250101000300")
    p2 = P(model)
    runner.process(p2, args(strength=2.0))
    NeoPerCallCompileScript().process_batch(p2, "Disable")
    runner.before_sampling(p2)
    assert value_hook_count(unet) == 16 and p2.extra_generation_params["VMix"] == "True"
    assert (apply_model_call(model.forge_objects.unet, x, [u, c], [1, 0], 1.0) - never).abs().max() > 1e-3
    runner.postprocess(p2)


def test_per_call_compile_with_the_stop_setting_stops_the_job(neo):
    runner, host, model, unet, options = neo
    options[0] = RunnerOptions(on_mismatch=ON_MISMATCH_STOP)
    kmodel = model.forge_objects.unet.model
    kmodel.apply_model = lambda x, t, **kw: kmodel.diffusion_model(x, t, **kw)
    p = P(model)
    runner.process(p, args())
    NeoPerCallCompileScript().process_batch(p, "guard_filter_fn")
    runner.before_sampling(p)
    assert value_hook_count(unet) == 0 and pre_hook_count(unet) == 1
    x, c, u = data()
    with pytest.raises(VMixError) as e:  # raised from the plain model's pre-hook, inside the compiled call
        apply_model_call(model.forge_objects.unet, x, [u, c], [1, 0], 1.0)
    assert str(e.value).startswith(f"VMix: {compat.COMPILED_REASON}; the job was stopped")
    assert not compat.is_compiled(kmodel.diffusion_model)  # the wrapper put the plain model back
    runner.postprocess(p)
    assert pre_hook_count(unet) == 0


def test_a_refiner_switch_to_a_compiled_model_is_not_hooked(neo):
    runner, host, model, unet, _ = neo
    p = neo_job(runner, model, args(), "Disable")
    assert value_hook_count(unet) == 16
    refiner_unet = make_unet(LAYOUT, seed=5)
    host.model = ForgeModel(torch.compile(refiner_unet, backend="eager"))  # reloaded by apply_refiner
    runner.on_cfg_denoiser(cfg_params(4, None, None, step=8))
    assert value_hook_count(refiner_unet) == 0  # the base model keeps its hooks for the next batch
    assert not has_forge_patch(host.model.forge_objects.unet)
    assert p.extra_generation_params["VMix note"] == f"not applied after a model switch in this job: {compat.COMPILED_REASON}"
    runner.on_cfg_denoiser(cfg_params(4, None, None, step=9))
    assert len(host.warnings) == 1  # said once
    runner.postprocess(p)
    assert value_hook_count(unet) == 0


def test_loaded_model_report_sees_through_the_compile_wrapper(monkeypatch):
    real = make_unet(LAYOUTS["sd15"], device="meta")  # real widths: the family is recognised
    monkeypatch.setattr(webui_host, "loaded_model", lambda: ForgeModel(torch.compile(real, backend="eager")))
    assert webui_host.loaded_model_report().family == "sd15"


# ---------------------------------------------------------------- refiner: "Reload state_dict Only"


def test_fast_state_dict_refiner_keeps_vmix_on_the_same_modules_and_leaves_nothing(neo):
    runner, host, model, unet, _ = neo
    x, c, u = data()
    base_weights = {k: v.clone() for k, v in unet.state_dict().items()}
    refiner_weights = make_unet(LAYOUT, seed=11).state_dict()
    with torch.no_grad():
        unet.load_state_dict(refiner_weights)
        refiner_base = forge_unet_call(model.forge_objects.unet, x, [u, c], [1, 0], 1.0)
        unet.load_state_dict(base_weights)
    p = neo_job(runner, model, args(), "Disable")
    patched = model.forge_objects.unet
    # apply_refiner with refiner_fast_sd: load_state_dict(diffusion_model, refiner sd), no script hook
    unet.load_state_dict(refiner_weights)
    runner.on_cfg_denoiser(cfg_params(4, None, None, step=7))
    assert value_hook_count(unet) == 16 and has_forge_patch(patched)
    out = forge_unet_call(patched, x, [u, c], [1, 0], 1.0)
    assert (out - refiner_base).abs().max() > 1e-3  # VMix acts on the refiner's weights
    assert "VMix note" not in p.extra_generation_params
    runner.postprocess(p)
    unet.load_state_dict(base_weights)  # the refiner script's postprocess restores the weights
    assert value_hook_count(unet) == 0
    with torch.no_grad():
        unet.load_state_dict(refiner_weights)
        assert torch.equal(forge_unet_call(model.forge_objects.unet, x, [u, c], [1, 0], 1.0), refiner_base)
        unet.load_state_dict(base_weights)


# ---------------------------------------------------------------- models that are not UNets


class TinyDiT(nn.Module):
    """A transformer with the attention names of Neo's non-UNet models (Qwen-Image's
    transformer_blocks.N.attn.to_q/to_k/to_v): a to_v VMix must not take for a UNet attn2."""

    def __init__(self):
        super().__init__()
        block = nn.Module()
        block.attn = nn.Module()
        block.attn.to_q, block.attn.to_k, block.attn.to_v = (nn.Linear(8, 8) for _ in range(3))
        self.transformer_blocks = nn.ModuleList([block])


@pytest.mark.parametrize("engine, title", sorted(compat.NON_UNET_TITLES.items()))
def test_non_unet_models_run_without_vmix_and_say_which(tmp_path, adapter, engine, title):
    dit = TinyDiT()
    model = type(engine, (ForgeModel,), {})(dit)  # Forge/Neo: the engine class names the family
    host = TestHost(model)
    runner = VMixRunner(host, placeholder_library(tmp_path, adapter))
    p = P(model)
    runner.process(p, args())
    runner.before_sampling(p)
    reason = f"this SD1.5 adapter does not fit the loaded model, which is {compat.non_unet_description(title)}"
    assert p.extra_generation_params["VMix"] == f"skipped ({reason})"
    assert host.warnings == [f"VMix skipped: {reason}."]
    assert value_hook_count(dit) == 0 and not has_forge_patch(model.forge_objects.unet)
    assert webui_host.engine_title(model) == title
    runner.postprocess(p)


def test_engine_title_is_none_for_unets_and_for_a1111():
    unet = make_unet(LAYOUT, device="meta")
    assert webui_host.engine_title(type("StableDiffusionXL", (ForgeModel,), {})(unet)) is None
    assert webui_host.engine_title(SimpleNamespace(model=SimpleNamespace(diffusion_model=unet))) is None
    assert webui_host.engine_title(None) is None


def test_loaded_model_report_names_a_non_unet_engine(monkeypatch):
    monkeypatch.setattr(webui_host, "loaded_model", lambda: type("QwenImage", (ForgeModel,), {})(TinyDiT()))
    report = webui_host.loaded_model_report()
    assert report.family is None and report.description == compat.non_unet_description("Qwen-Image")


# ---------------------------------------------------------------- paste: Neo's gr.skip() loop


def neo_paste(paste_fields, params, skip):
    """modules/infotext_utils.py:571-598 at 3df257ae: None -> gr.skip() (Forge: gr.update()), an
    update passes through, anything else is cast to the type of the control's current value."""
    res = []
    for output, key in paste_fields:
        v = key(params) if callable(key) else params.get(key)
        if v is None:
            res.append(skip)
        elif isinstance(v, dict) and v.get("__type__") == "update":
            res.append(v)
        else:
            try:
                valtype = type(output.value)
                val = False if valtype == bool and v == "False" else float(v) if valtype == int else valtype(v)
                res.append({"__type__": "update", "value": val})
            except Exception:
                res.append(skip)
    return res


def test_paste_through_neos_loop_restores_every_control_with_its_type():
    from vmix_lib.webui import infotext

    # the controls' values as ui.build makes them (enabled, adapter, λ, 8 α, start, end, uncond, block weights)
    controls = [SimpleNamespace(value=v) for v in [False, "tiny", 1.0] + [1.0] * 8 + [0.0, 1.0, True, ""]]
    text_params = {"VMix": "True", "VMix adapter": "tiny (0123456789)", "VMix strength": "1.4",
                   "VMix dimensions": "lighting=0.5 emotion=0", "VMix range": "0.1-0.9", "VMix uncond": "False",
                   "VMix block weights": "IN:1, MID:0.5"}
    skip = object()
    out = neo_paste(list(zip(controls, infotext.PASTE_FUNCTIONS)), text_params, skip)
    values = [o["value"] for o in out]
    assert values[:3] == [True, "tiny", 1.4]
    assert values[3:9] == [1.0, 0.5, 1.0, 1.0, 1.0, 0.0] and values[9:11] == [1.0, 1.0]  # default dimension order
    assert values[11:] == [0.1, 0.9, False, "IN:1, MID:0.5"]
    assert [type(v) for v in values] == [type(c.value) for c in controls]
    # an infotext without VMix: VMix off, every other control left as it is (gr.skip())
    off = neo_paste(list(zip(controls, infotext.PASTE_FUNCTIONS)), {"Steps": "20"}, skip)
    assert off[0] == {"__type__": "update", "value": False} and all(o is skip for o in off[1:])


# ---------------------------------------------------------------- the VMix tab's preview picture


def neo_save_pil_to_file(pil_image, temp_dir, cache_dir):
    """modules/ui_tempdir.py save_pil_to_file of Neo (3df257ae, lines 45-67), which gradio 4 calls for a
    PIL picture returned to a gr.Image: a picture already on disk is served from its file; any other is
    written to Settings > temp_dir (Neo's default: <webui>/tmp), a folder only made when the setting changes."""
    import os
    import tempfile

    already_saved_as = getattr(pil_image, "already_saved_as", None)
    if already_saved_as and os.path.isfile(already_saved_as):
        return f"{already_saved_as}?{os.path.getmtime(already_saved_as)}"
    if temp_dir:
        folder = temp_dir
    else:
        folder = cache_dir
        os.makedirs(folder, exist_ok=True)
    file_obj = tempfile.NamedTemporaryFile(delete=False, suffix=".png", dir=folder)
    pil_image.save(file_obj)
    return file_obj.name


def test_the_tabs_preview_is_served_from_its_file_when_neos_temp_folder_is_missing(tmp_path):
    import numpy as np
    from PIL import Image

    from vmix_lib.webui.making.job import JobStatus
    from vmix_lib.webui.making.service import preview_image

    path = tmp_path / "previews" / "t-step000002.png"
    path.parent.mkdir()
    Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3)).save(path)
    missing = tmp_path / "tmp"  # a fresh Neo: temp_dir = <webui>/tmp, not created
    with Image.open(path) as plain:  # what the tab returned before: a copy without its file
        with pytest.raises(FileNotFoundError):
            neo_save_pil_to_file(plain.copy(), str(missing), str(tmp_path / "cache"))
    image = preview_image(JobStatus(task_id="t", preview_path=str(path)))
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(path)))
    served = neo_save_pil_to_file(image, str(missing), str(tmp_path / "cache"))
    assert served.split("?")[0] == str(path) and not missing.exists()
    assert preview_image(JobStatus(task_id="t")) is None
