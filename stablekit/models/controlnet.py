"""The ControlNet (Zhang, Rao & Agrawala 2023, `cldm.ControlNet`), module paths = checkpoint keys.

A trainable copy of the UNet's input blocks and middle block reads the noisy latent plus a control
map (edges, depth, ...) and returns one residual per input block and one for the middle block, each
through a zero-initialised 1x1 convolution, to be added to the UNet's skip connections.

Key layout: `time_embed.{0,2}`, `input_hint_block.{0,2,...,14}` (the map encoder: convolutions with
SiLU between, stride 2 on the second of each pair, down to 1/8 of the picture), `input_blocks.*` and
`middle_block.*` as in the UNet, `zero_convs.N.0`, `middle_block_out.0`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import UNetConfig
from ..diffusion.cond import Cond
from .unet import TimestepEmbedSequential, embed_time, encoder, set_norm_groups, vector_embedding


@dataclass(frozen=True)
class ControlNetConfig:
    """A ControlNet: the UNet encoder it copies, and its map encoder."""

    unet: UNetConfig  # in_channels: what it reads of the UNet's input (4: the latent; 9: an inpainting copy)
    hint_channels: int = 3  # the control map's channels (RGB)
    # The map encoder's widths, each level after the first halving the size (cldm: 16, 32, 96, 256).
    hint_block_channels: tuple[int, ...] = (16, 32, 96, 256)

    @property
    def hint_downscale(self) -> int:
        return 2 ** (len(self.hint_block_channels) - 1)


def hint_block(cfg: ControlNetConfig) -> nn.Sequential:
    """Map [B, hint ch, H, W] -> [B, model ch, H / downscale, W / downscale]: conv, then per width a
    conv keeping it and a stride-2 conv to the next, then a (zero-initialised) conv to the UNet's width."""
    widths = cfg.hint_block_channels
    convs = [nn.Conv2d(cfg.hint_channels, widths[0], 3, padding=1)]
    for a, b in zip(widths, widths[1:]):
        convs += [nn.Conv2d(a, a, 3, padding=1), nn.Conv2d(a, b, 3, padding=1, stride=2)]
    convs.append(nn.Conv2d(widths[-1], cfg.unet.model_channels, 3, padding=1))
    layers: list[nn.Module] = []
    for conv in convs:
        layers += [conv, nn.SiLU()]
    return nn.Sequential(*layers[:-1])  # no SiLU after the last conv


class ControlNet(nn.Module):
    def __init__(self, cfg: ControlNetConfig):
        super().__init__()
        self.cfg = cfg
        u = cfg.unet
        emb = u.model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(u.model_channels, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.label_emb = vector_embedding(u, emb)
        self.input_hint_block = hint_block(cfg)
        self.input_blocks, self.middle_block, skip_channels = encoder(u, emb)
        self.zero_convs = nn.ModuleList(TimestepEmbedSequential(nn.Conv2d(c, c, 1)) for c in skip_channels)
        self.middle_block_out = TimestepEmbedSequential(nn.Conv2d(skip_channels[-1], skip_channels[-1], 1))
        self.skip_channels = tuple(skip_channels)
        set_norm_groups(self.input_blocks, u.norm_groups)
        set_norm_groups(self.middle_block, u.norm_groups)

    @property
    def in_channels(self) -> int:
        return self.cfg.unet.in_channels

    def forward(self, x: torch.Tensor, hint: torch.Tensor, t: torch.Tensor, cond: Cond) -> list[torch.Tensor]:
        """x [B, in ch, h, w], hint [B, hint ch, 8h, 8w] -> residuals for the UNet's input blocks, then
        its middle block (each the shape of that block's output)."""
        emb = embed_time(self, t, cond, x.dtype)
        context = cond.crossattn
        guided = self.input_hint_block(hint.to(x.dtype))
        out = []
        h = x
        for i, (block, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = block(h, emb, context)
            if i == 0:  # the encoded map joins after the first convolution
                if guided.shape[-2:] != h.shape[-2:]:
                    raise ValueError(f"the control map encodes to {tuple(guided.shape[-2:])} but the latent is "
                                     f"{tuple(h.shape[-2:])}: the map must be {self.cfg.hint_downscale}x the latent")
                h = h + guided
            out.append(zero_conv(h, emb, context))
        h = self.middle_block(h, emb, context)
        out.append(self.middle_block_out(h, emb, context))
        return out
