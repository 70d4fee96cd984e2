"""Evaluate VMix adapters the way the paper does (``python -m vmix_lib.evaluate``).

Images come from a running AUTOMATIC1111/Forge (HTTP API, webui_client.py), from the checkpoint
sampled in this process (offline.py), from existing folders or any Python function (sources.py);
settings (settings.py) compare VMix off, a λ sweep, per-dimension settings and several adapters on
the same prompts (prompts.py) and seeds; metrics.py computes Aes score, CLIP score, FID/KID, probes
and content kept with the models of vmix_lib.scoring, and a caller's own numbers (metrics.ImageMetric,
e.g. the demonstration's, vmix_lib/demo/evaluation.py); report.py writes CSV, JSON, the λ trade-off
plot, the grid and an HTML page; run.py ties them together and resumes.

Python API::

    from vmix_lib.evaluate.run import Options, evaluate
    results = evaluate(Options(out_dir=..., prompts=..., settings=..., sources=[...], aesthetic=...))
"""
