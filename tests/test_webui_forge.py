"""VMix in Forge: the to_v hooks on the shared diffusion model plus a plain-function attn2_patch on
a clone of forge_objects.unet, composed with an IP-Adapter-style attn2 *replace* patch; per-call
cond_or_uncond and sigmas; the hires double call; removal; a refiner switch."""
import pytest
import torch

from test_webui_fakes import (  # noqa: F401  (single_thread: autouse fixture)
    single_thread,
    QUERY_DIM, TINY_CONTEXT, TINY_HEADS, ForgeModel, P, Predictor, TestHost, attention, forge_unet_call,
    make_adapter, make_unet, placeholder_library, tiny_layout, value_hook_count,
)
from vmix_lib.webui.lifecycle import has_forge_patch, vmix_attn2_patch
from vmix_lib.webui.runner import VMixRunner

LAYOUT = tiny_layout()


@pytest.fixture(scope="module")
def adapter():
    return make_adapter(LAYOUT)


@pytest.fixture
def setup(tmp_path, adapter):
    library = placeholder_library(tmp_path, adapter)
    unet = make_unet(LAYOUT)
    model = ForgeModel(unet)
    host = TestHost(model)
    runner = VMixRunner(host, library)
    yield runner, host, model, unet
    runner.shutdown()
    assert value_hook_count(unet) == 0


def data(seed=0):
    torch.manual_seed(seed)
    return torch.randn(4, 4, QUERY_DIM), torch.randn(2, 77, TINY_CONTEXT), torch.randn(2, 77, TINY_CONTEXT)


def args(strength=1.0, start=0.0, end=1.0, uncond=True):
    return [True, "tiny", strength] + [1.0] * 8 + [start, end, uncond, ""]


def start_sampling(runner, model, a):
    """process(), then Forge's reset of forge_objects and process_before_every_sampling."""
    p = P(model)
    runner.process(p, a)
    runner.before_sampling(p)
    return p


def test_patch_goes_on_a_clone_and_hooks_on_the_shared_modules(setup):
    runner, host, model, unet = setup
    original = model.forge_objects.unet
    start_sampling(runner, model, args())
    patched = model.forge_objects.unet
    assert patched is not original and patched.model is original.model
    assert not has_forge_patch(original)
    assert patched.model_options["transformer_options"]["patches"]["attn2_patch"] == [vmix_attn2_patch]
    assert value_hook_count(unet) == 16
    # a later clone (another extension) keeps our plain function itself, not a deep copy
    assert patched.clone().model_options["transformer_options"]["patches"]["attn2_patch"][0] is vmix_attn2_patch


def test_hires_double_call_and_reset(setup):
    """Forge calls process_before_every_sampling twice in the hires pass, with a reset between."""
    runner, host, model, unet = setup
    original = model.forge_objects.unet
    p = start_sampling(runner, model, args())
    first = model.forge_objects.unet
    runner.before_sampling(p)
    assert model.forge_objects.unet is first  # already patched: nothing added
    assert first.model_options["transformer_options"]["patches"]["attn2_patch"] == [vmix_attn2_patch]
    model.forge_objects.unet = original  # forge_objects = forge_objects_after_applying_lora.shallow_copy()
    runner.before_sampling(p)
    assert model.forge_objects.unet is not original and has_forge_patch(model.forge_objects.unet)
    assert value_hook_count(unet) == 16


def ip_adapter_like_replace(ip_k, ip_v, weight, seen):
    """An attn2 replace like Forge's built-in IP-Adapter: base attention plus an image branch."""
    def replace(q, k, v, extra_options):
        seen.append((extra_options["block"], extra_options.get("block_index", 0), v))
        rows = q.shape[0]
        return attention(q, k, v, TINY_HEADS) + weight * attention(q, ip_k.expand(rows, -1, -1), ip_v.expand(rows, -1, -1), TINY_HEADS)
    return replace


