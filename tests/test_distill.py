"""Objective "distill" (vmix_lib/train/distill.py): the target against a hand computation, the
teacher's batching, its isolation from the adapter, the sampler x_t comes from, resumability.

The toy UNet has one WebUI-named attn2 whose to_v the VMix hook wraps; its output is an elementwise
function of x_t, t and a per-row sum of to_v(context).  Contexts and to_v weights are small integers,
so the teacher's arithmetic is exact whatever the batch layout and the comparisons are bit for bit.
"""
import math

import pytest
import torch
import torch.nn as nn

from vmix_lib.dimensions import AestheticDimension
from vmix_lib.hook import ValueMixer
from vmix_lib.mixing import VMixAdapter
from vmix_lib.train.distill import DistillConfig, DistillObjective, PhrasePair, join_prompt

DIMS = [
    AestheticDimension("color", "vibrant color", "sks"),
    AestheticDimension("lighting", "natural lighting", "ohwx"),
    AestheticDimension("focus", "sharp focus", "phol"),
]
D, INNER, TOKENS = 8, 8, 77
SHAPE = (2, 4, 4)
ACP = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)
PROMPTS = ["a cat", "a house on a hill", "a cat", "portrait of a man"]


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.heads = 2
        self.to_q = nn.Linear(D, INNER, bias=False)
        self.to_k = nn.Linear(D, INNER, bias=False)
        self.to_v = nn.Linear(D, INNER, bias=False)
        self.to_out = nn.Sequential(nn.Linear(INNER, D), nn.Dropout(0.0))


class ToyUNet(nn.Module):
    """out = x·(1 + s/1000) + t/1000 (+ text_embeds' row sum), s = Σ to_v(context) of the row."""

    def __init__(self):
        super().__init__()
        self.middle_block = nn.Module()
        block = nn.Module()
        self.middle_block.add_module("1", block)
        block.transformer_blocks = nn.ModuleList([nn.Module()])
        block.transformer_blocks[0].attn2 = Attn()
        with torch.no_grad():
            w = self.attn2.to_v.weight
            w.copy_(torch.randint(-2, 3, w.shape, generator=torch.Generator().manual_seed(0)).float())
        self.calls = []  # (rows, grad enabled, mixer armed) per call
        self.mixer = None

    @property
    def attn2(self):
        return self.middle_block._modules["1"].transformer_blocks[0].attn2

    def forward(self, x, t, context, added=None):
        self.calls.append((x.shape[0], torch.is_grad_enabled(), bool(self.mixer and self.mixer.armed)))
        s = self.attn2.to_v(context).sum(dim=(1, 2))
        if added is not None:
            s = s + added["text_embeds"].sum(-1)
        view = (-1,) + (1,) * (x.dim() - 1)
        return x * (1 + s / 1000).view(view) + t.to(x.dtype).view(view) / 1000


def encoder(with_added=False):
    """texts -> integer-valued contexts [n, 77, D], a distinct one per text (and SDXL-style extras)."""

    def encode(texts):
        rows = []
        for text in texts:
            g = torch.Generator().manual_seed(sum(ord(c) * (i + 1) for i, c in enumerate(text)) % 100_003)
            rows.append(torch.randint(-3, 4, (TOKENS, D), generator=g).float())
        context = torch.stack(rows)
        if not with_added:
            return context, None
        ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * len(texts))
        return context, {"text_embeds": context[:, 0, :4].clone(), "time_ids": ids}

    return encode


def setup(config=DistillConfig(guidance_scale=1.0, sample_steps=10), phrases=None, prediction="v_prediction", seed=0):
    unet = ToyUNet().requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():  # the projection's token Linear initialises from the global RNG
        torch.manual_seed(seed)
        adapter = VMixAdapter.for_unet(unet, torch.randn(2 * len(DIMS), D, generator=g), family="demo", dimensions=DIMS)
    with torch.no_grad():  # a live branch, as after some training
        adapter.projection.out.weight.copy_(torch.randn(D, D, generator=g) * 0.1)
    mixer = ValueMixer(adapter, strict=True).install(unet)
    unet.mixer = mixer
    objective = DistillObjective(DIMS, ACP, prediction, SHAPE, config, phrases)
    return unet, adapter, mixer, objective


def hand_target(unet, encode, objective, prompts, x_t, t, labels, signs):
    """ε* row by row, one UNet call per prompt variant, in the formula's order."""
    rows = []
    tt = torch.tensor([t])
    for b, prompt in enumerate(prompts):
        f = lambda text: unet(x_t[b : b + 1], tt, encode([text])[0])[0]
        delta = torch.zeros_like(x_t[b])
        for i, pair in enumerate(objective.phrases):
            if labels[b, i] > 0:
                delta = delta + (f(join_prompt(prompt, pair.positive)) - f(join_prompt(prompt, pair.contrast)))
        rows.append(f(prompt) + objective.config.eta * delta * signs[b])
    return torch.stack(rows)


