"""From a folder of pictures to a labelled VMix dataset: ``python -m vmix_lib.prepare IN OUT``.

    scan (recursive; captions from NAME.txt or metadata.jsonl)          sources.py
    checks: unreadable/truncated, too small, exact duplicates (sha256)  sources.py, filters.py
    CLIP image embeddings, cached per file in safetensors shards         ..scoring.features
    optional watermark/text classifier (transformers)                    models.py
    near duplicates (blocked cosine), LAION aesthetic score cut          filters.py
    captions: kept, or written by a transformers image-to-text model     models.py
    labels per dimension: antonym probes, quantile or margin rules,
    overrides a person writes                                            labels.py
    dataset folder (links or copies, metadata.jsonl), scores, report     output.py
    review pages and histograms                                          review.py
    the run that ties them together                                      run.py

The output is a folder the trainer (``python -m vmix_lib.train``) reads as it is.  Nothing imports the
WebUI; models are loaded by ``vmix_lib.scoring`` (CLIP, the predictor) and transformers.
"""
from .errors import PrepareError

__all__ = ["PrepareError"]
