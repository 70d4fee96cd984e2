"""Training objectives for ``python -m vmix_lib.train`` (the seam is documented on loop.Objective).

    data      DataObjective: a dataset folder (images, captions, labels) -> VAE latents cached per
              image and aspect-ratio bucket -> ε/v-prediction MSE (the paper's §3.4 training)
    distill   distill.DistillTraining: content prompts and a phrase pair per dimension -> the frozen
              base model's own predictions as the target (no images; Concept Sliders' recipe)

``OBJECTIVES`` maps the config's ``objective`` to a factory ``(cfg, family, size_multiple, log)``
that validates its inputs before any model loads (``--dry-run`` stops after it).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch

from .buckets import BatchPlan, BucketSettings, assign_buckets, bucket_summary, fit_to_bucket
from .config import not_a_multiple
from .dataset import DatasetError, DatasetItem, load_dataset, load_image
from .errors import TrainError
from .latents import LatentCache, cache_identity, image_latent_shape
from .distill import make_distill_objective
from .loop import DiffusionObjective, TrainBatch
from .runtime import local_processes, sample_generator, split_for_process
from .text import sdxl_time_ids


@dataclass
class RunContext:
    """What an objective's ``setup`` gets once the models are loaded (on every process)."""

    cfg: Any  # TrainConfig
    family: str
    base: Any  # checkpoint_loading.BaseModel (unet, vae, text encoders, ...); None in the WebUI's VMix tab
    conditioner: Any  # text.TextConditioner; None in the WebUI's VMix tab
    accelerator: Any
    device: torch.device
    output_dir: str
    progress: Callable  # tqdm-like
    log: Callable[[str], None]  # prints on the main process only
    vae_factor: int  # pixels per latent pixel
    prediction: str = "epsilon"  # what the UNet predicts (epsilon, v_prediction)
    unet_forward: Optional[Callable] = None  # (x_t, t, context, added_cond) -> the UNet's output (loop.UnetForward)
    mixer: Any = None  # the trainer's armed ValueMixer; disarmed, unet_forward is the frozen base model
    latent_channels: int = 4
    alphas_cumprod: Optional[torch.Tensor] = None  # [T] the model's noise schedule
    encoder: Optional[Callable] = None  # picture size -> (texts -> (context, added)) for size×size pictures


RARE_LABELS = 0.01  # a dimension with superior labels on fewer than this share of the images gets a warning


