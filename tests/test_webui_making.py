"""The VMix tab's job (vmix_lib/webui/making) by injection: a tiny random SD1.5-layout checkpoint
loaded by the trainer's own loader, dressed as AUTOMATIC1111's and Forge's model objects.

What must hold (issue "Make an adapter without leaving the WebUI"):
- the WebUI is left exactly as it was after a run that finished, was interrupted or failed: UNet and
  text-encoder weights byte for byte, requires_grad and train/eval flags, no VMix hook, no block
  checkpointing, the VAE back on its device, the global RNG, the LoRA / hypernetwork lists, and a
  UNet forward on a fixed input bit for bit;
- the same objective as ``python -m vmix_lib.train --objective distill``: the same losses and adapter;
- Interrupt saves, Resume continues bit for bit;
- bad input is one sentence and starts nothing.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from vmix_lib.hook import count_vmix_hooks
from vmix_lib.train.checkpoint_loading import load_base_model
from vmix_lib.train.text import TextConditioner
from vmix_lib.train.tiny_models import write_tiny_model
from vmix_lib.webui.making import models as making_models
from vmix_lib.webui.making.job import BOARD, BusyError, JobBoard, plan_job, run_job
from vmix_lib.webui.making.models import A1111Model, ForgeModel, make_trainable
from vmix_lib.webui.making.request import DEFAULT_ROWS, MakeError, default_name, from_form, from_json

from test_webui_fakes import single_thread  # noqa: F401  (one thread for tiny tensors)


# ---------------------------------------------------------------- the tiny model, dressed as the WebUIs'
class SdConditioning(list):
    """prompt_parser.SdConditioning: a list of prompts with the picture size (A1111, Forge)."""

    def __init__(self, prompts, is_negative_prompt=False, width=None, height=None, copy_from=None):
        super().__init__(prompts)
        self.width, self.height = width, height


class FakeA1111Model:
    """shared.sd_model of A1111 (ldm SD1.x), over diffusers modules of the same checkpoint."""

    def __init__(self, base):
        self.base = base
        self.model = SimpleNamespace(diffusion_model=base.unet, conditioning_key="crossattn")
        self.is_sdxl = False
        self.parameterization = "eps"
        self.alphas_cumprod_original = base.alphas_cumprod.clone()
        self.alphas_cumprod = base.alphas_cumprod.half().float()  # "downcast alphas_cumprod" of the last job: not used
        self.cond_stage_model = SimpleNamespace(wrapped=SimpleNamespace(transformer=base.text_encoders[0], tokenizer=base.tokenizers[0]))
        self.first_stage_model = base.vae
        self.sd_checkpoint_info = SimpleNamespace(title="tiny.safetensors [0123456789]", sha256="ab" * 32)
        self.conditioner = TextConditioner("sd15", base.tokenizers, base.text_encoders)
        self.latent_channels = 4
        self.fail_at = None  # raise inside the n-th UNet call with gradients (a step)
        self.calls = 0

    def apply_model(self, x, t, cond):
        if torch.is_grad_enabled():
            self.calls += 1
            if self.fail_at is not None and self.calls >= self.fail_at:
                raise self.fail_with
        return self.model.diffusion_model(x, t, encoder_hidden_states=cond).sample

    def get_learned_conditioning(self, texts):
        assert isinstance(texts, SdConditioning) and texts.width == texts.height
        return self.conditioner.encode(list(texts))[0]

    def decode_first_stage(self, z):
        return self.first_stage_model.decode(z / self.base.scaling_factor).sample


class FakeNetworks:
    """extensions-builtin/Lora networks.py: loaded_networks, load_networks(names)."""

    def __init__(self):
        self.loaded_networks = ["a-lora"]
        self.calls = []

    def load_networks(self, names):
        self.calls.append(list(names))
        self.loaded_networks.clear()


def a1111_env(**changes):
    devices = SimpleNamespace(device="cpu", cpu=torch.device("cpu"), autocast=contextlib.nullcontext,
                              without_autocast=contextlib.nullcontext, unet_needs_upcast=False,
                              dtype_unet=torch.float32, dtype_vae=torch.float32)
    env = SimpleNamespace(devices=devices, SdConditioning=SdConditioning, cmd_opts=SimpleNamespace(lowvram=False),
                          shared=SimpleNamespace(loaded_hypernetworks=["a-hypernetwork"]), lowvram_enabled=lambda m: False,
                          current_unet=lambda: None, networks=FakeNetworks(), open_clip_tokenize=None)
    for key, value in changes.items():
        setattr(env, key, value)
    return env


def tiny_a1111(base, **env_changes):
    model = A1111Model(FakeA1111Model(base), a1111_env(**env_changes), allow_custom_layout=True)
    model.vae_factor, model.size_multiple = 4, 8  # the tiny model's VAE and UNet downsampling
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    checkpoint, configs, tokenizer = write_tiny_model(str(folder / "model"))
    return checkpoint, configs, tokenizer


@pytest.fixture
def base(tiny):
    checkpoint, configs, tokenizer = tiny
    loaded = load_base_model(checkpoint, "auto", configs, None, tokenizer)
    loaded.unet.requires_grad_(True)  # as A1111 loads its UNet (nothing there freezes it)
    return loaded


SMALL = {"steps": 3, "batch_size": 2, "resolution": 32, "xt_steps": 4, "save_every": 0, "preview_every": 0,
         "gradient_checkpointing": False}


def request(**changes):
    return from_json({"name": "t", **SMALL, **changes})


def run(model, folder, req, board=None):
    board = board or JobBoard()
    status = board.new_task(req.name)
    return run_job(req, model, str(folder), status, board, console=lambda m: None)


# ---------------------------------------------------------------- the WebUI as it was
def fingerprint(model: A1111Model):
    """Everything a run may touch, as plain values."""
    m, base = model.m, model.m.base
    digest = hashlib.sha256()
    for module in (base.unet, *base.text_encoders, base.vae):
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        context = m.get_learned_conditioning(SdConditioning(["a red dog"], width=32, height=32))
        out = m.apply_model(x, torch.tensor([500]), context)
        image = m.decode_first_stage(x)
    unet = base.unet
    return {
        "weights": digest.hexdigest(),
        "requires_grad": [p.requires_grad for p in unet.parameters()],
        "training": [mod.training for mod in (*unet.modules(), *base.vae.modules(), *base.text_encoders[0].modules())],
        "hooks": count_vmix_hooks(unet),
        "instance_forwards": sum("forward" in mod.__dict__ for mod in unet.modules()),
        "grads": sum(p.grad is not None for p in unet.parameters()),
        "vae_device": str(next(base.vae.parameters()).device),
        "rng": torch.get_rng_state().clone(),
        "networks": list(model.env.networks.loaded_networks),
        "hypernetworks": list(model.env.shared.loaded_hypernetworks),
        "unet_out": out,
        "decoded": image,
    }


def assert_same_webui(before, after):
    for key in before:
        if isinstance(before[key], torch.Tensor):
            assert torch.equal(before[key], after[key]), key
        else:
            assert before[key] == after[key], key


# ---------------------------------------------------------------- runs
def test_a_finished_run_leaves_the_webui_as_it_was_and_writes_the_adapter(tmp_path, base):
    model = tiny_a1111(base)
    before = fingerprint(model)
    status = run(model, tmp_path, request(preview_every=3, save_every=2))
    assert status.state == "finished", status.message
    assert status.message == (f"Finished 3 steps: saved t.safetensors in {tmp_path}; choose it in the VMix panel of txt2img or img2img "
                              f"(press 🔄 there if the list does not show it yet).")
    assert_same_webui(before, fingerprint(model))
    assert model.env.networks.calls == [[]]  # trained on the plain checkpoint: LoRAs unloaded, then the list put back
    assert sorted(os.listdir(tmp_path)) == ["t-training", "t.safetensors"]
    work = tmp_path / "t-training"
    assert sorted(os.listdir(work)) == ["previews", "t-config.json", "t-loss.csv", "t-loss.png", "t-step000002.safetensors",
                                        "t-step000003.state.pt"]
    with safe_open(str(tmp_path / "t.safetensors"), "pt") as f:
        training = json.loads(f.metadata()["vmix"])["training"]
    assert training["base_checkpoint"] == "tiny.safetensors [0123456789]"
    assert training["base_checkpoint_sha256"] == "ab" * 32
    assert training["made_in"] == "AUTOMATIC1111 (the VMix tab)"
    assert training["base_weights"] == "the plain checkpoint (LoRAs and hypernetworks off)"
    assert training["objective"] == "distill" and training["steps"] == 3
    assert training["phrases"]["color"] == {"positive": "vibrant colors", "contrast": "dull colors"}
    assert status.preview_step == 3 and os.path.isfile(status.preview_path)
    assert [round(v, 3) for v in (status.loss, status.smoothed_loss)] and status.direction > 0


def test_interrupt_saves_and_resume_continues_bit_for_bit(tmp_path, base, monkeypatch):
    straight = run(tiny_a1111(base), tmp_path / "a", request(steps=4, save_every=2))
    assert straight.state == "finished"

    board = JobBoard()
    model = tiny_a1111(base)
    before = fingerprint(model)
    status = board.new_task("t")
    steps_seen = []

    class Sink:
        def begin(self, n): pass
        def image(self, image): pass
        def interrupted(self): return False

        def step(self, step, max_steps, text):
            steps_seen.append(step)
            if step == 2:
                board.request_stop()  # the tab's Interrupt button during step 2

    run_job(request(steps=4, save_every=0), model, str(tmp_path / "b"), status, board, Sink(), console=lambda m: None)
    assert status.state == "stopped" and steps_seen == [1, 2]
    assert status.message.startswith("Interrupted at step 2 of 4: saved ") and status.message.endswith("press Resume to continue.")
    assert_same_webui(before, fingerprint(model))
    assert os.path.isfile(tmp_path / "b" / "t.safetensors")  # usable at once
    assert os.path.isfile(tmp_path / "b" / "t-training" / "t-step000002.state.pt")

    def a1111_torch_load(*args, **kwargs):  # modules/safe.py: refuses the zip entries newer torch writes
        raise Exception("bad file inside state.pt: state.pt/.format_version")

    monkeypatch.setattr(torch, "load", a1111_torch_load)
    resumed = run(model, tmp_path / "b", request(steps=4, resume=True))
    assert resumed.state == "finished", resumed.message
    a, b = load_file(str(tmp_path / "a" / "t.safetensors")), load_file(str(tmp_path / "b" / "t.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = lambda folder: (folder / "t-training" / "t-loss.csv").read_text().splitlines()
    assert [r.split(",")[:2] for r in rows(tmp_path / "a")] == [r.split(",")[:2] for r in rows(tmp_path / "b")]


def test_interrupt_during_a_preview_step_stops_without_drawing_the_preview(tmp_path, base):
    """Interrupt during a step that would draw the λ-sweep: the run ends there at once (on a CPU the
    preview takes minutes); the finished resumed run draws its own."""
    board = JobBoard()
    model = tiny_a1111(base)
    status = board.new_task("t")

    class Sink:
        def begin(self, n): pass
        def image(self, image): pass
        def interrupted(self): return False

        def step(self, step, max_steps, text):
            if step == 2:
                board.request_stop()

    run_job(request(steps=4, save_every=0, preview_every=2), model, str(tmp_path), status, board, Sink(), console=lambda m: None)
    assert status.state == "stopped" and status.step == 2
    assert status.preview_step is None and not os.path.exists(tmp_path / "t-training" / "previews" / "t-step000002.png")
    resumed = run(model, tmp_path, request(steps=4, save_every=0, preview_every=2, resume=True))
    assert resumed.state == "finished" and resumed.preview_step == 4 and os.path.isfile(resumed.preview_path)


@pytest.mark.parametrize("failure", ["error", "oom"])
def test_a_failed_step_leaves_the_webui_as_it_was(tmp_path, base, failure):
    model = tiny_a1111(base)
    before = fingerprint(model)
    model.m.calls, model.m.fail_at = 0, 2  # inside the first step, after the student's forward has hooks armed
    model.m.fail_with = (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB") if failure == "oom"
                         else RuntimeError("a kernel failed"))
    status = run(model, tmp_path, request())
    model.m.fail_at = None
    assert status.state == "failed"
    if failure == "oom":
        assert status.message == ("Training stopped: the GPU ran out of memory; lower Batch size or Resolution, or turn on "
                                  "Gradient checkpointing (the resume state of the last save is kept).")
    else:
        assert status.message == "Training stopped by an error (RuntimeError: a kernel failed); the console has the details."
    assert_same_webui(before, fingerprint(model))
    assert not os.path.exists(tmp_path / "t.safetensors")


def test_the_tab_trains_the_same_adapter_as_the_command_line(tmp_path, tiny, base):
    """Same checkpoint, seed and settings: the CLI (diffusers UNet, accelerate) and the tab (the WebUI's
    forward through apply_model, its conditioning, SingleProcess) give the same losses and adapter."""
    from vmix_lib.train.__main__ import main as train_main

    checkpoint, configs, tokenizer = tiny
    phrases = [f"--phrase={r.name}={r.phrase}|{r.contrast}" for r in DEFAULT_ROWS]
    assert train_main(["--objective", "distill", "--checkpoint", checkpoint, "--model-config-dir", configs,
                       "--tokenizer-dir", tokenizer, "--output-dir", str(tmp_path / "cli"), "--name", "t",
                       "--max-steps", "3", "--batch-size", "2", "--resolution", "32", "--xt-steps", "4",
                       "--save-every", "0", "--preview-every", "0", "--device", "cpu", *phrases]) == 0
    status = run(tiny_a1111(base), tmp_path / "tab", request())
    assert status.state == "finished", status.message
    losses = lambda path: [float(r.split(",")[1]) for r in open(path).read().splitlines()[1:]]
    cli, tab = losses(tmp_path / "cli" / "t-loss.csv"), losses(tmp_path / "tab" / "t-training" / "t-loss.csv")
    assert len(cli) == 3 and cli == tab  # the same code on the same modules: equal to the last bit
    a, b = load_file(str(tmp_path / "cli" / "t.safetensors")), load_file(str(tmp_path / "tab" / "t.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class TransformerBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        from test_webui_fakes import CrossAttention

        self.norm2 = torch.nn.LayerNorm(8)
        self.attn2 = CrossAttention(8, 8, 16, 2)

    def forward(self, x, context=None):
        return x + self.attn2(self.norm2(x), context=context)


class SpatialTransformer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.transformer_blocks = torch.nn.ModuleList([TransformerBlock()])

    def forward(self, x, context=None):
        for block in self.transformer_blocks:
            x = block(x, context=context)
        return x


class Block(torch.nn.Sequential):
    """A UNet block called as block(x, context), like the WebUIs' TimestepEmbedSequential; its
    attn2 at <block>.1.transformer_blocks.0.attn2 as in the real names."""

    def __init__(self):
        super().__init__(torch.nn.Identity(), SpatialTransformer())

    def forward(self, x, context=None):
        return self[1](self[0](x), context=context)


class BlockUNet(torch.nn.Module):
    """input_blocks / middle_block / output_blocks, each block a module the UNet calls (A1111, Forge)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.input_blocks = torch.nn.ModuleList([Block(), Block()])
        self.middle_block = Block()
        self.output_blocks = torch.nn.ModuleList([Block(), Block()])

    def forward(self, x, context):
        for block in [*self.input_blocks, self.middle_block, *self.output_blocks]:
            x = block(x, context=context)
        return x


