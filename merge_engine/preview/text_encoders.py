"""Stable Diffusion's text encoders as plain torch modules whose parameter names are the ldm
checkpoint's own keys (after the component prefix), so loading is a strict name-for-name copy.

* `ClipText`: OpenAI CLIP ViT-L/14's text tower in transformers' naming (SD1's
  `cond_stage_model.transformer.`, SDXL's `conditioner.embedders.0.transformer.`), quick-GELU.
* `OpenClipText`: OpenCLIP's text tower (SD2's ViT-H at `cond_stage_model.model.`, SDXL's
  ViT-bigG at `conditioner.embedders.1.model.`), exact GELU, fused in-projection.

Both are causal transformers over 77 positions; `forward` returns the hidden states after the
requested block (negative counts from the end) and, for OpenCLIP, the pooled projection of the
final layer's end token (SDXL's conditioning vector).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

HEAD_WIDTH = 64  # every published CLIP text tower uses 64-wide heads


def heads_for(width: int) -> int:
    return max(1, width // HEAD_WIDTH)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """[batch, tokens, width] queries, keys and values -> causal multi-head attention output."""
    b, n, c = q.shape
    q, k, v = (t.reshape(b, n, heads, c // heads).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return out.transpose(1, 2).reshape(b, n, c)


class _ClipAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(causal_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads))


class _ClipMlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        return self.fc2(x * torch.sigmoid(1.702 * x))  # quick GELU


class _ClipLayer(nn.Module):
    def __init__(self, width: int, hidden: int, heads: int):
        super().__init__()
        self.self_attn = _ClipAttention(width, heads)
        self.layer_norm1, self.layer_norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.mlp = _ClipMlp(width, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class _ClipEmbeddings(nn.Module):
    def __init__(self, vocab: int, positions: int, width: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, width)
        self.position_embedding = nn.Embedding(positions, width)


class _ClipEncoder(nn.Module):
    def __init__(self, layers: int, width: int, hidden: int, heads: int):
        super().__init__()
        self.layers = nn.ModuleList(_ClipLayer(width, hidden, heads) for _ in range(layers))


class _ClipTextModel(nn.Module):
    def __init__(self, vocab: int, positions: int, width: int, hidden: int, layers: int, heads: int):
        super().__init__()
        self.embeddings = _ClipEmbeddings(vocab, positions, width)
        self.encoder = _ClipEncoder(layers, width, hidden, heads)
        self.final_layer_norm = nn.LayerNorm(width)


class ClipText(nn.Module):
    """CLIP ViT-L/14 text encoder. `layer=-1` (SD1): the last block then the final layer norm;
    `layer=-2` (SDXL's first encoder): the penultimate block's output, no final norm."""

    def __init__(self, vocab: int, positions: int, width: int, hidden: int, layers: int):
        super().__init__()
        self.text_model = _ClipTextModel(vocab, positions, width, hidden, layers, heads_for(width))

    @classmethod
    def from_shapes(cls, shapes: dict[str, tuple[int, ...]]) -> ClipText:
        vocab, width = shapes["text_model.embeddings.token_embedding.weight"]
        positions = shapes["text_model.embeddings.position_embedding.weight"][0]
        hidden = shapes["text_model.encoder.layers.0.mlp.fc1.weight"][0]
        layers = _count(shapes, "text_model.encoder.layers.")
        return cls(vocab, positions, width, hidden, layers)

    def forward(self, ids: torch.Tensor, layer: int = -1, final_norm: bool = True,
                pooled: bool = False) -> tuple[torch.Tensor, None]:
        if pooled:
            raise ValueError("CLIP-L conditions no pooled vector in Stable Diffusion")
        model = self.text_model
        x = model.embeddings.token_embedding(ids) + model.embeddings.position_embedding.weight[: ids.shape[1]]
        blocks = model.encoder.layers
        for block in blocks[: len(blocks) + 1 + layer]:
            x = block(x)
        return (model.final_layer_norm(x) if final_norm else x), None


class _OpenClipAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        return self.out_proj(causal_attention(q, k, v, self.heads))


class _OpenClipMlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.c_fc, self.c_proj = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class _ResBlock(nn.Module):
    def __init__(self, width: int, hidden: int, heads: int):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = _OpenClipAttention(width, heads)
        self.mlp = _OpenClipMlp(width, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class _Transformer(nn.Module):
    def __init__(self, layers: int, width: int, hidden: int, heads: int):
        super().__init__()
        self.resblocks = nn.ModuleList(_ResBlock(width, hidden, heads) for _ in range(layers))


class OpenClipText(nn.Module):
    """OpenCLIP text tower. SD2: `layer=-2` then `ln_final`. SDXL's second encoder: `layer=-2`
    without the norm for the context, plus the pooled projection of the last block's end token."""

    def __init__(self, vocab: int, positions: int, width: int, hidden: int, layers: int, projection: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, width)
        self.positional_embedding = nn.Parameter(torch.empty(positions, width))
        self.transformer = _Transformer(layers, width, hidden, heads_for(width))
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, projection))
        self.logit_scale = nn.Parameter(torch.empty(()))

    @classmethod
    def from_shapes(cls, shapes: dict[str, tuple[int, ...]]) -> OpenClipText:
        vocab, width = shapes["token_embedding.weight"]
        positions = shapes["positional_embedding"][0]
        hidden = shapes["transformer.resblocks.0.mlp.c_fc.weight"][0]
        layers = _count(shapes, "transformer.resblocks.")
        return cls(vocab, positions, width, hidden, layers, shapes["text_projection"][1])

    def forward(self, ids: torch.Tensor, layer: int = -2, final_norm: bool = True,
                pooled: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]
        blocks = self.transformer.resblocks
        stop = len(blocks) + 1 + layer
        hidden = None
        for index, block in enumerate(blocks if pooled else blocks[:stop]):
            x = block(x)
            if index == stop - 1:
                hidden = x
        assert hidden is not None
        pooled_out = None
        if pooled:  # the end token (the highest id) of the final block, normed and projected
            last = self.ln_final(x)
            pooled_out = last[torch.arange(ids.shape[0], device=ids.device), ids.argmax(dim=-1)] @ self.text_projection
        return (self.ln_final(hidden) if final_norm else hidden), pooled_out


def _count(shapes: dict[str, tuple[int, ...]], prefix: str) -> int:
    return len({k[len(prefix):].split(".", 1)[0] for k in shapes if k.startswith(prefix)})