@pytest.mark.parametrize("mirror", [False, True])
@pytest.mark.parametrize("contrast", ["", "dull"])
def test_target_equals_the_formula_computed_by_hand(mirror, contrast):
    phrases = [PhrasePair(d.positive, contrast + " " + d.name if contrast else "") for d in DIMS]
    cfg = DistillConfig(eta=1.5, guidance_scale=1.0, sample_steps=10, mirror=mirror)
    unet, adapter, mixer, objective = setup(cfg, phrases)
    encode = encoder()
    out = objective.loss(unet, mixer, encode, PROMPTS, torch.Generator().manual_seed(3))
    labels, signs = out.draw.labels, out.draw.signs
    assert labels.sum() > 0 and (labels.sum(1) < len(DIMS)).any()  # a mix of superior and inferior
    if mirror:
        assert set(signs.tolist()) <= {-1.0, 1.0}
    else:
        assert torch.equal(signs, torch.ones(len(PROMPTS)))
    mixer.disarm()
    with torch.no_grad():
        expected = hand_target(unet, encode, objective, PROMPTS, out.x_t, out.timestep, labels, signs)
    assert torch.equal(out.target, expected)
    per_sample = sum(1 + int(labels[b].sum()) * (2 if contrast else 1) for b in range(len(PROMPTS)))
    assert out.teacher_rows == per_sample


def test_loss_is_the_mse_of_the_student_against_the_target():
    unet, adapter, mixer, objective = setup()
    out = objective.loss(unet, mixer, encoder(), PROMPTS, torch.Generator().manual_seed(1))
    # The mixer is left armed with the student's labels (for backward's recomputation).
    assert mixer.armed and mixer.strength == 1.0
    student = unet(out.x_t, torch.full((len(PROMPTS),), out.timestep), encoder()(PROMPTS)[0])
    assert torch.allclose(out.loss, ((student - out.target) ** 2).mean(), rtol=1e-6, atol=0)
    out.loss.backward()
    assert adapter.projection.out.weight.grad.abs().sum() > 0
    assert unet.attn2.to_v.weight.grad is None  # the base stays frozen


def test_batching_equals_one_row_at_a_time():
    encode = encoder(with_added=True)
    results = []
    for chunk in (None, 1, 3):
        unet, adapter, mixer, objective = setup(DistillConfig(guidance_scale=1.0, sample_steps=10, max_teacher_rows=chunk))
        out = objective.loss(unet, mixer, encode, PROMPTS, torch.Generator().manual_seed(5))
        teacher_calls = [c for c in unet.calls if not c[2]]
        assert len(teacher_calls) == math.ceil(out.teacher_rows / (chunk or out.teacher_rows))
        results.append(out)
    for other in results[1:]:
        assert torch.equal(other.target, results[0].target)
        assert torch.equal(other.loss, results[0].loss)


def test_all_inferior_labels_give_the_base_prediction_exactly():
    unet, adapter, mixer, objective = setup()
    mixer.disarm()
    x_t = torch.randn(len(PROMPTS), *SHAPE, generator=torch.Generator().manual_seed(0))
    encode = encoder()
    target, direction, rows = objective.teacher_target(unet, encode, PROMPTS, x_t, 500, torch.zeros(len(PROMPTS), len(DIMS)))
    assert rows == len(PROMPTS)
    assert torch.equal(direction, torch.zeros_like(x_t))
    with torch.no_grad():
        assert torch.equal(target, unet(x_t, torch.full((len(PROMPTS),), 500), encode(PROMPTS)[0]))


def test_teacher_runs_without_gradient_with_vmix_disarmed_in_one_call():
    cfg = DistillConfig(guidance_scale=3.0, sample_steps=10)
    unet, adapter, mixer, objective = setup(cfg)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):  # until a draw that denoises at least one step
        out = objective.loss(unet, mixer, encoder(), PROMPTS, g)
        if out.draw.step:
            break
        unet.calls.clear()
    b = len(PROMPTS)
    denoise, teacher, student = unet.calls[: out.draw.step], unet.calls[out.draw.step : -1], unet.calls[-1]
    assert out.draw.step > 0 and all(c == (2 * b, False, True) for c in denoise)  # CFG rows together, adapter on
    assert teacher == [(out.teacher_rows, False, False)]  # one call, no gradient, VMix disarmed
    assert student == (b, True, True)


