"""Image scoring models shared by dataset preparation and evaluation (DESIGN §8).

Both roads need the same things, so they live once, here:

- ``clip``: a CLIP model (transformers) loaded from a local folder or a hub id the user names,
  offline unless a download is allowed; L2-normalised image and text embeddings, prompts truncated
  to 77 tokens *keeping* the end token CLIP pools on.
- ``aesthetic``: the LAION improved aesthetic predictor (MLP on L2-normalised CLIP ViT-L/14 image
  embeddings), from its pickled ``.pth`` (``torch.load(weights_only=True)``) or a safetensors file.
- ``probes``: CLIP zero-shot antonym pairs per aesthetic dimension (CLIP-IQA style), several
  phrasings per pole, the score being the pair's softmax averaged over phrasings.
- ``images``: finding images in a folder tree and decoding them fully (truncated files are caught).
- ``features``: an on-disk cache of image embeddings per image file, in safetensors shards, so
  nothing is encoded twice and 100,000 images never sit in memory as pixels.
- ``paths``: the one rule that tells a local model folder from a hub id (a missing folder is named as
  a folder, not looked up on the hub).
- ``tiny``: small random-weight CLIP models and predictors in the real formats, for tests and demos.

Every wrong file or name raises ``ScoringError`` with one sentence.  Nothing here imports the WebUI.
"""
from .errors import ScoringError

__all__ = ["ScoringError"]