class DataObjective(DiffusionObjective):
    """Images with captions and aesthetic labels, trained with the diffusion loss (paper §3.4).

    Batches: ``buckets.BatchPlan`` cuts each epoch into global micro-batches of
    batch_size × processes images from one bucket; each process takes its contiguous part
    (``runtime.split_for_process``), so all processes run the same bucket shape in a step (no
    process waits for a bigger one) and the global batch is the same for any process count.
    Each sample's caption dropout, aesthetic dropout, timestep and noise come from its own seeded
    generator.  Loading runs in DataLoader workers (cached latents are small files; pinned memory
    on CUDA), while the text encoders run on the device in the training process.
    """

    name = "data"

    def __init__(self, cfg, family: str, size_multiple: int, log: Callable[[str], None]):
        super().__init__(0.0)
        self.cfg, self.family = cfg, family
        self.resolution = cfg.family_default("resolution", family)
        self.settings = BucketSettings(self.resolution, cfg.bucket, cfg.bucket_min, cfg.bucket_max,
                                       cfg.bucket_step or size_multiple)
        problem = self.settings.problem()
        if problem:
            raise TrainError(f"aspect-ratio buckets: {problem}")
        if self.settings.step % size_multiple:
            raise TrainError(not_a_multiple("bucket_step", self.settings.step, size_multiple, cfg.origin("bucket_step")))
        self.dim_names = [d.name for d in cfg.dimensions]
        self._set_items(load_dataset(cfg.dataset_dir, self.dim_names, cfg.skip_bad, log))
        self.position = 0
        self.plan: Optional[BatchPlan] = None
        self.ctx: Optional[RunContext] = None

    def _set_items(self, items: Sequence[DatasetItem]) -> None:
        self.items = list(items)
        self.bucket_list = self.settings.buckets()
        self.assigned = assign_buckets([it.size for it in self.items], self.bucket_list)

    # -- what the run prints and records -----------------------------------------------------
    @property
    def label_counts(self) -> Dict[str, int]:
        return {d: sum(1 for it in self.items if it.labels[i] == 1.0) for i, d in enumerate(self.dim_names)}

    def summary(self) -> List[str]:
        s = self.settings.resolved()
        counts = ", ".join(f"{d} {c}" for d, c in self.label_counts.items())
        lines = [f"  data: {len(self.items)} images; superior labels: {counts}"]
        rare = [(d, c) for d, c in self.label_counts.items() if c < RARE_LABELS * len(self.items)]
        if rare:
            named = ", ".join(f"{d} ({c})" for d, c in rare)
            rest = [d for d in self.dim_names if d not in dict(rare)]
            it = "it" if len(rare) == 1 else "them"
            lines.append(
                f"  warning: under {RARE_LABELS * 100:g} % of the {len(self.items)} images are labelled superior in {named}: "
                "the adapter learns next to nothing for a dimension without superior examples; label some superior "
                "(python -m vmix_lib.prepare, or the dataset's .json / metadata.jsonl labels)"
                + (f" or train without {it}: --dimensions {','.join(rest)}" if rest else "")
            )
        if s.enabled:
            used = len(set(self.assigned))
            lines.append(f"  aspect-ratio buckets: {len(self.bucket_list)} of about {s.resolution}x{s.resolution} px "
                         f"(sides {s.min_size}-{s.max_size}, step {s.step}), {used} used: {bucket_summary(self.assigned)}")
        else:
            lines.append(f"  square centre crops at {s.resolution}x{s.resolution} px (bucket = false)")
        upscaled = sum(1 for it, b in zip(self.items, self.assigned) if fit_to_bucket(it.size, b)[0][0] > it.size[0])
        if upscaled:
            lines.append(f"  note: {upscaled} image(s) are smaller than their bucket and are upscaled")
        return lines

    def facts(self) -> Dict:
        return {
            "objective": self.name, "resolution": self.resolution, "images": len(self.items),
            "buckets": self.settings.to_json(), "superior_labels": self.label_counts,
            "caption_dropout": self.cfg.caption_dropout, "aesthetic_dropout": self.cfg.aesthetic_dropout,
        }

    def preview_prompts(self) -> List[str]:
        return list(dict.fromkeys(it.caption for it in self.items))[:2]

    # -- preparation (every process) ---------------------------------------------------------
    def setup(self, ctx: RunContext) -> None:
        self.ctx = ctx
        cfg, acc = ctx.cfg, ctx.accelerator
        self.latent_channels = ctx.base.unet.config.in_channels
        self.cache: Optional[LatentCache] = None
        if cfg.cache_latents:
            cache_dir = cfg.cache_dir or os.path.join(ctx.output_dir, "cache")
            self.cache = LatentCache(ctx.base.vae, ctx.base.scaling_factor, ctx.device, cache_dir,
                                     cache_identity(cfg.vae or cfg.checkpoint))
            failures = self.cache.fill(list(zip(self.items, self.assigned)), max(1, cfg.batch_size), acc,
                                       ctx.progress, local_processes(acc))
            if failures:
                problems = [f"unreadable image: {n} ({e})" for n, e in failures]
                if not cfg.skip_bad:
                    raise DatasetError(os.path.abspath(cfg.dataset_dir), problems)
                ctx.log(f"--skip-bad: skipping {len(failures)} image(s) that failed to decode: " + ", ".join(n for n, _ in failures))
                failed = {n for n, _ in failures}
                self._set_items([it for it in self.items if it.name not in failed])
                if not self.items:
                    raise TrainError("no usable images are left")
        self.global_batch = cfg.batch_size * acc.num_processes
        self.plan = BatchPlan(self.assigned, self.global_batch, cfg.seed)

    # -- batches ----------------------------------------------------------------------------
    def batches(self, count: int) -> Iterator[TrainBatch]:
        from torch.utils.data import DataLoader

        ctx = self.ctx
        cuda = ctx.device.type == "cuda"
        workers = self.cfg.data_workers
        source = PlannedSamples(
            self.plan, self.items, self.assigned,
            [self.cache.path(it, b) for it, b in zip(self.items, self.assigned)] if self.cache else None,
            ctx.accelerator.num_processes, ctx.accelerator.process_index, self.cfg.seed,
            self.cfg.caption_dropout, self.cfg.aesthetic_dropout, int(ctx.base.alphas_cumprod.shape[0]),
            self.latent_channels, ctx.vae_factor,
        )
        loader = DataLoader(source, batch_size=None, sampler=range(self.position, self.position + count),
                            num_workers=workers, pin_memory=cuda, prefetch_factor=4 if workers else None,
                            persistent_workers=False)
        for raw in loader:
            batch = self._on_device(raw)
            self.position += 1
            yield batch

    def _on_device(self, raw: Dict) -> TrainBatch:
        ctx = self.ctx
        device = ctx.device
        if "error" in raw:
            raise TrainError(raw["error"])
        if "latents" in raw:
            latents = raw["latents"].to(device, non_blocking=True)
        else:
            latents = self.cache_free_encode(raw["pixels"])
        context, text_embeds = ctx.conditioner.encode(raw["captions"])
        added = None
        if self.family == "sdxl":
            bucket_w, bucket_h = raw["bucket"]
            time_ids = torch.tensor(
                [sdxl_time_ids((sc[0], sc[1]), (sc[2], sc[3]), (bucket_h, bucket_w)) for sc in raw["size_crop"].tolist()],
                device=device,
            )
            added = {"text_embeds": text_embeds, "time_ids": time_ids.to(text_embeds.dtype)}
        return TrainBatch(
            latents, context, raw["labels"].to(device, non_blocking=True), added,
            noise=raw["noise"].to(device, non_blocking=True), timesteps=raw["timesteps"].to(device, non_blocking=True),
            weights=raw["weights"].to(device, non_blocking=True), loss_scale=float(raw["loss_scale"]),
        )

    def cache_free_encode(self, pixels: torch.Tensor) -> torch.Tensor:
        base = self.ctx.base
        with torch.no_grad():
            batch = pixels.to(self.ctx.device, next(base.vae.parameters()).dtype, non_blocking=True)
            return base.vae.encode(batch).latent_dist.mean.float() * base.scaling_factor

    # -- resume -----------------------------------------------------------------------------
    def state_dict(self) -> Dict:
        return {"position": self.position, "global_batch": self.global_batch, "per_epoch": self.plan.per_epoch,
                "images": len(self.items), "buckets": self.settings.to_json(), "seed": self.cfg.seed}

    def load_state_dict(self, state: Dict, log: Callable[[str], None] = print) -> None:
        same = all(state.get(k) == v for k, v in (("global_batch", self.global_batch), ("images", len(self.items)),
                                                   ("buckets", self.settings.to_json()), ("seed", self.cfg.seed)))
        if same:
            self.position = int(state["position"])
            return
        if "position" in state:
            epoch, within = divmod(int(state["position"]), int(state["per_epoch"]))
            fraction = within / int(state["per_epoch"])
        else:  # a state of trainer version 1: a count of samples from one process
            epoch, within = divmod(int(state["samples_seen"]), int(state["images"]))
            fraction = within / int(state["images"])
        self.position = self.plan.continue_from(epoch, fraction)
        changed = [name for name, key, now in (
            ("global micro-batch", "global_batch", self.global_batch), ("number of images", "images", len(self.items)),
            ("bucket settings", "buckets", self.settings.to_json()), ("seed", "seed", self.cfg.seed),
        ) if key in state and state[key] != now]
        log(f"Note: the {', '.join(changed) or 'data order'} changed since the saved state: the data continue in epoch "
            f"{epoch + 1} at {fraction:.0%} of it with a new draw of batches (not as the original run would have).")

    def fingerprint(self) -> Dict:
        return {"objective": self.name}


