"""CLIP text encoders in the two layouts Stable Diffusion checkpoints use.

SD 1.x: transformers' `CLIPTextModel` under `cond_stage_model.transformer.text_model.*`,
        output = last block -> final_layer_norm.
SD 2.x: OpenCLIP ViT-H/14 text tower under `cond_stage_model.model.*` (fused `in_proj`),
        output = penultimate block -> ln_final (the last block is never computed).
Clip skip N (A1111 numbering, 1 = off) drops N-1 more final blocks; the final norm still applies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextEncoderConfig


def _activation(name: str):
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    return F.gelu


# (row, first position, vectors [n, width]): learned vectors that stand in for n token embeddings
Replacements = list[tuple[int, int, torch.Tensor]]


def _replace(x: torch.Tensor, vectors: Replacements | None) -> torch.Tensor:
    """Token embeddings [B, n, C] with the given rows' positions overwritten (the web UI's EmbeddingsWithFixes)."""
    if not vectors:
        return x
    x = x.clone()
    for row, start, v in vectors:
        x[row, start : start + v.shape[0]] = v.to(x.dtype)
    return x


def _causal_mask(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.full((n, n), float("-inf"), dtype=dtype, device=device).triu_(1)  # [n, n]


# --- SD 1.x: transformers CLIP layout ------------------------------------------------------------


class CLIPAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = (p(x).view(b, n, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, heads, n, c/heads]
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_width)
        self.fc2 = nn.Linear(cfg.mlp_width, cfg.width)
        self.act = _activation(cfg.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.self_attn = CLIPAttention(cfg.width, cfg.heads)
        self.layer_norm1 = nn.LayerNorm(cfg.width)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.width)


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.layers))


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width)


class _TransformersCLIP(nn.Module):
    """Holds `text_model` so the key path reads `transformer.text_model.*`."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.text_model = CLIPTextTransformer(cfg)


class CLIPTextEncoder(nn.Module):
    """SD 1.x `cond_stage_model` (FrozenCLIPEmbedder)."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.transformer = _TransformersCLIP(cfg)

    def forward(self, ids: torch.Tensor, clip_skip: int = 1, vectors: Replacements | None = None) -> torch.Tensor:
        """ids [B, 77] -> hidden states [B, 77, width]; `vectors` replace token embeddings (textual inversion)."""
        tm = self.transformer.text_model
        n = ids.shape[1]
        x = _replace(tm.embeddings.token_embedding(ids), vectors) + tm.embeddings.position_embedding.weight[:n]
        mask = _causal_mask(n, x.dtype, x.device)
        for layer in tm.encoder.layers[: _layers_used(self.cfg.layers, clip_skip)]:
            x = layer(x, mask)
        return tm.final_layer_norm(x)


# --- SD 2.x: OpenCLIP layout ---------------------------------------------------------------------


class OpenCLIPAttention(nn.Module):
    """`nn.MultiheadAttention` key layout: fused in_proj [3C, C] and out_proj."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(b, n, 3, self.heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, heads, n, c/heads]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class OpenCLIPMLP(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.width, cfg.mlp_width)
        self.c_proj = nn.Linear(cfg.mlp_width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width)
        self.attn = OpenCLIPAttention(cfg.width, cfg.heads)
        self.ln_2 = nn.LayerNorm(cfg.width)
        self.mlp = OpenCLIPMLP(cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class _OpenCLIPTransformer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(cfg) for _ in range(cfg.layers))


class _OpenCLIPText(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.max_positions, cfg.width))
        self.transformer = _OpenCLIPTransformer(cfg)
        self.ln_final = nn.LayerNorm(cfg.width)


class OpenCLIPTextEncoder(nn.Module):
    """SD 2.x `cond_stage_model` (FrozenOpenCLIPEmbedder, layer="penultimate")."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.model = _OpenCLIPText(cfg)

    def forward(self, ids: torch.Tensor, clip_skip: int = 1, vectors: Replacements | None = None) -> torch.Tensor:
        """ids [B, 77] -> hidden states [B, 77, width]; `vectors` replace token embeddings (textual inversion)."""
        m = self.model
        n = ids.shape[1]
        x = _replace(m.token_embedding(ids), vectors) + m.positional_embedding[:n]
        mask = _causal_mask(n, x.dtype, x.device)
        for block in m.transformer.resblocks[: _layers_used(self.cfg.layers, clip_skip)]:
            x = block(x, mask)
        return m.ln_final(x)


def _layers_used(layers: int, clip_skip: int) -> int:
    if not 1 <= clip_skip <= layers:
        raise ValueError(f"clip skip must be between 1 and {layers}, got {clip_skip}")
    return layers - (clip_skip - 1)


def build_text_encoder(cfg: TextEncoderConfig) -> nn.Module:
    return CLIPTextEncoder(cfg) if cfg.layout == "clip" else OpenCLIPTextEncoder(cfg)
