"""The to_v hook against the literal two-branch Eq. 9, through several attention kernels, on
WebUI-named module trees and a diffusers UNet; exactness when VMix must change nothing."""
import copy
import gc
import logging

import pytest
import torch

from vmix_lib.hook import ValueMixer, remove_vmix_hooks
from vmix_lib.layers import find_cross_attention_layers
from vmix_lib.mixing import VMixAdapter, two_branch_attention

ROWS = 4  # two cond rows, two uncond rows
# Real names, widths and heads; a few layers of each model keep the suite fast.
SD15_SUBSET = (
    "input_blocks.1.1.transformer_blocks.0.attn2",  # 320 wide, 8 heads of 40
    "input_blocks.4.1.transformer_blocks.0.attn2",  # 640, 8 × 80
    "middle_block.1.transformer_blocks.0.attn2",  # 1280, 8 × 160
    "output_blocks.11.1.transformer_blocks.0.attn2",  # 320
)
SDXL_SUBSET = (
    "input_blocks.4.1.transformer_blocks.1.attn2",  # 640 wide, 10 heads of 64
    "middle_block.1.transformer_blocks.0.attn2",  # 1280, 20 × 64
)


def layout_rows(attn2_layouts, family, names=None):
    rows = [(l["name"], l["to_v_shape"][1], l["to_v_shape"][0], l["heads"]) for l in attn2_layouts[family]["layers"]]
    return [r for r in rows if names is None or r[0] in names]


def no_hooks(module):
    return all(not m._forward_hooks for m in module.modules())


@pytest.fixture(scope="module")
def trees(webui, attn2_layouts):
    """family -> (tree of real attn2 layers, live adapter)."""
    torch.manual_seed(0)
    built = {}
    for family, names in (("sd15", SD15_SUBSET), ("sdxl", SDXL_SUBSET)):
        tree = webui.Tree(layout_rows(attn2_layouts, family, names)).eval().requires_grad_(False)
        built[family] = (tree, webui.live_adapter(tree, family))
    return built


def context_for(tree, tokens, rows=ROWS, seed=5, dtype=torch.float32):
    d = find_cross_attention_layers(tree)[0].context_dim
    return torch.randn(rows, tokens, d, generator=torch.Generator().manual_seed(seed)).to(dtype)


def run_recorded(tree, context):
    """Outputs and the (q, k, v) each attn2 computed."""
    attns = {name: tree.get_submodule(name) for name in tree.names}
    for attn in attns.values():
        attn.record = []
    try:
        with torch.no_grad():
            outputs = tree(context)
        return outputs, {name: attn.record[0] for name, attn in attns.items()}
    finally:
        for attn in attns.values():
            attn.record = None