def test_composes_with_an_attn2_replace_patch(setup, adapter):
    runner, host, model, unet = setup
    x, c, u = data()
    torch.manual_seed(9)
    ip_k, ip_v = torch.randn(1, 4, 16), torch.randn(1, 4, 16)
    seen = []
    original = model.forge_objects.unet
    # IP-Adapter patches first (its clone is what VMix clones next), on every block
    ip = original.clone()
    for name, number in [("input", 1), ("input", 2), ("input", 4), ("input", 5), ("input", 7), ("input", 8),
                         ("middle", 0)] + [("output", i) for i in range(3, 12)]:
        ip.set_model_attn2_replace(ip_adapter_like_replace(ip_k, ip_v, 0.7, seen), name, number)
    model.forge_objects.unet = ip
    ip_only = forge_unet_call(ip, x, [u, c], [1, 0], 1.0)
    plain = forge_unet_call(original, x, [u, c], [1, 0], 1.0)
    assert (ip_only - plain).abs().max() > 1e-3  # the replace does something
    seen.clear()

    p = start_sampling(runner, model, args(strength=1.5))
    both = forge_unet_call(model.forge_objects.unet, x, [u, c], [1, 0], 1.0)
    assert len(seen) == 16 and (both - ip_only).abs().max() > 1e-3
    # the replace received v = to_v(context) + λ·V_a, V_a computed independently from the adapter
    f_a = adapter.aesthetic_context(adapter.aesthetic_input(None))
    context = torch.cat([u, c])
    layer = unet.input_blocks[1][1].transformer_blocks[0].attn2
    (block, index, v) = seen[0]
    assert block == ("input", 1) and index == 0
    expected = torch.nn.functional.linear(context, layer.to_v.weight) + 1.5 * adapter.aesthetic_values(
        "input_blocks.1.1.transformer_blocks.0.attn2", f_a)
    assert torch.allclose(v, expected, atol=1e-5)

    runner.postprocess(p)
    assert value_hook_count(unet) == 0
    assert torch.equal(forge_unet_call(ip, x, [u, c], [1, 0], 1.0), ip_only)  # bit-identical after


def test_without_replace_same_result_as_the_a1111_path(setup):
    runner, host, model, unet = setup
    x, c, u = data()
    start_sampling(runner, model, args())
    forge = forge_unet_call(model.forge_objects.unet, x, [c, u], [0, 1], 1.0)
    a1111 = unet(x, context=torch.cat([c, u]))  # the same hooks, no transformer_options
    assert torch.allclose(forge, a1111, atol=1e-6)


@pytest.mark.parametrize("order", [[1, 0], [0, 1]])
def test_uncond_off_uses_cond_or_uncond_chunks(setup, order):
    runner, host, model, unet = setup
    x, c, u = data()
    original = model.forge_objects.unet
    contexts = [u if kind == 1 else c for kind in order]
    base = forge_unet_call(original, x, contexts, order, 1.0)
    base_cond_only = forge_unet_call(original, x[:2], [c], [0], 1.0)
    start_sampling(runner, model, args(uncond=False))
    out = forge_unet_call(model.forge_objects.unet, x, contexts, order, 1.0)
    for chunk, kind in enumerate(order):
        rows = slice(2 * chunk, 2 * chunk + 2)
        if kind == 1:
            assert torch.equal(out[rows], base[rows])
        else:
            assert (out[rows] - base[rows]).abs().max() > 1e-3
    # CFG 1: only a cond chunk runs
    cond_only = forge_unet_call(model.forge_objects.unet, x[:2], [c], [0], 1.0)
    assert (cond_only - base_cond_only).abs().max() > 1e-3


def test_range_is_a_sigma_window_from_percent_to_sigma(setup):
    runner, host, model, unet = setup
    x, c, u = data()
    original = model.forge_objects.unet
    predictor = Predictor()
    middle, low = predictor.percent_to_sigma(0.5), predictor.percent_to_sigma(0.9)
    cases = [(14.0, False), (middle * 1.01, False), (middle * 0.99, True), (low * 1.01, True), (low * 0.99, False)]
    bases = [forge_unet_call(original, x, [c, u], [0, 1], sigma) for sigma, _ in cases]  # before VMix
    start_sampling(runner, model, args(start=0.5, end=0.9))
    patched = model.forge_objects.unet
    for (sigma, on), base in zip(cases, bases):
        out = forge_unet_call(patched, x, [c, u], [0, 1], sigma)
        assert torch.equal(out, base) != on, sigma