def test_the_teacher_ignores_the_adapter():
    """Whatever the adapter has learnt, the target comes from the base model."""
    unet, adapter, mixer, objective = setup()
    first = objective.loss(unet, mixer, encoder(), PROMPTS, torch.Generator().manual_seed(2))
    x_t, t, labels = first.x_t, first.timestep, first.draw.labels
    mixer.set_alphas(None)  # one aesthetic input for every row
    mixer.arm()
    target, _, _ = objective.teacher_target(unet, encoder(), PROMPTS, x_t, t, labels)
    mixer.disarm()  # what loss() does around its teacher call
    reference, _, _ = objective.teacher_target(unet, encoder(), PROMPTS, x_t, t, labels)
    assert torch.equal(first.target, reference)
    assert not torch.equal(target, reference)  # armed, the adapter would have changed it


def test_random_state_comes_from_the_generator_only_and_resumes():
    unet, adapter, mixer, objective = setup(DistillConfig(guidance_scale=1.0, sample_steps=10, mirror=True))
    g = torch.Generator().manual_seed(11)
    objective.loss(unet, mixer, encoder(), PROMPTS, g)  # advance somewhat
    saved, global_state = g.get_state(), torch.get_rng_state()
    a = objective.loss(unet, mixer, encoder(), PROMPTS, g)
    a_next = objective.loss(unet, mixer, encoder(), PROMPTS, g)
    assert torch.equal(torch.get_rng_state(), global_state)  # the global RNG is never touched
    g2 = torch.Generator()
    g2.set_state(saved)  # as a resumed run restores it
    torch.manual_seed(12345)
    b = objective.loss(unet, mixer, encoder(), PROMPTS, g2)
    b_next = objective.loss(unet, mixer, encoder(), PROMPTS, g2)
    for x, y in ((a, b), (a_next, b_next)):
        assert torch.equal(x.draw.labels, y.draw.labels) and torch.equal(x.draw.signs, y.draw.signs)
        assert x.draw.step == y.draw.step and torch.equal(x.draw.noise, y.draw.noise)
        assert torch.equal(x.x_t, y.x_t) and torch.equal(x.target, y.target) and torch.equal(x.loss, y.loss)
    assert not torch.equal(a.draw.noise, a_next.draw.noise)


def test_labels_are_superior_with_probability_one_half_and_steps_cover_the_range():
    _, _, _, objective = setup(DistillConfig(guidance_scale=1.0, sample_steps=10, min_timestep=300, max_timestep=800))
    g = torch.Generator().manual_seed(0)
    draws = [objective.draw(64, g) for _ in range(60)]
    share = torch.cat([d.labels for d in draws]).mean()
    assert abs(float(share) - 0.5) < 0.02
    steps = {d.step for d in draws}
    assert steps == set(objective.allowed_steps)
    assert all(300 <= objective.timesteps[k] <= 800 for k in steps) and len(steps) == 5


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("clip", [None, 1.0])
@pytest.mark.parametrize("cfg_scale", [1.0, 2.5])
def test_denoising_matches_diffusers_ddim(prediction, clip, cfg_scale):
    from diffusers import DDIMScheduler

    config = DistillConfig(sample_steps=10, timestep_offset=1, guidance_scale=cfg_scale, clip_sample=clip)
    unet, adapter, mixer, objective = setup(config, prediction=prediction)
    mixer.disarm()
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", steps_offset=1,
        clip_sample=clip is not None, clip_sample_range=clip or 1.0, prediction_type=prediction, set_alpha_to_one=False,
    )
    scheduler.set_timesteps(10)
    assert [int(t) for t in scheduler.timesteps] == objective.timesteps
    encode = encoder()
    cond, uncond = encode(PROMPTS)[0], encode([""] * len(PROMPTS))[0]
    noise = torch.randn(len(PROMPTS), *SHAPE, generator=torch.Generator().manual_seed(0))
    ours = objective.denoise(unet, noise, 6, cond, None, uncond if cfg_scale != 1 else None)
    x = noise.clone()
    with torch.no_grad():
        for t in scheduler.timesteps[:6]:
            tt = t.expand(len(PROMPTS))
            out = unet(x, tt, cond)
            if cfg_scale != 1:
                out_u = unet(x, tt, uncond)
                out = out_u + cfg_scale * (out - out_u)
            x = scheduler.step(out, t, x).prev_sample
    assert torch.allclose(ours, x, rtol=1e-5, atol=1e-5)


