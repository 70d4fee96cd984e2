"""Benchmark: ``python -m vmix_lib.bench [--family sd15|sdxl|all] [--repeats N] [--warmup N] [--threads N]``.

Times real-size UNet steps (diffusers UNet2DConditionModel with the SD1.5 / SDXL base configuration,
random weights, fp32, CPU, latent 32×32, batch 2 = cond + uncond) three ways, interleaved round by
round so that drift in machine load hits all three alike:

    off         no VMix hooks on the UNet
    hook        ValueMixer installed and armed (λ = 1, nonzero projection): to_v(c) + λ·V_a
    two-branch  literal Eq. 9: a second attention per attn2 with the content keys and V_a

V_a is computed once per generation in both VMix forms, so it is prepared outside the timed step.
Then the size and save/load time of full-size adapter files.  Needs diffusers (a test dependency).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import math
import os
import platform
import statistics
import tempfile
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from .dimensions import DEFAULT_DIMENSIONS
from .hook import ValueMixer
from .layers import LAYOUTS, TOKENS, find_cross_attention_layers
from .mixing import VMixAdapter
from .train.checkpoint_loading import shipped_unet_config

# diffusers configurations of the real models, as the trainer ships them (vmix_lib/train/configs).
CONFIGS = {family: shipped_unet_config(family) for family in ("sd15", "sdxl")}
TITLES = {"sd15": "SD1.5", "sdxl": "SDXL"}
DEFAULT_REPEATS = {"sd15": 7, "sdxl": 3}
LATENT = 32


# -- the literal two-branch form ------------------------------------------------------------------
class TwoBranchAttnProcessor:
    """Eq. 9 as written, for a diffusers ``Attention`` used as attn2:

        x̂ = softmax(QK_cᵀ/√d)·V_c + λ·softmax(QK_cᵀ/√d)·V_a        (two attention passes)

    ``v_aesthetic`` is V_a [77, inner] or [rows, 77, inner]; ``strength`` λ, a number or [rows].
    Covers the attn2 of SD/SDXL UNets (no spatial/group/cross norm, no mask).
    """

    def __init__(self, v_aesthetic: torch.Tensor, strength=1.0, record: Optional[List[Callable]] = None):
        self.v_aesthetic = v_aesthetic
        self.strength = strength
        self.record = record  # if a list, receives a replayable call of each second branch (benchmark)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if attn.spatial_norm is not None or attn.group_norm is not None or attn.norm_cross or attention_mask is not None:
            raise NotImplementedError("TwoBranchAttnProcessor covers plain SD/SDXL cross-attention only")
        if encoder_hidden_states is None:
            raise ValueError("TwoBranchAttnProcessor is for cross-attention (attn2) layers")
        residual = hidden_states
        b = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        heads = attn.heads
        dh = key.shape[-1] // heads

        def split(t):
            return t.reshape(b, -1, heads, dh).transpose(1, 2)

        chunks = key.shape[1] // self.v_aesthetic.shape[-2]
        v_a = self.v_aesthetic.to(value.dtype)
        if chunks != 1:
            v_a = torch.cat([v_a] * chunks, dim=-2)
        v_a = v_a.expand(b, *v_a.shape[-2:])
        q, k = split(query), split(key)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        content = F.scaled_dot_product_attention(q, k, split(value), scale=attn.scale)
        strength = self.strength
        if isinstance(strength, torch.Tensor):
            strength = strength.to(content.dtype).view(-1, 1, 1, 1)
        mixed = self._add_second_branch(content, q, k, split(v_a), strength, attn.scale)
        if self.record is not None:
            self.record.append(functools.partial(self._add_second_branch, content, q, k, split(v_a), strength, attn.scale))
        out = mixed.transpose(1, 2).reshape(b, -1, heads * dh).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    @staticmethod
    def _add_second_branch(content, q, k, v_a, strength, scale):
        """content + λ·softmax(QK_cᵀ/√d)·V_a: the work the two-branch form adds to an attn2."""
        return content + strength * F.scaled_dot_product_attention(q, k, v_a, scale=scale)


@contextlib.contextmanager
def two_branch(unet, adapter: VMixAdapter, f_a: torch.Tensor, strength=1.0, record: Optional[List[Callable]] = None):
    """Run ``unet``'s attn2 layers as the literal two-branch form for the duration of the block."""
    layers = find_cross_attention_layers(unet)
    saved = []
    try:
        for info in layers:
            device = info.module.to_v.weight.device
            with torch.no_grad():
                v_a = adapter.aesthetic_values(info.name, f_a, device=device)
            saved.append((info.module, info.module.processor))
            info.module.set_processor(TwoBranchAttnProcessor(v_a, strength, record))
        yield
    finally:
        for module, processor in saved:
            module.set_processor(processor)