def test_gradient_checkpointing_on_a_webui_unet_gives_the_same_gradients_and_is_removed():
    from vmix_lib.dimensions import DEFAULT_DIMENSIONS
    from vmix_lib.hook import ValueMixer
    from vmix_lib.layers import find_cross_attention_layers
    from vmix_lib.mixing import VMixAdapter
    from vmix_lib.train.loop import checkpoint_unet_blocks

    unet = BlockUNet().requires_grad_(False)
    layers = find_cross_attention_layers(unet)
    assert len(layers) == 5
    torch.manual_seed(1)
    adapter = VMixAdapter(DEFAULT_DIMENSIONS, 8, {l.name: l.inner_dim for l in layers}, "sd15")
    with torch.no_grad():
        adapter.projection.out.weight.normal_()
    x, context = torch.randn(2, 6, 8), torch.randn(2, 77, 8)
    grads, outputs = [], []
    for checkpointing in (False, True):
        adapter.zero_grad()
        restore = checkpoint_unet_blocks(unet) if checkpointing else None
        if restore:
            assert sum("forward" in m.__dict__ for m in unet.modules()) == 5
        mixer = ValueMixer(adapter).install(unet)
        mixer.arm()
        mixer.set_aesthetic_context(adapter.aesthetic_context(adapter.aesthetic_input(None)))
        out = unet(x, context)
        out.square().mean().backward()
        outputs.append(out.detach())
        mixer.remove()
        if restore:
            restore()
        grads.append([p.grad.clone() for p in adapter.parameters() if p.grad is not None])
    assert sum("forward" in m.__dict__ for m in unet.modules()) == 0  # nothing left on the blocks
    assert torch.equal(outputs[0], outputs[1])
    assert len(grads[0]) == len(grads[1]) > 0 and any(g.abs().sum() > 0 for g in grads[1])
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-8) for a, b in zip(*grads))


