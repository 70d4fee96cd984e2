"""The VMix lifecycle in AUTOMATIC1111: hooks per generation, row layouts, step range, a job that
raises, a refiner swapping the model, script unload.  Real torch modules with the WebUI's attn2
names (tiny widths); the glue is driven through VMixRunner like scripts/vmix.py does."""
import pytest
import torch

from test_webui_fakes import (  # noqa: F401  (single_thread: autouse fixture)
    single_thread,
    QUERY_DIM, TINY_CONTEXT, A1111Model, P, TestHost, a1111_denoise, make_adapter, make_unet, placeholder_library,
    tiny_layout, value_hook_count,
)
from vmix_lib.hook import ValueMixer
from vmix_lib.layers import find_cross_attention_layers
from vmix_lib.webui.lifecycle import PRE_HOOK_MARK
from vmix_lib.webui.runner import VMixRunner

LAYOUT = tiny_layout()


def vmix_hook_count(unet):
    value = value_hook_count(unet)
    pre = sum(1 for fn in unet._forward_pre_hooks.values() if getattr(fn, PRE_HOOK_MARK, False))
    return value, pre


@pytest.fixture(scope="module")
def adapter():
    return make_adapter(LAYOUT)


@pytest.fixture
def library(tmp_path, adapter):
    return placeholder_library(tmp_path, adapter)


@pytest.fixture(scope="module")
def unet():
    return make_unet(LAYOUT)


@pytest.fixture
def setup(unet, library):
    model = A1111Model(unet)
    host = TestHost(model)
    runner = VMixRunner(host, library)
    yield runner, host, model
    runner.shutdown()
    assert vmix_hook_count(unet) == (0, 0)


