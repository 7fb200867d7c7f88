"""The Stable Diffusion UNet (LDM `openaimodel.UNetModel`), module paths = checkpoint keys.

Key layout under `model.diffusion_model.`: `time_embed.{0,2}`, `input_blocks.N.M`,
`middle_block.{0,1,2}`, `output_blocks.N.M`, `out.{0,2}`. Sequential indices are kept, with
stateless layers (SiLU, Dropout) holding their numbers, so original files load strictly.
Any latent size works: upsampling targets the size of the matching skip connection, so
sizes that are multiples of 8 but not of 64 are fine.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import UNetConfig
from ..diffusion.cond import Cond
from .attention import attention


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with float32 statistics whatever the weights' and activations' dtype (as LDM does).

    PyTorch's kernels already accumulate bf16 in float32 (the same result to the last bit of the
    bf16 output, checked by a test), so only fp16 is cast; the bf16 casts cost two copies a call.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float16:
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        y = F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps)
        return y.to(x.dtype)


def normalization(channels: int, eps: float = 1e-5) -> nn.GroupNorm:
    return GroupNorm32(32, channels, eps=eps)


def set_norm_groups(module: nn.Module, groups: int) -> None:
    """Give every GroupNorm in `module` `groups` groups (SD uses 32 everywhere; the count has no weights).

    Why: with 32 groups a 32- or 64-channel layer normalises each channel on its own, which erases
    a flat picture's colour; small models keep several channels per group instead.
    """
    for m in module.modules():
        if isinstance(m, nn.GroupNorm):
            if m.num_channels % groups:
                raise ValueError(f"{m.num_channels} channels do not split into {groups} norm groups")
            m.num_groups = groups


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [B, dim] of (possibly fractional) timesteps, cos half first."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepBlock(nn.Module):
    """Marker: a block that takes the time embedding."""


class ResBlock(TimestepBlock):
    def __init__(self, channels: int, emb_channels: int, out_channels: int):
        super().__init__()
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            normalization(out_channels), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        )
        self.skip_connection = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    """Multi-head attention; `context` None means self-attention."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        b, n, c = x.shape
        q = self.to_q(x).view(b, n, self.heads, -1).transpose(1, 2)  # [B, heads, n, d]
        k = self.to_k(context).view(b, context.shape[1], self.heads, -1).transpose(1, 2)
        v = self.to_v(context).view(b, context.shape[1], self.heads, -1).transpose(1, 2)
        out = attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, c))


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020): one projection, half gates the other half."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """attn1 (self-attention, or with `cross_only` a second attention to the text: LDM `disable_self_attn`),
    attn2 (cross-attention to the text), then the feed-forward; each pre-normed and residual."""

    def __init__(self, dim: int, heads: int, context_dim: int, cross_only: bool = False):
        super().__init__()
        self.cross_only = cross_only
        self.attn1 = CrossAttention(dim, context_dim if cross_only else dim, heads)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), context if self.cross_only else None)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Image tokens attend to themselves and to the text context (LDM)."""

    def __init__(
        self, channels: int, heads: int, depth: int, context_dim: int, use_linear: bool, cross_only: bool = False
    ):
        super().__init__()
        self.use_linear = use_linear
        self.norm = normalization(channels, eps=1e-6)
        proj = (lambda: nn.Linear(channels, channels)) if use_linear else (lambda: nn.Conv2d(channels, channels, 1))
        self.proj_in = proj()
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, heads, context_dim, cross_only) for _ in range(depth)
        )
        self.proj_out = proj()

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2)  # [B, h*w, C]
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.transpose(1, 2).reshape(b, c, h, w)
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        # Nearest-neighbour to the skip connection's size (2x when the size is a multiple of 64/8).
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """Runs its layers, giving each the inputs it needs."""

    def forward(
        self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, upsample_size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, upsample_size)
            else:
                x = layer(x)
        return x


def _transformer(cfg: UNetConfig, ch: int, level: int | None) -> SpatialTransformer:
    """A level's transformer (level None: the middle block's)."""
    return SpatialTransformer(ch, cfg.heads_for(ch), cfg.transformer_depth, cfg.context_dim,
                              cfg.use_linear_in_transformer, cross_only=level in cfg.cross_only_levels)