# -- models ---------------------------------------------------------------------------------------
def build_unet(family: str, seed: int = 0):
    """A real-size UNet with random weights, built on the meta device and filled in place.

    Filling from one random pool (at a random offset per tensor, scaled by 1/√fan_in) takes
    seconds where the default initialisers take a minute for SDXL; the timings only need
    realistic shapes and finite, well-scaled activations.
    """
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**CONFIGS[family])
    unet = unet.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(1 << 22, generator=g)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if param.dim() > 1:
                flat = param.view(-1)
                start = int(torch.randint(0, pool.numel(), (1,), generator=g))
                filled = 0
                while filled < flat.numel():
                    piece = pool[start : start + flat.numel() - filled]
                    flat[filled : filled + piece.numel()].copy_(piece)
                    filled += piece.numel()
                    start = 0
                flat.mul_(1.0 / math.sqrt(param[0].numel()))
            elif name.endswith("weight"):
                param.fill_(1.0)  # norm scales
            else:
                param.zero_()
    return unet.eval().requires_grad_(False)


def live_adapter(unet, family: str, seed: int = 1) -> VMixAdapter:
    """An adapter whose branch is active: W_a = to_v, random AesEmb and a nonzero projection."""
    g = torch.Generator().manual_seed(seed)
    d = find_cross_attention_layers(unet)[0].context_dim
    adapter = VMixAdapter.for_unet(unet, torch.randn(2 * len(DEFAULT_DIMENSIONS), d, generator=g), family)
    with torch.no_grad():
        adapter.projection.out.weight.copy_(torch.randn(d, d, generator=g) / math.sqrt(d))
        adapter.projection.out.bias.copy_(torch.randn(d, generator=g) * 0.1)
    return adapter.requires_grad_(False)


def unet_inputs(family: str, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    d = CONFIGS[family]["cross_attention_dim"]
    latent = torch.randn(2, 4, LATENT, LATENT, generator=g)
    context = torch.randn(2, TOKENS, d, generator=g)  # row 0 cond, row 1 uncond
    kwargs = {}
    if family == "sdxl":
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, 1280, generator=g),
            "time_ids": torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * 2),
        }
    return latent, context, kwargs


# -- measurement ----------------------------------------------------------------------------------
def available_memory_gb() -> Optional[float]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def unet_memory_gb(family: str) -> float:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**CONFIGS[family])
    return sum(p.numel() for p in unet.parameters()) * 4 / 2**30


def bench_family(family: str, repeats: int, warmup: int, out=print) -> Dict[str, float]:
    title = TITLES[family]
    t0 = time.perf_counter()
    unet = build_unet(family)
    n_params = sum(p.numel() for p in unet.parameters())
    adapter = live_adapter(unet, family)
    mixer = ValueMixer(adapter, strength=1.0)
    f_a = adapter.aesthetic_context(adapter.aesthetic_input()).detach()
    latent, context, kwargs = unet_inputs(family)
    layers = find_cross_attention_layers(unet)
    out(f"{title} UNet: diffusers UNet2DConditionModel, {title} config, {n_params / 1e6:.1f}M parameters, random weights, fp32, CPU")
    out(f"  latent {tuple(latent.shape)} (cond + uncond), context {tuple(context.shape)}, {len(layers)} attn2 layers;"
        f" built in {time.perf_counter() - t0:.1f} s")

    def step():
        return unet(latent, 500, encoder_hidden_states=context, **kwargs).sample

    @contextlib.contextmanager
    def hooked():
        with mixer.applied(unet):
            mixer.precompute(latent.device, latent.dtype)  # once per generation, not per step
            yield

    variants = {"off": contextlib.nullcontext, "hook": hooked, "two-branch": lambda: two_branch(unet, adapter, f_a)}
    names = list(variants)
    wall: Dict[str, List[float]] = {n: [] for n in names}
    cpu: Dict[str, List[float]] = {n: [] for n in names}
    outputs: Dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for r in range(warmup + repeats):
            order = names[r % 3 :] + names[: r % 3]  # rotate so no variant always runs first
            for name in order:
                with variants[name]():
                    gc.collect()
                    w0, c0 = time.perf_counter(), time.process_time()
                    result = step()
                    w1, c1 = time.perf_counter(), time.process_time()
                if r >= warmup:
                    wall[name].append(w1 - w0)
                    cpu[name].append(c1 - c0)
                outputs[name] = result

    med_wall = {n: statistics.median(wall[n]) for n in names}
    min_wall = {n: min(wall[n]) for n in names}
    med_cpu = {n: statistics.median(cpu[n]) for n in names}
    out(f"  {repeats} timed rounds after {warmup} warm-up, variants interleaved; wall-clock seconds per UNet step:")
    out(f"    {'variant':<11} {'median':>8} {'min':>8} {'median/off':>11} {'min/off':>8} {'paired/off':>11}")
    for n in names:
        paired = statistics.median(w / o for w, o in zip(wall[n], wall["off"]))
        out(f"    {n:<11} {med_wall[n]:8.3f} {min_wall[n]:8.3f} {med_wall[n] / med_wall['off']:11.4f}"
            f" {min_wall[n] / min_wall['off']:8.4f} {paired:11.4f}")
    out("    (paired/off: median over rounds of the step time divided by the same round's off step)")
    out("  process CPU time, medians: " + ", ".join(
        f"{n} {med_cpu[n]:.3f} s ({med_cpu[n] / med_cpu['off']:.4f})" for n in names))

    # What each VMix form itself adds to a step, apart from machine load: record every hook call
    # and every second attention branch of one step, then replay each alone on one thread.
    hook_calls: List[Callable] = []
    with torch.no_grad(), hooked():
        for module in unet.modules():
            for key, fn in list(module._forward_hooks.items()):
                module._forward_hooks[key] = _recording(fn, hook_calls)
        step()
        hook_seconds = replay_seconds(hook_calls)
    branch_calls: List[Callable] = []
    with torch.no_grad(), two_branch(unet, adapter, f_a, record=branch_calls):
        step()
    branch_seconds = replay_seconds(branch_calls)
    del hook_calls, branch_calls
    off_step = med_wall["off"]
    out("  VMix's own work per step, each call replayed alone on 1 thread (median of 10):")
    out(f"    hook (to_v output + λ·V_a): {hook_seconds * 1e3:8.2f} ms for {len(layers)} layers,"
        f" {hook_seconds / off_step * 100:6.3f}% of the median off step")
    out(f"    two-branch second attention: {branch_seconds * 1e3:7.2f} ms for {len(layers)} layers,"
        f" {branch_seconds / off_step * 100:6.3f}% of the median off step")
    assert not any(m._forward_hooks for m in unet.modules()), "benchmark left a hook behind"
    scale = outputs["off"].abs().max().item()
    diff = (outputs["hook"] - outputs["two-branch"]).abs().max().item()
    effect = (outputs["hook"] - outputs["off"]).abs().max().item()
    out(f"  agreement: max |hook - two-branch| = {diff:.3e} (max |output| {scale:.3f};"
        f" VMix changes the output by up to {effect:.3f})")
    result = {
        "hook_ratio": med_wall["hook"] / med_wall["off"],
        "two_branch_ratio": med_wall["two-branch"] / med_wall["off"],
        "hook_seconds": hook_seconds,
        "branch_seconds": branch_seconds,
        "max_diff": diff,
    }
    del unet, adapter, mixer, outputs
    gc.collect()
    return result


