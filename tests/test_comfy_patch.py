"""Apply VMix on a comfy-shaped model: clones, per-call arming, independence of graph branches,
λ = 0, the schedule range, the negative prompt's rows, IP-Adapter replace patches, torch.compile,
wrong families, chained nodes, errors mid-run.  The same numbers as the WebUI hook."""
import logging

import pytest
import torch

from test_comfy_fakes import (  # noqa: F401  (single_thread: autouse fixture)
    DIFFUSION_MODEL, OUTER_SAMPLE, comfy_model, data, direct_call, make_comfy_unet, sample, single_thread,
    torch_compile_node,
)
from test_webui_fakes import LAYOUTS, TINY_HEADS, attention, make_adapter, make_unet, tiny_layout, value_hook_count
from vmix_lib.comfy.patch import (
    COMPILED_REASON, KEY, ApplySettings, LoadedAdapter, VMixPatch, apply_vmix, cond_row_factors,
)
from vmix_lib.dimensions import DEFAULT_DIMENSIONS
from vmix_lib.hook import ValueMixer
from vmix_lib.mixing import VMixAdapter

LAYOUT = tiny_layout()


@pytest.fixture(scope="module")
def adapter():
    return make_adapter(LAYOUT)


@pytest.fixture(scope="module")
def other_adapter():
    return make_adapter(LAYOUT, seed=5)


@pytest.fixture
def model():
    return comfy_model(make_comfy_unet(LAYOUT))


def loaded(adapter, name="tiny.safetensors"):
    return LoadedAdapter(adapter, name)


def settings(strength=1.0, **kw):
    return ApplySettings(strength=strength, **kw)


def unet_of(patcher):
    return patcher.model.diffusion_model


def one_sentence(message: str) -> bool:
    body = message.rstrip(".")
    return message.endswith(".") and "\n" not in message and ". " not in body


# ---------------------------------------------------------------- clones and the invariants


def test_patch_goes_on_a_clone_and_nothing_stays_on_the_shared_model(model, adapter):
    x, c, u = data()
    base = sample(model, x, [c, u])[0]
    patched = apply_vmix(model, loaded(adapter), settings())
    assert patched is not model and patched.model is model.model
    assert model.wrappers == {} and model.model_options == {"transformer_options": {}}
    assert VMixPatch.of(patched) is not None and VMixPatch.of(model) is None
    assert value_hook_count(unet_of(model)) == 0  # nothing hooked until a sampling run
    out = sample(patched, x, [c, u])[0]
    assert (out - base).abs().max() > 1e-3
    assert value_hook_count(unet_of(model)) == 0  # removed when the run ended
    assert torch.equal(sample(model, x, [c, u])[0], base)  # the input model: bit for bit


def test_strength_zero_returns_the_model_itself(model, adapter):
    x, c, u = data()
    base = sample(model, x, [c, u])[0]
    assert apply_vmix(model, loaded(adapter), settings(0.0)) is model
    assert apply_vmix(model, loaded(adapter), settings(block_weights="ALL:0")) is model
    # and the hook path at λ = 0 changes nothing either (the core's invariant, through the wrappers)
    patched = apply_vmix(model, loaded(adapter), settings(1.0))
    VMixPatch.of(patched).mixer.strength = 0.0
    assert torch.equal(sample(patched, x, [c, u])[0], base)


def test_same_numbers_as_the_webui_hook(model, adapter):
    """The ComfyUI path adds exactly what the WebUIs' hook adds (same core, same V_a)."""
    x, c, u = data()
    patched = apply_vmix(model, loaded(adapter), settings(1.3, alphas=(1.0, 0.5, 0.0)))
    comfy = sample(patched, x, [c, u])[0]
    mixer = ValueMixer(adapter, 1.3, alphas={"color": 1.0, "lighting": 0.5, "composition": 0.0})
    with mixer.applied(unet_of(model)):
        webui = unet_of(model)(x, context=torch.cat([c, u]))
    assert torch.equal(comfy, webui)