def encoder(cfg: UNetConfig, emb: int) -> tuple[nn.ModuleList, TimestepEmbedSequential, list[int]]:
    """The input blocks and the middle block (shared by the UNet and the ControlNet, which copies them),
    and the channels of each input block's output (the skip connections)."""
    mc = cfg.model_channels
    input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
    skip_channels = [mc]
    ch = mc
    last = len(cfg.channel_mult) - 1
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            layers: list[nn.Module] = [ResBlock(ch, emb, mc * mult)]
            ch = mc * mult
            if level in cfg.attention_levels:
                layers.append(_transformer(cfg, ch, level))
            input_blocks.append(TimestepEmbedSequential(*layers))
            skip_channels.append(ch)
        if level != last:
            input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
            skip_channels.append(ch)
    middle_block = TimestepEmbedSequential(ResBlock(ch, emb, ch), _transformer(cfg, ch, None), ResBlock(ch, emb, ch))
    return input_blocks, middle_block, skip_channels


class UNetModel(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        mc = cfg.model_channels
        emb = mc * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.label_emb = vector_embedding(cfg, emb)
        self.input_blocks, self.middle_block, skip_channels = encoder(cfg, emb)
        skip_channels = list(skip_channels)
        ch = skip_channels[-1]

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb, mc * mult)]
                ch = mc * mult
                if level in cfg.attention_levels:
                    layers.append(_transformer(cfg, ch, level))
                if level != 0 and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(normalization(ch), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1))
        set_norm_groups(self, cfg.norm_groups)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, cond: Cond, control: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """x [B, latent ch, h, w], t [B] (float timesteps), cond for B -> [B, out_ch, h, w].

        `cond.concat` is appended to x as input channels, `cond.vector` goes through `label_emb`
        into the time embedding. `control`: residuals (ControlNet), one per input block in order,
        then one for the middle block; each is added to the matching skip connection.
        """
        if cond.concat is not None:
            x = torch.cat([x, cond.concat.to(x.dtype)], dim=1)
        if x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"the UNet takes {self.cfg.in_channels} input channels, got {x.shape[1]}")
        if cond.control and control is None:
            raise ValueError("the conditioning carries ControlNet inputs: run it through ControlledUNet")
        emb = embed_time(self, t, cond, x.dtype)
        context = cond.crossattn
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        if control is not None:
            if len(control) != len(skips) + 1:
                raise ValueError(f"control has {len(control)} residuals; this UNet takes {len(skips) + 1}")
            skips = [s + c.to(s.dtype) for s, c in zip(skips, control)]
            h = h + control[-1].to(h.dtype)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            target = skips[-1].shape[-2:] if skips else None
            h = block(h, emb, context, upsample_size=target)
        return self.out(h)


def vector_embedding(cfg: UNetConfig, emb: int) -> nn.Module | None:
    """LDM's `label_emb`: an embedding table for class labels, or two linear layers for an adm vector."""
    if cfg.num_classes and cfg.adm_in_channels:
        raise ValueError("a UNet takes class labels or an adm vector, not both")
    if cfg.num_classes:
        return nn.Embedding(cfg.num_classes, emb)
    if cfg.adm_in_channels:  # keys label_emb.0.{0,2}: a Sequential inside a Sequential, as LDM nests it
        return nn.Sequential(nn.Sequential(nn.Linear(cfg.adm_in_channels, emb), nn.SiLU(), nn.Linear(emb, emb)))
    return None


def embed_time(net: nn.Module, t: torch.Tensor, cond: Cond, dtype: torch.dtype) -> torch.Tensor:
    """The time embedding [B, 4 * model channels] of a network with `time_embed` and `label_emb`
    (the UNet, the ControlNet), plus the vector input's where the network takes one."""
    channels = net.time_embed[0].in_features
    emb = net.time_embed(timestep_embedding(t, channels).to(dtype))
    if net.label_emb is not None:
        if cond.vector is None:
            raise ValueError("this network takes a vector input (class label or adm vector) and none was given")
        emb = emb + net.label_emb(cond.vector).to(emb.dtype)
    return emb


class DiffusionWrapper(nn.Module):
    """Holds `diffusion_model` so the key path reads `model.diffusion_model.*`."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.diffusion_model = UNetModel(cfg)
