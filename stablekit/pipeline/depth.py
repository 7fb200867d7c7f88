"""Depth for the SD 2 depth model: a built-in DPT-Hybrid (MiDaS 3.0) estimator and depth-map helpers.

picture [B,3,H,W] in [0,1] ─8-bit PIL resize, normalise─▶ pixel values [B,3,h,w]
  ─DPT-Hybrid─▶ inverse depth [B,1,h,w] (larger = nearer) ─depth_for_latents─▶ [B,1,H/8,W/8] in [-1,1]

The estimator comes from a Hugging Face folder (`Intel/dpt-hybrid-midas`: config.json, weights,
preprocessor_config.json) or from the `depth_model.model.*` tensors an SD 2 depth single file
carries. `predict` equals transformers' `DPTForDepthEstimation(pixel_values=processor(pictures))
.predicted_depth` where the processor gets the pictures as 8-bit PIL images, which is what
diffusers' depth2img pipeline hands it for PIL input.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..checkpoint.files import read_tensors, shapes_of, shown_keys
from ..models import dpt_keys
from ..models.dpt import DPTDepthModel, make_div
from ..models.meta import empty_modules

DEPTH_PREFIX = "depth_model.model."
DETECTION_KEY = DEPTH_PREFIX + "pretrained.act_postprocess3.0.project.0.bias"


@dataclass(frozen=True)
class DPTConfig:
    """DPT-Hybrid sizes. Defaults: `Intel/dpt-hybrid-midas` = MiDaS 3.0 `dpt_hybrid` (ViT-B/16 + R50)."""

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_size: int = 3072
    image_size: int = 384  # the learnt position grid is (image_size / patch_size)^2; other sizes interpolate
    patch_size: int = 16  # = the ResNet's total stride
    num_channels: int = 3
    layer_norm_eps: float = 1e-12  # transformers' configs say 1e-12; timm (MiDaS, SD 2 files) uses 1e-6
    qkv_bias: bool = True
    backbone_embedding_size: int = 64  # stem width
    backbone_depths: tuple[int, ...] = (3, 4, 9)  # bottleneck blocks per stage
    backbone_widths: tuple[int, ...] = (256, 512, 1024)  # stage output channels
    backbone_num_groups: int = 32  # GroupNorm groups throughout the ResNet
    out_indices: tuple[int, ...] = (0, 1, 8, 11)  # ResNet stages 0, 1, then the ViT blocks tapped
    readout: str = "project"
    neck_hidden_sizes: tuple[int, ...] = (256, 512, 768, 768)
    reassemble_factors: tuple[float, ...] = (1, 1, 1, 0.5)  # only the last two act (ViT maps)
    fusion_hidden_size: int = 256
    fusion_residual_bias: bool = True

    def __post_init__(self) -> None:
        problems = []
        if len(self.backbone_depths) != 3 or len(self.backbone_widths) != 3:
            problems.append(f"the hybrid ResNet has 3 stages, got depths {self.backbone_depths}, "
                            f"widths {self.backbone_widths}")
        if self.patch_size != 16:
            problems.append(f"patch size {self.patch_size}: the ResNet's stride is 16")
        if self.hidden_size % self.num_heads:
            problems.append(f"hidden size {self.hidden_size} is not a multiple of {self.num_heads} heads")
        taps = tuple(self.out_indices[2:])
        if len(self.out_indices) != 4 or not (0 <= taps[0] < taps[1] < self.num_layers):
            problems.append(f"out indices {self.out_indices}: need 4, the last two increasing blocks "
                            f"of {self.num_layers}")
        if len(self.neck_hidden_sizes) != 4 or tuple(self.neck_hidden_sizes[:2]) != tuple(self.backbone_widths[:2]):
            problems.append(f"neck sizes {self.neck_hidden_sizes}: need 4, the first two = the ResNet "
                            f"widths {tuple(self.backbone_widths[:2])}")
        if len(self.reassemble_factors) != 4 or any(f not in (0.25, 0.5, 1, 2, 4) for f in self.reassemble_factors[2:]):
            problems.append(f"reassemble factors {self.reassemble_factors}")
        if self.readout != "project":
            problems.append(f"readout '{self.readout}': DPT-Hybrid uses 'project'")
        if problems:
            raise ValueError("not a DPT-Hybrid configuration: " + "; ".join(problems))

    @classmethod
    def from_hf_json(cls, conf: Mapping) -> DPTConfig:
        """From a transformers DPT config.json; ValueError for another model or unsupported options."""
        if conf.get("model_type", "dpt") != "dpt":
            raise ValueError(f"not a DPT config: model_type is '{conf.get('model_type')}'")
        if not (conf.get("is_hybrid") or conf.get("embedding_type") == "hybrid"):
            raise ValueError("a DPT config without the hybrid ResNet backbone (DPT-Large or a newer "
                             "backbone); only DPT-Hybrid (Intel/dpt-hybrid-midas) is built in")
        bb = conf.get("backbone_config") or {}
        wanted = {("model_type", "bit"), ("layer_type", "bottleneck"), ("global_padding", "same"),
                  ("embedding_dynamic_padding", True), ("hidden_act", "relu"), ("width_factor", 1),
                  ("num_channels", conf.get("num_channels", 3))}
        unsupported = [f"backbone {k}={bb[k]!r}" for k, v in sorted(wanted, key=str)
                       if k in bb and (bb[k].lower() if isinstance(bb[k], str) else bb[k]) != v]
        unsupported += [f"{k}={conf[k]!r}" for k, v in [("readout_type", "project"), ("hidden_act", "gelu"),
                        ("use_batch_norm_in_fusion_residual", False), ("add_projection", False),
                        ("head_in_index", -1), ("neck_ignore_stages", [0, 1])] if k in conf and conf[k] != v]
        if bb.get("output_stride", 32) < 16:
            unsupported.append(f"backbone output_stride={bb['output_stride']}")
        if unsupported:
            raise ValueError("unsupported DPT options: " + ", ".join(unsupported))
        depths = tuple(bb.get("depths", (3, 4, 9)))
        widths = tuple(make_div(h) for h in bb.get("hidden_sizes", (256, 512, 1024, 2048))[: len(depths)])
        featmap = conf.get("backbone_featmap_shape")
        if featmap and featmap[1] != widths[-1]:
            raise ValueError(f"backbone_featmap_shape {featmap} does not match the last stage's {widths[-1]} channels")
        bias = conf.get("use_bias_in_fusion_residual")
        return cls(
            hidden_size=conf.get("hidden_size", 768), num_layers=conf.get("num_hidden_layers", 12),
            num_heads=conf.get("num_attention_heads", 12), mlp_size=conf.get("intermediate_size", 3072),
            image_size=_square(conf.get("image_size", 384), "image_size"),
            patch_size=_square(conf.get("patch_size", 16), "patch_size"),
            num_channels=conf.get("num_channels", 3), layer_norm_eps=conf.get("layer_norm_eps", 1e-12),
            qkv_bias=conf.get("qkv_bias", True), backbone_embedding_size=bb.get("embedding_size", 64),
            backbone_depths=depths, backbone_widths=widths, backbone_num_groups=bb.get("num_groups", 32),
            # Only the last two name ViT blocks; the hybrid always takes ResNet stages 0 and 1 first.
            out_indices=(0, 1, *conf.get("backbone_out_indices", (2, 5, 8, 11))[2:]),
            readout=conf.get("readout_type", "project"),
            neck_hidden_sizes=tuple(conf.get("neck_hidden_sizes", (256, 512, 768, 768))),
            reassemble_factors=tuple(conf.get("reassemble_factors", (1, 1, 1, 0.5))),
            fusion_hidden_size=conf.get("fusion_hidden_size", 256),
            fusion_residual_bias=True if bias is None else bool(bias),
        )

    @classmethod
    def from_midas_shapes(cls, shapes: Mapping[str, torch.Tensor]) -> DPTConfig:
        """Read the sizes from MiDaS-layout tensors (shapes only). What shapes cannot tell follows
        the ViT convention: 64-wide heads (12 for ViT-B), blocks 2L/3 and L-1 tapped (8 and 11)."""
        def shape(key: str) -> torch.Size:
            if key not in shapes:
                raise ValueError(f"the depth model's weights are incomplete: no '{key}'")
            return shapes[key].shape

        res = "pretrained.model.patch_embed.backbone."
        pos = shape("pretrained.model.pos_embed")  # [1, 1 + n*n, C]
        hidden, grid = pos[-1], math.isqrt(pos[1] - 1)
        if grid * grid != pos[1] - 1:
            raise ValueError(f"the depth model's position embedding {list(pos)} is not 1 + a square grid")

        def count(pattern: str) -> int:  # 1 + the largest index N in keys matching `pattern` (with (\d+))
            return 1 + max((int(m[1]) for k in shapes if (m := re.match(pattern, k))), default=-1)

        layers = count(r"pretrained\.model\.blocks\.(\d+)\.")
        depths = tuple(count(re.escape(res) + rf"stages\.{s}\.blocks\.(\d+)\.") for s in range(3))
        if layers < 2 or 0 in depths:
            raise ValueError(f"the depth model's weights are incomplete: {layers} ViT blocks, ResNet stages {depths}")
        widths = tuple(shape(f"{res}stages.{s}.blocks.0.conv3.weight")[0] for s in range(3))

        def factor(stage: int) -> float:
            key = f"pretrained.act_postprocess{stage}.4.weight"
            if key not in shapes:
                return 1
            return 0.5 if shape(key)[-1] == 3 else shape(key)[-1]  # 3x3 stride-2 conv, or a k x k/k transposed conv

        return cls(
            hidden_size=hidden, num_layers=layers, num_heads=max(1, hidden // 64),
            mlp_size=shape("pretrained.model.blocks.0.mlp.fc1.weight")[0], image_size=grid * 16,
            layer_norm_eps=1e-6, qkv_bias="pretrained.model.blocks.0.attn.qkv.bias" in shapes,
            backbone_embedding_size=shape(res + "stem.conv.weight")[0], backbone_depths=depths, backbone_widths=widths,
            out_indices=(0, 1, 2 * layers // 3, layers - 1),
            neck_hidden_sizes=(widths[0], widths[1], shape("pretrained.act_postprocess3.3.weight")[0],
                               shape("pretrained.act_postprocess4.3.weight")[0]),
            reassemble_factors=(1, 1, factor(3), factor(4)),
            fusion_hidden_size=shape("scratch.layer1_rn.weight")[0],
            fusion_residual_bias="scratch.refinenet1.resConfUnit1.conv1.bias" in shapes,
        )


DPT_HYBRID = DPTConfig()  # the real-size preset


def _square(value: int | list[int], name: str) -> int:
    if isinstance(value, int):
        return value
    if len(value) == 2 and value[0] == value[1]:
        return int(value[0])
    raise ValueError(f"DPT {name} {value}: only square sizes are supported")


def _multiple(value: float, multiple: int) -> int:
    """DPTImageProcessor's rounding to a multiple (half to even); a side it would make 0 rounds up instead."""
    return round(value / multiple) * multiple or math.ceil(value / multiple) * multiple


