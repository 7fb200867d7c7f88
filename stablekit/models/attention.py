"""Scaled dot-product attention shared by the UNet's transformers and the VAE's attention block.

One function so that every attention in the model gets the same dtype policy and the same
memory bound: queries are processed in chunks whenever the full score matrix of a chunk would
exceed `CHUNK_ELEMENTS`, so large latents (1024x1024 pictures and up) attend in bounded memory
on any backend, including those that materialise the scores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 1 << 28  # scores per chunk, over batch and heads: 1 GiB in float32


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_elements: int | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for q [B, heads, n, d], k and v [B, heads, m, d] -> [B, heads, n, d].

    The softmax's running maximum and sum are float32 in PyTorch's fused kernels whatever the
    inputs' dtype. On the CPU, reduced-precision inputs are computed in float32 all through: the
    fused CPU kernel is slower in bf16 than in float32 (measured 782 vs 660 ms for the largest SD 1.5
    attention on 2 cores) and the float32 copies of q, k and v are small next to the scores.
    """
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        return attention(q.float(), k.float(), v.float(), chunk_elements).to(q.dtype)
    limit = CHUNK_ELEMENTS if chunk_elements is None else chunk_elements
    b, h, n, _ = q.shape
    per_query = b * h * k.shape[2]
    rows = max(1, limit // per_query)
    if rows >= n:
        return F.scaled_dot_product_attention(q, k, v)
    out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)
    for start in range(0, n, rows):  # each query row's result depends on that row only: chunks are exact
        out[:, :, start:start + rows] = F.scaled_dot_product_attention(q[:, :, start:start + rows], k, v)
    return out
