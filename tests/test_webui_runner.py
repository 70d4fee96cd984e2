"""One generation through VMixRunner with real adapter files: model fit (skip or stop), invalid
arguments (stop with one sentence at the first UNet call), failed X/Y/Z cells, no adapter, a
malformed file, and an end-to-end check of the value a hooked to_v returns."""
import os

import pytest
import torch

from test_webui_fakes import (  # noqa: F401  (single_thread: autouse fixture)
    single_thread,
    A1111Model, ForgeModel, P, TestHost, make_unet, plaintext_to_html, process_images, ui_job, write_adapter,
)
from vmix_lib.adapter_file import load_adapter
from vmix_lib.layers import LAYOUTS
from vmix_lib.webui.library import AdapterLibrary
from vmix_lib.webui.lifecycle import VMixError
from vmix_lib.webui.runner import ON_MISMATCH_STOP, RunnerOptions, VMixRunner


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("VMix")
    write_adapter(folder / "sd15_style.safetensors")
    (folder / "broken.safetensors").write_bytes(os.urandom(64))
    return folder


@pytest.fixture(scope="module")
def library(folder):
    return AdapterLibrary(lambda: str(folder))


@pytest.fixture(scope="module")
def meta_models():
    return {family: make_unet(LAYOUTS[family], device="meta") for family in ("sd15", "sdxl")}


def run(library, model, args, options=RunnerOptions(), **p_attrs):
    host = TestHost(model)
    runner = VMixRunner(host, library, lambda: options)
    p = P(model, **p_attrs)
    runner.process(p, args)
    runner.before_sampling(p)
    return runner, host, p


def unet_call(unet):
    width = next(m.to_k.in_features for n, m in unet.named_modules() if n.endswith("attn2"))
    x = torch.empty(2, 4, 8, device="meta")
    return unet(x, context=torch.empty(2, 77, width, device="meta"))


def vmix_hooks(unet):
    return sum(len(m._forward_hooks) for m in unet.modules()) + len(unet._forward_pre_hooks)


ON = [True, "sd15_style", 1.0]


def test_sd15_adapter_on_sdxl_is_skipped_with_one_warning_and_infotext(library, meta_models):
    unet = meta_models["sdxl"]
    runner, host, p = run(library, A1111Model(unet), ON)
    reason = "this SD1.5 adapter does not fit the loaded model, which is SDXL (70 cross-attention layers, width 2048)"
    assert p.extra_generation_params["VMix"] == f"skipped ({reason})"
    assert host.warnings == [f"VMix skipped: {reason}."]
    assert vmix_hooks(unet) == 0
    unet_call(unet)  # the job runs (meta tensors: no data, shapes only)
    runner.postprocess(p)


@pytest.mark.parametrize("layout, words", [
    ("sd2", "an SD2.x model"), ("refiner", "the SDXL refiner"), ("sd3", "SD3, Flux or another non-UNet design"),
])
def test_other_model_families_are_named(library, layout, words):
    from vmix_lib.layers import LayerInfo

    if layout == "sd2":
        layers = [LayerInfo(l.name, 1024, l.inner_dim, l.heads) for l in LAYOUTS["sd15"]]
        unet = make_unet(layers, device="meta")
    elif layout == "refiner":
        layers = [LayerInfo(f"input_blocks.{i}.1.transformer_blocks.{j}.attn2", 1280, 768, 12) for i in (4, 5) for j in range(4)]
        unet = make_unet(layers + [LayerInfo("middle_block.1.transformer_blocks.0.attn2", 1280, 1536, 24)], device="meta")
    else:
        unet = torch.nn.Linear(1, 1)  # no attn2 at all
    runner, host, p = run(library, A1111Model(unet), ON)
    assert p.extra_generation_params["VMix"].startswith("skipped (this SD1.5 adapter does not fit the loaded model, which is ")
    assert words in p.extra_generation_params["VMix"]


