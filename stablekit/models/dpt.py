"""DPT-Hybrid (MiDaS 3.0): normalised picture [B,3,H,W] -> relative inverse depth [B,1,H,W].

"Vision Transformers for Dense Prediction", Ranftl et al. 2021. A BiT-style ResNet-50 stem
(weight-standardised convs + GroupNorm, 3 stages) turns the picture into a 1/16 grid of
tokens for a ViT-B; the first two ResNet stages and ViT blocks 8 and 11 are reassembled into
four feature maps and fused coarse to fine by RefineNet blocks; a small head doubles the size
back to the input and keeps the output non-negative.

Module paths are the MiDaS repository's (`pretrained.model.*` is timm's `vit_base_resnet50_384`,
`pretrained.act_postprocess{3,4}` the reassembly, `scratch.*` the decoder), because the SD 2
depth checkpoint stores the network that way under `depth_model.model.`; Hugging Face folders
go through `dpt_keys`.

Shapes for the real model at 384x384: stages [B,256,96,96], [B,512,48,48], [B,1024,24,24];
tokens [B,1+576,768]; fusion maps 256 channels at 12 -> 24 -> 48 -> 96 -> 192; output 384.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention

if TYPE_CHECKING:  # the config lives with the public API; importing it at run time would be circular
    from ..pipeline.depth import DPTConfig

WS_EPS = 1e-8  # weight-standardisation epsilon of timm's ViT-Hybrid stem (and transformers' BiT)
GN_EPS = 1e-5


def make_div(value: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of `divisor`, never more than 10% below it (BiT's rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def same_pad(x: torch.Tensor, kernel: int, stride: int, value: float = 0.0) -> torch.Tensor:
    """TensorFlow 'SAME' padding from the input size: output = ceil(input / stride), extra pixel right/bottom."""
    h, w = x.shape[-2:]
    ph = max((math.ceil(h / stride) - 1) * stride + kernel - h, 0)
    pw = max((math.ceil(w / stride) - 1) * stride + kernel - w, 0)
    if ph or pw:
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2], value=value)
    return x


class StdConv2dSame(nn.Conv2d):
    """Conv with weight standardisation (Qiao et al. 2019, as BiT uses) and 'SAME' padding, no bias."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1):
        # Stride 1 with an odd kernel is SAME with fixed symmetric padding; otherwise it depends on the input.
        static = stride == 1 and kernel % 2 == 1
        super().__init__(in_ch, out_ch, kernel, stride=stride, padding=(kernel - 1) // 2 if static else 0, bias=False)
        self.dynamic = not static

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic:
            x = same_pad(x, self.kernel_size[0], self.stride[0])
        # Each filter to zero mean, unit (biased) variance, in float32: the 1e-8 epsilon means nothing in fp16.
        w = self.weight.float()
        var, mean = torch.var_mean(w, dim=(1, 2, 3), correction=0, keepdim=True)
        w = ((w - mean) * torch.rsqrt(var + WS_EPS)).to(x.dtype)
        return F.conv2d(x, w, None, self.stride, self.padding)


class GroupNormAct(nn.GroupNorm):
    """GroupNorm followed by ReLU (or not), timm's `GroupNormAct`."""

    def __init__(self, channels: int, groups: int, act: bool = True):
        super().__init__(groups, channels, eps=GN_EPS)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return F.relu(x) if self.act else x


class DownsampleConv(nn.Module):
    """The projection shortcut of a stage's first block: 1x1 conv (with the stage stride) + norm."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, groups: int):
        super().__init__()
        self.conv = StdConv2dSame(in_ch, out_ch, 1, stride)
        self.norm = GroupNormAct(out_ch, groups, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3x3 conv), timm ResNetV2's non-pre-activation block."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, groups: int, first: bool):
        super().__init__()
        mid = make_div(out_ch * 0.25)
        self.downsample = DownsampleConv(in_ch, out_ch, stride, groups) if first else None
        self.conv1 = StdConv2dSame(in_ch, mid, 1)
        self.norm1 = GroupNormAct(mid, groups)
        self.conv2 = StdConv2dSame(mid, mid, 3, stride)
        self.norm2 = GroupNormAct(mid, groups)
        self.conv3 = StdConv2dSame(mid, out_ch, 1)
        self.norm3 = GroupNormAct(out_ch, groups, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.norm1(self.conv1(x))
        x = self.norm2(self.conv2(x))
        x = self.norm3(self.conv3(x))
        return F.relu(x + shortcut)


class ResNetStage(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, depth: int, stride: int, groups: int):
        super().__init__()
        self.blocks = nn.Sequential(*(
            Bottleneck(in_ch if i == 0 else out_ch, out_ch, stride if i == 0 else 1, groups, first=i == 0)
            for i in range(depth)
        ))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class ResNetV2(nn.Module):
    """The hybrid's CNN: 7x7/2 stem conv + norm + 3x3/2 max-pool, then stages at strides 4, 8, 16."""

    def __init__(self, cfg: DPTConfig):
        super().__init__()
        groups = cfg.backbone_num_groups
        self.stem = nn.ModuleDict({
            "conv": StdConv2dSame(cfg.num_channels, cfg.backbone_embedding_size, 7, 2),
            "norm": GroupNormAct(cfg.backbone_embedding_size, groups),
        })
        chans = (cfg.backbone_embedding_size, *cfg.backbone_widths)
        self.stages = nn.ModuleList(
            ResNetStage(chans[i], chans[i + 1], depth, 1 if i == 0 else 2, groups)
            for i, depth in enumerate(cfg.backbone_depths)
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem["norm"](self.stem["conv"](x))
        # SAME max-pool. Zero padding (as transformers does) equals timm's -inf here: inputs are post-ReLU.
        x = F.max_pool2d(same_pad(x, 3, 2), 3, 2)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features  # [B, widths[i], H/4, W/4], [.., H/8, W/8], [.., H/16, W/16]


class HybridEmbed(nn.Module):
    """The ViT's patch embedding: the ResNet's last map, 1x1-projected to tokens."""

    def __init__(self, cfg: DPTConfig):
        super().__init__()
        self.backbone = ResNetV2(cfg)
        self.proj = nn.Conv2d(cfg.backbone_widths[-1], cfg.hidden_size, 1)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qkv_bias: bool):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)  # [B, heads, n, d]
        return self.proj(attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as timm and transformers' "gelu"


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: DPTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg.hidden_size, cfg.num_heads, cfg.qkv_bias)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(cfg.hidden_size, cfg.mlp_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def resize_pos_embed(pos: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """[1, 1+n*n, C] learnt at n x n -> [1, 1+gh*gw, C], the grid bilinearly resized (align_corners=False)."""
    token, grid = pos[:, :1], pos[0, 1:]
    n = int(math.sqrt(grid.shape[0]))
    grid = grid.reshape(1, n, n, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bilinear", align_corners=False)
    return torch.cat([token, grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)], dim=1)


class VisionTransformer(nn.Module):
    """timm's ViT-Hybrid. `norm` is never used by DPT (it taps block outputs) but is in the weights."""

    def __init__(self, cfg: DPTConfig):
        super().__init__()
        self.patch_embed = HybridEmbed(cfg)
        grid = cfg.image_size // cfg.patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, cfg.hidden_size))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class ProjectReadout(nn.Module):
    """Readout 'project': each patch token concatenated with the class token, Linear(2C -> C) + GELU."""

    def __init__(self, dim: int):
        super().__init__()
        self.project = nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = x[:, 1:]
        return self.project(torch.cat([patches, x[:, :1].expand_as(patches)], dim=-1))


def _reassemble(cfg: DPTConfig, stage: int) -> nn.Sequential:
    """act_postprocess{stage+1}: readout, (Transpose, Unflatten: done in forward), 1x1 conv, resize."""
    channels, factor = cfg.neck_hidden_sizes[stage], cfg.reassemble_factors[stage]
    layers: list[nn.Module] = [ProjectReadout(cfg.hidden_size), nn.Identity(), nn.Identity(),
                               nn.Conv2d(cfg.hidden_size, channels, 1)]
    if factor > 1:
        layers.append(nn.ConvTranspose2d(channels, channels, int(factor), stride=int(factor)))
    elif factor < 1:
        layers.append(nn.Conv2d(channels, channels, 3, stride=round(1 / factor), padding=1))
    return nn.Sequential(*layers)


class ViTHybridBackbone(nn.Module):
    """MiDaS `pretrained`: the ViT plus the reassembly of its tapped blocks into feature maps.

    The first two maps are the ResNet's stage outputs as they are (MiDaS's act_postprocess1/2 are
    identities for the hybrid and hold no weights, so they are not built here).
    """

    def __init__(self, cfg: DPTConfig):
        super().__init__()
        self.cfg = cfg
        self.model = VisionTransformer(cfg)
        self.act_postprocess3 = _reassemble(cfg, 2)
        self.act_postprocess4 = _reassemble(cfg, 3)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b, _, h, w = x.shape
        p = self.cfg.patch_size
        gh, gw = h // p, w // p
        vit = self.model
        maps = vit.patch_embed.backbone(x)
        tokens = vit.patch_embed.proj(maps[-1]).flatten(2).transpose(1, 2)  # [B, gh*gw, C]
        if tokens.shape[1] != gh * gw:
            raise ValueError(f"DPT input {h}x{w}: height and width must be multiples of {p}")
        x = torch.cat([vit.cls_token.expand(b, -1, -1).to(tokens.dtype), tokens], dim=1)
        x = x + resize_pos_embed(vit.pos_embed, gh, gw).to(tokens.dtype)  # any grid, not only 24x24
        taps = self.cfg.out_indices[2:]
        tapped = []
        for i, block in enumerate(vit.blocks[: taps[-1] + 1]):  # later blocks (none in MiDaS) feed nothing
            x = block(x)
            if i in taps:
                tapped.append(x)
        out = maps[:2]
        for seq, t in zip((self.act_postprocess3, self.act_postprocess4), tapped):
            y = seq[0](t).transpose(1, 2).reshape(b, -1, gh, gw)  # [B, C, gh, gw]
            for layer in seq[3:]:
                y = layer(y)
            out.append(y)
        return out


class ResidualConvUnit(nn.Module):
    """Pre-activation residual unit: x + conv(relu(conv(relu(x))))."""

    def __init__(self, channels: int, bias: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=bias)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FeatureFusionBlock(nn.Module):
    """RefineNet-style fusion: path (+ refined skip) -> refine -> x2 bilinear (align_corners) -> 1x1 conv."""

    def __init__(self, channels: int, bias: bool):
        super().__init__()
        self.out_conv = nn.Conv2d(channels, channels, 1)
        self.resConfUnit1 = ResidualConvUnit(channels, bias)  # MiDaS name
        self.resConfUnit2 = ResidualConvUnit(channels, bias)  # MiDaS name

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            if skip.shape[-2:] != x.shape[-2:]:  # odd grids: transformers resizes the skip to the path
                skip = F.interpolate(skip, size=x.shape[-2:], mode="bilinear", align_corners=False)
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class Scratch(nn.Module):
    """MiDaS `scratch`: 3x3 convs to the fusion width, 4 fusion blocks, the depth head."""

    def __init__(self, cfg: DPTConfig):
        super().__init__()
        f = cfg.fusion_hidden_size
        for i, c in enumerate(cfg.neck_hidden_sizes, start=1):
            setattr(self, f"layer{i}_rn", nn.Conv2d(c, f, 3, padding=1, bias=False))
        for i in range(1, 5):
            setattr(self, f"refinenet{i}", FeatureFusionBlock(f, cfg.fusion_residual_bias))
        self.output_conv = nn.Sequential(
            nn.Conv2d(f, f // 2, 3, padding=1),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
            nn.Conv2d(f // 2, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 1, 1),
            nn.ReLU(),  # non-negative inverse depth
        )


class DPTDepthModel(nn.Module):
    """The whole network (MiDaS `DPTDepthModel`): pixel values [B,3,H,W] -> inverse depth [B,1,H,W]."""

    def __init__(self, cfg: DPTConfig):
        super().__init__()
        self.cfg = cfg
        self.pretrained = ViTHybridBackbone(cfg)
        self.scratch = Scratch(cfg)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        s = self.scratch
        l1, l2, l3, l4 = self.pretrained(pixel_values)
        path = s.refinenet4(s.layer4_rn(l4))  # coarsest first
        path = s.refinenet3(path, s.layer3_rn(l3))
        path = s.refinenet2(path, s.layer2_rn(l2))
        path = s.refinenet1(path, s.layer1_rn(l1))
        return s.output_conv(path)