def data(cond_rows=2, uncond_rows=2, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(cond_rows + uncond_rows, 4, QUERY_DIM)
    return x, torch.randn(cond_rows, 77, TINY_CONTEXT), torch.randn(uncond_rows, 77, TINY_CONTEXT)


def args(enabled=True, strength=1.0, start=0.0, end=1.0, uncond=True, block_weights=""):
    return [enabled, "tiny", strength] + [1.0] * 8 + [start, end, uncond, block_weights]


def generation(runner, model, a, **attrs):
    p = P(model, **attrs)
    runner.process(p, a)
    runner.before_sampling(p)
    return p


def test_off_installs_nothing_and_is_identical(setup, unet):
    runner, host, model = setup
    x, c, u = data()
    base = a1111_denoise(unet, x, c, u)
    p = generation(runner, model, args(enabled=False))
    assert vmix_hook_count(unet) == (0, 0)
    assert torch.equal(a1111_denoise(unet, x, c, u, callback=runner.on_cfg_denoiser), base)
    assert not [k for k in p.extra_generation_params if k.startswith("VMix")]


def test_on_changes_every_row_and_postprocess_restores_bit_identical(setup, unet):
    runner, host, model = setup
    x, c, u = data()
    base = a1111_denoise(unet, x, c, u)
    p = generation(runner, model, args())
    assert vmix_hook_count(unet) == (16, 0)
    out = a1111_denoise(unet, x, c, u, callback=runner.on_cfg_denoiser)
    assert all((out[i] - base[i]).abs().max() > 1e-3 for i in range(4))
    runner.postprocess(p)
    assert vmix_hook_count(unet) == (0, 0)
    assert torch.equal(a1111_denoise(unet, x, c, u), base)


def test_strength_zero_is_bit_identical(setup, unet):
    runner, host, model = setup
    x, c, u = data()
    base = a1111_denoise(unet, x, c, u)
    generation(runner, model, args(strength=0.0))
    assert vmix_hook_count(unet) == (16, 0)
    assert torch.equal(a1111_denoise(unet, x, c, u, callback=runner.on_cfg_denoiser), base)


@pytest.mark.parametrize("layout", ["batched", "separate", "uneven"])
def test_uncond_off_leaves_uncond_rows_bit_identical_in_every_layout(setup, unet, layout):
    runner, host, model = setup
    x, c, u = data()
    base = a1111_denoise(unet, x, c, u, layout)
    p = generation(runner, model, args(uncond=True))
    both = a1111_denoise(unet, x, c, u, layout, callback=runner.on_cfg_denoiser)
    runner.postprocess(p)
    p = generation(runner, model, args(uncond=False))
    assert vmix_hook_count(unet) == (16, 1)  # the pre-hook counts rows
    out = a1111_denoise(unet, x, c, u, layout, callback=runner.on_cfg_denoiser)
    assert torch.equal(out[2:], base[2:])  # uncond rows untouched
    assert torch.allclose(out[:2], both[:2], atol=1e-6) and (out[:2] - base[:2]).abs().max() > 1e-3


def test_and_prompts_with_chunks_straddling_cond_and_uncond(setup, unet):
    """Batch 2, AND-prompt repeats [2, 1] -> 3 cond rows + 2 uncond rows; batch_cond_uncond off
    runs chunks of 2 rows: [c, c], [c, u], [u]."""
    runner, host, model = setup
    x, c, u = data(cond_rows=3, uncond_rows=2)
    base = a1111_denoise(unet, x, c, u, "separate", batch=2)
    generation(runner, model, args(uncond=False))
    out = a1111_denoise(unet, x, c, u, "separate", callback=runner.on_cfg_denoiser, batch=2)
    assert torch.equal(out[3:], base[3:])
    assert all((out[i] - base[i]).abs().max() > 1e-3 for i in range(3))


def test_skip_early_cond_drops_uncond_rows(setup, unet):
    runner, host, model = setup
    x, c, u = data()
    base = unet(x[:2], context=c)
    generation(runner, model, args(uncond=False))
    runner.on_cfg_denoiser(__import__("test_webui_fakes").cfg_params(4, c, u))  # x_in before the uncond rows are cut
    out = unet(x[:2], context=c)
    assert (out - base).abs().amax(dim=(1, 2)).min() > 1e-3


def test_a_second_denoiser_call_restarts_the_row_count(setup, unet):
    runner, host, model = setup
    x, c, u = data()
    base = a1111_denoise(unet, x, c, u, "uneven")
    generation(runner, model, args(uncond=False))
    for step in range(3):
        out = a1111_denoise(unet, x, c, u, "uneven", callback=runner.on_cfg_denoiser, step=step)
        assert torch.equal(out[2:], base[2:]) and (out[:2] - base[:2]).abs().max() > 1e-3


@pytest.mark.parametrize("start, end, on_steps", [(0.5, 1.0, {5, 6, 9}), (0.0, 0.5, {0, 2, 3, 4}), (0.2, 0.3, {2})])
def test_start_end_range_by_denoiser_step(setup, unet, start, end, on_steps):
    runner, host, model = setup
    x, c, u = data()
    base = a1111_denoise(unet, x, c, u)
    generation(runner, model, args(start=start, end=end))
    for step in (0, 2, 3, 4, 5, 6, 9):
        out = a1111_denoise(unet, x, c, u, callback=runner.on_cfg_denoiser, step=step, total=10)
        assert torch.equal(out, base) == (step not in on_steps), step


def test_hooks_are_installed_once_however_often_asked(setup, unet):
    """process_batch, before_hr and process_before_every_sampling all ask (hires, batch count > 1)."""
    runner, host, model = setup
    p = generation(runner, model, args(uncond=False))
    mixer = runner.controller.current.mixer
    handles = list(mixer._handles)
    for _ in range(4):
        runner.before_sampling(p)
    assert vmix_hook_count(unet) == (16, 1) and mixer._handles == handles


def test_vmix_stays_on_while_the_webui_relabels_the_job(setup, unet):
    """A1111 sets state.job to "Batch 2 out of 4", X/Y/Z cell and batch-img2img counters mid-job."""
    runner, host, model = setup
    x, c, u = data()
    base = a1111_denoise(unet, x, c, u)
    generation(runner, model, args())
    for label in ("Batch 2 out of 4", "3 out of 9", "Batch 4 out of 4"):
        host.state.job = label
        out = a1111_denoise(unet, x, c, u, callback=runner.on_cfg_denoiser)
        assert (out - base).abs().max() > 1e-3, label


def test_a_job_that_raised_leaves_inert_hooks_and_the_next_job_removes_them(setup, unet):
    runner, host, model = setup
    x, c, u = data()
    base = a1111_denoise(unet, x, c, u)
    generation(runner, model, args(uncond=False))
    a1111_denoise(unet, x, c, u, callback=runner.on_cfg_denoiser)
    # an exception in the UNet: A1111 skips postprocess; the job ends (state.end()) and its key changes
    host.end_job()
    assert vmix_hook_count(unet) == (16, 1)
    assert torch.equal(a1111_denoise(unet, x, c, u), base)  # left over, but inert
    host.begin_job("20250101000100")
    assert torch.equal(a1111_denoise(unet, x, c, u), base)  # inert in another job too
    generation(runner, model, args(enabled=False))
    assert vmix_hook_count(unet) == (0, 0)
    assert torch.equal(a1111_denoise(unet, x, c, u, callback=runner.on_cfg_denoiser), base)


def test_next_generation_in_the_same_job_cleans_up_a_failed_one(setup, unet):
    """X/Y/Z: a cell raised (same WebUI job), the next cell has VMix off."""
    runner, host, model = setup
    x, c, u = data()
    base = a1111_denoise(unet, x, c, u)
    generation(runner, model, args())
    generation(runner, model, args(enabled=False))
    assert vmix_hook_count(unet) == (0, 0)
    assert torch.equal(a1111_denoise(unet, x, c, u, callback=runner.on_cfg_denoiser), base)


def test_hooks_of_an_earlier_script_instance_are_removed(unet, library, adapter):
    """"Reload UI" makes a new script; hooks its predecessor left (no postprocess) must go."""
    model = A1111Model(unet)
    old = VMixRunner(TestHost(model), library)
    generation(old, model, args(uncond=False))
    orphan = ValueMixer(adapter)  # and a mixer nobody tracks any more
    orphan.install(unet)
    new = VMixRunner(TestHost(model), library)
    generation(new, model, args(enabled=False))
    assert vmix_hook_count(unet) == (0, 0)
    new.shutdown()


def test_script_unload_removes_everything(setup, unet):
    runner, host, model = setup
    generation(runner, model, args(uncond=False))
    runner.shutdown()
    assert vmix_hook_count(unet) == (0, 0) and runner.controller.current is None


def test_refiner_switch_follows_the_new_model(setup, unet, adapter):
    runner, host, model = setup
    x, c, u = data()
    refiner = make_unet(LAYOUT, seed=5)
    refiner_base = a1111_denoise(refiner, x, c, u)
    p = generation(runner, model, args())
    a1111_denoise(unet, x, c, u, callback=runner.on_cfg_denoiser, step=0)
    host.model = A1111Model(refiner)  # the refiner is loaded inside CFGDenoiser.forward
    out = a1111_denoise(refiner, x, c, u, callback=runner.on_cfg_denoiser, step=5)
    assert vmix_hook_count(unet) == (0, 0) and vmix_hook_count(refiner) == (16, 0)
    assert (out - refiner_base).abs().max() > 1e-3
    runner.postprocess(p)
    assert vmix_hook_count(refiner) == (0, 0)
    assert torch.equal(a1111_denoise(refiner, x, c, u), refiner_base)


def test_refiner_of_another_family_is_skipped_with_a_note(setup, unet):
    runner, host, model = setup
    x, c, u = data()
    other = make_unet(tiny_layout("sdxl"), seed=6)  # e.g. an SD1.5 adapter and an SDXL refiner
    other_base = a1111_denoise(other, x, c, u)
    p = generation(runner, model, args())
    host.model = A1111Model(other)
    out = a1111_denoise(other, x, c, u, callback=runner.on_cfg_denoiser, step=5)
    assert torch.equal(out, other_base)
    note = p.extra_generation_params["VMix note"]
    assert note.startswith("not applied after a model switch in this job: this SD1.5 adapter does not fit the loaded model")
    assert len(host.warnings) == 1 and host.warnings[0] == f"VMix {note}"
    a1111_denoise(other, x, c, u, callback=runner.on_cfg_denoiser, step=6)
    assert len(host.warnings) == 1  # said once
    # the next batch reloads the base model: VMix applies again
    host.model = model
    runner.before_sampling(p)
    assert vmix_hook_count(unet) == (16, 0)


def test_block_weights_scale_layers(setup, unet, adapter):
    runner, host, model = setup
    generation(runner, model, args(block_weights="ALL:0, MID:1"))
    mixer = runner.controller.current.mixer
    assert mixer.layer_strengths == {name: 0.0 for name in adapter.layer_names if not name.startswith("middle_block")}


def test_reload_ui_reports_what_it_removed(setup, unet, library):
    # A job stopped by a bad argument raises at its first UNet call, so postprocess never runs and
    # its UNet pre-hook stays until the next job or "Reload UI" (what the browser check observes).
    from vmix_lib.webui.app import unload_report
    from vmix_lib.webui.lifecycle import VMixError

    runner, host, model = setup
    generation(runner, model, args(block_weights="IN:9"))
    with pytest.raises(VMixError):
        a1111_denoise(unet, *data())
    assert vmix_hook_count(unet) == (0, 1)
    assert runner.shutdown() == (1, 0) and vmix_hook_count(unet) == (0, 0)
    assert runner.shutdown() == (0, 0)
    assert unload_report(1, 0) == "[VMix] Reload UI: removed 1 VMix hook(s); nothing of VMix is left on the loaded model."
    generation(runner, model, args())  # a hooked generation that never ended
    assert vmix_hook_count(unet)[0] == len(find_cross_attention_layers(unet))
    assert runner.shutdown() == (len(find_cross_attention_layers(unet)), 0)


def _replace_attention_without_to_v(unet, count):
    """What an attention patcher that bypasses VMix does: its own forward for attn2, using to_v's
    weight but never calling the module (so no forward hook on to_v runs)."""
    import torch.nn.functional as F

    from test_webui_fakes import attention

    replaced = []
    for info in find_cross_attention_layers(unet)[:count]:
        module = info.module

        def forward(x, context=None, value=None, module=module, **kwargs):
            v = F.linear(value if value is not None else context, module.to_v.weight)
            return module.to_out(attention(module.to_q(x), module.to_k(context), v, module.heads))

        module.forward = forward
        replaced.append(info.name)
    return replaced


@pytest.mark.parametrize("replaced_layers", [0, 2, 16])
def test_attention_replaced_without_to_v_is_named_in_the_infotext_not_silent(library, replaced_layers):
    unet = make_unet(LAYOUT)  # its own: the forwards are replaced
    names = _replace_attention_without_to_v(unet, replaced_layers)
    host = TestHost(A1111Model(unet))
    runner = VMixRunner(host, library)
    x, c, u = data()
    try:
        p = generation(runner, host.model, args())
        a1111_denoise(unet, x, c, u, callback=runner.on_cfg_denoiser)
        runner.after_batch(p)
        note = p.extra_generation_params.get("VMix note")
        if replaced_layers:
            expected = (f"did not act on {replaced_layers} of 16 cross-attention layers (first: {names[0]}): their value "
                        f"projection attn2.to_v was never called while sampling, so another extension replaced that "
                        f"attention; VMix cannot work together with it")
            assert note == expected and host.warnings == ["VMix " + expected]
        else:
            assert note is None and host.warnings == []
        runner.postprocess(p)
        # λ = 0 changes nothing anyway, and a job that never sampled made no claim: no note
        for a, sample in ((args(strength=0.0), True), (args(), False)):
            p = generation(runner, host.model, a)
            if sample:
                a1111_denoise(unet, x, c, u, callback=runner.on_cfg_denoiser)
            runner.after_batch(p)
            assert "VMix note" not in p.extra_generation_params
            runner.postprocess(p)
    finally:
        runner.shutdown()
    assert vmix_hook_count(unet) == (0, 0)
