"""VAE latents of the dataset images, one cache file per image and bucket, filled by all processes.

    cache/<sha1 of path, size, mtime, bucket, VAE>.safetensors
        latents    [C, h, w] fp16, already multiplied by the VAE scaling factor
        size_crop  [4] int64: original (h, w), crop top-left (top, left) - SDXL's conditioning

Filling is shared out: process r encodes images r, r+P, r+2P, ... of those not cached yet, then all
wait at a barrier (kohya's sharding; the barrier's timeout is ``ddp_timeout``).  If the cache folder
is not shared between machines, each machine then finds the others' files missing and encodes
those itself, shared out over its own processes, with a second barrier.  Files are written under a
per-process temporary name and renamed into place, so concurrent writers never clash.
"""
from __future__ import annotations

import hashlib
import os
from typing import Callable, List, Sequence, Tuple

import torch

from .buckets import Size
from .dataset import DatasetItem, load_image


class LatentCache:
    def __init__(self, vae, scaling_factor: float, device, cache_dir: str, identity: str):
        self.vae, self.scale, self.device = vae, scaling_factor, device
        self.cache_dir, self.identity = cache_dir, identity
        os.makedirs(cache_dir, exist_ok=True)

    def path(self, item: DatasetItem, bucket: Size) -> str:
        st = os.stat(item.image)
        key = f"{os.path.abspath(item.image)}|{st.st_size}|{st.st_mtime_ns}|{bucket[0]}x{bucket[1]}|{self.identity}"
        return os.path.join(self.cache_dir, hashlib.sha1(key.encode()).hexdigest() + ".safetensors")

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Scaled latents of pixel batches [B, 3, H, W] in [-1, 1] (the distribution's mean: no sampling noise)."""
        batch = pixels.to(self.device, next(self.vae.parameters()).dtype, non_blocking=True)
        return self.vae.encode(batch).latent_dist.mean.float() * self.scale

    def _fill(self, work: Sequence[Tuple[DatasetItem, Size]], batch_size: int, bar, rank: int) -> List[Tuple[str, str]]:
        from safetensors.torch import save_file

        failures: List[Tuple[str, str]] = []
        by_bucket = {}
        for item, bucket in work:
            by_bucket.setdefault(bucket, []).append(item)
        for bucket, items in by_bucket.items():
            for start in range(0, len(items), batch_size):
                loaded = []
                for item in items[start:start + batch_size]:
                    try:
                        loaded.append((item, *load_image(item.image, bucket)))
                    except Exception as e:  # PIL raises many kinds (OSError, DecompressionBombError, ...)
                        failures.append((item.name, str(e) or type(e).__name__))
                if loaded:
                    latents = self.encode(torch.stack([pixels for _, pixels, _, _ in loaded]))
                    for (item, _, original, crop), lat in zip(loaded, latents):
                        path = self.path(item, bucket)
                        tmp = f"{path}.{rank}.tmp"
                        save_file({"latents": lat.half().cpu().contiguous(),
                                   "size_crop": torch.tensor([*original, *crop], dtype=torch.int64)}, tmp)
                        os.replace(tmp, path)
                bar.update(len(items[start:start + batch_size]))
        return failures

    def fill(self, work: Sequence[Tuple[DatasetItem, Size]], batch_size: int, accelerator, progress: Callable,
             local_processes: int) -> List[Tuple[str, str]]:
        """Encode every (image, bucket) not cached yet, shared out over the processes; returns the
        (image name, error) pairs of images that failed to decode, the same list on every process."""
        from .runtime import gather_lists

        rank, count = accelerator.process_index, accelerator.num_processes
        todo = [(item, bucket) for item, bucket in work if not os.path.isfile(self.path(item, bucket))]
        accelerator.wait_for_everyone()  # every process has listed the same missing files before any is written
        mine = todo[rank::count]
        total = len(todo)
        bar = progress(total=total, desc="caching latents", unit="img", disable=not (total and accelerator.is_main_process))
        failures = self._fill(mine, batch_size, _WholeBar(bar, count), rank)
        bar.close()
        failures = gather_lists(accelerator, failures)
        accelerator.wait_for_everyone()
        if count > 1:
            failed = {name for name, _ in failures}
            missing = [(it, b) for it, b in todo if it.name not in failed and not os.path.isfile(self.path(it, b))]
            if gather_lists(accelerator, [len(missing)]) != [0] * count:
                # Not a shared folder: each machine encodes what it lacks, over its own processes.
                local = accelerator.local_process_index
                silent = progress(total=len(missing), disable=True)
                self._fill(missing[local::local_processes], batch_size, silent, rank)
                accelerator.wait_for_everyone()
        return sorted(set(failures))

    @staticmethod
    def read(path: str) -> Tuple[torch.Tensor, List[int]]:
        from safetensors.torch import load_file

        data = load_file(path)
        return data["latents"].float(), data["size_crop"].tolist()


class _WholeBar:
    """The main process's bar counts its own share times the process count (the shares are equal)."""

    def __init__(self, bar, factor: int):
        self.bar, self.factor = bar, factor

    def update(self, n: int = 1) -> None:
        self.bar.update(max(0, min(n * self.factor, (self.bar.total or 0) - self.bar.n)))


def cache_identity(vae_or_checkpoint: str) -> str:
    """What the cached latents depend on besides the image: the VAE's file (path and size)."""
    return f"{os.path.abspath(vae_or_checkpoint)}|{os.path.getsize(vae_or_checkpoint)}"


def image_latent_shape(bucket: Size, channels: int, factor: int) -> Tuple[int, int, int]:
    return channels, bucket[1] // factor, bucket[0] // factor

