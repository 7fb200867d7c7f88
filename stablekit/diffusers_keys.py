"""The one conversion table: diffusers-format component keys -> original LDM keys.

Each rule is a regex over a diffusers key and a function giving the LDM key. Block numbers
are computed from the layout (`layers` res blocks per level), so one table covers any size.
The converters work on key names only and return recipes (source keys + how to combine
them), so tensors are read, reshaped or fused one at a time when the loader asks for them.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable

import torch

from .detect import CheckpointError

Rule = tuple[str, Callable[..., str]]
Recipe = tuple[tuple[str, ...], Callable[..., torch.Tensor]]  # source keys, combine(*tensors)


def same(t: torch.Tensor) -> torch.Tensor:
    """A recipe's combine step for a tensor taken as it is."""
    return t


def _conv1x1(t: torch.Tensor) -> torch.Tensor:
    return t[:, :, None, None] if t.ndim == 2 else t  # diffusers stores the VAE's 1x1 convs as Linear


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.cat([q, k, v])

_RESNET_UNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_RESNET_VAE = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "query": "q", "to_k": "k", "key": "k", "to_v": "v", "value": "v",
             "to_out.0": "proj_out", "proj_attn": "proj_out"}


def _apply(rules: list[Rule], key: str) -> str:
    for pattern, make in rules:
        m = re.fullmatch(pattern, key)
        if m:
            return make(*m.groups())
    raise CheckpointError(f"diffusers key '{key}' has no counterpart in the original layout")


def unet_to_ldm(keys: Iterable[str], layers_per_block: int) -> dict[str, Recipe]:
    keys = list(keys)
    L = layers_per_block
    up_has_attention = {int(m.group(1)) for k in keys if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}

    def res(part: str, rest: str) -> str:
        return f"{_RESNET_UNET[part]}.{rest}"

    rules: list[Rule] = [
        (r"conv_in\.(.+)", lambda r: f"input_blocks.0.0.{r}"),
        (r"time_embedding\.linear_1\.(.+)", lambda r: f"time_embed.0.{r}"),
        (r"time_embedding\.linear_2\.(.+)", lambda r: f"time_embed.2.{r}"),
        (r"class_embedding\.weight", lambda: "label_emb.weight"),  # num_class_embeds: an embedding table
        (r"(?:add|class)_embedding\.linear_([12])\.(.+)", lambda n, r: f"label_emb.0.{2 * (int(n) - 1)}.{r}"),
        (r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.+)",
         lambda i, j, p, r: f"input_blocks.{1 + int(i) * (L + 1) + int(j)}.0.{res(p, r)}"),
        (r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)",
         lambda i, j, r: f"input_blocks.{1 + int(i) * (L + 1) + int(j)}.1.{r}"),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", lambda i, r: f"input_blocks.{(int(i) + 1) * (L + 1)}.0.op.{r}"),
        (r"mid_block\.resnets\.(\d+)\.(\w+)\.(.+)", lambda j, p, r: f"middle_block.{2 * int(j)}.{res(p, r)}"),
        (r"mid_block\.attentions\.0\.(.+)", lambda r: f"middle_block.1.{r}"),
        (r"up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.+)",
         lambda i, j, p, r: f"output_blocks.{int(i) * (L + 1) + int(j)}.0.{res(p, r)}"),
        (r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", lambda i, j, r: f"output_blocks.{int(i) * (L + 1) + int(j)}.1.{r}"),
        (r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)",
         lambda i, r: f"output_blocks.{int(i) * (L + 1) + L}.{2 if int(i) in up_has_attention else 1}.conv.{r}"),
        (r"conv_norm_out\.(.+)", lambda r: f"out.0.{r}"),
        (r"conv_out\.(.+)", lambda r: f"out.2.{r}"),
    ]
    return {"model.diffusion_model." + _apply(rules, k): ((k,), same) for k in keys}


