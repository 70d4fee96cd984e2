"""Benchmark: ``python -m vmix_lib.bench [--family sd15|sdxl|all] [--device cpu|cuda] [--dtype fp32|fp16|bf16]``.

Times real-size UNet steps (diffusers UNet2DConditionModel with the SD1.5 / SDXL base configuration,
random weights) three ways, interleaved round by round so that drift in machine load hits all alike:

    off         no VMix hooks on the UNet
    hook        ValueMixer installed and armed (λ = 1, nonzero projection): to_v(c) + λ·V_a
    two-branch  literal Eq. 9: a second attention per attn2 with the content keys and V_a

Defaults: CPU, fp32, latent 32×32 (256 px), batch 2 (cond + uncond).  ``--device cuda --dtype fp16``
times on a GPU with CUDA events after warm-up rounds, synchronised, at 512² (SD1.5) and 1024² (SDXL).
V_a is computed once per generation (and shared by the next generations while adapter and α stay the
same), so it is prepared outside the timed step and timed on its own: the generation-start cost with
the adapter on the CPU in its file dtype as the WebUI keeps it, and the cost when only λ changed.
Then the size, save/load time and memory of full-size adapter files.  Needs diffusers (a test
dependency).
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
from .hook import AestheticValues, ValueMixer
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
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build_unet(family: str, seed: int = 0, device="cpu", dtype: torch.dtype = torch.float32, config: Optional[dict] = None):
    """A real-size UNet with random weights, built on the meta device and filled in place.

    Filling from one random pool (at a random offset per tensor, scaled by 1/√fan_in) takes
    seconds where the default initialisers take a minute for SDXL; the timings only need
    realistic shapes and finite, well-scaled activations.
    """
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**(config or CONFIGS[family]))
    if dtype != torch.float32:
        unet = unet.to(dtype)  # still on meta: no float32 copy on the device first
    unet = unet.to_empty(device=device)
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(1 << 22, generator=g).to(device)
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


def live_adapter(unet, family: str, seed: int = 1, values_dtype: torch.dtype = torch.float32) -> VMixAdapter:
    """An adapter whose branch is active: W_a = to_v, random AesEmb and a nonzero projection.

    It lives on the CPU with W_a in ``values_dtype``, as the WebUI keeps a loaded adapter file.
    """
    g = torch.Generator().manual_seed(seed)
    d = find_cross_attention_layers(unet)[0].context_dim
    adapter = VMixAdapter.for_unet(unet, torch.randn(2 * len(DEFAULT_DIMENSIONS), d, generator=g), family)
    with torch.no_grad():
        adapter.projection.out.weight.copy_(torch.randn(d, d, generator=g) / math.sqrt(d))
        adapter.projection.out.bias.copy_(torch.randn(d, generator=g) * 0.1)
    adapter.values.to(values_dtype)
    return adapter.requires_grad_(False)


def unet_inputs(family: str, seed: int = 2, device="cpu", dtype: torch.dtype = torch.float32, latent: int = 32,
                batch: int = 2, config: Optional[dict] = None):
    config = config or CONFIGS[family]
    g = torch.Generator().manual_seed(seed)
    d = config["cross_attention_dim"]
    sample = torch.randn(batch, config.get("in_channels", 4), latent, latent, generator=g)
    context = torch.randn(batch, TOKENS, d, generator=g)  # cond rows, then uncond rows
    kwargs = {}
    if config.get("addition_embed_type") == "text_time":
        text_dim = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        px = float(latent * 8)
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, text_dim, generator=g).to(device, dtype),
            "time_ids": torch.tensor([[px, px, 0.0, 0.0, px, px]] * batch).to(device, dtype),
        }
    return sample.to(device, dtype), context.to(device, dtype), kwargs


# -- measurement ----------------------------------------------------------------------------------
class Clock:
    """Seconds of GPU work between CUDA events (synchronised) on a GPU; wall and process time on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn: Callable, repeats: int = 1):
        """(seconds per call, CPU seconds per call or None, the last result) of ``repeats`` calls."""
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(repeats):
                result = fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / repeats, None, result
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(repeats):
            result = fn()
        w1, c1 = time.perf_counter(), time.process_time()
        return (w1 - w0) / repeats, (c1 - c0) / repeats, result


