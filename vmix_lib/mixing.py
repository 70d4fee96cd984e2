"""The VMix maths (arXiv 2412.20800 §3): AesEmb, the aesthetic input, the projection layer and
the per-layer aesthetic value projections.  Everything else in the project calls into here.

    f_t[i] = neg[i] + α_i (pos[i] − neg[i])                      (α = 1 is the paper's default)
    f_a    = Z(LN(Linear_{N→77}(f_tᵀ)ᵀ))                          (Eq. 6, Z zero-initialised)
    V_a    = W_a f_a                                              (one W_a per attn2, Eq. 7)
    x̂      = softmax(QK_cᵀ/√d)(V_c + λ V_a)                        (Eq. 9 with the map shared)
"""
from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
# The classes themselves, not the torch.nn attributes: Forge swaps torch.nn.Linear/LayerNorm for its
# own operations while it loads a model, and an adapter may be built at that moment (UI thread).
from torch.nn.modules.linear import Linear
from torch.nn.modules.normalization import LayerNorm

from .dimensions import DEFAULT_DIMENSIONS, AestheticDimension, resolve_alphas
from .layers import TOKENS, find_cross_attention_layers

EncodePooled = Callable[[List[str]], torch.Tensor]


def build_aes_emb(encode_pooled: EncodePooled, dimensions: Sequence[AestheticDimension]) -> torch.Tensor:
    """AesEmb [2N, d]: rows 0..N-1 the positive labels, rows N..2N-1 their rare-token negatives.

    ``encode_pooled`` maps label strings to the text encoder's pooled "[CLS]" vectors [n, d].
    """
    texts = [d.positive for d in dimensions] + [d.negative for d in dimensions]
    with torch.no_grad():
        emb = encode_pooled(texts)
    if emb.dim() != 2 or emb.shape[0] != len(texts):
        raise ValueError(f"encode_pooled returned shape {tuple(emb.shape)}, expected [{len(texts)}, d]")
    return emb.detach().float().cpu().contiguous()


class AestheticProjection(nn.Module):
    """Linear over the token axis N→77, LayerNorm(d), then a zero-initialised Linear(d, d)."""

    def __init__(self, n_dims: int, context_dim: int, tokens: int = TOKENS):
        super().__init__()
        self.token = Linear(n_dims, tokens)
        self.norm = LayerNorm(context_dim)
        self.out = Linear(context_dim, context_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, f_t: torch.Tensor) -> torch.Tensor:  # [..., N, d] -> [..., 77, d]
        x = self.token(f_t.transpose(-1, -2)).transpose(-1, -2)
        return self.out(self.norm(x))


def _module_key(layer_name: str) -> str:
    return layer_name.replace(".", "__")  # ModuleDict keys cannot hold dots