@dataclass(frozen=True)
class DepthPreprocess:
    """transformers' DPTImageProcessor settings (preprocessor_config.json); defaults are its own."""

    size: tuple[int, int] = (384, 384)  # (height, width)
    keep_aspect_ratio: bool = False  # scale both sides by the factor nearer 1
    ensure_multiple_of: int = 1
    resample: int = int(Image.Resampling.BICUBIC)  # a PIL filter number
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    do_pad: bool = False  # centre zero padding up to multiples of size_divisor (after normalising)
    size_divisor: int | None = None

    @classmethod
    def from_json(cls, conf: Mapping) -> DepthPreprocess:
        size = conf.get("size", {"height": 384, "width": 384})
        if isinstance(size, int):
            size = {"height": size, "width": size}
        if not isinstance(size, Mapping) or "height" not in size or "width" not in size:
            raise ValueError(f"DPT preprocessor size {size!r}: expected height and width")
        known = {f.name for f in fields(cls)} - {"size"}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in conf.items() if k in known and v is not None}
        for k in ("image_mean", "image_std"):
            if isinstance(values.get(k), (int, float)):
                values[k] = (float(values[k]),) * 3
        return cls(size=(int(size["height"]), int(size["width"])), **values)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The resized (height, width): DPTImageProcessor's rule, Python rounding (half to even) included."""
        sh, sw = self.size[0] / height, self.size[1] / width
        if self.keep_aspect_ratio:
            sh = sw = sw if abs(1 - sw) < abs(1 - sh) else sh
        return _multiple(sh * height, self.ensure_multiple_of), _multiple(sw * width, self.ensure_multiple_of)

    def __call__(self, pictures: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] in [0,1] -> float32 pixel values [B,3,h,w]. Each picture is rounded to 8 bits and
        resized by PIL, then scaled and normalised in the processor's float64/float32 steps."""
        if pictures.ndim != 4 or pictures.shape[1] != 3:
            raise ValueError(f"depth estimation takes RGB pictures [B,3,H,W], got {tuple(pictures.shape)}")
        arr = (pictures.detach().clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype(np.uint8)
        mean = torch.tensor(self.image_mean, dtype=torch.float32)
        std = torch.tensor(self.image_std, dtype=torch.float32)
        out = []
        for a in arr:  # [H, W, 3] uint8
            if self.do_resize:
                h, w = self.output_size(*a.shape[:2])
                a = np.array(Image.fromarray(a).resize((w, h), resample=Image.Resampling(self.resample)))
            x = torch.from_numpy(a.astype(np.float64) * self.rescale_factor if self.do_rescale else a).float()
            if self.do_normalize:
                x = (x - mean) / std
            x = x.permute(2, 0, 1)
            if self.do_pad and self.size_divisor:
                ph, pw = (-s % self.size_divisor for s in x.shape[1:])
                x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
            out.append(x)
        return torch.stack(out)


class DepthEstimator:
    """A DPT-Hybrid network with its preprocessing, on one device and dtype."""

    def __init__(self, net: DPTDepthModel, preprocess: DepthPreprocess, *, device: torch.device, dtype: torch.dtype):
        self.net, self.preprocess, self.device, self.dtype = net, preprocess, device, dtype

    @property
    def config(self) -> DPTConfig:
        return self.net.cfg

    @torch.no_grad()
    def network(self, x: torch.Tensor) -> torch.Tensor:
        """The network alone on pictures already in its input range [-1, 1], at their own size (as the
        ControlNet extension's depth preprocessor runs it) -> [B, 1, h, w] float32."""
        return self.net(x.to(self.device, self.dtype)).float()

    @torch.no_grad()
    def predict(self, pictures: torch.Tensor) -> torch.Tensor:
        """Pictures [B,3,H,W] in [0,1] -> relative inverse depth [B,1,h,w] (float32) at the network's input size."""
        x = self.preprocess(pictures).to(self.device, self.dtype)
        return self.net(x).float()


def _build(cfg: DPTConfig, tensors: Mapping[str, torch.Tensor], source: str, extra: list[str], hf: bool,
           dtype: torch.dtype, device: torch.device | str) -> DPTDepthModel:
    """Make the network and load `tensors` strictly, naming missing/unexpected keys and mismatched shapes."""
    with empty_modules():
        net = DPTDepthModel(cfg)
    expected = net.state_dict()
    name = (lambda k: dpt_keys.midas_name_to_hf(k) or k) if hf else (lambda k: k)
    missing = [name(k) for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected] + extra
    if missing or unexpected:
        raise ValueError(f"{source}: the weights do not fit DPT-Hybrid ({cfg.num_layers} blocks of "
                         f"{cfg.hidden_size}): " + "; ".join(
                             f"{what} {len(keys)} keys: {shown_keys(sorted(keys))}"
                             for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys))
    wrong = [f"{name(k)} {list(tensors[k].shape)} vs {list(v.shape)}" for k, v in expected.items()
             if tensors[k].shape != v.shape]
    if wrong:
        raise ValueError(f"{source}: tensor sizes (weights vs network) differ: {shown_keys(wrong)}")
    net.load_state_dict({k: tensors[k].to(device=device, dtype=dtype) for k in expected}, strict=True, assign=True)
    return net.eval().requires_grad_(False)


def load_depth_estimator(path: str | Path, *, dtype: torch.dtype = torch.float32,
                         device: torch.device | str = "cpu") -> DepthEstimator:
    """A Hugging Face DPT-Hybrid folder (config.json + model.safetensors or pytorch_model.bin, and
    preprocessor_config.json if any) -> an estimator."""
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder; a DPT depth estimator is a Hugging Face folder "
                         "(config.json, model.safetensors) such as Intel/dpt-hybrid-midas")
    conf_path = folder / "config.json"
    if not conf_path.is_file():
        raise ValueError(f"{folder}: no config.json, so not a Hugging Face DPT folder")
    try:
        conf = json.loads(conf_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{conf_path}: not valid JSON ({e})") from None
    cfg = DPTConfig.from_hf_json(conf)
    weights = next((folder / n for n in ("model.safetensors", "pytorch_model.bin") if (folder / n).is_file()), None)
    if weights is None:
        raise ValueError(f"{folder}: no weights (model.safetensors or pytorch_model.bin) next to config.json")
    pre_path = folder / "preprocessor_config.json"
    preprocess = DepthPreprocess.from_json(json.loads(pre_path.read_text(encoding="utf-8"))) if pre_path.is_file() \
        else DepthPreprocess()
    hf = read_tensors(weights)  # weights-only for pickles; a clear error for damaged files
    recipes, unknown = dpt_keys.hf_to_midas(hf.keys())
    tensors = {k: combine(*(hf[s] for s in src)) for k, (src, combine) in recipes.items()}
    net = _build(cfg, tensors, str(weights), unknown, True, dtype, device)
    return DepthEstimator(net, preprocess, device=torch.device(device), dtype=dtype)


def has_checkpoint_depth_model(keys: Iterable[str]) -> bool:
    """Whether a single file's keys carry the SD 2 depth model's DPT (`depth_model.model.*`)."""
    return DETECTION_KEY in (keys if isinstance(keys, (Mapping, AbstractSet)) else set(keys))


def depth_estimator_from_checkpoint(tensors: Mapping[str, torch.Tensor], prefix: str = DEPTH_PREFIX, *,
                                    dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                                    config: DPTConfig | None = None) -> DepthEstimator | None:
    """The DPT-Hybrid an SD 2 depth file carries under `prefix`, with DPTImageProcessor's default
    preprocessing (384x384, bicubic, mean/std 0.5, as diffusers' depth2img); None if it has none.
    Sizes are read from the shapes unless `config` is given."""
    keys = [k for k in tensors if k.startswith(prefix) and not dpt_keys.UNUSED_MIDAS_KEYS.fullmatch(k[len(prefix):])]
    if not keys:
        return None
    shapes = shapes_of(tensors)  # meta tensors for lazily read files: nothing is read yet
    cfg = config or DPTConfig.from_midas_shapes({k[len(prefix):]: shapes[k] for k in keys})
    sub = {k[len(prefix):]: tensors[k] for k in keys}
    net = _build(cfg, sub, f"depth model ({prefix}*)", [], False, dtype, device)
    return DepthEstimator(net, DepthPreprocess(), device=torch.device(device), dtype=dtype)


def depth_for_latents(depth: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """[B,1,h,w] -> [B,1,lh,lw] in [-1,1]: bicubic (align_corners=False) straight to the latent size,
    then each map min-max to [-1,1] (diffusers' depth2img `prepare_depth_map`). Float32."""
    if depth.ndim != 4 or depth.shape[1] != 1:
        raise ValueError(f"depth maps must be [B,1,h,w], got {tuple(depth.shape)}")
    d = F.interpolate(depth.float(), size=tuple(latent_hw), mode="bicubic", align_corners=False)
    lo, hi = d.amin(dim=(1, 2, 3), keepdim=True), d.amax(dim=(1, 2, 3), keepdim=True)
    # A flat map would divide 0 by 0 (NaN in diffusers); it becomes a flat -1 instead.
    return 2.0 * (d - lo) / (hi - lo).clamp_min(torch.finfo(torch.float32).tiny) - 1.0


def depth_map_from_picture(image: Image.Image | str | Path) -> torch.Tensor:
    """A user's depth map (larger = nearer): 8/16-bit grayscale, 32-bit or RGB picture -> [1,1,H,W] float32
    with the values as stored (RGB through PIL's luminance); depth_for_latents normalises them."""
    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as im:
                image = im.copy()
        except (OSError, ValueError) as e:
            raise ValueError(f"{image}: not a readable depth-map picture ({e})") from None
    if not isinstance(image, Image.Image):
        # ValueError, as for every unusable input the user hands in (images.load_picture does the same)
        raise ValueError(f"a depth map must be a picture (PIL image or file), got {type(image).__name__}")  # noqa: TRY004
    if not (image.mode.startswith("I") or image.mode == "F"):
        image = image.convert("L")
    arr = np.asarray(image).astype(np.float32)
    if arr.ndim != 2:
        raise ValueError(f"a depth map picture of mode {image.mode} did not give one channel")
    return torch.from_numpy(arr)[None, None]


def depth_picture(depth: torch.Tensor) -> Image.Image:
    """[1,h,w] or [h,w] -> a 16-bit grayscale picture (PIL mode I;16), min-max normalised to 0..65535."""
    d = depth.detach().float().cpu()
    if d.ndim == 3 and d.shape[0] == 1:
        d = d[0]
    if d.ndim != 2:
        raise ValueError(f"a depth picture is made of one depth map [1,h,w] or [h,w], got {tuple(depth.shape)}")
    lo, hi = d.min(), d.max()
    n = (d - lo) / (hi - lo) if hi > lo else torch.zeros_like(d)
    return Image.fromarray((n * 65535).round().numpy().astype(np.uint16))  # uint16 -> mode I;16


def save_depth_png(depth: torch.Tensor, path: str | Path) -> Path:
    """depth_picture(depth) written as a 16-bit PNG."""
    path = Path(path)
    depth_picture(depth).save(path, format="PNG")
    return path


def checkpoint_depth_estimator(path: Path | None, *, dtype: torch.dtype = torch.float32,
                               device: torch.device | str = "cpu") -> DepthEstimator:
    """The estimator a depth checkpoint carries: a single file's depth_model.* weights, or a diffusers
    folder's depth_estimator/ (with feature_extractor/preprocessor_config.json)."""
    if path is not None and path.is_dir() and (path / "depth_estimator").is_dir():
        estimator = load_depth_estimator(path / "depth_estimator", dtype=dtype, device=device)
        pre = path / "feature_extractor" / "preprocessor_config.json"
        if pre.is_file():
            estimator.preprocess = DepthPreprocess.from_json(json.loads(pre.read_text(encoding="utf-8")))
        return estimator
    estimator = None
    if path is not None and path.is_file():
        estimator = depth_estimator_from_checkpoint(read_tensors(path), dtype=dtype, device=device)
    if estimator is None:
        where = path.name if path is not None else "this model"
        raise ValueError(f"{where} carries no depth estimator (depth_model.* weights or a depth_estimator/ "
                         "folder): give a depth map, or --depth-model with a DPT folder such as Intel/dpt-hybrid-midas")
    return estimator