def available_memory_gb(device: torch.device) -> Optional[float]:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free / 2**30
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def unet_memory_gb(family: str, dtype: torch.dtype = torch.float32) -> float:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**CONFIGS[family])
    return sum(p.numel() for p in unet.parameters()) * torch.finfo(dtype).bits / 8 / 2**30


def default_latent(family: str, device: torch.device) -> int:
    """Latent side: the family's native resolution on a GPU (512² SD1.5, 1024² SDXL), 256² on a CPU."""
    if device.type == "cuda":
        return 64 if family == "sd15" else 128
    return LATENT


def prepare_seconds(adapter: VMixAdapter, clock: Clock, device: torch.device, dtype: torch.dtype, repeats: int = 5):
    """Generation start: (s to make f_a and V_a of every layer for a new adapter or α, s when only λ
    changed (the next generation shares them), W_a·f_a products of the second)."""
    def fresh():
        values = AestheticValues.for_alphas(adapter, {"color": 0.5})
        ValueMixer(adapter, strength=1.0, values=values).precompute(device, dtype)
        return values

    clock.time(fresh)  # warm-up (first transfer and kernels)
    cold = statistics.median(clock.time(fresh)[0] for _ in range(repeats))
    values = fresh()
    before = values.computed
    warm = statistics.median(
        clock.time(lambda: ValueMixer(adapter, strength=2.0, values=values).precompute(device, dtype))[0]
        for _ in range(repeats)
    )
    return cold, warm, values.computed - before


