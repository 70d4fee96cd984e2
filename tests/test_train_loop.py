"""The training loop on tiny models: step 0 = base model, the loss falls, checkpointing, hooks removed."""
import copy

import pytest
import torch

from vmix_lib.dimensions import DEFAULT_DIMENSIONS
from vmix_lib.mixing import VMixAdapter
from vmix_lib.train.loop import AdapterTrainer, TrainBatch, train_adapter
from vmix_lib.train.lora import LoRANetwork
from vmix_lib.training_step import aesthetic_context_for_batch, diffusion_loss

from test_train_helpers import alphas_cumprod, tiny_unet

DIMS = DEFAULT_DIMENSIONS[:2]


def _problem(seed=1):
    """8 latents; the 'color: superior' half is shifted in channel 0 - something labels can explain."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([[1.0, 0.0]] * 4 + [[0.0, 0.0]] * 4)
    latents = torch.randn(8, 4, 8, 8, generator=g) * 0.5
    latents[:4, 0] += 1.5
    context = torch.randn(1, 77, 8, generator=g).expand(8, 77, 8).contiguous()
    aes_emb = torch.randn(4, 8, generator=g)
    return TrainBatch(latents, context, labels), aes_emb


def _eval_loss(trainer, batch, acp):
    """Loss at fixed timesteps and noise (4 draws), so that before/after compare like with like."""
    with torch.no_grad():
        aesthetic_context_for_batch(trainer.mixer, batch.labels)
        losses = [
            diffusion_loss(lambda x, t, c: trainer.forward(x, t, c, None), batch.latents, batch.context, acp, "epsilon",
                           torch.Generator().manual_seed(s)).item()
            for s in range(4)
        ]
    return sum(losses) / len(losses)


def test_step_zero_output_is_bit_identical_to_the_base_model():
    unet = tiny_unet()
    batch, aes_emb = _problem()
    x, t = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(3)), torch.arange(8) * 120
    with torch.no_grad():
        base = unet(x, t, encoder_hidden_states=batch.context).sample
    adapter = VMixAdapter.for_unet(unet, aes_emb, "sd15", DIMS)
    lora = LoRANetwork(unet, rank=2, conv_rank=2).install()
    trainer = AdapterTrainer(unet, adapter, alphas_cumprod(), extra_parameters=list(lora.parameters()))
    assert trainer.mixer.armed and trainer.mixer.is_installed_on(unet)
    with torch.no_grad():
        aesthetic_context_for_batch(trainer.mixer, batch.labels)
        hooked = unet(x, t, encoder_hidden_states=batch.context).sample
    assert torch.equal(hooked, base)  # zero-initialised projection (and LoRA up): exactly the base model
    trainer.train_step([batch])
    with torch.no_grad():
        aesthetic_context_for_batch(trainer.mixer, batch.labels)
        assert not torch.equal(unet(x, t, encoder_hidden_states=batch.context).sample, base)
    trainer.close()
    lora.remove()
    with torch.no_grad():
        assert torch.equal(unet(x, t, encoder_hidden_states=batch.context).sample, base)  # hooks gone


def test_loss_falls_on_a_fixed_problem_and_only_trainables_move():
    unet = tiny_unet()
    frozen = copy.deepcopy(unet.state_dict())
    batch, aes_emb = _problem()
    acp = alphas_cumprod()
    adapter = VMixAdapter.for_unet(unet, aes_emb, "sd15", DIMS)
    aes_before = adapter.aes_emb.clone()
    trainer = AdapterTrainer(unet, adapter, acp, lr=1e-2, seed=0)
    before = _eval_loss(trainer, batch, acp)
    losses = [trainer.train_step([batch]) for _ in range(30)]
    after = _eval_loss(trainer, batch, acp)
    trainer.close()
    assert trainer.step == 30 and len(losses) == 30
    assert after < 0.95 * before, (before, after)
    assert all(torch.equal(v, frozen[k]) for k, v in unet.state_dict().items())  # base frozen
    assert torch.equal(adapter.aes_emb, aes_before)  # AesEmb is a frozen table
    assert adapter.projection.out.weight.abs().sum() > 0  # Z left zero


def test_gradient_checkpointing_gives_the_same_update():
    batch, aes_emb = _problem()
    results = []
    for checkpointing in (False, True):
        unet = tiny_unet()
        adapter = VMixAdapter.for_unet(unet, aes_emb, "sd15", DIMS)
        torch.nn.init.normal_(adapter.projection.out.weight, std=0.05)  # non-zero f_a: W_a gets gradients too
        trainer = AdapterTrainer(unet, adapter, alphas_cumprod(), lr=1e-2, seed=0, gradient_checkpointing=checkpointing)
        losses = [trainer.train_step([batch]) for _ in range(2)]
        trainer.close()
        results.append((losses, {k: v.clone() for k, v in adapter.state_dict().items()}))
    (losses_a, state_a), (losses_b, state_b) = results
    assert losses_a == pytest.approx(losses_b, rel=1e-5)
    for key in state_a:
        assert torch.allclose(state_a[key], state_b[key], atol=1e-6), key
    assert not torch.equal(state_a["values.input_blocks__1__1__transformer_blocks__0__attn2.weight"],
                           VMixAdapter.for_unet(tiny_unet(), aes_emb, "sd15", DIMS).state_dict()["values.input_blocks__1__1__transformer_blocks__0__attn2.weight"])


def test_gradient_accumulation_averages_micro_batches():
    batch, aes_emb = _problem()
    half = [TrainBatch(batch.latents[i::2], batch.context[i::2], batch.labels[i::2]) for i in range(2)]
    unet = tiny_unet()
    adapter = VMixAdapter.for_unet(unet, aes_emb, "sd15", DIMS)
    trainer = AdapterTrainer(unet, adapter, alphas_cumprod(), seed=0)
    loss = trainer.train_step(half)
    assert trainer.step == 1 and loss > 0
    trainer.close()


def test_train_adapter_runs_v_prediction_and_always_unhooks():
    batch, aes_emb = _problem()
    unet = tiny_unet()
    adapter = VMixAdapter.for_unet(unet, aes_emb, "sd15", DIMS)
    seen = []
    losses = train_adapter(unet, adapter, iter([batch] * 6), 3, alphas_cumprod(), grad_accum=2, prediction="v_prediction",
                           warmup_steps=2, lr=1e-3, on_step=lambda s, l: seen.append(s))
    assert len(losses) == 3 and seen == [1, 2, 3]
    assert not any(m._forward_hooks for m in unet.modules())
    with pytest.raises(StopIteration):  # out of batches: the hooks are still removed
        train_adapter(unet, adapter, iter([batch]), 2, alphas_cumprod())
    assert not any(m._forward_hooks for m in unet.modules())
    with pytest.raises(ValueError, match="unknown prediction type 'x0'"):
        AdapterTrainer(unet, adapter, alphas_cumprod(), prediction="x0")


def test_warmup_and_decay_schedules_follow_the_optimiser_step():
    batch, aes_emb = _problem()
    unet = tiny_unet()
    adapter = VMixAdapter.for_unet(unet, aes_emb, "sd15", DIMS)
    trainer = AdapterTrainer(unet, adapter, alphas_cumprod(), lr=1e-3, warmup_steps=4)
    assert [trainer.lr_at(s) for s in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    trainer.close()
    for schedule, expected in (("linear", [5e-4, 1e-3, 1e-3, 2 / 3 * 1e-3, 1 / 3 * 1e-3]),
                               ("cosine", [5e-4, 1e-3, 1e-3, 0.75e-3, 0.25e-3])):
        trainer = AdapterTrainer(unet, adapter, alphas_cumprod(), lr=1e-3, warmup_steps=2, lr_schedule=schedule, max_steps=5)
        assert [trainer.lr_at(s) for s in range(5)] == pytest.approx(expected)
        trainer.train_step([batch])
        assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)  # step 1 ran at lr_at(0)
        trainer.close()
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'step'"):
        AdapterTrainer(unet, adapter, alphas_cumprod(), lr_schedule="step")