# ---------------------------------------------------------------- bad input: one sentence, nothing started
@pytest.mark.parametrize("body, message", [
    ({"dimensions": [{"name": "color", "phrase": "", "contrast": "dull"}]},
     "Dimension 'color' has an empty phrase; write what it adds to the prompt, e.g. vibrant colors."),
    ({"dimensions": [["color", "vivid", ""], ["color", "bright", ""]]}, "Dimension 'color' appears twice; each dimension needs its own name."),
    ({"dimensions": [["Color!", "vivid", ""]]}, "Dimension name 'Color!' (row 1) must be a short lowercase word: letters, digits, _ (e.g. color)."),
    ({"dimensions": [["color", "vivid", "vivid"]]}, "Dimension 'color' has the same phrase and contrast ('vivid'); give a different contrast, or none."),
    ({"dimensions": [[f"d{i}", "x", ""] for i in range(9)]}, "9 dimensions are given; the VMix panel has 8 α sliders, so keep at most 8."),
    ({"dimensions": []}, "No dimension is given; keep at least one row (name, phrase, contrast)."),
    ({"name": "../evil"}, "Adapter name '../evil' has a path in it; give a plain file name (it is saved in the VMix adapter folder)."),
    ({"name": "a/b"}, "Adapter name 'a/b' has a path in it; give a plain file name (it is saved in the VMix adapter folder)."),
    ({"name": "x-training"}, "Adapter name 'x-training' ends in '-training', which names the training folders; choose another."),
    ({"steps": 0}, "Steps must be from 1 to 1000000, got 0."),
    ({"steps": 2.5}, "Steps must be a whole number, got 2.5."),
    ({"resolution": 500}, "Resolution must be a multiple of 64 (0 = 512 for SD1.5, 1024 for SDXL), got 500."),
    ({"learning_rate": "fast"}, "Learning rate must be a number, got 'fast'."),
    ({"gradient_checkpointing": "yes"}, "Gradient checkpointing must be true or false, got 'yes'."),
    ({"stepz": 3}, "Unknown setting 'stepz' (did you mean 'steps'?); the settings are name, overwrite, resume, dimensions, "
                   "prompts, steps, batch_size, learning_rate, eta, resolution, xt_steps, seed, save_every, preview_every, "
                   "gradient_checkpointing, unload_vae."),
    ({"resume": True, "overwrite": True}, "resume and overwrite exclude each other: resume continues the run of that name, "
                                          "overwrite starts it anew."),
])
def test_bad_settings_are_one_sentence(body, message):
    with pytest.raises(MakeError) as err:
        from_json(body)
    assert str(err.value) == message and err.value.status_code == 422