class PlannedSamples(torch.utils.data.Dataset):
    """This process's part of global micro-batch ``i`` of the plan, loaded on the CPU (in workers).

    Holds only plain data (lists, numbers), so that it pickles cheaply to spawned workers.
    """

    def __init__(self, plan: BatchPlan, items: Sequence[DatasetItem], buckets, cache_paths: Optional[List[str]],
                 processes: int, rank: int, seed: int, caption_dropout: float, aesthetic_dropout: float,
                 timesteps: int, latent_channels: int, vae_factor: int):
        self.plan, self.items, self.buckets, self.cache_paths = plan, list(items), list(buckets), cache_paths
        self.processes, self.rank, self.seed = processes, rank, seed
        self.caption_dropout, self.aesthetic_dropout = caption_dropout, aesthetic_dropout
        self.timesteps, self.latent_channels, self.vae_factor = timesteps, latent_channels, vae_factor

    def __len__(self) -> int:  # batches of one epoch; the sampler indexes beyond it (epoch after epoch)
        return self.plan.per_epoch

    def __getitem__(self, index: int) -> Dict:
        planned = self.plan.batch(index)
        positions, weights, loss_scale = split_for_process(len(planned.items), self.processes, self.rank)
        captions, labels, steps, noises, images, size_crop = [], [], [], [], [], []
        for position in positions:
            i = planned.items[position]
            item = self.items[i]
            g = sample_generator(self.seed, planned.serials[position])
            drop_caption = torch.rand(1, generator=g).item() < self.caption_dropout
            drop_labels = torch.rand(1, generator=g).item() < self.aesthetic_dropout
            steps.append(torch.randint(0, self.timesteps, (1,), generator=g))
            captions.append("" if drop_caption else item.caption)
            labels.append([0.0] * len(item.labels) if drop_labels else list(item.labels))  # all inferior = α 0
            if self.cache_paths is not None:
                latents, sc = LatentCache.read(self.cache_paths[i])
                images.append(latents)
            else:
                try:
                    pixels, original, crop = load_image(item.image, planned.bucket)
                except Exception as e:  # reported by the training process in one sentence
                    return {"error": f"image {item.name} cannot be read ({str(e) or type(e).__name__}); fix or remove it and resume"}
                images.append(pixels)
                sc = [*original, *crop]
            size_crop.append(sc)
            noises.append(torch.randn(image_latent_shape(planned.bucket, self.latent_channels, self.vae_factor), generator=g))
        out = {
            "captions": captions, "labels": torch.tensor(labels, dtype=torch.float32), "timesteps": torch.cat(steps),
            "noise": torch.stack(noises), "weights": torch.tensor(weights, dtype=torch.float32),
            "loss_scale": loss_scale, "size_crop": torch.tensor(size_crop, dtype=torch.int64), "bucket": planned.bucket,
        }
        out["latents" if self.cache_paths is not None else "pixels"] = torch.stack(images)
        return out


def make_data_objective(cfg, family: str, size_multiple: int, log: Callable[[str], None]) -> DataObjective:
    return DataObjective(cfg, family, size_multiple, log)


# The config's ``objective`` -> factory(cfg, family, size_multiple, log) returning an Objective.
OBJECTIVES: Dict[str, Callable[..., Any]] = {"data": make_data_objective, "distill": make_distill_objective}
