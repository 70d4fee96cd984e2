"""Aspect-ratio buckets (kohya's algorithm), the crop geometry behind SDXL's conditioning, the batch
plan over buckets, and how a global micro-batch is shared out over processes."""
import itertools

import pytest
import torch

from vmix_lib.train.buckets import (
    BatchPlan, BucketSettings, assign_buckets, bucket_summary, fit_to_bucket, make_bucket_resolutions, select_bucket,
)
from vmix_lib.train.dataset import load_image
from vmix_lib.train.runtime import sample_generator, split_for_process
from vmix_lib.train.text import sdxl_time_ids

# Worked by hand from kohya's rule for 512² (h = min(1024, ⌊262144 / w / 64⌋·64) for w = 256, 320, ..., 1024).
SD15_BUCKETS = [
    (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576), (512, 512),
    (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256),
]


def test_bucket_list_for_sd15_and_sdxl():
    assert make_bucket_resolutions((512, 512), 256, 1024, 64) == SD15_BUCKETS
    assert BucketSettings(512, step=64).buckets() == SD15_BUCKETS  # defaults: sides 256-1024
    sdxl = BucketSettings(1024, step=64).buckets()  # sides 512-2048
    assert len(sdxl) == 33 and (1024, 1024) in sdxl
    for pair in [(896, 1152), (832, 1216), (768, 1344), (640, 1536)]:  # SDXL's own training sizes appear
        assert pair in sdxl and pair[::-1] in sdxl
    assert all(w % 64 == 0 and h % 64 == 0 and 512 <= min(w, h) and max(w, h) <= 2048 for w, h in sdxl)
    assert all(w * h <= 1024 * 1024 for w, h in sdxl)  # resolution sets the maximum area (pitfall 7)
    assert BucketSettings(512, enabled=False, step=64).buckets() == [(512, 512)]
    assert BucketSettings(32, step=8).buckets() == [(16, 48), (16, 56), (16, 64), (24, 40), (32, 32), (40, 24), (48, 16), (56, 16), (64, 16)]


@pytest.mark.parametrize("settings, problem", [
    (BucketSettings(512, step=64), ""),
    (BucketSettings(500, step=64), "resolution 500 is not a multiple of bucket_step 64"),
    (BucketSettings(512, min_size=200, step=64), "bucket_min 200 is not a multiple of bucket_step 64"),
    (BucketSettings(512, min_size=640, step=64), "bucket_min 640 and bucket_max 1024 must enclose the resolution 512"),
    (BucketSettings(500, enabled=False, step=64), ""),  # square crops need no bucket arithmetic
])
def test_bucket_settings_problems(settings, problem):
    assert settings.problem() == problem


@pytest.mark.parametrize("image, bucket, resized, crop", [
    ((1920, 1080), (640, 384), (683, 384), (0, 21)),  # 16:9 photo: heights matched, 43 px cropped from the sides
    ((1000, 3000), (256, 832), (277, 832), (0, 10)),  # tall: 0.333 is closest to 256/832 = 0.308
    ((448, 576), (448, 576), (448, 576), (0, 0)),  # exactly a bucket: used as it is
    ((3000, 2000), (640, 384), (640, 427), (21, 0)),  # 1.5: 640/384 = 1.667 (error 0.167) beats 576/448 = 1.286 (0.214)
    ((500, 510), (512, 512), (512, 522), (5, 0)),  # small, nearly square: upscaled to cover, 10 rows cropped
])
def test_select_bucket_and_crop(image, bucket, resized, crop):
    assert select_bucket(image, SD15_BUCKETS) == bucket
    assert fit_to_bucket(image, bucket) == (resized, crop)


def test_assignment_summary_and_sdxl_conditioning_values():
    sizes = [(1920, 1080), (1920, 1080), (1000, 3000), (448, 576), (512, 512)]
    assigned = assign_buckets(sizes, SD15_BUCKETS)
    assert assigned == [(640, 384), (640, 384), (256, 832), (448, 576), (512, 512)]
    assert bucket_summary(assigned) == "640x384: 2, 256x832: 1, 448x576: 1, 512x512: 1"
    # diffusers' order (h, w): original size, crop top-left in the resized image, target size
    (w, h), (top, left) = fit_to_bucket((1920, 1080), (640, 384))
    assert sdxl_time_ids((1080, 1920), (top, left), (384, 640)) == [1080.0, 1920.0, 0.0, 21.0, 384.0, 640.0]