def test_the_form_reads_gradio_tables_and_prompt_boxes():
    table = [["color", "vivid colors", "dull colors"], ["", "", ""], ["mood", "warm mood", None]]
    req = from_form("mine", False, table, False, "a cat\n# comment\n\na dog", steps=10, batch_size=1)
    assert [(r.name, r.phrase, r.contrast) for r in req.rows] == [("color", "vivid colors", "dull colors"), ("mood", "warm mood", "")]
    assert req.prompts == ("a cat", "a dog") and req.steps == 10 and req.batch_size == 1 and req.eta == 1.0
    dims = req.dimensions()
    assert dims[0].positive == "vibrant color" and dims[0].negative == "sks"  # built-in: its own AesEmb labels
    assert dims[1].positive == "warm mood" and dims[1].negative not in {"sks", "ohwx", "zwx", "phol", "tqz", "vkp"}
    with pytest.raises(MakeError, match="holds none"):
        from_form("mine", False, table, False, "# only a comment")
    assert default_name("v1-5-pruned-emaonly.safetensors [6ce0161689]") == "vmix-v1-5-pruned-emaonly"
    assert default_name("sub/dir/my: model.ckpt [x]") == "vmix-my_ model"


def test_model_problems_and_existing_names_are_refused_before_anything_is_written(tmp_path, base):
    folder = tmp_path / "VMix"
    folder.mkdir()
    (folder / "t.safetensors").write_bytes(b"an adapter the user has")
    model = tiny_a1111(base)
    with pytest.raises(MakeError) as err:
        plan_job(request(), model, str(folder))
    assert str(err.value) == ("An adapter named 't' already exists in " + str(folder) + " (t.safetensors); tick Overwrite, "
                              "press Resume to continue its run, or choose another name (nothing was changed).")
    with pytest.raises(MakeError, match="There is no run named 't' to resume"):
        plan_job(request(resume=True), model, str(folder))
    with pytest.raises(MakeError, match=r"Resolution must be a multiple of 8 \(0 = 512 for this model\), got 36"):
        plan_job(dataclasses.replace(request(name="u"), values={**request().values, "resolution": 36}), model, str(folder))
    assert sorted(os.listdir(folder)) == ["t.safetensors"] and (folder / "t.safetensors").read_bytes() == b"an adapter the user has"

    def problem(**changes):
        m = FakeA1111Model(base)
        for key, value in changes.pop("model", {}).items():
            setattr(m, key, value)
        return A1111Model(m, a1111_env(**changes)).problem()

    title = "tiny.safetensors [0123456789]"
    assert problem(cmd_opts=SimpleNamespace(lowvram=True)).startswith("The WebUI runs with --lowvram")
    assert problem(model={"is_sd2": True}) == f"The loaded checkpoint {title} is an SD2 model; VMix adapters are made for SD1.5 and SDXL base checkpoints."
    assert problem(model={"is_sdxl": True, "conditioner": SimpleNamespace(embedders=[object(), object()])}) == (
        f"The loaded checkpoint {title} is the SDXL refiner; load an SDXL base checkpoint to train.")
    assert problem(model={"model": SimpleNamespace(conditioning_key="hybrid", diffusion_model=base.unet)}) == (
        f"The loaded checkpoint {title} is an inpainting model; load the plain (non-inpainting) checkpoint to train.")
    assert problem(current_unet=lambda: SimpleNamespace(name="[TRT] my-engine")) == (
        "A replacement UNet is active ([TRT] my-engine, Settings > SD Unet); set SD Unet to None to train on the checkpoint's own UNet.")
    layout = problem()  # the tiny UNet is no SD1.5/SDXL layout: only tests allow it
    assert layout.startswith(f"The loaded checkpoint {title} is ") and layout.endswith(
        "; VMix adapters are made for SD1.5 and SDXL base checkpoints and their fine-tunes.")
    assert A1111Model(None, a1111_env()).problem() == (
        "No checkpoint is loaded; choose an SD1.5 or SDXL checkpoint at the top of the page first.")