class VMixAdapter(nn.Module):
    """Everything inference needs: AesEmb, the projection layer and one W_a per attn2 layer."""

    def __init__(
        self,
        dimensions: Sequence[AestheticDimension],
        context_dim: int,
        layers: Mapping[str, int],  # WebUI layer name -> inner width (to_v out_features)
        family: str,
        tokens: int = TOKENS,
        train_lambda: float = 1.0,
    ):
        super().__init__()
        self.dimensions: List[AestheticDimension] = list(dimensions)
        self.context_dim = int(context_dim)
        self.family = family
        self.tokens = int(tokens)
        self.train_lambda = float(train_lambda)
        self.layer_names: List[str] = list(layers)
        n = len(self.dimensions)
        self.register_buffer("aes_emb", torch.zeros(2 * n, self.context_dim))
        self.projection = AestheticProjection(n, self.context_dim, self.tokens)
        self.values = nn.ModuleDict(
            {_module_key(name): Linear(self.context_dim, int(inner), bias=False) for name, inner in layers.items()}
        )

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def for_unet(
        cls,
        unet: nn.Module,
        aes_emb: torch.Tensor,
        family: str,
        dimensions: Sequence[AestheticDimension] = DEFAULT_DIMENSIONS,
        copy_to_v: bool = True,
    ) -> "VMixAdapter":
        """A fresh adapter for ``unet``; each W_a starts as a copy of that layer's to_v weight.

        The zero-initialised projection makes the adapted UNet equal to the base at step 0.
        """
        layers = find_cross_attention_layers(unet)
        if not layers:
            raise ValueError("this UNet has no cross-attention (attn2) layers")
        context_dim = layers[0].context_dim
        adapter = cls(dimensions, context_dim, {info.name: info.inner_dim for info in layers}, family)
        if tuple(aes_emb.shape) != (2 * len(adapter.dimensions), context_dim):
            raise ValueError(f"AesEmb has shape {tuple(aes_emb.shape)}, expected {(2 * len(adapter.dimensions), context_dim)}")
        adapter.aes_emb.copy_(aes_emb)
        if copy_to_v:
            with torch.no_grad():
                for info in layers:
                    adapter.value(info.name).weight.copy_(info.module.to_v.weight.float())
        return adapter

    # -- accessors --------------------------------------------------------------------------
    @property
    def dimension_names(self) -> List[str]:
        return [d.name for d in self.dimensions]

    def value(self, layer_name: str) -> Linear:
        return self.values[_module_key(layer_name)]

    def layer_shapes(self) -> Dict[str, Tuple[int, int]]:
        return {name: tuple(self.value(name).weight.shape) for name in self.layer_names}

    # -- the maths --------------------------------------------------------------------------
    def aesthetic_input(self, alphas: Optional[Mapping[str, float]] = None) -> torch.Tensor:
        """f_t [N, d] from per-dimension weights α ∈ [0, 1] by name (missing = 1)."""
        weights = torch.tensor(resolve_alphas(self.dimensions, alphas), dtype=self.aes_emb.dtype, device=self.aes_emb.device)
        return self.label_input(weights)

    def label_input(self, labels: torch.Tensor) -> torch.Tensor:
        """f_t [..., N, d] from labels [..., N] in [0, 1] (1 = superior/positive, 0 = negative)."""
        n = len(self.dimensions)
        pos, neg = self.aes_emb[:n], self.aes_emb[n:]
        # lerp is exact at both ends: α = 1 gives the positive rows, α = 0 the negative rows, bit for bit.
        return torch.lerp(neg, pos, labels.to(pos.dtype).unsqueeze(-1))

    def aesthetic_context(self, f_t: torch.Tensor) -> torch.Tensor:
        """f_a [..., 77, d] (Eq. 6)."""
        return self.projection(f_t)

    def aesthetic_values(self, layer_name: str, f_a: torch.Tensor, device=None) -> torch.Tensor:
        """V_a = W_a f_a for one layer, computed in float32 on ``device`` (the UNet's)."""
        weight = self.value(layer_name).weight
        device = device if device is not None else weight.device
        return F.linear(f_a.to(device=device, dtype=torch.float32), weight.to(device=device, dtype=torch.float32))


def mix_values(v_content: torch.Tensor, v_aesthetic: torch.Tensor, strength) -> torch.Tensor:
    """V_c + λ·V_a with V_a tiled over 77-token chunks; λ a number or a per-row tensor [rows]."""
    chunks = v_content.shape[-2] // v_aesthetic.shape[-2]
    if chunks != 1:
        v_aesthetic = torch.cat([v_aesthetic] * chunks, dim=-2)
    if isinstance(strength, torch.Tensor):
        strength = strength.to(v_content.dtype).view(-1, *([1] * (v_content.dim() - 1)))
    return v_content + strength * v_aesthetic.to(v_content.dtype)


def two_branch_attention(q, k, v_content, v_aesthetic, strength, heads: int, scale: Optional[float] = None):
    """Literal Eq. 9: softmax(QK_cᵀ/√d)V_c + λ·softmax(QK_cᵀ/√d)V_a, two attentions, shared map.

    q [B, Nq, H·D], k/v [B, T, H·D], v_aesthetic [T', H·D] or [B, T', H·D] (tiled to T).
    Reference for tests and the benchmark, not used at inference.
    """
    b, nq, inner = q.shape
    dh = inner // heads
    scale = dh ** -0.5 if scale is None else scale
    chunks = k.shape[1] // v_aesthetic.shape[-2]
    if chunks != 1:
        v_aesthetic = torch.cat([v_aesthetic] * chunks, dim=-2)
    v_aesthetic = v_aesthetic.expand(b, *v_aesthetic.shape[-2:]).to(q.dtype)

    def split(t):
        return t.reshape(b, -1, heads, dh).transpose(1, 2)

    attn = (split(q) @ split(k).transpose(-1, -2) * scale).softmax(-1)
    content = (attn @ split(v_content)).transpose(1, 2).reshape(b, nq, inner)
    aesthetic = (attn @ split(v_aesthetic)).transpose(1, 2).reshape(b, nq, inner)
    if isinstance(strength, torch.Tensor):
        strength = strength.to(q.dtype).view(-1, 1, 1)
    return content + strength * aesthetic