def test_mismatch_with_the_stop_setting_stops_at_the_first_unet_call(library, meta_models):
    unet = meta_models["sdxl"]
    runner, host, p = run(library, A1111Model(unet), ON, RunnerOptions(on_mismatch=ON_MISMATCH_STOP))
    assert "VMix" not in p.extra_generation_params
    with pytest.raises(VMixError) as e:
        unet_call(unet)
    assert str(e.value).startswith("VMix: this SD1.5 adapter does not fit the loaded model, which is SDXL")
    assert "the job was stopped because Settings > VMix is set to stop" in str(e.value)
    assert len(host.warnings) == 1 and host.warnings[0] == str(e.value)
    # A1111 skips postprocess after the exception; the next job (here: VMix off) cleans up
    host.begin_job("20250101000300")
    runner.process(P(A1111Model(unet)), [False])
    assert vmix_hooks(unet) == 0
    unet_call(unet)


@pytest.mark.parametrize("args, words", [
    ([True, "../sd15_style", 1.0], "VMix adapter name '../sd15_style' must be a plain name from the adapter folder"),
    ([True, "/etc/passwd", 1.0], "must be a plain name from the adapter folder"),
    ([True, "nope", 1.0], "VMix adapter 'nope' is not installed in"),
    ([True, "sd15_style", 7.0], "VMix argument strength must be from 0 to 3, got 7.0."),
    ([{"adapter": "sd15_style", "strength": 1, "colour": 1}], "VMix argument 'colour' is not known"),
    ([{"adapter": "sd15_style", "dimensions": {"mood": 1}}], "VMix dimensions: unknown aesthetic dimension 'mood'"),
    ([True, "sd15_style", 1.0] + [1.0] * 8 + [0, 1, True, "IN3:1"], "VMix block weights: IN3 has no cross-attention"),
])
@pytest.mark.parametrize("is_api", [True, False])
def test_invalid_arguments_stop_the_job_with_one_sentence(library, meta_models, args, words, is_api):
    unet = meta_models["sd15"]
    runner, host, p = run(library, A1111Model(unet), args, is_api=is_api)
    # a UI job is interrupted before sampling, with the sentence as a comment; an API job is not
    assert host.state.interrupted is not is_api and p.do_not_save_grid is not is_api
    with pytest.raises(VMixError) as e:  # the API's stop; for the UI, should anything sample anyway
        unet_call(unet)
    assert words in str(e.value) and "\n" not in str(e.value)
    assert host.warnings == [f"{e.value} The job is stopped."]
    assert p.comments == ({} if is_api else {f"{e.value} The job is stopped.": 1})
    # what the WebUI's API turns an exception into (handle_exception reads these attributes)
    assert vars(e.value).get("status_code", 500) == 422 and vars(e.value).get("detail") == str(e.value)
    assert sum(len(m._forward_hooks) for m in unet.modules()) == 0  # never a half-applied hook
    runner.shutdown()
    assert vmix_hooks(unet) == 0


def test_a_failed_xyz_cell_leaves_nothing_for_the_next_cells(library, meta_models):
    unet = meta_models["sd15"]
    model = A1111Model(unet)
    host = TestHost(model)
    runner = VMixRunner(host, library)
    cell = P(model, vmix_overrides={"adapter": "missing"})
    runner.process(cell, [False])  # the override switches VMix on for the cell
    runner.before_sampling(cell)
    with pytest.raises(VMixError):
        unet_call(unet)  # xyz_grid catches this per cell; postprocess is skipped
    for overrides in ({"enabled": False}, {}):
        nxt = P(model, vmix_overrides=overrides)
        runner.process(nxt, [False])
        runner.before_sampling(nxt)
        assert vmix_hooks(unet) == 0
        unet_call(unet)
        runner.postprocess(nxt)


def test_no_adapter_installed_skips_and_says_where(tmp_path, meta_models):
    library = AdapterLibrary(lambda: str(tmp_path))
    runner, host, p = run(library, A1111Model(meta_models["sd15"]), [True, None, 1.0])
    assert p.extra_generation_params["VMix"].startswith(f"skipped (no VMix adapter is installed in {tmp_path}")
    assert "No official VMix weights were ever released" in host.warnings[0]