def test_the_target_is_the_same_in_either_parameterisation():
    """ε = √ᾱ·v + √(1−ᾱ)·x_t is affine at a fixed x_t, so the formula commutes with it."""
    unet, _, mixer, objective = setup()
    mixer.disarm()
    x_t = torch.randn(len(PROMPTS), *SHAPE, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 1, 1], [0, 0, 0]])
    t = 700
    a = ACP[t]
    as_eps = lambda v: a.sqrt() * v + (1 - a).sqrt() * x_t

    def eps_unet(x, tt, c, added=None):  # the same model, answering in ε
        return a.sqrt() * unet(x, tt, c) + (1 - a).sqrt() * x

    target_v, _, _ = objective.teacher_target(unet, encoder(), PROMPTS, x_t, t, labels)
    eps_objective = DistillObjective(DIMS, ACP, "epsilon", SHAPE, objective.config)
    target_eps, _, _ = eps_objective.teacher_target(eps_unet, encoder(), PROMPTS, x_t, t, labels)
    assert torch.allclose(as_eps(target_v), target_eps, rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_gradients():
    """loss() leaves the mixer in the student's state, so recomputation in backward matches."""
    from diffusers import UNet2DConditionModel

    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=D, attention_head_dim=4, norm_num_groups=8,
        ).requires_grad_(False)
        unet.train()  # diffusers checkpoints only in training mode
        if checkpointing:
            unet.enable_gradient_checkpointing()
        adapter = VMixAdapter.for_unet(unet, torch.randn(2 * len(DIMS), D, generator=torch.Generator().manual_seed(1)), "demo", DIMS)
        with torch.no_grad():
            adapter.projection.out.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
        mixer = ValueMixer(adapter, strict=True).install(unet)
        objective = DistillObjective(DIMS, ACP, "epsilon", (4, 8, 8), DistillConfig(guidance_scale=2.0, sample_steps=4, mirror=True))
        forward = lambda x, t, c, added=None: unet(x, t, encoder_hidden_states=c).sample
        out = objective.loss(forward, mixer, encoder(), PROMPTS, torch.Generator().manual_seed(4))
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in adapter.named_parameters() if p.grad is not None})
        mixer.remove()
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-7), name


def test_join_prompt():
    assert join_prompt("a cat", "vibrant color") == "a cat, vibrant color"
    assert join_prompt("a cat", "") == "a cat" and join_prompt("a cat", "  ") == "a cat"
    assert join_prompt("", "vibrant color") == "vibrant color"


def test_bad_settings_are_refused_in_one_sentence():
    with pytest.raises(ValueError, match="2 phrase pairs for 3 dimensions"):
        DistillObjective(DIMS, ACP, "epsilon", SHAPE, phrases=[PhrasePair("a"), PhrasePair("b")])
    with pytest.raises(ValueError, match="'lighting' has an empty positive phrase"):
        DistillObjective(DIMS, ACP, "epsilon", SHAPE, phrases=[PhrasePair("a"), PhrasePair(" "), PhrasePair("c")])
    with pytest.raises(ValueError, match="same positive and contrast"):
        DistillObjective(DIMS, ACP, "epsilon", SHAPE, phrases=[PhrasePair("a", "a"), PhrasePair("b"), PhrasePair("c")])
    with pytest.raises(ValueError, match="unknown prediction type 'sample'"):
        DistillObjective(DIMS, ACP, "sample", SHAPE)
    with pytest.raises(ValueError, match="no step of the 10-step sampler"):
        DistillObjective(DIMS, ACP, "epsilon", SHAPE, DistillConfig(sample_steps=10, min_timestep=995, max_timestep=998))
    for bad, message in [
        (dict(eta=0.0), "eta must be positive"),
        (dict(superior_prob=0.0), "superior_prob"),
        (dict(sample_steps=1), "sample_steps must be at least 2"),
        (dict(guidance_scale=0.5), "guidance_scale must be at least 1"),
        (dict(max_teacher_rows=0), "max_teacher_rows"),
    ]:
        with pytest.raises(ValueError, match=message):
            DistillObjective(DIMS, ACP, "epsilon", SHAPE, DistillConfig(**bad))


def test_metadata_records_the_objective_phrases_and_eta():
    _, _, _, objective = setup(phrases=[PhrasePair("vibrant color", "dull colors"), PhrasePair("natural lighting"), PhrasePair("sharp focus")])
    meta = objective.metadata()
    assert meta["objective"] == "distill" and meta["eta"] == 1.0
    assert meta["phrases"]["color"] == {"positive": "vibrant color", "contrast": "dull colors"}
    assert meta["phrases"]["lighting"] == {"positive": "natural lighting", "contrast": ""}


def test_probe_finds_a_phrase_the_model_ignores():
    unet, adapter, mixer, objective = setup(DistillConfig(guidance_scale=2.0, sample_steps=10))
    mixer.disarm()
    plain = encoder()
    deaf = lambda texts: plain([t.replace(", sharp focus", "") for t in texts])  # "focus" changes nothing
    effects = objective.probe(unet, deaf, PROMPTS, torch.Generator().manual_seed(0), draws=3)
    assert effects["focus"] == 0.0
    assert effects["color"] > 1e-3 and effects["lighting"] > 1e-3
    assert all(not armed for _, _, armed in unet.calls)