def test_two_branches_on_shared_modules_stay_independent(model, adapter, other_adapter):
    """Two Apply VMix nodes on two branches of one graph, and the plain model beside them."""
    x, c, u = data()
    base = sample(model, x, [c, u])[0]
    a = apply_vmix(model, loaded(adapter), settings(1.0))
    b = apply_vmix(model, loaded(other_adapter, "other.safetensors"), settings(2.0, uncond=False))
    alone_a = sample(a, x, [c, u])[0]
    alone_b = sample(b, x, [c, u])[0]
    assert not torch.equal(alone_a, alone_b)
    for _ in range(2):  # any order, repeatedly: each branch gets its own result
        assert torch.equal(sample(b, x, [c, u])[0], alone_b)
        assert torch.equal(sample(model, x, [c, u])[0], base)
        assert torch.equal(sample(a, x, [c, u])[0], alone_a)
    # interleaved at the level of single UNet calls, too (no sampling run around them)
    assert torch.equal(direct_call(a, x, [c, u]), alone_a)
    assert torch.equal(direct_call(model, x, [c, u]), base)
    assert torch.equal(direct_call(b, x, [c, u]), alone_b)
    assert value_hook_count(unet_of(model)) == 0


def test_a_nested_call_of_another_branch_does_not_see_this_branch(model, adapter):
    """While branch A samples, a UNet call of the plain model (another node) gets no VMix."""
    x, c, u = data()
    base = direct_call(model, x, [c, u])
    patched = apply_vmix(model, loaded(adapter), settings())
    seen = []

    def spy(executor, *args, **kwargs):
        seen.append(torch.equal(direct_call(model, x, [c, u]), base))  # hooks installed, but A is not armed
        return executor(*args, **kwargs)

    patched.add_wrapper_with_key(OUTER_SAMPLE, "spy", spy)
    sample(patched, x, [c, u])
    assert seen == [True]


def test_models_derived_after_apply_keep_vmix(model, adapter):
    """A LoRA loader (or any patch) after Apply VMix clones the patched model: VMix comes along."""
    x, c, u = data()
    patched = apply_vmix(model, loaded(adapter), settings())
    derived = patched.clone()
    derived.set_model_attn2_patch(lambda n, context, value, extra: (n, context, value))
    assert torch.equal(sample(derived, x, [c, u])[0], sample(patched, x, [c, u])[0])


def test_a_second_apply_on_the_same_model_replaces_the_first(model, adapter, other_adapter, caplog):
    x, c, u = data()
    first = apply_vmix(model, loaded(adapter), settings(1.0))
    with caplog.at_level(logging.WARNING, logger="vmix"):
        second = apply_vmix(first, loaded(other_adapter, "other.safetensors"), settings(2.0))
    assert "replaces the VMix applied earlier" in caplog.text
    assert len(second.get_wrappers(DIFFUSION_MODEL, KEY)) == 1 and len(second.get_wrappers(OUTER_SAMPLE, KEY)) == 1
    direct = apply_vmix(model, loaded(other_adapter, "other.safetensors"), settings(2.0))
    assert torch.equal(sample(second, x, [c, u])[0], sample(direct, x, [c, u])[0])
    off = apply_vmix(first, loaded(adapter), settings(0.0))  # λ = 0 after a VMix: VMix off on that branch
    assert off is not first and VMixPatch.of(off) is None
    assert torch.equal(sample(off, x, [c, u])[0], sample(model, x, [c, u])[0])


# ---------------------------------------------------------------- per-call facts


