"""Aesthetic dimensions, α handling, AesEmb and the projection layer."""
import math

import pytest
import torch

from vmix_lib.dimensions import DEFAULT_DIMENSIONS, AestheticDimension, check_dimensions, resolve_alphas
from vmix_lib.hook import ValueMixer
from vmix_lib.mixing import AestheticProjection, VMixAdapter, build_aes_emb

NAMES = [d.name for d in DEFAULT_DIMENSIONS]
LAYER = "input_blocks.1.1.transformer_blocks.0.attn2"


@pytest.fixture
def adapter():
    torch.manual_seed(0)
    adapter = VMixAdapter(DEFAULT_DIMENSIONS, 64, {LAYER: 32}, "sd15")
    # negatives far from the positives, so that pos = neg + 1·(pos - neg) would round off
    adapter.aes_emb[:6] = torch.randn(6, 64)
    adapter.aes_emb[6:] = torch.randn(6, 64) * 30
    return adapter


def test_default_dimensions():
    assert NAMES == ["color", "lighting", "composition", "focus", "texture", "emotion"]
    assert check_dimensions(DEFAULT_DIMENSIONS) is None
    negatives = [d.negative for d in DEFAULT_DIMENSIONS]
    assert len(set(negatives)) == len(negatives)  # one rare token per dimension
    assert all(len(d.negative.split()) == 1 and d.negative not in d.positive for d in DEFAULT_DIMENSIONS)


def test_all_one_gives_the_positive_rows_and_all_zero_the_negative_rows(adapter):
    pos, neg = adapter.aes_emb[:6], adapter.aes_emb[6:]
    assert torch.equal(adapter.aesthetic_input(), pos)  # missing names mean 1
    assert torch.equal(adapter.aesthetic_input({n: 1.0 for n in NAMES}), pos)
    assert torch.equal(adapter.aesthetic_input({n: 0 for n in NAMES}), neg)
    assert torch.equal(adapter.label_input(torch.tensor([[1.0] * 6, [0.0] * 6])), torch.stack([pos, neg]))


def test_interpolation(adapter):
    alphas = {"color": 0.25, "focus": 0.5, "emotion": 0.0}
    f_t = adapter.aesthetic_input(alphas)
    pos, neg = adapter.aes_emb[:6].double(), adapter.aes_emb[6:].double()
    for i, name in enumerate(NAMES):
        a = alphas.get(name, 1.0)
        expected = neg[i] + a * (pos[i] - neg[i])
        torch.testing.assert_close(f_t[i].double(), expected, rtol=1e-6, atol=1e-5)
    assert torch.equal(f_t[1], adapter.aes_emb[1]) and torch.equal(f_t[5], adapter.aes_emb[11])
    assert resolve_alphas(DEFAULT_DIMENSIONS, alphas) == [0.25, 1.0, 1.0, 0.5, 1.0, 0.0]
    labels = torch.tensor([0.25, 1.0, 1.0, 0.5, 1.0, 0.0])
    assert torch.equal(adapter.label_input(labels), f_t)


@pytest.mark.parametrize("alphas,words", [
    ({"colour": 0.5}, ["unknown aesthetic dimension", "'colour'", "color, lighting"]),
    ({"color": 1.5}, ["'color'", "between 0 and 1", "1.5"]),
    ({"lighting": -0.1}, ["'lighting'", "between 0 and 1"]),
    ({"focus": float("nan")}, ["'focus'", "between 0 and 1", "nan"]),
    ({"texture": math.inf}, ["'texture'", "between 0 and 1"]),
    ({"emotion": "strong"}, ["'emotion'", "a number", "'strong'"]),
    ({"emotion": None}, ["'emotion'", "a number", "None"]),
])
def test_bad_alphas_name_the_dimension(adapter, alphas, words):
    for call in (lambda: resolve_alphas(DEFAULT_DIMENSIONS, alphas), lambda: adapter.aesthetic_input(alphas),
                 lambda: ValueMixer(adapter, alphas=alphas)):
        with pytest.raises(ValueError) as err:
            call()
        for word in words:
            assert word in str(err.value)
    mixer = ValueMixer(adapter)
    with pytest.raises(ValueError):
        mixer.set_alphas(alphas)


@pytest.mark.parametrize("dims,problem", [
    ((), "no aesthetic dimensions"),
    ((AestheticDimension("Color", "a", "b"),), "not a short lowercase identifier"),
    ((AestheticDimension("color", "a", "b"), AestheticDimension("color", "c", "d")), "appears twice"),
    ((AestheticDimension("color", " ", "b"),), "empty label"),
])
def test_check_dimensions(dims, problem):
    assert problem in check_dimensions(dims)


def test_build_aes_emb_orders_positives_then_negatives():
    seen = []

    def encode_pooled(texts):
        seen.extend(texts)
        return torch.arange(len(texts) * 3, dtype=torch.float64).view(len(texts), 3)

    emb = build_aes_emb(encode_pooled, DEFAULT_DIMENSIONS)
    assert seen == [d.positive for d in DEFAULT_DIMENSIONS] + [d.negative for d in DEFAULT_DIMENSIONS]
    assert emb.dtype == torch.float32 and emb.shape == (12, 3) and emb[7, 0] == 21
    with pytest.raises(ValueError, match=r"expected \[12, d\]"):
        build_aes_emb(lambda texts: torch.zeros(len(texts) - 1, 3), DEFAULT_DIMENSIONS)


def test_projection_layer_is_zero_initialised_and_maps_n_to_77_tokens():
    proj = AestheticProjection(6, 64)
    assert torch.count_nonzero(proj.out.weight) == 0 and torch.count_nonzero(proj.out.bias) == 0
    f_t = torch.randn(3, 6, 64)
    f_a = proj(f_t)
    assert f_a.shape == (3, 77, 64) and torch.count_nonzero(f_a) == 0
    torch.nn.init.normal_(proj.out.weight)
    # token-axis linear, then LayerNorm over d, then Z: check against an explicit computation
    x = torch.einsum("tn,bnd->btd", proj.token.weight, f_t) + proj.token.bias[:, None]
    x = torch.nn.functional.layer_norm(x, (64,), proj.norm.weight, proj.norm.bias)
    torch.testing.assert_close(proj(f_t), x @ proj.out.weight.T + proj.out.bias)