# ---------------------------------------------------------------- Forge / Forge Neo
class FakeForgeKModel(torch.nn.Module):
    def __init__(self, unet, alphas_cumprod):
        super().__init__()
        self.diffusion_model = unet
        self.predictor = SimpleNamespace(alphas_cumprod=alphas_cumprod, prediction_type="epsilon")
        self.computation_dtype = torch.float32
        self.storage_dtype = torch.float32


def forge_unet(unet):
    """The diffusers UNet with the call signature of Forge's IntegratedUNet2DConditionModel."""
    plain = type(unet)

    class ForgeUNet(plain):
        def forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}):
            assert transformer_options == {} and y is None
            return plain.forward(self, x, timesteps, encoder_hidden_states=context).sample

    unet.__class__ = ForgeUNet
    return unet


class StableDiffusion:
    """backend/diffusion_engine/sd15.py, its model built under torch.inference_mode() as Forge's loader does."""

    def __init__(self, checkpoint, configs, tokenizer):
        with torch.inference_mode():
            base = load_base_model(checkpoint, "auto", configs, None, tokenizer)
            kmodel = FakeForgeKModel(forge_unet(base.unet), base.alphas_cumprod.clone())
        self.base = base
        unet_patcher = SimpleNamespace(model=kmodel)
        clip = SimpleNamespace(patcher=SimpleNamespace(name="clip"))
        self.forge_objects_original = SimpleNamespace(unet=unet_patcher, clip=clip, vae=SimpleNamespace(latent_channels=4))
        self.forge_objects_original.shallow_copy = lambda: SimpleNamespace(copy_of="original")
        self.forge_objects = SimpleNamespace(unet="the last job's LoRA clone")
        self.text_processing_engine = SimpleNamespace(text_encoder=SimpleNamespace(transformer=base.text_encoders[0]),
                                                      tokenizer=base.tokenizers[0])
        self.conditioner = TextConditioner("sd15", base.tokenizers, base.text_encoders)
        self.sd_checkpoint_info = SimpleNamespace(title="tiny.safetensors [0123456789]", sha256="cd" * 32)
        self.is_inpaint = False

    @torch.inference_mode()
    def get_learned_conditioning(self, texts):
        assert self.forge_objects.copy_of == "original"  # CLIP without the last job's LoRA
        return self.conditioner.encode(list(texts))[0]

    @torch.inference_mode()
    def decode_first_stage(self, z):
        return self.base.vae.decode(z / self.base.scaling_factor).sample


