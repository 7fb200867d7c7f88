"""DPT-Hybrid key table: Hugging Face `DPTForDepthEstimation` names <-> MiDaS names (our layout).

The MiDaS names are those of the original DPT/MiDaS repository, as the SD 2 depth checkpoint
stores them under `depth_model.model.`; the correspondence is the one transformers'
`convert_dpt_hybrid_to_pytorch.py` applies. Each row pairs two templates: `{x}` is any text
(kept), other fields are integers, remapped where a row says so (MiDaS numbers the act_postprocess
and scratch layers from 1, and its refinenet4 is transformers' first fusion layer). The only
tensor change is attention: timm fuses query, key and value into one `qkv` Linear.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

import torch

Recipe = tuple[tuple[str, ...], Callable[..., torch.Tensor]]  # source keys, combine(*tensors)
IndexMap = dict[str, tuple[Callable[[int], int], Callable[[int], int]]]  # field -> (to MiDaS, to HF)

_PLUS1: tuple[Callable[[int], int], Callable[[int], int]] = (lambda i: i + 1, lambda i: i - 1)
_REVERSED: tuple[Callable[[int], int], Callable[[int], int]] = (lambda j: 4 - j, lambda r: 4 - r)

_BIT = "dpt.embeddings.backbone.bit."
_RES = "pretrained.model.patch_embed.backbone."
_HF_LAYER = "dpt.encoder.layer.{i}."
_VIT_BLOCK = "pretrained.model.blocks.{i}."
_FUSION = "neck.fusion_stage.layers.{j}."
_REFINE = "scratch.refinenet{j}."

TABLE: list[tuple[str, str, IndexMap]] = [
    # BiT / ResNetV2 stem and stages (block parts keep their names: conv1..3, norm1..3, downsample.*)
    (_BIT + "embedder.convolution.weight", _RES + "stem.conv.weight", {}),
    (_BIT + "embedder.norm.{x}", _RES + "stem.norm.{x}", {}),
    (_BIT + "encoder.stages.{s}.layers.{b}.{x}", _RES + "stages.{s}.blocks.{b}.{x}", {}),
    # patch embedding and tokens
    ("dpt.embeddings.projection.{x}", "pretrained.model.patch_embed.proj.{x}", {}),
    ("dpt.embeddings.cls_token", "pretrained.model.cls_token", {}),
    ("dpt.embeddings.position_embeddings", "pretrained.model.pos_embed", {}),
    # ViT blocks (attention.attention.{query,key,value} <-> attn.qkv: see QKV)
    (_HF_LAYER + "layernorm_before.{x}", _VIT_BLOCK + "norm1.{x}", {}),
    (_HF_LAYER + "attention.output.dense.{x}", _VIT_BLOCK + "attn.proj.{x}", {}),
    (_HF_LAYER + "layernorm_after.{x}", _VIT_BLOCK + "norm2.{x}", {}),
    (_HF_LAYER + "intermediate.dense.{x}", _VIT_BLOCK + "mlp.fc1.{x}", {}),
    (_HF_LAYER + "output.dense.{x}", _VIT_BLOCK + "mlp.fc2.{x}", {}),
    ("dpt.layernorm.{x}", "pretrained.model.norm.{x}", {}),
    # reassembly: readout projection, 1x1 conv, resize conv
    ("neck.reassemble_stage.readout_projects.{i}.0.{x}", "pretrained.act_postprocess{i}.0.project.0.{x}",
     {"i": _PLUS1}),
    ("neck.reassemble_stage.layers.{i}.projection.{x}", "pretrained.act_postprocess{i}.3.{x}", {"i": _PLUS1}),
    ("neck.reassemble_stage.layers.{i}.resize.{x}", "pretrained.act_postprocess{i}.4.{x}", {"i": _PLUS1}),
    # decoder
    ("neck.convs.{i}.weight", "scratch.layer{i}_rn.weight", {"i": _PLUS1}),
    (_FUSION + "projection.{x}", _REFINE + "out_conv.{x}", {"j": _REVERSED}),
    (_FUSION + "residual_layer{a}.convolution{c}.{x}", _REFINE + "resConfUnit{a}.conv{c}.{x}", {"j": _REVERSED}),
    ("head.head.{n}.{x}", "scratch.output_conv.{n}.{x}", {}),
]
QKV = (_HF_LAYER + "attention.attention.{part}.{x}", _VIT_BLOCK + "attn.qkv.{x}")
QKV_PARTS = ("query", "key", "value")  # the order of the thirds of timm's fused qkv

# The timm ViT's ImageNet classifier, carried by MiDaS files (and so by SD 2 depth checkpoints), unused by DPT.
UNUSED_MIDAS_KEYS = re.compile(r"pretrained\.model\.head\.(weight|bias)")

_FIELD = re.compile(r"\{(\w+)\}")


def _regex(template: str) -> re.Pattern[str]:
    parts = _FIELD.split(template)  # text, field, text, field, ...
    out = []
    for i, part in enumerate(parts):
        if i % 2 == 0:
            out.append(re.escape(part))
        else:
            out.append(f"(?P<{part}>{'.+' if part == 'x' else '[a-z]+' if part == 'part' else r'[0-9]+'})")
    return re.compile("".join(out))


_COMPILED = [(_regex(hf), _regex(midas), hf, midas, index) for hf, midas, index in TABLE]
_QKV_HF, _QKV_MIDAS = _regex(QKV[0]), _regex(QKV[1])


def _fill(template: str, fields: dict[str, str], index: IndexMap, direction: int) -> str:
    values = {k: str(index[k][direction](int(v))) if k in index else v for k, v in fields.items()}
    return template.format(**values)


def hf_name_to_midas(key: str) -> str | None:
    """One transformers key -> its MiDaS key (query/key/value -> the fused qkv); None if it has none."""
    m = _QKV_HF.fullmatch(key)
    if m and m["part"] in QKV_PARTS:
        return QKV[1].format(i=m["i"], x=m["x"])
    for hf_re, _, _, midas, index in _COMPILED:
        m = hf_re.fullmatch(key)
        if m:
            return _fill(midas, m.groupdict(), index, 0)
    return None


def midas_name_to_hf(key: str) -> str | None:
    """One MiDaS key -> its transformers key (qkv -> 'query/key/value' for messages); None if it has none."""
    m = _QKV_MIDAS.fullmatch(key)
    if m:
        return QKV[0].format(i=m["i"], part="query/key/value", x=m["x"])
    for _, midas_re, hf, _, index in _COMPILED:
        m = midas_re.fullmatch(key)
        if m:
            return _fill(hf, m.groupdict(), index, 1)
    return None


def _fuse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.cat([q, k, v])


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def hf_to_midas(keys: Iterable[str]) -> tuple[dict[str, Recipe], list[str]]:
    """Recipes for MiDaS-layout tensors from transformers keys, and the keys that have no counterpart.

    A fused qkv whose query, key or value is absent gets no recipe, so the loader reports it missing.
    """
    keys = list(keys)
    present = set(keys)
    recipes: dict[str, Recipe] = {}
    unknown: list[str] = []
    for key in keys:
        m = _QKV_HF.fullmatch(key)
        if m and m["part"] in QKV_PARTS:
            parts = tuple(QKV[0].format(i=m["i"], part=p, x=m["x"]) for p in QKV_PARTS)
            if all(p in present for p in parts):
                recipes[QKV[1].format(i=m["i"], x=m["x"])] = (parts, _fuse)
            continue
        target = hf_name_to_midas(key)
        if target is None:
            unknown.append(key)
        else:
            recipes[target] = ((key,), _same)
    return recipes, unknown


def midas_to_hf(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MiDaS-layout tensors -> a transformers `DPTForDepthEstimation` state dict (qkv split in thirds)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if UNUSED_MIDAS_KEYS.fullmatch(key):
            continue
        m = _QKV_MIDAS.fullmatch(key)
        if m:
            for part, third in zip(QKV_PARTS, value.chunk(3, dim=0), strict=True):
                out[QKV[0].format(i=m["i"], part=part, x=m["x"])] = third
            continue
        target = midas_name_to_hf(key)
        if target is None:
            raise ValueError(f"MiDaS key '{key}' has no transformers counterpart")
        out[target] = value
    return out