@pytest.mark.parametrize("order", [(1, 0), (0, 1)])
def test_uncond_off_leaves_the_negative_rows_alone(model, adapter, order):
    x, c, u = data()
    contexts = [u if kind == 1 else c for kind in order]
    base = sample(model, x, contexts, order)[0]
    out = sample(apply_vmix(model, loaded(adapter), settings(uncond=False)), x, contexts, order)[0]
    for chunk, kind in enumerate(order):
        rows = slice(2 * chunk, 2 * chunk + 2)
        assert torch.equal(out[rows], base[rows]) == (kind == 1)
    both = sample(apply_vmix(model, loaded(adapter), settings(uncond=True)), x, contexts, order)[0]
    assert all(not torch.equal(both[r], base[r]) for r in (slice(0, 2), slice(2, 4)))


def test_cond_row_factors():
    assert cond_row_factors([0, 1], 4) == (1.0, 1.0, 0.0, 0.0)
    assert cond_row_factors([1, 0], 2) == (0.0, 1.0)
    assert cond_row_factors([0], 3) is None  # CFG 1: only positive rows
    assert cond_row_factors([0, 1], 3) is None and cond_row_factors(None, 4) is None


def test_start_end_is_a_sigma_window_from_percent_to_sigma(model, adapter):
    x, c, u = data()
    sampling = model.model.model_sampling
    middle, late = sampling.percent_to_sigma(0.5), sampling.percent_to_sigma(0.9)
    cases = [(14.0, False), (middle * 1.01, False), (middle * 0.99, True), (late * 1.01, True), (late * 0.99, False)]
    sigmas = [sigma for sigma, _ in cases]
    base = sample(model, x, [c, u], sigmas=sigmas)
    out = sample(apply_vmix(model, loaded(adapter), settings(start=0.5, end=0.9)), x, [c, u], sigmas=sigmas)
    for (sigma, on), b, o in zip(cases, base, out):
        assert torch.equal(o, b) != on, sigma


def test_the_window_follows_the_model_sampling_of_the_sampled_model(model, adapter):
    """A ModelSampling node after Apply VMix changes the schedule: the run reads the sampled model's."""
    x, c, u = data()
    patched = apply_vmix(model, loaded(adapter), settings(start=0.5))
    shifted = patched.clone()
    shifted.add_object_patch("model_sampling", type(model.model.model_sampling)(sigma_min=0.3, sigma_max=140.0))
    sigma = 2.0  # before the middle of the original schedule (0.66), after the middle of the shifted one (6.5)
    base = sample(model, x, [c, u], sigmas=[sigma])[0]
    assert torch.equal(sample(patched, x, [c, u], sigmas=[sigma])[0], base)
    assert not torch.equal(sample(shifted, x, [c, u], sigmas=[sigma])[0], base)


def test_block_weights_use_the_webui_syntax(model, adapter):
    x, c, u = data()
    out_only = apply_vmix(model, loaded(adapter), settings(block_weights="ALL:0, OUT:1"))
    mixer = VMixPatch.of(out_only).mixer
    assert set(mixer.layer_strengths) == {n for n in adapter.layer_names if not n.startswith("output_blocks")}
    with pytest.raises(ValueError, match="VMix block weights: 'XYZ' is not a block key"):
        apply_vmix(model, loaded(adapter), settings(block_weights="XYZ:1"))


# ---------------------------------------------------------------- beside other patches


def ip_adapter_like_replace(ip_k, ip_v, weight, seen):
    """An attn2 replace like IPAdapter_plus's Attn2Replace: base attention on the given q, k, v plus
    an image branch with its own keys and values."""
    def replace(q, k, v, extra_options):
        seen.append(v)
        rows = q.shape[0]
        return attention(q, k, v, TINY_HEADS) + weight * attention(q, ip_k.expand(rows, -1, -1), ip_v.expand(rows, -1, -1), TINY_HEADS)
    return replace