def bench_family(family: str, repeats: int, warmup: int, out=print, device="cpu", dtype: torch.dtype = torch.float32,
                 latent: Optional[int] = None, batch: int = 2, config: Optional[dict] = None) -> Dict[str, float]:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    clock = Clock(device)
    latent = latent or default_latent(family, device)
    dtype_name = {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype))
    title = TITLES[family]
    t0 = time.perf_counter()
    unet = build_unet(family, device=device, dtype=dtype, config=config)
    n_params = sum(p.numel() for p in unet.parameters())
    adapter = live_adapter(unet, family, values_dtype=dtype)
    mixer = ValueMixer(adapter, strength=1.0)
    f_a = adapter.aesthetic_context(adapter.aesthetic_input()).detach()
    sample, context, kwargs = unet_inputs(family, device=device, dtype=dtype, latent=latent, batch=batch, config=config)
    layers = find_cross_attention_layers(unet)
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    out(f"{title} UNet: diffusers UNet2DConditionModel, {title} config, {n_params / 1e6:.1f}M parameters, random weights,"
        f" {dtype_name}, {device.type}{gpu}")
    out(f"  latent {tuple(sample.shape)} ({latent * 8}² px, batch {batch}: cond + uncond), context {tuple(context.shape)},"
        f" {len(layers)} attn2 layers; built in {time.perf_counter() - t0:.1f} s")

    def step():
        return unet(sample, 500, encoder_hidden_states=context, **kwargs).sample

    @contextlib.contextmanager
    def hooked():
        with mixer.applied(unet):
            mixer.precompute(device, dtype)  # once per generation, not per step
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
                    if not clock.cuda:
                        gc.collect()
                    seconds, cpu_seconds, result = clock.time(step)
                if r >= warmup:
                    wall[name].append(seconds)
                    cpu[name].append(cpu_seconds)
                outputs[name] = result

    med_wall = {n: statistics.median(wall[n]) for n in names}
    min_wall = {n: min(wall[n]) for n in names}
    what = "GPU seconds per UNet step (CUDA events, synchronised)" if clock.cuda else "wall-clock seconds per UNet step"
    out(f"  {repeats} timed rounds after {warmup} warm-up, variants interleaved; {what}:")
    out(f"    {'variant':<11} {'median':>8} {'min':>8} {'median/off':>11} {'min/off':>8} {'paired/off':>11}")
    paired = {}
    for n in names:
        paired[n] = statistics.median(w / o for w, o in zip(wall[n], wall["off"]))
        out(f"    {n:<11} {med_wall[n]:8.4f} {min_wall[n]:8.4f} {med_wall[n] / med_wall['off']:11.4f}"
            f" {min_wall[n] / min_wall['off']:8.4f} {paired[n]:11.4f}")
    out("    (paired/off: median over rounds of the step time divided by the same round's off step)")
    if not clock.cuda:
        med_cpu = {n: statistics.median(cpu[n]) for n in names}
        out("  process CPU time, medians: " + ", ".join(
            f"{n} {med_cpu[n]:.3f} s ({med_cpu[n] / med_cpu['off']:.4f})" for n in names))

    # What each VMix form itself adds to a step, apart from machine load: record every hook call
    # and every second attention branch of one step, then replay each alone.
    hook_calls: List[Callable] = []
    with torch.no_grad(), hooked():
        for module in unet.modules():
            for key, fn in list(module._forward_hooks.items()):
                module._forward_hooks[key] = _recording(fn, hook_calls)
        step()
        hook_seconds = replay_seconds(hook_calls, clock)
    branch_calls: List[Callable] = []
    with torch.no_grad(), two_branch(unet, adapter, f_a, record=branch_calls):
        step()
    branch_seconds = replay_seconds(branch_calls, clock)
    del hook_calls, branch_calls
    off_step = med_wall["off"]
    alone = "each call replayed alone, median of 10" + ("" if clock.cuda else " on 1 thread")
    out(f"  VMix's own work per step ({alone}):")
    out(f"    hook (to_v output + λ·V_a): {hook_seconds * 1e3:8.3f} ms for {len(layers)} layers,"
        f" {hook_seconds / off_step * 100:6.3f}% of the median off step")
    out(f"    two-branch second attention: {branch_seconds * 1e3:7.3f} ms for {len(layers)} layers,"
        f" {branch_seconds / off_step * 100:6.3f}% of the median off step")

    cold, warm, recomputed = prepare_seconds(adapter, clock, device, dtype)
    w_dtype = {v: k for k, v in DTYPES.items()}.get(adapter.value(adapter.layer_names[0]).weight.dtype)
    out(f"  V_a at generation start (adapter on the CPU, W_a {w_dtype}; f_a and W_a·f_a of {len(layers)} layers on"
        f" {device.type}): new adapter or α {cold * 1e3:.2f} ms; only λ changed {warm * 1e3:.3f} ms"
        f" ({recomputed} products recomputed)")
    assert not any(m._forward_hooks for m in unet.modules()), "benchmark left a hook behind"
    scale = outputs["off"].abs().max().item()
    diff = (outputs["hook"] - outputs["two-branch"]).abs().max().item()
    effect = (outputs["hook"] - outputs["off"]).abs().max().item()
    out(f"  agreement: max |hook - two-branch| = {diff:.3e} (max |output| {scale:.3f};"
        f" VMix changes the output by up to {effect:.3f})")
    result = {
        "hook_ratio": med_wall["hook"] / med_wall["off"],
        "two_branch_ratio": med_wall["two-branch"] / med_wall["off"],
        "hook_paired": paired["hook"],
        "two_branch_paired": paired["two-branch"],
        "off_seconds": off_step,
        "hook_seconds": hook_seconds,
        "branch_seconds": branch_seconds,
        "prepare_seconds": cold,
        "prepare_seconds_same_alpha": warm,
        "recomputed_same_alpha": recomputed,
        "max_diff": diff,
        "effect": effect,
        "scale": scale,
    }
    del unet, adapter, mixer, outputs
    gc.collect()
    if clock.cuda:
        torch.cuda.empty_cache()
    return result


def _recording(fn, calls: List[Callable]):
    """Wrap a forward hook so that each call can be replayed later with the same tensors."""

    def recording_hook(module, args, output):
        calls.append(functools.partial(fn, module, args, output))
        return fn(module, args, output)

    return recording_hook


def replay_seconds(calls: List[Callable], clock: Optional[Clock] = None, repeats: int = 10) -> float:
    """Sum over calls of the median time of running each alone (single-threaded on a CPU)."""
    clock = clock or Clock(torch.device("cpu"))
    threads = torch.get_num_threads()
    if not clock.cuda:
        torch.set_num_threads(1)  # no waiting on a descheduled worker thread on a busy machine
    try:
        total = 0.0
        with torch.no_grad():
            for call in calls:
                if clock.cuda:  # one launch is too short for events: time 10 back to back
                    call()
                    total += clock.time(call, repeats)[0]
                else:
                    total += statistics.median(clock.time(call)[0] for _ in range(repeats))
        return total
    finally:
        torch.set_num_threads(threads)


def adapter_memory_mb(adapter: torch.nn.Module) -> float:
    """Bytes the adapter's tensors hold in memory, in MB."""
    tensors = list(adapter.parameters()) + list(adapter.buffers())
    return sum(t.numel() * t.element_size() for t in tensors) / 1e6


