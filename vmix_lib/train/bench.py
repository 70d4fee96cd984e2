"""Cost of the accelerate runtime per training step: ``python -m vmix_lib.train.bench``.

Times the same optimiser steps (same UNet, adapter, LoRA, batches and random draws) two ways,
interleaved round by round so that machine load hits both alike:

    plain        the trainer's step before accelerate (commit cdfddc9): zero_grad, loss, backward,
                 clip, AdamW step, in plain PyTorch
    accelerate   AdapterTrainer.train_step: the same step through accelerate (prepared model and
                 optimizer, accumulate, backward, clip_grad_norm_, the loss reduction)

and reports the median of the per-round ratios accelerate / plain, and that both runs end with
the same weights.  On a CPU a step is timed in process CPU time (what this process computed, not
how long it waited for other jobs), on a GPU in wall time after a synchronisation.  One process (a multi-process step adds DDP's all-reduce, which is the point of
running several, not an overhead of the wrapping).  The default model is the trainer's tiny SD1.5
test model, whose short steps make any fixed per-step cost show the most; ``--unet sd15`` uses the
real SD1.5 UNet configuration (random weights).  ``--device cuda`` runs the same on a GPU.

``--distill-teacher`` times instead the distill objective's teacher passes: one batched UNet call
per micro-batch (the trainer's way) against one call per row, and checks they agree.
"""
from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from typing import List

import torch

from ..dimensions import DEFAULT_DIMENSIONS
from ..hook import ValueMixer
from ..mixing import VMixAdapter
from ..training_step import aesthetic_context_for_batch, diffusion_loss
from .checkpoint_loading import alphas_cumprod_from, clean_config, model_configs, shipped_unet_config
from .loop import AdapterTrainer, TrainBatch, diffusers_unet_forward
from .lora import LoRANetwork
from .tiny_models import tiny_configs


class PlainStep:
    """The trainer's optimiser step as it was before accelerate (fp32), for the side-by-side timing."""

    def __init__(self, unet, adapter, alphas_cumprod, extra_parameters, lr: float, seed: int):
        self.adapter = adapter
        self.alphas_cumprod = alphas_cumprod
        unet.requires_grad_(False)
        adapter.requires_grad_(True)
        adapter.aes_emb.requires_grad_(False)
        self.mixer = ValueMixer(adapter, strength=adapter.train_lambda, strict=True)
        self.mixer.install(unet)
        self.mixer.arm()
        self.forward = diffusers_unet_forward(unet)
        self.parameters = [p for p in adapter.parameters() if p.requires_grad] + list(extra_parameters)
        self.lr = lr
        self.optimizer = torch.optim.AdamW(self.parameters, lr=lr, weight_decay=1e-2)
        self.generator = torch.Generator(adapter.aes_emb.device).manual_seed(seed)

    def train_step(self, batches) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr  # the warm-up schedule's value
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for batch in batches:
            aesthetic_context_for_batch(self.mixer, batch.labels, 0.0, self.generator)
            loss = diffusion_loss(lambda x, t, c: self.forward(x, t, c, batch.added_cond), batch.latents, batch.context,
                                  self.alphas_cumprod, "epsilon", self.generator)
            if not torch.isfinite(loss):
                raise FloatingPointError("the loss became non-finite")
            (loss / len(batches)).backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(self.parameters, 1.0)
        self.optimizer.step()
        return total / len(batches)


def _unet(kind: str, device):
    from diffusers import UNet2DConditionModel

    config = clean_config(tiny_configs("sd15")["unet"]) if kind == "tiny" else shipped_unet_config("sd15")
    torch.manual_seed(0)
    return UNet2DConditionModel.from_config(config).to(device).eval()