def test_malformed_file_skips_with_the_files_problem(library, meta_models):
    runner, host, p = run(library, A1111Model(meta_models["sd15"]), [True, "broken", 1.0])
    assert p.extra_generation_params["VMix"].startswith("skipped (VMix adapter 'broken.safetensors' ")
    assert p.extra_generation_params["VMix adapter"] == "broken"
    assert len(host.warnings) == 1


def test_dict_without_adapter_uses_the_first_readable_adapter(library, meta_models):
    runner, host, p = run(library, A1111Model(meta_models["sd15"]), [{"strength": 0.5}])
    # "broken" sorts first but is no adapter (found in the real A1111 with a LoRA in models/VMix)
    assert p.extra_generation_params["VMix"] == "True"
    assert p.extra_generation_params["VMix adapter"].startswith("sd15_style (")
    runner.postprocess(p)
    runner, host, p = run(AdapterLibrary(lambda: library.folder() + "_none"), A1111Model(meta_models["sd15"]), [{}])
    assert p.extra_generation_params["VMix"].startswith("skipped (no VMix adapter is installed")


def test_process_never_raises_into_the_webui(library):
    class Broken:
        @property
        def model(self):
            raise RuntimeError("model unloaded")

    runner, host, p = run(library, Broken(), ON)
    assert p.extra_generation_params["VMix"].startswith("skipped (unexpected error RuntimeError: model unloaded")


@pytest.mark.parametrize("webui", ["a1111", "forge"])
def test_end_to_end_with_a_real_adapter_file(library, folder, webui):
    """The value a hooked to_v returns is to_v(context) + λ·V_a with V_a from the file."""
    torch.manual_seed(0)
    unet = make_unet(LAYOUTS["sd15"])  # real widths; only one to_v is called
    model = A1111Model(unet) if webui == "a1111" else ForgeModel(unet)
    runner, host, p = run(library, model, [{"adapter": "sd15_style", "strength": 0.75, "dimensions": {"color": 0.5}}])
    assert p.extra_generation_params["VMix"] == "True" and host.warnings == []
    adapter = load_adapter(str(folder / "sd15_style.safetensors"))
    f_a = adapter.aesthetic_context(adapter.aesthetic_input({"color": 0.5}))
    name = "output_blocks.8.1.transformer_blocks.0.attn2"
    to_v = unet.output_blocks[8][1].transformer_blocks[0].attn2.to_v
    context = torch.randn(2, 154, 768)  # a long prompt: two 77-token chunks
    expected = torch.nn.functional.linear(context, to_v.weight) + 0.75 * adapter.aesthetic_values(name, f_a).repeat(1, 2, 1)
    assert torch.allclose(to_v(context), expected, atol=1e-5)
    runner.postprocess(p)
    assert torch.equal(to_v(context), torch.nn.functional.linear(context, to_v.weight))


class StarletteLikeHTTPException(Exception):
    """What fastapi.HTTPException is in the WebUI (starlette: status_code, detail, headers; newer
    versions format str() as "status: detail")."""

    def __init__(self, status_code, detail=None, headers=None):
        self.status_code, self.detail, self.headers = status_code, detail, headers

    def __str__(self):
        return f"{self.status_code}: {self.detail}"


def webui_handle_exception(e):
    """A1111 1.10.1 / Forge modules/api/api.py handle_exception: (response, printed a traceback?)."""
    err = {"error": type(e).__name__, "detail": vars(e).get("detail", ""), "body": vars(e).get("body", ""),
           "errors": str(e)}
    return vars(e).get("status_code", 500), err, not isinstance(e, StarletteLikeHTTPException)