def test_load_image_crops_the_centre_of_a_bucket(tmp_path):
    from PIL import Image

    img = Image.new("RGB", (96, 40), (0, 0, 255))
    img.paste((255, 0, 0), (8, 0, 88, 40))  # red centre, blue 8-px margins left and right
    path = str(tmp_path / "wide.png")
    img.save(path)
    bucket = select_bucket((96, 40), BucketSettings(32, step=8).buckets())
    assert bucket == (48, 16)  # 2.4:1 is closer to 48/16 = 3 than to 40/24 = 1.67
    assert fit_to_bucket((96, 40), bucket) == ((48, 20), (2, 0))  # widths matched, 4 rows cropped
    pixels, original, crop = load_image(path, bucket)
    assert pixels.shape == (3, 16, 48) and original == (40, 96) and crop == (2, 0)
    assert torch.allclose(pixels[:, 8, 24], torch.tensor([1.0, -1.0, -1.0]), atol=0.02)  # red centre
    assert torch.allclose(pixels[:, 8, 1], torch.tensor([-1.0, -1.0, 1.0]), atol=0.02)  # blue margin kept (no side crop)


def test_exif_rotated_images_are_measured_as_shown(tmp_path):
    from PIL import Image

    from vmix_lib.train.dataset import scan_dataset

    img = Image.new("RGB", (60, 20), (10, 20, 30))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90° when shown: a 20x60 portrait
    img.save(str(tmp_path / "p.jpg"), exif=exif)
    (tmp_path / "p.txt").write_text("a portrait")
    [item] = scan_dataset(str(tmp_path), ["color"]).items
    assert item.size == (20, 60)
    pixels, original, _ = load_image(item.image, (16, 48))
    assert pixels.shape == (3, 48, 16) and original == (60, 20)


def test_batch_plan_one_bucket_per_batch_every_image_once_per_epoch():
    buckets = [(32, 32)] * 7 + [(40, 24)] * 5 + [(24, 40)] * 1
    plan = BatchPlan(buckets, global_batch=4, seed=3)
    assert plan.per_epoch == 2 + 2 + 1  # ceil(7/4) + ceil(5/4) + ceil(1/4)
    for epoch in range(3):
        batches = [plan.batch(epoch * plan.per_epoch + i) for i in range(plan.per_epoch)]
        seen = [i for b in batches for i in b.items]
        assert sorted(seen) == list(range(13))
        assert all(len(b.items) <= 4 and {buckets[i] for i in b.items} == {b.bucket} for b in batches)
        serials = [s for b in batches for s in b.serials]
        assert sorted(serials) == list(range(epoch * 13, epoch * 13 + 13))
    assert plan.epoch(0) != plan.epoch(1)  # reshuffled per epoch
    again = BatchPlan(buckets, 4, 3)
    assert [again.batch(i) for i in range(12)] == [plan.batch(i) for i in range(12)]  # a pure function of its inputs
    assert plan.continue_from(2, 0.5) == 2 * 5 + 2 and plan.continue_from(0, 1.0) == 4


def test_split_for_process_gives_the_global_mean_for_any_process_count():
    for total, processes in itertools.product(range(1, 10), range(1, 5)):
        losses = torch.rand(total, generator=torch.Generator().manual_seed(total * 10 + processes), dtype=torch.float64)
        shares, covered = [], []
        for rank in range(processes):
            positions, weights, scale = split_for_process(total, processes, rank)
            assert len(positions) >= 1  # every process runs at least one sample
            shares.append(scale * sum(w * losses[p] for p, w in zip(positions, weights)))
            covered.extend(p for p, w in zip(positions, weights) if w)
        assert sorted(covered) == list(range(total))  # each sample counted exactly once
        assert float(sum(shares) / processes) == pytest.approx(float(losses.mean()), rel=1e-12)  # DDP's mean
    assert split_for_process(10, 4, 0)[0] == (0, 1, 2) and split_for_process(10, 4, 3)[0] == (8, 9)
    assert split_for_process(1, 2, 1) == ((0,), (0.0,), 2.0)


def test_sample_draws_depend_on_seed_and_serial_only():
    a = torch.randn(5, generator=sample_generator(7, 12))
    assert torch.equal(a, torch.randn(5, generator=sample_generator(7, 12)))
    assert not torch.equal(a, torch.randn(5, generator=sample_generator(7, 13)))
    assert not torch.equal(a, torch.randn(5, generator=sample_generator(8, 12)))