def _time(step, batches, device) -> float:
    """Seconds of one step: this process's CPU time on a CPU (other jobs on a shared machine do not
    count), wall time on a GPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        began = time.perf_counter()
        step(batches)  # returns a float: the step has finished on the device
        return time.perf_counter() - began
    began = time.process_time()
    step(batches)
    return time.process_time() - began


def run(kind: str, latent: int, batch: int, accumulation: int, rounds: int, steps: int, warmup: int, lora_rank: int,
        device: torch.device) -> dict:
    base = _unet(kind, device)
    context_dim = base.config.cross_attention_dim
    g = torch.Generator().manual_seed(1)
    aes_emb = torch.randn(2 * len(DEFAULT_DIMENSIONS), context_dim, generator=g)
    batches = [
        TrainBatch(torch.randn(batch, 4, latent, latent, generator=g).to(device),
                   torch.randn(batch, 77, context_dim, generator=g).to(device),
                   (torch.rand(batch, len(DEFAULT_DIMENSIONS), generator=g) < 0.5).float().to(device))
        for _ in range(accumulation)
    ]
    acp = alphas_cumprod_from(model_configs("sd15")["scheduler"])  # the shipped SD schedule
    runners = {}
    for name in ("plain", "accelerate"):
        unet = copy.deepcopy(base)
        torch.manual_seed(2)
        adapter = VMixAdapter.for_unet(unet, aes_emb, "sd15").to(device)
        lora = LoRANetwork(unet, lora_rank).to(device).install() if lora_rank else None
        extra = list(lora.parameters()) if lora else []
        if name == "plain":
            runners[name] = (PlainStep(unet, adapter, acp.to(device), extra, 1e-4, 3), adapter)
        else:
            runners[name] = (AdapterTrainer(unet, adapter, acp, lr=1e-4, seed=3, extra_parameters=extra), adapter)
    for name, (runner, _) in runners.items():
        for _ in range(warmup):
            runner.train_step(batches)
    times = {"plain": [], "accelerate": []}
    ratios: List[float] = []
    for r in range(rounds):
        order = ("plain", "accelerate") if r % 2 == 0 else ("accelerate", "plain")
        medians = {}
        for name in order:
            samples = [_time(runners[name][0].train_step, batches, device) for _ in range(steps)]
            times[name].extend(samples)
            medians[name] = statistics.median(samples)
        ratios.append(medians["accelerate"] / medians["plain"])
    a, b = runners["plain"][1].state_dict(), runners["accelerate"][1].state_dict()
    return {
        "plain": statistics.median(times["plain"]), "accelerate": statistics.median(times["accelerate"]),
        "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
        "same_weights": all(torch.equal(a[k], b[k]) for k in a),
        "steps": warmup + rounds * steps,
    }


def run_teacher(kind: str, latent: int, batch: int, rounds: int, steps: int, warmup: int, device: torch.device) -> dict:
    """The distill objective's teacher (vmix_lib/train/distill.py) two ways on the same rows: one
    batched UNet call per micro-batch (what the trainer does) against one call per row.  Every
    dimension superior with a contrast phrase: 1 + 2·6 = 13 rows per sample."""
    from .distill import DistillConfig, DistillObjective, EncodedTexts, PhrasePair

    unet = _unet(kind, device)
    context_dim = unet.config.cross_attention_dim
    acp = alphas_cumprod_from(model_configs("sd15")["scheduler"])  # the shipped SD schedule
    phrases = [PhrasePair(d.positive, "dull " + d.name) for d in DEFAULT_DIMENSIONS]
    make = lambda rows: DistillObjective(DEFAULT_DIMENSIONS, acp, "epsilon", (4, latent, latent),
                                         DistillConfig(max_teacher_rows=rows), phrases)
    batched, looped = make(None), make(1)
    prompts = [f"prompt {i}" for i in range(batch)]
    layout = batched.teacher_layout(prompts, torch.ones(batch, len(DEFAULT_DIMENSIONS)))
    g = torch.Generator().manual_seed(4)
    table = {t: torch.randn(77, context_dim, generator=g) for t in dict.fromkeys(layout.texts)}
    texts = EncodedTexts.of(lambda ts: (torch.stack([table[t] for t in ts]).to(device), None), layout.texts)
    x_t = torch.randn(batch, 4, latent, latent, generator=g).to(device)
    forward = diffusers_unet_forward(unet)
    runners = {name: (lambda _, o=o: o.teacher_outputs(forward, texts, layout, x_t, 500)) for name, o in
               (("batched", batched), ("looped", looped))}
    outputs = {name: run(None) for name, run in runners.items()}
    for run in runners.values():
        for _ in range(warmup):
            run(None)
    times = {"batched": [], "looped": []}
    ratios: List[float] = []
    for r in range(rounds):
        medians = {}
        for name in (("batched", "looped") if r % 2 == 0 else ("looped", "batched")):
            samples = [_time(runners[name], None, device) for _ in range(steps)]
            times[name].extend(samples)
            medians[name] = statistics.median(samples)
        ratios.append(medians["looped"] / medians["batched"])
    return {
        "rows": len(layout.texts), "batched": statistics.median(times["batched"]), "looped": statistics.median(times["looped"]),
        "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
        "max_diff": float((outputs["batched"] - outputs["looped"]).abs().max()),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vmix_lib.train.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--unet", choices=("tiny", "sd15"), default="tiny", help="tiny test UNet, or the real SD1.5 layout")
    parser.add_argument("--latent", type=int, default=16, help="latent side (pixels / 8)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per runner per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--lora-rank", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--distill-teacher", action="store_true",
                        help="instead: the distill objective's teacher, one batched UNet call against one call per row")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clock = "wall" if device.type == "cuda" else "CPU"
    if args.distill_teacher:
        result = run_teacher(args.unet, args.latent, args.batch, args.rounds, args.steps, args.warmup, device)
        print(f"Distill teacher, one batched call vs one call per row: UNet {args.unet}, latent {args.latent}x{args.latent}, "
              f"{args.batch} samples x 13 rows = {result['rows']} rows, {device}, {torch.get_num_threads()} threads, "
              f"torch {torch.__version__}")
        print(f"  batched  median {result['batched'] * 1e3:9.2f} ms per micro-batch ({clock} time)")
        print(f"  per row  median {result['looped'] * 1e3:9.2f} ms per micro-batch ({clock} time)")
        print(f"  per row / batched, median of {args.rounds} paired rounds: {result['ratio']:.3f} "
              f"(range {result['ratio_min']:.3f}-{result['ratio_max']:.3f}); max |difference| {result['max_diff']:.2e}")
        return 0
    print(f"VMix trainer step, plain PyTorch vs accelerate: UNet {args.unet}, latent {args.latent}x{args.latent}, "
          f"batch {args.batch} x accumulation {args.accumulation}, LoRA rank {args.lora_rank}, {device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, {platform.processor() or platform.machine()}")
    result = run(args.unet, args.latent, args.batch, args.accumulation, args.rounds, args.steps, args.warmup,
                 args.lora_rank, device)
    print(f"  plain       median {result['plain'] * 1e3:9.2f} ms/step ({clock} time)")
    print(f"  accelerate  median {result['accelerate'] * 1e3:9.2f} ms/step ({clock} time)")
    print(f"  accelerate / plain, median of {args.rounds} paired rounds: {result['ratio']:.4f} "
          f"(range {result['ratio_min']:.4f}-{result['ratio_max']:.4f})")
    print(f"  same weights after {result['steps']} steps each: {result['same_weights']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