def test_a_stopped_api_job_is_a_422_without_a_console_traceback(library, meta_models, monkeypatch):
    # Found in the real A1111: a plain exception makes handle_exception print a traceback with all
    # locals for every bad request; the host's stop error is also the API's HTTPException.
    from vmix_lib.webui import host as webui_host

    monkeypatch.setattr(webui_host, "_api_error_class", [webui_host.api_error_class(StarletteLikeHTTPException)])

    class Host(TestHost):
        stop_error = webui_host.WebUIHost.stop_error

    unet = meta_models["sd15"]
    runner = VMixRunner(Host(A1111Model(unet)), library)
    p = P(A1111Model(unet), is_api=True)
    runner.process(p, [True, "../sd15_style", 1.0])
    runner.before_sampling(p)
    with pytest.raises(VMixError) as e:
        unet_call(unet)
    status, err, traceback_printed = webui_handle_exception(e.value)
    sentence = "VMix adapter name '../sd15_style' must be a plain name from the adapter folder, without folders or path separators."
    assert (status, err, traceback_printed) == (422, {"error": "VMixError", "detail": sentence, "body": "",
                                                      "errors": sentence}, False)
    runner.shutdown()


def test_without_the_api_class_the_plain_error_still_stops_the_job():
    from vmix_lib.webui import host as webui_host

    assert webui_host.api_error_class(None) is VMixError
    error = VMixError("VMix argument strength must be from 0 to 3, got 7.")
    assert (str(error), error.status_code, error.detail) == (error.detail, 422, error.detail)


def test_a_malformed_file_with_the_stop_setting_names_vmix_once(library, meta_models):
    unet = meta_models["sd15"]
    runner, host, p = run(library, A1111Model(unet), [True, "broken", 1.0], RunnerOptions(on_mismatch=ON_MISMATCH_STOP))
    with pytest.raises(VMixError) as e:
        unet_call(unet)
    assert str(e.value).startswith("VMix adapter 'broken.safetensors' ")
    assert "the job was stopped because Settings > VMix is set to stop" in str(e.value)
    runner.shutdown()


def test_api_errors_name_the_folder_relative_to_the_webui_and_the_console_keeps_the_full_path(folder, meta_models):
    library = AdapterLibrary(lambda: str(folder), shown=lambda path: "models/VMix")
    unet = meta_models["sd15"]
    runner, host, p = run(library, A1111Model(unet), [True, "nope", 1.0])
    with pytest.raises(VMixError) as e:
        unet_call(unet)
    assert str(e.value) == "VMix adapter 'nope' is not installed in models/VMix; installed adapters: broken, sd15_style."
    assert host.warnings == [f"VMix adapter 'nope' is not installed in {folder}; installed adapters: broken, "
                             "sd15_style. The job is stopped."]
    runner.shutdown()
    empty = folder.parent / (folder.name + "_empty")
    empty.mkdir()
    library = AdapterLibrary(lambda: str(empty), shown=lambda path: "models/VMix")
    runner, host, p = run(library, A1111Model(unet), [True, None, 1.0])
    assert p.extra_generation_params["VMix"].startswith("skipped (no VMix adapter is installed in models/VMix;")
    assert host.warnings[0].startswith(f"VMix skipped: no VMix adapter is installed in {empty};")
    runner.shutdown()


def test_the_next_generation_reuses_v_a_unless_adapter_or_alpha_change(library, meta_models, monkeypatch):
    from vmix_lib import hook

    made = []
    original = hook.AestheticValues.for_alphas.__func__
    monkeypatch.setattr(hook.AestheticValues, "for_alphas",
                        classmethod(lambda cls, adapter, alphas=None: made.append(alphas) or original(cls, adapter, alphas)))
    unet = meta_models["sd15"]
    host = TestHost(A1111Model(unet))
    runner = VMixRunner(host, library)
    alphas = [1.0, 0.5, 1, 1, 1, 1, 1, 1]
    values = []
    for strength, blocks, slots in ((1.0, "", alphas), (2.0, "", alphas), (0.5, "OUT:0", alphas),
                                    (1.0, "", [1.0] * 8), (1.5, "", [1.0] * 8)):
        p = P(A1111Model(unet))
        runner.process(p, [True, "sd15_style", strength, *slots, 0.0, 1.0, True, blocks])
        runner.before_sampling(p)
        values.append(runner.controller.current.mixer.values)
        runner.postprocess(p)
    assert values[0] is values[1] is values[2] and values[3] is values[4] and values[2] is not values[3]
    assert len(made) == 2  # λ and block weights changed without a new V_a; an α change made one