def assert_outputs_equal(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_the_test_kernels_compute_attention(webui):
    """The four kernels differ in how they split the work, not in the result."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, n, 64, generator=g) for n in (20, 154, 154))
    reference = webui.kernels["naive"](q, k, v, 4, 0.25)
    for name, kernel in webui.kernels.items():
        torch.testing.assert_close(kernel(q, k, v, 4, 0.25), reference, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("kernel", ["naive", "sdp", "sliced", "key_chunked"])
@pytest.mark.parametrize("family,tokens", [("sd15", 77), ("sd15", 154), ("sdxl", 154), ("sdxl", 231)])
def test_hook_equals_two_branch_reference(trees, webui, monkeypatch, kernel, family, tokens):
    monkeypatch.setattr(webui.CrossAttention, "kernel", kernel)
    tree, adapter = trees[family]
    names = tree.names
    context = context_for(tree, tokens)
    plain, qkv = run_recorded(tree, context)

    layer_strengths = {names[0]: 0.5, names[-1]: 0.0}
    row_strengths = [1.0, 0.25, 2.0, 0.0]  # per row, e.g. uncond rows weaker
    mixer = ValueMixer(adapter, strength=1.3, layer_strengths=layer_strengths)
    mixer.row_strengths = row_strengths
    with mixer.applied(tree):
        mixed, _ = run_recorded(tree, context)
        mixer.gate = False  # a step outside the start/end range
        gated, _ = run_recorded(tree, context)
    assert no_hooks(tree)
    assert_outputs_equal(gated, plain)

    f_a = adapter.aesthetic_context(adapter.aesthetic_input())
    for name in names:
        attn = tree.get_submodule(name)
        q, k, v_c = qkv[name]
        lam = 1.3 * layer_strengths.get(name, 1.0) * torch.tensor(row_strengths)
        v_a = adapter.aesthetic_values(name, f_a)
        with torch.no_grad():
            reference = attn.to_out(two_branch_attention(q, k, v_c, v_a, lam, attn.heads, attn.scale))
        if layer_strengths.get(name) == 0.0:
            assert torch.equal(mixed[name], plain[name])
            continue
        torch.testing.assert_close(mixed[name], reference, rtol=1e-4, atol=2e-5)
        # rows with λ = 0 are untouched; the others really moved
        assert torch.equal(mixed[name][3], plain[name][3])
        assert (mixed[name][:3] - plain[name][:3]).abs().amax() > 1e-2


def test_attention_map_is_unchanged(trees):
    tree, adapter = trees["sd15"]
    context = context_for(tree, 154)
    _, plain = run_recorded(tree, context)
    with ValueMixer(adapter, strength=2.0).applied(tree):
        _, mixed = run_recorded(tree, context)
    f_a = adapter.aesthetic_context(adapter.aesthetic_input())
    for name in tree.names:
        attn = tree.get_submodule(name)
        (q0, k0, v0), (q1, k1, v1) = plain[name], mixed[name]
        assert torch.equal(q0, q1) and torch.equal(k0, k1)
        heads = attn.heads

        def attention_map(q, k):
            q = q.reshape(q.shape[0], q.shape[1], heads, -1).transpose(1, 2)
            k = k.reshape(k.shape[0], k.shape[1], heads, -1).transpose(1, 2)
            return (q @ k.transpose(-1, -2) * attn.scale).softmax(-1)

        assert torch.equal(attention_map(q0, k0), attention_map(q1, k1))
        # only the values moved, by exactly λ·tile(V_a)
        v_a = adapter.aesthetic_values(name, f_a)
        torch.testing.assert_close(v1, v0 + 2.0 * torch.cat([v_a, v_a]), rtol=0, atol=1e-5)
        assert not torch.equal(v0, v1)


def test_bit_identical_whenever_vmix_must_not_act(trees, webui):
    tree, adapter = trees["sd15"]
    context = context_for(tree, 77)
    with torch.no_grad():
        plain = tree(context)
        assert_outputs_equal(tree(context), plain)  # the tree itself is deterministic

        def run(mixer, arm=True):
            mixer.install(tree)
            if arm:
                mixer.arm()
            result = tree(context)
            mixer.remove()
            assert no_hooks(tree)
            return result

        assert_outputs_equal(run(ValueMixer(adapter, strength=0.0)), plain)
        fresh = VMixAdapter.for_unet(tree, adapter.aes_emb.clone(), "sd15")  # zero-initialised projection
        assert_outputs_equal(run(ValueMixer(fresh, strength=1.5)), plain)
        assert_outputs_equal(run(ValueMixer(adapter), arm=False), plain)
        mixer = ValueMixer(adapter)
        mixer.row_strengths = [0, 0, 0, 0]
        assert_outputs_equal(run(mixer), plain)
        assert_outputs_equal(run(ValueMixer(adapter, guard=lambda: False)), plain)
        assert_outputs_equal(run(ValueMixer(adapter, layer_strengths={n: 0.0 for n in tree.names})), plain)

        # the same mixer acts while armed, and the UNet is exactly restored after removal
        mixer = ValueMixer(adapter)
        with mixer.applied(tree):
            assert not torch.equal(tree(context)[tree.names[0]], plain[tree.names[0]])
        assert no_hooks(tree)
        assert_outputs_equal(tree(context), plain)


def test_leftover_hooks_are_inert_and_removable(trees):
    tree, adapter = trees["sd15"]
    context = context_for(tree, 77)
    with torch.no_grad():
        plain = tree(context)
        # a mixer lost by the caller (crash before postprocess): still armed, hooks still on
        lost = ValueMixer(adapter)
        lost.install(tree)
        lost.arm()
        assert not torch.equal(tree(context)[tree.names[0]], plain[tree.names[0]])
        assert remove_vmix_hooks(tree) == len(tree.names)
        assert no_hooks(tree)
        assert_outputs_equal(tree(context), plain)
        # the stripped mixer notices its hooks are gone and installs again
        assert not lost.is_installed_on(tree)
        lost.install(tree)
        assert sum(len(m._forward_hooks) for m in tree.modules()) == len(tree.names)
        assert lost.armed  # re-installing keeps the armed state
        assert not torch.equal(tree(context)[tree.names[0]], plain[tree.names[0]])
        # a hook whose mixer is gone does nothing, and is still found by remove_vmix_hooks
        del lost
        gc.collect()
        assert_outputs_equal(tree(context), plain)
        assert remove_vmix_hooks(tree) == len(tree.names)
        assert no_hooks(tree)


def test_install_is_idempotent_and_other_hooks_survive(trees):
    tree, adapter = trees["sd15"]
    first = tree.get_submodule(tree.names[0]).to_v
    other = first.register_forward_hook(lambda m, a, o: None)  # somebody else's hook
    try:
        mixer = ValueMixer(adapter)
        mixer.install(tree)
        mixer.install(tree)
        assert mixer.is_installed_on(tree)
        assert len(first._forward_hooks) == 2
        second = ValueMixer(adapter)
        second.install(tree)  # a second live mixer is installed beside the first, never instead of it
        assert len(first._forward_hooks) == 3 and mixer.is_installed_on(tree) and second.is_installed_on(tree)
        second.remove()
        mixer.remove()
        assert list(first._forward_hooks) == [other.id]
    finally:
        other.remove()
        remove_vmix_hooks(tree)


def test_two_mixers_on_one_unet_one_armed_at_a_time(trees):
    """Two adapters installed on one UNet (an evaluation of N adapters): each armed alone gives
    exactly its single-adapter output, arming one disarms the other, and neither strips the other."""
    tree, adapter = trees["sd15"]
    context = context_for(tree, 77)
    other_adapter = copy.deepcopy(adapter)
    with torch.no_grad():
        for p in other_adapter.parameters():
            p.mul_(-0.5)
        plain = tree(context)
        alone = {}
        for name, a in (("a", adapter), ("b", other_adapter)):
            with ValueMixer(a, strength=2.0).applied(tree):
                alone[name] = tree(context)
            assert no_hooks(tree)
        a = ValueMixer(adapter, strength=2.0).install(tree)
        b = ValueMixer(other_adapter, strength=2.0).install(tree)
        assert_outputs_equal(tree(context), plain)  # both installed, none armed
        a.arm()
        assert_outputs_equal(tree(context), alone["a"])
        b.arm()
        assert not a.armed and b.armed
        assert_outputs_equal(tree(context), alone["b"])
        a.arm()
        assert not b.armed
        assert_outputs_equal(tree(context), alone["a"])
        assert not torch.equal(alone["a"][tree.names[0]], plain[tree.names[0]])
        assert not torch.equal(alone["a"][tree.names[0]], alone["b"][tree.names[0]])
        a.remove()
        b.remove()
        assert no_hooks(tree)


def test_a_stripped_mixer_refuses_to_arm(trees):
    tree, adapter = trees["sd15"]
    mixer = ValueMixer(adapter).install(tree)
    remove_vmix_hooks(tree)  # e.g. a WebUI job's clean start
    with pytest.raises(RuntimeError, match="hooks were removed"):
        mixer.arm()
    mixer.install(tree)
    mixer.arm()
    assert mixer.armed
    mixer.remove()


def test_context_not_multiple_of_77_is_left_alone_and_warns_once(trees, caplog):
    tree, adapter = trees["sd15"]
    context = context_for(tree, 80)
    with torch.no_grad():
        plain = tree(context)
        with caplog.at_level(logging.WARNING, logger="vmix"), ValueMixer(adapter).applied(tree):
            assert_outputs_equal(tree(context), plain)
            assert_outputs_equal(tree(context), plain)
    warnings = [r for r in caplog.records if "not a multiple of 77" in r.getMessage()]
    assert len(warnings) == 1 and "80 tokens" in warnings[0].getMessage()


def test_aesthetic_values_computed_once_per_adapter_alphas_and_device(trees, monkeypatch):
    tree, adapter = trees["sd15"]
    calls = []
    original = adapter.aesthetic_values

    def counting(name, f_a, device=None):
        calls.append(name)
        return original(name, f_a, device)

    monkeypatch.setattr(adapter, "aesthetic_values", counting)
    mixer = ValueMixer(adapter)
    n = len(tree.names)
    with torch.no_grad(), mixer.applied(tree):
        for _ in range(3):  # three sampling steps
            tree(context_for(tree, 77))
        assert sorted(calls) == sorted(tree.names)
        tree(context_for(tree, 154))  # a long prompt re-tiles, it does not recompute
        mixer.precompute("cpu", torch.bfloat16)  # a new dtype re-casts, it does not recompute
        assert len(calls) == n
        mixer.set_alphas({"color": 0.0})  # new aesthetic input: recomputed once more
        for _ in range(2):
            tree(context_for(tree, 77))
        assert len(calls) == 2 * n
    calls.clear()
    mixer.install(tree)  # the same mixer in a new generation keeps its V_a
    mixer.arm()
    mixer.precompute("cpu", torch.float32)
    with torch.no_grad():
        tree(context_for(tree, 77))
    assert calls == []
    mixer.remove()
    assert no_hooks(tree)


def test_next_generation_shares_values_when_only_strength_changes(trees, monkeypatch):
    """What the WebUI runner does: a fresh mixer per generation, V_a shared while adapter and α match."""
    tree, adapter = trees["sd15"]
    context = context_for(tree, 77)
    calls = []
    original = adapter.aesthetic_values
    monkeypatch.setattr(adapter, "aesthetic_values", lambda name, f_a, device=None: calls.append(name) or original(name, f_a, device))
    alphas = {"color": 0.5}
    first = ValueMixer(adapter, strength=1.0, alphas=alphas)
    with torch.no_grad():
        with first.applied(tree):
            one = tree(context)
        assert len(calls) == len(tree.names) == first.values.computed
        values = first.values
        assert values.matches(adapter, {"color": 0.5, "lighting": 1.0})  # same α: missing names are 1
        assert not values.matches(adapter, {"color": 0.25}) and not values.matches(adapter, {"nope": 1})
        second = ValueMixer(adapter, strength=2.0, layer_strengths={tree.names[0]: 0.5}, values=values)
        with second.applied(tree):
            two = tree(context)
        assert len(calls) == len(tree.names)  # λ and block weights changed: nothing recomputed
        fresh = ValueMixer(adapter, strength=2.0, alphas=alphas, layer_strengths={tree.names[0]: 0.5})
        with fresh.applied(tree):
            reference = tree(context)
    assert_outputs_equal(two, reference)  # sharing gives exactly what a fresh mixer gives
    assert not torch.equal(one[tree.names[1]], two[tree.names[1]])
    with pytest.raises(ValueError, match="another adapter"):
        ValueMixer(trees["sdxl"][1], values=values)


def test_per_row_aesthetic_context(trees):
    """Training feeds f_a [rows, 77, d] (one label set per image)."""
    tree, adapter = trees["sdxl"]
    context = context_for(tree, 154)
    plain, qkv = run_recorded(tree, context)
    labels = torch.tensor([[1.0] * 6, [0.0] * 6, [1, 0, 1, 0, 1, 0], [0.5] * 6])
    f_a = adapter.aesthetic_context(adapter.label_input(labels))
    mixer = ValueMixer(adapter)
    mixer.set_aesthetic_context(f_a)
    with mixer.applied(tree):
        mixed, _ = run_recorded(tree, context)
    for name in tree.names:
        attn = tree.get_submodule(name)
        q, k, v_c = qkv[name]
        v_a = adapter.aesthetic_values(name, f_a)
        with torch.no_grad():
            reference = attn.to_out(two_branch_attention(q, k, v_c, v_a, 1.0, attn.heads, attn.scale))
        torch.testing.assert_close(mixed[name], reference, rtol=1e-4, atol=2e-5)


def test_half_precision_unet(trees, webui):
    """bf16 to_v outputs get V_a cast to bf16 (computed in float32 once)."""
    tree, adapter = trees["sdxl"]
    tree16 = webui.Tree(layout_rows_from_tree(tree)).to(torch.bfloat16)
    tree16.load_state_dict(tree.state_dict())
    context = context_for(tree, 77)
    mixer = ValueMixer(adapter)
    with torch.no_grad(), mixer.applied(tree16):
        mixed = tree16(context.to(torch.bfloat16))
    with torch.no_grad(), mixer.applied(tree):
        reference = tree(context)
    for name in tree.names:
        assert mixed[name].dtype == torch.bfloat16
        torch.testing.assert_close(mixed[name].float(), reference[name], rtol=0.05, atol=0.05)


def layout_rows_from_tree(tree):
    return [(i.name, i.context_dim, i.inner_dim, i.heads) for i in find_cross_attention_layers(tree)]


def test_errors_inside_the_hook_disable_vmix_for_the_generation(trees, caplog):
    tree, adapter = trees["sd15"]
    context = context_for(tree, 77)
    with torch.no_grad():
        plain = tree(context)
        mixer = ValueMixer(adapter)
        mixer.set_aesthetic_context(torch.zeros(77, 5))  # wrong width: W_a cannot apply
        with caplog.at_level(logging.WARNING, logger="vmix"), mixer.applied(tree):
            assert_outputs_equal(tree(context), plain)
            assert not mixer.armed
        assert sum("disabled for this generation" in r.getMessage() for r in caplog.records) == 1
        strict = ValueMixer(adapter, strict=True)
        strict.set_aesthetic_context(torch.zeros(77, 5))
        with pytest.raises(RuntimeError), strict.applied(tree):
            tree(context)
    assert no_hooks(tree)


def test_mismatched_row_strengths_warn_and_fall_back_to_all_rows(trees, caplog):
    tree, adapter = trees["sd15"]
    context = context_for(tree, 77)
    mixer = ValueMixer(adapter)
    with torch.no_grad(), mixer.applied(tree):
        full = tree(context)
        mixer.row_strengths = [1.0, 0.0]  # 2 factors for 4 rows
        with caplog.at_level(logging.WARNING, logger="vmix"):
            assert_outputs_equal(tree(context), full)
    assert any("2 row strengths for 4 rows" in r.getMessage() for r in caplog.records)


def test_unknown_layer_in_block_weights_is_refused(trees):
    _, adapter = trees["sd15"]
    with pytest.raises(ValueError, match="input_blocks.99"):
        ValueMixer(adapter, layer_strengths={"input_blocks.99.1.transformer_blocks.0.attn2": 0.5})


def test_gradients_reach_projection_and_value_weights(trees, webui):
    """Training goes through the same hook: grads flow to the projection and every W_a."""
    tree, _ = trees["sdxl"]
    adapter = webui.live_adapter(tree, "sdxl").requires_grad_(True)
    mixer = ValueMixer(adapter)
    context = context_for(tree, 77)
    with mixer.applied(tree):
        mixer.set_aesthetic_context(adapter.aesthetic_context(adapter.aesthetic_input()))
        loss = sum(out.square().mean() for out in tree(context).values())
    loss.backward()
    assert adapter.projection.out.weight.grad.abs().sum() > 0
    assert all(adapter.value(n).weight.grad.abs().sum() > 0 for n in tree.names)
    assert all(p.grad is None for p in tree.parameters())


# -- a diffusers UNet ------------------------------------------------------------------------------
TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=48,
    attention_head_dim=8,
    norm_num_groups=8,
)


@pytest.fixture(scope="module")
def tiny_unet(webui):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET).eval().requires_grad_(False)
    return unet, webui.live_adapter(unet, "sd15")


def test_diffusers_unet_hook_equals_two_branch(tiny_unet):
    from vmix_lib.bench import two_branch

    unet, adapter = tiny_unet
    layers = find_cross_attention_layers(unet)
    assert [i.name for i in layers] == [
        "input_blocks.1.1.transformer_blocks.0.attn2",
        "input_blocks.2.1.transformer_blocks.0.attn2",
        "middle_block.1.transformer_blocks.0.attn2",
        "output_blocks.3.1.transformer_blocks.0.attn2",
        "output_blocks.4.1.transformer_blocks.0.attn2",
        "output_blocks.5.1.transformer_blocks.0.attn2",
    ]
    g = torch.Generator().manual_seed(3)
    latent = torch.randn(2, 4, 8, 8, generator=g)
    context = torch.randn(2, 154, 48, generator=g)
    f_a = adapter.aesthetic_context(adapter.aesthetic_input({"color": 0.3}))
    with torch.no_grad():
        plain = unet(latent, 10, encoder_hidden_states=context).sample
        mixer = ValueMixer(adapter, strength=0.8, alphas={"color": 0.3})
        with mixer.applied(unet):
            hooked = unet(latent, 10, encoder_hidden_states=context).sample
        assert no_hooks(unet)
        with two_branch(unet, adapter, f_a, strength=0.8):
            reference = unet(latent, 10, encoder_hidden_states=context).sample
        torch.testing.assert_close(hooked, reference, rtol=1e-4, atol=1e-5)
        assert (hooked - plain).abs().amax() > 1e-3
        assert torch.equal(unet(latent, 10, encoder_hidden_states=context).sample, plain)
        # λ = 0 and a fresh adapter leave the diffusers UNet bit-identical too
        with ValueMixer(adapter, strength=0.0).applied(unet):
            assert torch.equal(unet(latent, 10, encoder_hidden_states=context).sample, plain)
        fresh = VMixAdapter.for_unet(unet, adapter.aes_emb.clone(), "sd15")
        with ValueMixer(fresh).applied(unet):
            assert torch.equal(unet(latent, 10, encoder_hidden_states=context).sample, plain)
    assert no_hooks(unet)


def test_training_through_the_hook_survives_gradient_checkpointing():
    # A cached V_a would be missing from checkpointing's recomputed forward (CheckpointError).
    from diffusers import UNet2DConditionModel

    from vmix_lib.mixing import VMixAdapter

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), norm_num_groups=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8, attention_head_dim=2,
        layers_per_block=1, sample_size=8,
    ).requires_grad_(False)
    adapter = VMixAdapter.for_unet(unet, torch.randn(12, 8), family="sd15")
    x, context = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 8)
    grads = []
    for checkpointing in (False, True):
        unet.train()
        if checkpointing:
            unet.enable_gradient_checkpointing()
        adapter.zero_grad()
        mixer = ValueMixer(adapter, strict=True)
        with mixer.applied(unet):
            labels = torch.tensor([[1.0] * 6, [0.0] * 6])
            mixer.set_aesthetic_context(adapter.aesthetic_context(adapter.label_input(labels)))
            unet(x, 1, context).sample.square().mean().backward()
        grads.append(adapter.projection.out.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


def test_shared_values_stay_bounded_across_many_prompt_lengths(trees):
    tree, adapter = trees["sd15"]
    mixer = ValueMixer(adapter)
    values = mixer.values
    n = len(tree.names)
    with torch.no_grad(), mixer.applied(tree):
        for chunks in range(1, 12):  # prompts of 77 … 847 tokens, generation after generation
            tree(context_for(tree, 77 * chunks))
            assert len(values._tensors) <= values.MAX_FORMS * n
    assert values.computed == n  # the float32 bases were never recomputed