def _recording(fn, calls: List[Callable]):
    """Wrap a forward hook so that each call can be replayed later with the same tensors."""

    def recording_hook(module, args, output):
        calls.append(functools.partial(fn, module, args, output))
        return fn(module, args, output)

    return recording_hook


def replay_seconds(calls: List[Callable], repeats: int = 10) -> float:
    """Sum over calls of the median time of running each alone, single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # no waiting on a descheduled worker thread on a busy machine
    try:
        total = 0.0
        with torch.no_grad():
            for call in calls:
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    call()
                    times.append(time.perf_counter() - start)
                total += statistics.median(times)
        return total
    finally:
        torch.set_num_threads(threads)


def bench_adapter_files(out=print) -> None:
    out("Adapter files (full size, 6 dimensions; W_a in the given dtype, AesEmb and projection fp32):")
    out(f"    {'family':<7} {'dtype':<6} {'size MB':>8} {'save s':>7} {'load s':>7} {'info s':>7}")
    from .adapter_file import load_adapter, read_adapter_info, save_adapter

    with tempfile.TemporaryDirectory(prefix="vmix-bench-") as tmp:
        for family, layout in LAYOUTS.items():
            d = layout[0].context_dim
            adapter = VMixAdapter(DEFAULT_DIMENSIONS, d, {i.name: i.inner_dim for i in layout}, family)
            adapter.aes_emb.normal_()
            for dtype, tag in ((torch.float32, "fp32"), (torch.float16, "fp16")):
                path = os.path.join(tmp, f"{family}-{tag}.safetensors")
                t0 = time.perf_counter()
                save_adapter(adapter, path, training={"note": "benchmark"}, dtype=dtype)
                t1 = time.perf_counter()
                loaded = load_adapter(path)
                t2 = time.perf_counter()
                read_adapter_info(path)
                t3 = time.perf_counter()
                size = os.path.getsize(path) / 1e6
                out(f"    {TITLES[family]:<7} {tag:<6} {size:8.1f} {t1 - t0:7.2f} {t2 - t1:7.2f} {t3 - t2:7.4f}")
                del loaded
                os.remove(path)
            del adapter
            gc.collect()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vmix_lib.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=("sd15", "sdxl", "all"), default="all")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per UNet (default: 7 SD1.5, 3 SDXL)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-files", action="store_true", help="skip the adapter file section")
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1 or args.warmup < 0 or args.threads is not None and args.threads < 1:
        parser.error("--repeats and --threads must be at least 1, --warmup at least 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"VMix benchmark: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    families = ["sd15", "sdxl"] if args.family == "all" else [args.family]
    for family in families:
        repeats = args.repeats or DEFAULT_REPEATS[family]
        need = unet_memory_gb(family) * 1.15 + 1.0  # weights, adapter copy of to_v, activations
        have = available_memory_gb()
        if have is not None and have < need:
            print(f"{TITLES[family]} UNet: skipped, it does not fit in memory (needs about {need:.1f} GB, {have:.1f} GB available)")
            continue
        bench_family(family, repeats, args.warmup)
    if not args.no_files:
        bench_adapter_files()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
