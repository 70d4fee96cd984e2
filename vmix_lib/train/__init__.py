"""VMix adapter training (paper §3.4) for SD1.5 / SDXL single-file checkpoints: ``python -m vmix_lib.train``.

Needs the packages in requirements-train.txt (diffusers, transformers, accelerate, ...); the WebUI
extension itself never imports this package.  One GPU, several GPUs or several machines: the same
command under ``accelerate launch`` / ``torchrun`` (runtime.py).  What is trained on is an
objective (loop.Objective; objectives.py): "data" = images in aspect-ratio buckets (buckets.py).

Programmatic use, for any UNet with attn2 layers (see loop.py):

    from vmix_lib.train.loop import AdapterTrainer, TrainBatch, train_adapter
"""