def test_forge_trains_through_weights_made_in_inference_mode_and_puts_the_engine_back(tmp_path, tiny):
    engine = StableDiffusion(*tiny)
    loads = []
    env = SimpleNamespace(memory_management=SimpleNamespace(load_models_gpu=lambda models: loads.append(models),
                                                            soft_empty_cache=lambda: loads.append("soft_empty_cache")),
                          SdConditioning=SdConditioning, shared=SimpleNamespace(), attention=None)
    model = ForgeModel(engine, env, allow_custom_layout=True)
    model.vae_factor, model.size_multiple = 4, 8
    assert model.problem() is None and model.family == "sd15"
    unet = engine.forge_objects_original.unet.model.diffusion_model
    weights = {k: v.clone() for k, v in unet.state_dict().items()}
    saved_objects = engine.forge_objects
    assert all(p.is_inference() for p in unet.parameters())
    status = run(model, tmp_path, request(steps=2))
    assert status.state == "finished", status.message
    assert engine.forge_objects is saved_objects  # the engine's objects put back
    assert loads[0] == [engine.forge_objects_original.unet] and loads[-1] == "soft_empty_cache"
    assert not any(p.is_inference() for p in unet.parameters())  # ordinary tensors now, the same bytes
    assert all(torch.equal(weights[k], v) for k, v in unet.state_dict().items())
    with safe_open(str(tmp_path / "t.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["vmix"])["training"]["made_in"] == "Forge (the VMix tab)"


def test_make_trainable_keeps_bytes_and_flags():
    with torch.inference_mode():
        layer = torch.nn.Linear(3, 2)
        layer.register_buffer("scale", torch.ones(2))
    x = torch.randn(4, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
        layer(x).sum().backward()
    weight = layer.weight.clone()
    assert make_trainable(layer) == 3
    assert torch.equal(layer.weight, weight) and layer.weight.requires_grad and not layer.weight.is_inference()
    layer(x).sum().backward()
    assert x.grad is not None


def test_forge_refuses_other_engines_in_one_sentence():
    class Flux:
        forge_objects = forge_objects_original = object()
        sd_checkpoint_info = SimpleNamespace(title="flux1-dev.safetensors [abc]")

    class StableDiffusionXLRefiner(Flux):
        pass

    env = SimpleNamespace()
    assert ForgeModel(Flux(), env).problem() == (
        "The loaded model flux1-dev.safetensors [abc] is Flux, a diffusion transformer without UNet cross-attention "
        "layers (VMix works on SD1.5 and SDXL UNets).")
    assert ForgeModel(StableDiffusionXLRefiner(), env).problem() == (
        "The loaded checkpoint flux1-dev.safetensors [abc] is the SDXL refiner; VMix adapters are made for SD1.5 and SDXL base checkpoints.")
    assert ForgeModel(SimpleNamespace(forge_objects=None), env).problem().startswith("No checkpoint is loaded yet")


# ---------------------------------------------------------------- the HTTP API
def test_api_routes(tmp_path):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from vmix_lib.webui.making import api

    board = JobBoard()
    started = []

    def start(req, board_):
        if req.name == "refused":
            raise MakeError("The loaded checkpoint x is an SD2 model; VMix adapters are made for SD1.5 and SDXL base checkpoints.")
        board_.check_free()
        status = board_.new_task(req.name)
        started.append(req)
        return status

    app = FastAPI()
    api.register(app, board, start)
    api.register(app, board, start)  # once per app
    client = TestClient(app)
    assert client.get("/vmix/v1/make").status_code == 404
    bad = client.post("/vmix/v1/make", json={"steps": 0})
    assert bad.status_code == 422 and bad.json() == {"detail": "Steps must be from 1 to 1000000, got 0."}
    assert client.post("/vmix/v1/make", json={"name": "refused"}).json()["detail"].startswith("The loaded checkpoint x is an SD2")
    assert client.post("/vmix/v1/make", content=b"not json").status_code == 422
    ok = client.post("/vmix/v1/make", json={"name": "mine", "steps": 5})
    assert ok.status_code == 200 and ok.json()["state"] == "queued" and started[0].steps == 5
    task = ok.json()["task_id"]
    busy = client.post("/vmix/v1/make", json={"name": "other"})
    assert busy.status_code == 409 and busy.json()["detail"] == (
        "A VMix job is already waiting (mine); interrupt it or wait for it to finish.")
    assert client.get(f"/vmix/v1/make/{task}").json()["task_id"] == task
    assert client.get("/vmix/v1/make/task(nope)").status_code == 404
    assert client.post("/vmix/v1/make/interrupt").json() == {"interrupted": True, "task_id": task}
    board.current.state, board.current.preview_path = "finished", None
    assert client.post("/vmix/v1/make/interrupt").json() == {"interrupted": False, "task_id": task}
    status = client.get("/vmix/v1/make?preview=true").json()
    assert status["preview"] is None and status["state"] == "finished"
    defaults = client.get("/vmix/v1/make/defaults").json()
    assert defaults["dimensions"][0] == {"name": "color", "phrase": "vibrant colors", "contrast": "dull colors"}
    assert defaults["builtin_prompts"] == 60 and defaults["settings"][0]["key"] == "steps"


def test_the_tab_needs_no_trainer_packages():
    """The VMix tab runs in the WebUI's own environment: its code imports neither diffusers,
    transformers nor accelerate (the command-line trainer needs them, the tab does not)."""
    import subprocess
    import sys

    code = ("import sys\n"
            "for name in ('diffusers', 'transformers', 'accelerate'): sys.modules[name] = None\n"
            "import vmix_lib.webui.making.job, vmix_lib.webui.making.models, vmix_lib.webui.making.service\n"
            "import vmix_lib.train.session, vmix_lib.train.distill, vmix_lib.train.previews\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == "ok", out.stderr


def test_a1111_sdxl_conditioning_and_openclip_pooled_rows():
    """SDXL in A1111: conditioning is {"crossattn", "vector"} (passed to apply_model as is), and the
    OpenCLIP-G "[CLS]" row is the final-LN EOS state before text_projection, read through A1111's
    wrapped token embedding (which has no .weight)."""
    from vmix_lib.webui.making.models import openclip_pooled

    torch.manual_seed(0)

    class Wrapped(torch.nn.Module):  # A1111's EmbeddingsWithFixes around the embedding
        def __init__(self):
            super().__init__()
            self.wrapped = torch.nn.Embedding(50, 6)

        def forward(self, ids):
            return self.wrapped(ids)

    class OpenClipEmbedder:  # sgm FrozenOpenCLIPEmbedder2 (legacy=False)
        def __init__(self):
            self.model = torch.nn.Module()
            self.model.token_embedding = Wrapped()
            self.model.ln_final = torch.nn.LayerNorm(6)
            self.model.text_projection = torch.nn.Parameter(torch.randn(6, 4))

        def encode_with_transformer(self, tokens):
            last = self.model.token_embedding(tokens) * 2
            return {"last": last, "penultimate": last, "pooled": self.model.ln_final(last)[:, 0] @ self.model.text_projection}

    tokens = torch.tensor([[49, 3, 0, 0], [49, 5, 7, 0]])  # EOT = the highest id
    embedder = OpenClipEmbedder()
    rows = openclip_pooled(embedder, ["a", "b"], lambda texts: tokens)
    expected = embedder.model.ln_final(embedder.model.token_embedding(tokens) * 2)[torch.arange(2), tokens.argmax(-1)]
    assert torch.equal(rows, expected.float()) and rows.shape == (2, 6)  # 6 wide: no projection

    seen = {}

    class XL:
        is_sdxl = True
        model = SimpleNamespace(diffusion_model=None, conditioning_key="crossattn")

        def get_learned_conditioning(self, texts):
            seen["size"] = (texts.width, texts.height)
            return {"crossattn": torch.ones(len(texts), 77, 8), "vector": torch.full((len(texts), 12), 2.0)}

        def apply_model(self, x, t, cond):
            seen["cond"] = cond
            return x

    model = A1111Model(XL(), a1111_env())
    context, added = model._encoder(1024)(["a", "b"])
    assert seen["size"] == (1024, 1024) and context.shape == (2, 77, 8) and torch.equal(added["vector"], torch.full((2, 12), 2.0))
    model._forward(torch.zeros(2, 4, 8, 8), torch.tensor([1, 1]), context, added)
    assert set(seen["cond"]) == {"crossattn", "vector"} and seen["cond"]["crossattn"] is context
