"""VMix adapter training (paper §3.4) for SD1.5 / SDXL single-file checkpoints: ``python -m vmix_lib.train``.

Needs the packages in requirements-train.txt (diffusers, transformers, ...); the WebUI extension
itself never imports this package.

Programmatic use, for any UNet with attn2 layers (see loop.py):

    from vmix_lib.train.loop import AdapterTrainer, TrainBatch, train_adapter
"""