def vae_to_ldm(keys: Iterable[str], levels: int) -> dict[str, Recipe]:
    def res(part: str, rest: str) -> str:
        return f"{_RESNET_VAE[part]}.{rest}"

    rules: list[Rule] = [
        (r"(encoder|decoder)\.(conv_in|conv_out)\.(.+)", lambda e, c, r: f"{e}.{c}.{r}"),
        (r"(encoder|decoder)\.conv_norm_out\.(.+)", lambda e, r: f"{e}.norm_out.{r}"),
        (r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(\w+)\.(.+)",
         lambda e, j, p, r: f"{e}.mid.block_{int(j) + 1}.{res(p, r)}"),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|query|to_k|key|to_v|value|to_out\.0|proj_attn)\.(.+)",
         lambda e, p, r: f"{e}.mid.attn_1.{_VAE_ATTN[p]}.{r}"),
        (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.+)", lambda i, j, p, r: f"encoder.down.{i}.block.{j}.{res(p, r)}"),
        (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", lambda i, r: f"encoder.down.{i}.downsample.conv.{r}"),
        (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.+)",
         lambda i, j, p, r: f"decoder.up.{levels - 1 - int(i)}.block.{j}.{res(p, r)}"),
        (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)",
         lambda i, r: f"decoder.up.{levels - 1 - int(i)}.upsample.conv.{r}"),
        (r"(quant_conv|post_quant_conv)\.(.+)", lambda c, r: f"{c}.{r}"),
    ]
    out = {}
    for k in keys:
        new = _apply(rules, k)
        out["first_stage_model." + new] = ((k,), _conv1x1 if ".mid.attn_1." in new else same)
    return out


def _text_keys(keys: Iterable[str]) -> dict[str, str]:
    """transformers < 5 saves CLIPTextModel keys under `text_model.`, 5.x without it: accept both."""
    return {k.removeprefix("text_model."): k for k in keys if not k.endswith("position_ids")}


def clip_to_ldm(keys: Iterable[str]) -> dict[str, Recipe]:
    """transformers CLIPTextModel (SD 1.x): same names under a prefix."""
    return {"cond_stage_model.transformer.text_model." + k: ((src,), same) for k, src in _text_keys(keys).items()}


def openclip_to_ldm(keys: Iterable[str]) -> dict[str, Recipe]:
    """transformers CLIPTextModel (SD 2.x) -> OpenCLIP names, fusing q/k/v into in_proj."""
    p = "cond_stage_model.model."
    rules: list[Rule] = [
        (r"embeddings\.token_embedding\.weight", lambda: "token_embedding.weight"),
        (r"embeddings\.position_embedding\.weight", lambda: "positional_embedding"),
        (r"final_layer_norm\.(.+)", lambda r: f"ln_final.{r}"),
        (r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.(.+)", lambda i, r: f"transformer.resblocks.{i}.attn.out_proj.{r}"),
        (r"encoder\.layers\.(\d+)\.layer_norm(\d)\.(.+)", lambda i, n, r: f"transformer.resblocks.{i}.ln_{n}.{r}"),
        (r"encoder\.layers\.(\d+)\.mlp\.fc1\.(.+)", lambda i, r: f"transformer.resblocks.{i}.mlp.c_fc.{r}"),
        (r"encoder\.layers\.(\d+)\.mlp\.fc2\.(.+)", lambda i, r: f"transformer.resblocks.{i}.mlp.c_proj.{r}"),
    ]
    out: dict[str, Recipe] = {}
    qkv: dict[tuple[str, str], dict[str, str]] = {}
    for k, src in _text_keys(keys).items():
        m = re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", k)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = src
            continue
        out[p + _apply(rules, k)] = ((src,), same)
    for (i, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"text encoder layer {i}: q/k/v {kind} incomplete ({sorted(parts)})")
        out[p + f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = ((parts["q"], parts["k"], parts["v"]), _fuse_qkv)
    return out