def test_leftover_patch_and_hooks_are_inert_and_removed_next_time(setup):
    runner, host, model, unet = setup
    x, c, u = data()
    original = model.forge_objects.unet
    base = forge_unet_call(original, x, [c, u], [0, 1], 1.0)
    start_sampling(runner, model, args())
    kept = model.forge_objects.unet  # e.g. still referenced after an exception
    host.end_job()  # the job ended without postprocess
    assert torch.equal(forge_unet_call(kept, x, [c, u], [0, 1], 1.0), base)
    host.begin_job("20250101000200")
    model.forge_objects.unet = original
    runner.process(P(model), [False])
    assert value_hook_count(unet) == 0
    assert torch.equal(forge_unet_call(kept, x, [c, u], [0, 1], 1.0), base)


def test_refiner_switch_patches_in_place_and_strips_it_after(setup):
    runner, host, model, unet = setup
    x, c, u = data()
    p = start_sampling(runner, model, args())
    refiner_unet = make_unet(LAYOUT, seed=7)
    refiner = ForgeModel(refiner_unet)
    base = forge_unet_call(refiner.forge_objects.unet, x, [c, u], [0, 1], 1.0)
    host.model = refiner  # apply_refiner reloaded the model; no script hook runs
    runner.on_cfg_denoiser(__import__("test_webui_fakes").cfg_params(4, None, None, step=6))
    assert value_hook_count(refiner_unet) == 16 and value_hook_count(unet) == 0
    assert has_forge_patch(refiner.forge_objects.unet)
    out = forge_unet_call(refiner.forge_objects.unet, x, [c, u], [0, 1], 1.0)
    assert (out - base).abs().max() > 1e-3
    runner.postprocess(p)
    assert not has_forge_patch(refiner.forge_objects.unet) and value_hook_count(refiner_unet) == 0
    assert "attn2_patch" not in refiner.forge_objects.unet.model_options["transformer_options"].get("patches", {})
    assert torch.equal(forge_unet_call(refiner.forge_objects.unet, x, [c, u], [0, 1], 1.0), base)


def test_old_backend_without_predictor_falls_back_to_steps(setup):
    """ldm_patched keeps percent_to_sigma on model.model_sampling; without either, steps decide."""
    runner, host, model, unet = setup
    model.forge_objects.unet.model.predictor = None
    x, c, u = data()
    base = forge_unet_call(model.forge_objects.unet, x, [c, u], [0, 1], 1.0)
    start_sampling(runner, model, args(start=0.5))
    cfg = __import__("test_webui_fakes").cfg_params
    runner.on_cfg_denoiser(cfg(4, None, None, step=1))
    assert torch.equal(forge_unet_call(model.forge_objects.unet, x, [c, u], [0, 1], 1.0), base)
    runner.on_cfg_denoiser(cfg(4, None, None, step=7))
    assert not torch.equal(forge_unet_call(model.forge_objects.unet, x, [c, u], [0, 1], 1.0), base)


def test_an_attn2_replace_that_never_calls_to_v_is_named_not_silent(setup):
    """Forge's attn2 replace patches get q, k, v already projected by to_v (VMix composes with them);
    an extension that replaced attn2's forward itself and computes v without calling to_v would leave
    VMix without effect: the infotext and the console say so."""
    import torch.nn.functional as F

    from vmix_lib.layers import find_cross_attention_layers

    runner, host, model, unet = setup
    layers = find_cross_attention_layers(unet)
    originals = {}
    for info in layers[:3]:
        module = info.module
        originals[module] = module.__dict__.get("forward")

        def forward(x, context=None, value=None, module=module, **kwargs):
            v = F.linear(value if value is not None else context, module.to_v.weight)
            return module.to_out(attention(module.to_q(x), module.to_k(context), v, TINY_HEADS))

        module.forward = forward
    try:
        x, c, u = data()
        p = start_sampling(runner, model, args())
        forge_unet_call(model.forge_objects.unet, x, [c, u], [0, 1], 5.0)
        runner.after_batch(p)
        assert p.extra_generation_params["VMix note"].startswith(
            f"did not act on 3 of 16 cross-attention layers (first: {layers[0].name}): their value projection attn2.to_v was never called")
        runner.postprocess(p)
    finally:
        for module in originals:
            del module.forward
    p = start_sampling(runner, model, args())
    forge_unet_call(model.forge_objects.unet, x, [c, u], [0, 1], 5.0)
    runner.after_batch(p)
    assert "VMix note" not in p.extra_generation_params  # every layer reached: nothing to say