@pytest.mark.parametrize("vmix_first", [True, False])
def test_composes_with_ip_adapter_replace_patches(model, adapter, vmix_first):
    x, c, u = data()
    torch.manual_seed(9)
    ip_k, ip_v = torch.randn(1, 4, 16), torch.randn(1, 4, 16)
    seen = []

    def with_ip(patcher):
        m = patcher.clone()
        for name, number in [("input", 1), ("input", 2), ("input", 4), ("input", 5), ("input", 7), ("input", 8),
                             ("middle", 0)] + [("output", i) for i in range(3, 12)]:
            m.set_model_attn2_replace(ip_adapter_like_replace(ip_k, ip_v, 0.7, seen), name, number)
        return m

    ip_only = sample(with_ip(model), x, [c, u])[0]
    vmix_only = sample(apply_vmix(model, loaded(adapter), settings()), x, [c, u])[0]
    both_model = (with_ip(apply_vmix(model, loaded(adapter), settings())) if vmix_first
                  else apply_vmix(with_ip(model), loaded(adapter), settings()))
    seen.clear()
    both = sample(both_model, x, [c, u])[0]
    assert len(seen) == 16 and not torch.equal(both, ip_only) and not torch.equal(both, vmix_only)
    # the replace got v = to_v(context) + λ·V_a
    f_a = adapter.aesthetic_context(adapter.aesthetic_input(None))
    layer = unet_of(model).input_blocks[1][1].transformer_blocks[0].attn2
    expected = torch.nn.functional.linear(torch.cat([c, u]), layer.to_v.weight) + adapter.aesthetic_values(
        "input_blocks.1.1.transformer_blocks.0.attn2", f_a)
    assert torch.allclose(seen[0], expected, atol=1e-5)
    assert torch.equal(sample(with_ip(model), x, [c, u])[0], ip_only)  # bit for bit after


def test_torch_compile_is_refused_before_or_after(model, adapter):
    with pytest.raises(ValueError) as before:
        apply_vmix(torch_compile_node(model), loaded(adapter), settings())
    assert str(before.value) == COMPILED_REASON and one_sentence(COMPILED_REASON)
    x, c, u = data()
    compiled_after = torch_compile_node(apply_vmix(model, loaded(adapter), settings()))
    with pytest.raises(RuntimeError, match="torch.compile"):
        sample(compiled_after, x, [c, u])
    assert value_hook_count(unet_of(model)) == 0


def test_an_optimized_module_patched_in_is_refused(model, adapter):
    compiled = model.clone()
    fake = torch.nn.Module()
    fake._orig_mod = unet_of(model)  # what torch.compile(module) returns
    compiled.add_object_patch("diffusion_model", fake)
    with pytest.raises(ValueError, match="torch.compile"):
        apply_vmix(compiled, loaded(adapter), settings())


# ---------------------------------------------------------------- refusals and errors


def test_wrong_family_is_one_sentence():
    """A real-layout SD1.5 adapter on a real-layout SDXL UNet (meta tensors: shapes only)."""
    sdxl = comfy_model(make_unet(LAYOUTS["sdxl"], device="meta"))
    with torch.device("meta"):
        sd15_adapter = VMixAdapter(DEFAULT_DIMENSIONS, 768, {l.name: l.inner_dim for l in LAYOUTS["sd15"]}, "sd15")
    with pytest.raises(ValueError) as e:
        apply_vmix(sdxl, loaded(sd15_adapter, "my-sd15.safetensors"), settings())
    message = str(e.value)
    assert message == ("VMix adapter 'my-sd15.safetensors': this SD1.5 adapter does not fit the loaded model, "
                       "which is SDXL (70 cross-attention layers, width 2048).")
    assert one_sentence(message)