def bench_adapter_files(out=print, repeats: int = 3) -> Dict[str, Dict[str, float]]:
    from .adapter_file import load_adapter, read_adapter_info, save_adapter

    out("Adapter files (full size, 6 dimensions; W_a in the given dtype, AesEmb and projection fp32;"
        f" load: median of {repeats}):")
    out(f"    {'family':<7} {'dtype':<6} {'size MB':>8} {'save s':>7} {'load s':>7} {'memory MB':>10} {'info s':>7}")
    results = {}
    with tempfile.TemporaryDirectory(prefix="vmix-bench-") as tmp:
        for family, layout in LAYOUTS.items():
            d = layout[0].context_dim
            adapter = VMixAdapter(DEFAULT_DIMENSIONS, d, {i.name: i.inner_dim for i in layout}, family)
            adapter.aes_emb.normal_()
            for dtype, tag in ((torch.float32, "fp32"), (torch.float16, "fp16")):
                path = os.path.join(tmp, f"{family}-{tag}.safetensors")
                t0 = time.perf_counter()
                save_adapter(adapter, path, training={"note": "benchmark"}, dtype=dtype)
                save = time.perf_counter() - t0
                loads = []
                for _ in range(repeats):
                    gc.collect()
                    t1 = time.perf_counter()
                    loaded = load_adapter(path)
                    loads.append(time.perf_counter() - t1)
                    memory = adapter_memory_mb(loaded)
                    del loaded
                t3 = time.perf_counter()
                read_adapter_info(path)
                info = time.perf_counter() - t3
                size = os.path.getsize(path) / 1e6
                load = statistics.median(loads)
                out(f"    {TITLES[family]:<7} {tag:<6} {size:8.1f} {save:7.2f} {load:7.2f} {memory:10.1f} {info:7.4f}")
                results[f"{family}-{tag}"] = {"size_mb": size, "save_s": save, "load_s": load, "memory_mb": memory}
                os.remove(path)
            del adapter
            gc.collect()
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vmix_lib.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=("sd15", "sdxl", "all"), default="all")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda / cuda:N")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="UNet and W_a precision (default fp32)")
    parser.add_argument("--size", type=int, default=None,
                        help="image side in pixels (default: 256 on a CPU; 512 SD1.5 and 1024 SDXL on a GPU)")
    parser.add_argument("--batch", type=int, default=2, help="UNet batch (default 2: cond + uncond)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed rounds per UNet (default: 7 SD1.5, 3 SDXL on a CPU; 30 on a GPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 1 on a CPU, 5 on a GPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    files = parser.add_mutually_exclusive_group()
    files.add_argument("--no-files", action="store_true", help="skip the adapter file section")
    files.add_argument("--files-only", action="store_true", help="only the adapter file section")
    args = parser.parse_args(argv)
    if (args.repeats is not None and args.repeats < 1 or args.warmup is not None and args.warmup < 0
            or args.threads is not None and args.threads < 1 or args.batch < 1):
        parser.error("--repeats, --batch and --threads must be at least 1, --warmup at least 0")
    if args.size is not None and (args.size < 64 or args.size % 64):
        parser.error("--size must be a multiple of 64 pixels (the UNet halves the latent three times)")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device!r} is not a torch device; use cpu or cuda")
    if device.type not in ("cpu", "cuda"):
        parser.error("--device must be cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this torch sees no CUDA GPU (a CPU build, or no driver)")
    dtype = DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"VMix benchmark: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    if device.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}")
    families = ["sd15", "sdxl"] if args.family == "all" else [args.family]
    for family in ([] if args.files_only else families):
        if device.type == "cuda":
            repeats, warmup = args.repeats or 30, 5 if args.warmup is None else args.warmup
        else:
            repeats, warmup = args.repeats or DEFAULT_REPEATS[family], 1 if args.warmup is None else args.warmup
        latent = args.size // 8 if args.size else None
        need = unet_memory_gb(family, dtype) * 1.3 + 1.0  # weights, two-branch V_a, activations
        have = available_memory_gb(device)
        if have is not None and have < need:
            print(f"{TITLES[family]} UNet: skipped, it does not fit in memory (needs about {need:.1f} GB, {have:.1f} GB available)")
            continue
        bench_family(family, repeats, warmup, device=device, dtype=dtype, latent=latent, batch=args.batch)
    if not args.no_files:
        bench_adapter_files()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