BAD_BLOCKS = [True, "sd15_style", 1.0] + [1.0] * 8 + [0.0, 1.0, True, "IN:9"]
BAD_BLOCKS_SENTENCE = ("VMix block weights: 'IN:9' needs a weight from 0 to 2; write e.g. IN:1, MID:0.5, OUT:1 "
                       "(see the README for block and layer numbers).")


@pytest.mark.parametrize("webui", ["a1111", "forge"])
@pytest.mark.parametrize("args, sentence, options", [
    (BAD_BLOCKS, f"{BAD_BLOCKS_SENTENCE} The job is stopped.", RunnerOptions()),
    ([True, "broken", 1.0], None, RunnerOptions(on_mismatch=ON_MISMATCH_STOP)),
])
def test_a_job_stopped_from_the_ui_prints_one_console_line_and_shows_the_sentence(
        library, meta_models, webui, args, sentence, options):
    """Issue 21: bad block weights from the UI printed a ~70-line traceback (the UI's job wrapper
    prints any exception) while the API printed one line.  Now a UI job stops before sampling, as
    Interrupt would: the console has VMix's one line, the page shows the sentence under the infotext."""
    unet = meta_models["sd15"]
    model = A1111Model(unet) if webui == "a1111" else ForgeModel(unet)
    host = TestHost(model)
    runner = VMixRunner(host, library, lambda: options)
    p = P(model, script_args=args, n_iter=2)
    calls = unet.calls
    outputs, printed = ui_job(webui, host.state, lambda: process_images(p, runner, host.state, lambda: unet_call(unet)))
    if sentence is None:  # a malformed file with the stop setting: the file's own sentence
        assert len(host.warnings) == 1 and host.warnings[0].startswith("VMix adapter 'broken.safetensors' ")
        sentence = host.warnings[0]
    assert host.warnings + printed == [sentence]  # the console: VMix's line, no traceback
    assert outputs == [[], plaintext_to_html(f"{sentence}\n", classname="comments")]
    assert unet.calls == calls  # nothing was sampled, so no image and no grid (p.do_not_save_grid)
    assert p.do_not_save_grid is True and "VMix" not in p.extra_generation_params
    assert host.state.interrupted is False  # the UI's wrapper resets it for the next job
    assert vmix_hooks(unet) == 0  # postprocess ran
    # the next job runs
    host.begin_job("20250101000400")
    nxt = P(model, script_args=[True, "sd15_style", 1.0])
    outputs, printed = ui_job(webui, host.state, lambda: process_images(nxt, runner, host.state, lambda: unet_call(unet)))
    assert (len(outputs[0]), printed, len(host.warnings)) == (1, [], 1)
    assert nxt.extra_generation_params["VMix"] == "True"


def test_the_same_stop_from_the_api_is_a_422_and_the_same_one_line(library, meta_models, monkeypatch):
    from vmix_lib.webui import host as webui_host

    monkeypatch.setattr(webui_host, "_api_error_class", [webui_host.api_error_class(StarletteLikeHTTPException)])

    class Host(TestHost):
        stop_error = webui_host.WebUIHost.stop_error

    unet = meta_models["sd15"]
    host = Host(A1111Model(unet))
    runner = VMixRunner(host, library)
    p = P(A1111Model(unet), script_args=BAD_BLOCKS, is_api=True)  # modules/api/api.py:469
    with pytest.raises(VMixError) as e:  # process_images raises out of text2imgapi to handle_exception
        process_images(p, runner, host.state, lambda: unet_call(unet))
    status, err, traceback_printed = webui_handle_exception(e.value)
    assert (status, err["detail"], traceback_printed) == (422, BAD_BLOCKS_SENTENCE, False)
    assert host.warnings == [f"{BAD_BLOCKS_SENTENCE} The job is stopped."]
    assert host.state.interrupted is False and p.comments == {}
    runner.shutdown()