def test_a_model_without_unet_cross_attention_is_one_sentence(adapter):
    flux_like = comfy_model(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    with pytest.raises(ValueError) as e:
        apply_vmix(flux_like, loaded(adapter), settings())
    assert "without UNet cross-attention layers" in str(e.value) and one_sentence(str(e.value))


@pytest.mark.parametrize("kw, text", [
    (dict(start=0.6, end=0.5), "VMix start (0.6) must be below end (0.5)"),
    (dict(strength=3.5), "VMix strength must be from 0 to 3"),
    (dict(alphas=(1.0, 1.5)), "VMix alpha_2 must be from 0 to 1"),
])
def test_settings_errors_are_one_sentence(model, adapter, kw, text):
    with pytest.raises(ValueError) as e:
        apply_vmix(model, loaded(adapter), ApplySettings(**kw))
    assert str(e.value).startswith(text) and one_sentence(str(e.value))


def test_an_old_comfyui_without_wrappers_is_refused(adapter):
    class OldPatcher:
        def clone(self):
            return self

    with pytest.raises(ValueError, match="needs ComfyUI 0.3.10 or newer"):
        apply_vmix(OldPatcher(), loaded(adapter), settings())


def test_an_error_mid_run_leaves_nothing_behind(model, adapter):
    x, c, u = data()
    base = sample(model, x, [c, u])[0]
    patched = apply_vmix(model, loaded(adapter), settings())

    def interrupt(executor, *args, **kwargs):
        raise KeyboardInterrupt("interrupted")  # ComfyUI's InterruptProcessingException, in a callback

    patched.add_wrapper_with_key(DIFFUSION_MODEL, "zz-interrupt", interrupt)
    with pytest.raises(KeyboardInterrupt):
        sample(patched, x, [c, u])
    mixer = VMixPatch.of(patched).mixer
    assert value_hook_count(unet_of(model)) == 0 and not mixer.armed
    assert torch.equal(sample(model, x, [c, u])[0], base)


def test_a_call_outside_a_sampling_run_hooks_for_that_call_only(model, adapter):
    x, c, u = data()
    patched = apply_vmix(model, loaded(adapter), settings())
    assert torch.equal(direct_call(patched, x, [c, u]), sample(patched, x, [c, u])[0])
    assert value_hook_count(unet_of(model)) == 0


def test_the_patch_survives_a_deepcopy_of_the_options_as_itself(model, adapter):
    import copy

    patched = apply_vmix(model, loaded(adapter), settings())
    patch = VMixPatch.of(patched)
    assert copy.deepcopy(patched.get_wrappers(DIFFUSION_MODEL, KEY))[0].__self__ is patch


def test_v_a_is_shared_between_apply_nodes_with_the_same_alphas(model, adapter):
    source = loaded(adapter)
    a = VMixPatch.of(apply_vmix(model, source, settings(1.0)))
    b = VMixPatch.of(apply_vmix(model, source, settings(2.0, start=0.2)))
    c = VMixPatch.of(apply_vmix(model, source, settings(1.0, alphas=(0.5,))))
    assert a.mixer.values is b.mixer.values and c.mixer.values is not a.mixer.values


def test_composes_with_lora_weight_patches(model, adapter):
    """ComfyUI's LoRA loaders patch the to_v weights in place while their clone samples (and restore
    them after): VMix adds λ·V_a to whatever to_v computes, so the two add up."""
    x, c, u = data()
    layer = unet_of(model).input_blocks[1][1].transformer_blocks[0].attn2
    original = layer.to_v.weight.clone()
    seen = []
    patched = apply_vmix(model, loaded(adapter), settings(1.5)).clone()
    patched.set_model_attn2_replace(lambda q, k, v, extra: seen.append(v) or attention(q, k, v, TINY_HEADS), "input", 1)
    torch.manual_seed(3)
    delta = 0.1 * torch.randn_like(original)
    with torch.no_grad():
        layer.to_v.weight.add_(delta)  # what ModelPatcher.patch_model does for a LoRA on this key
        sample(patched, x, [c, u])
        layer.to_v.weight.copy_(original)  # unpatch_model
    f_a = adapter.aesthetic_context(adapter.aesthetic_input(None))
    expected = torch.nn.functional.linear(torch.cat([c, u]), original + delta) + 1.5 * adapter.aesthetic_values(
        "input_blocks.1.1.transformer_blocks.0.attn2", f_a)
    assert torch.allclose(seen[0], expected, atol=1e-5)
