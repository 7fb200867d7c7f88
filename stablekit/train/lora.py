"""LoRA training (Hu et al. 2021) on a checkpoint, written as the kohya `.safetensors` people share.

Every Linear and 1x1 Conv2d inside the UNet's transformer blocks (proj_in, attn1/attn2 q/k/v/out,
the feed-forward, proj_out: kohya's default "Transformer2DModel" targets), and optionally the SD 1
text encoder's attention and MLP, get a parallel low-rank branch W x + (alpha / rank) * up(down(x)).
`down` starts as kohya's (Kaiming uniform, a = sqrt(5)), `up` at zero, so step 0 is the base model.
Only the branches train; the base weights are never changed.

The file uses kohya's names in diffusers' block layout (`lora_unet_down_blocks_0_attentions_0_...`,
`lora_te_text_model_encoder_layers_0_self_attn_q_proj`) with `.lora_down.weight`, `.lora_up.weight`
and a 0-d `.alpha`, and kohya's `ss_*` metadata, so the web UI, ComfyUI, diffusers'
`load_lora_weights` and this project's loader read it.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..checkpoint import load_model
from ..engine import resolve_device
from .common import StageConfig
from .data import captioned_batches, captioned_pictures
from .latent import train_latent_diffusion


class LoraBranch(nn.Module):
    """The low-rank branch of one Linear or 1x1 Conv2d; `base` is called unchanged."""

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int, alpha: float, peft_name: str):
        super().__init__()
        self.peft_name = peft_name  # the diffusers/PEFT name: "unet.down_blocks.0.attentions.0.proj_in", ...
        if isinstance(base, nn.Linear):
            self.lora_down = nn.Linear(base.in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, base.out_features, bias=False)
        else:  # a conv: down has its kernel, stride and padding (LoCon for 3x3), up is 1x1
            self.lora_down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, bias=False)
            self.lora_up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.rank, self.alpha = rank, alpha
        self.base = [base]  # a list: not a submodule, so its weights are neither trained nor saved here
        self.base_forward = base.forward
        base.forward = self.forward  # the model calls the base module; the branch rides along

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_forward(x) + self.lora_up(self.lora_down(x)) * (self.alpha / self.rank)

    def remove(self) -> None:
        self.base[0].forward = self.base_forward


def _unet_targets(unet: nn.Module, conv: bool) -> dict[str, nn.Module]:
    """Module path -> Linear / Conv2d to train: the layers inside each SpatialTransformer (kohya's
    default), and with `conv` every layer of the ResBlocks and the down/upsampling convs (kohya's
    conv_dim targets: ResnetBlock2D, Downsample2D, Upsample2D)."""
    kinds = {"SpatialTransformer"} | ({"ResBlock", "Downsample", "Upsample"} if conv else set())
    out = {}
    for name, m in unet.named_modules():
        if type(m).__name__ in kinds:
            for sub, layer in m.named_modules(prefix=name):
                if isinstance(layer, (nn.Linear, nn.Conv2d)):
                    out[sub] = layer
    return out


_RESNET_PARTS = {"in_layers.2": "conv1", "out_layers.3": "conv2", "skip_connection": "conv_shortcut",
                 "emb_layers.1": "time_emb_proj"}


def diffusers_unet_name(path: str, num_res_blocks: int) -> str:
    """An LDM UNet module path -> the diffusers one kohya names: input_blocks.4.1.X ->
    down_blocks.1.attentions.0.X, input_blocks.4.0.in_layers.2 -> down_blocks.1.resnets.0.conv1,
    input_blocks.3.0.op -> down_blocks.0.downsamplers.0.conv, and so on."""
    n = num_res_blocks + 1
    if m := re.fullmatch(r"input_blocks\.(\d+)\.1\.(.+)", path):
        i = int(m[1]) - 1
        return f"down_blocks.{i // n}.attentions.{i % n}.{m[2]}"
    if m := re.fullmatch(r"input_blocks\.(\d+)\.0\.op", path):
        return f"down_blocks.{(int(m[1]) - 1) // n}.downsamplers.0.conv"
    if (m := re.fullmatch(r"input_blocks\.(\d+)\.0\.(.+)", path)) and m[2] in _RESNET_PARTS:
        i = int(m[1]) - 1
        return f"down_blocks.{i // n}.resnets.{i % n}.{_RESNET_PARTS[m[2]]}"
    if m := re.fullmatch(r"middle_block\.1\.(.+)", path):
        return f"mid_block.attentions.0.{m[1]}"
    if (m := re.fullmatch(r"middle_block\.([02])\.(.+)", path)) and m[2] in _RESNET_PARTS:
        return f"mid_block.resnets.{int(m[1]) // 2}.{_RESNET_PARTS[m[2]]}"
    if m := re.fullmatch(r"output_blocks\.(\d+)\.[12]\.conv", path):
        return f"up_blocks.{int(m[1]) // n}.upsamplers.0.conv"
    if m := re.fullmatch(r"output_blocks\.(\d+)\.1\.(.+)", path):
        i = int(m[1])
        return f"up_blocks.{i // n}.attentions.{i % n}.{m[2]}"
    if (m := re.fullmatch(r"output_blocks\.(\d+)\.0\.(.+)", path)) and m[2] in _RESNET_PARTS:
        i = int(m[1])
        return f"up_blocks.{i // n}.resnets.{i % n}.{_RESNET_PARTS[m[2]]}"
    raise ValueError(f"no diffusers name for the UNet layer {path}")


def add_lora(model: nn.Module, rank: int, alpha: float, text_encoder: bool = False,
             conv_rank: int | None = None, conv_alpha: float | None = None) -> nn.ModuleDict:
    """Branches on the model's UNet (and text encoder); keys are the kohya module names. `conv_rank`
    adds the ResBlocks and resampling convs (3x3 convs at conv_rank / conv_alpha, kohya's conv_dim)."""
    if rank < 1 or (conv_rank is not None and conv_rank < 1):
        raise ValueError(f"--rank and --conv-rank must be at least 1, got {rank} and {conv_rank}")
    cfg = model.cfg
    branches = {}
    for path, layer in _unet_targets(model.unet, conv_rank is not None).items():
        diffusers_name = diffusers_unet_name(path, cfg.unet.num_res_blocks)
        wide = isinstance(layer, nn.Conv2d) and layer.kernel_size != (1, 1)
        r, a = (conv_rank, conv_rank if conv_alpha is None else conv_alpha) if wide else (rank, alpha)
        branches["lora_unet_" + diffusers_name.replace(".", "_")] = LoraBranch(
            layer, r, float(a), "unet." + diffusers_name)
    if text_encoder:
        if cfg.text.layout != "clip":
            raise ValueError("--text-encoder LoRA is for SD 1.x text encoders (CLIP ViT-L) here; SD 2's OpenCLIP "
                             "fuses q/k/v and is not trained")
        for path, layer in model.text_encoder.named_modules():
            m = re.fullmatch(r"transformer\.text_model\.(encoder\.layers\.\d+\.(?:self_attn\.\w+_proj|mlp\.fc[12]))",
                             path)
            if m and isinstance(layer, nn.Linear):
                branches["lora_te_text_model_" + m[1].replace(".", "_")] = LoraBranch(
                    layer, rank, alpha, "text_encoder.text_model." + m[1])
    # ModuleDict keys cannot contain dots; kohya names have none
    return nn.ModuleDict(branches)


def kohya_tensors(branches: nn.ModuleDict, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    out = {}
    for name, b in branches.items():
        out[f"{name}.lora_down.weight"] = b.lora_down.weight.detach().to("cpu", dtype).contiguous()
        out[f"{name}.lora_up.weight"] = b.lora_up.weight.detach().to("cpu", dtype).contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(b.alpha), dtype=dtype)
    return out


def peft_file(branches: nn.ModuleDict, dtype: torch.dtype = torch.float16) -> tuple[dict, dict[str, str]]:
    """(tensors, metadata) in diffusers' `save_lora_weights` layout: `unet.X.lora_A.weight` (down),
    `lora_B.weight` (up), and the PEFT config per component in `lora_adapter_metadata`."""
    tensors, config = {}, {}
    for b in branches.values():
        tensors[f"{b.peft_name}.lora_A.weight"] = b.lora_down.weight.detach().to("cpu", dtype).contiguous()
        tensors[f"{b.peft_name}.lora_B.weight"] = b.lora_up.weight.detach().to("cpu", dtype).contiguous()
        part, module = b.peft_name.split(".", 1)
        # PEFT matches target names as dotted suffixes; the layer's own name (with its index for
        # "to_out.0", "net.2") picks out exactly these layers, whatever the library prefixes them with
        names = module.split(".")
        target = ".".join(names[-2:]) if names[-1].isdigit() else names[-1]
        config.setdefault(f"{part}.target_modules", set()).add(target)
        config[f"{part}.r"], config[f"{part}.lora_alpha"] = b.rank, b.alpha
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    return tensors, {"lora_adapter_metadata": json.dumps(config), "format": "pt"}


def kohya_metadata(*, family: str, rank: int, alpha: float, steps: int, lr: float, resolution: int,
                   text_encoder: bool, name: str, captions: list[str]) -> dict[str, str]:
    """The `ss_*` training keys kohya's sd-scripts write and the web UI shows, plus the modelspec ones."""
    tags: dict[str, int] = {}
    for caption in captions:
        for tag in (t.strip() for t in caption.split(",")):
            if tag:
                tags[tag] = tags.get(tag, 0) + 1
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_base_model_version": "sd_v1" if family == "sd1" else "sd_2.0",
        "ss_v2": str(family != "sd1"),
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_max_train_steps": str(steps),
        "ss_learning_rate": str(lr),
        "ss_unet_lr": str(lr),
        "ss_text_encoder_lr": str(lr) if text_encoder else "0",
        "ss_network_train_unet_only": str(not text_encoder),
        "ss_output_name": name,
        "ss_num_train_images": str(len(captions)),
        "ss_tag_frequency": json.dumps({"data": tags}),
        "ss_training_comment": "trained with stablekit train lora",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": ("stable-diffusion-v1" if family == "sd1" else "stable-diffusion-v2-512") + "/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": name,
        "modelspec.resolution": f"{resolution}x{resolution}",
    }


def train_lora(model: str | Path, data: Path, out: Path, *, steps: int, batch_size: int, lr: float,
               rank: int = 8, alpha: float | None = None, size: int | None = None, text_encoder: bool = False,
               device: str = "auto", prediction: str | None = None, seed: int = 0, name: str | None = None,
               stop_after: int | None = None, caption_dropout: float = 0.0, flip: bool = False, buckets: bool = False,
               ema: float = 0.0, gradient_checkpointing: bool = False,
               autocast: torch.dtype | None = None, peft: bool = False, conv_rank: int | None = None,
               conv_alpha: float | None = None) -> Path | None:
    """Train LoRA branches on `data` (pictures with same-name .txt captions); resumable from `out`.

    Writes out/NAME.safetensors (kohya format, fp16) and returns its path, and with `peft` a diffusers/PEFT
    copy, out/pytorch_lora_weights.safetensors; None when `stop_after` ended the run early (its state
    is saved: the same call without it carries on)."""
    dev = resolve_device(device)
    pairs = captioned_pictures(data)
    loaded = load_model(model, dtype=torch.float32, device=dev, prediction=prediction)
    sd_model = loaded.model
    size = size or loaded.config.resolution
    alpha = float(rank if alpha is None else alpha)
    torch.manual_seed(seed)  # the down projections' start
    branches = add_lora(sd_model, rank, alpha, text_encoder, conv_rank, conv_alpha).to(dev)
    batches = captioned_batches(pairs, sd_model.vae, size, batch_size, seed, dev, flip, buckets)
    stage = StageConfig(steps=steps, batch_size=batch_size, lr=lr, warmup=min(100, steps // 10 + 1),
                        weight_decay=0.0, sample_every=max(steps // 4, 1), seed=seed, stop_after=stop_after, ema=ema)
    done = train_latent_diffusion(sd_model, batches, stage, out, gradient_checkpointing=gradient_checkpointing,
                                  autocast=autocast, caption_dropout=caption_dropout, offset_noise=0.0,
                                  trained={"lora": branches}, preview_prompts=[c for _, c in pairs[:2]],
                                  preview_size=(size, size), device=dev)
    if done < steps:
        return None
    name = name or out.name
    meta = kohya_metadata(family=loaded.config.family, rank=rank, alpha=alpha, steps=steps, lr=lr, resolution=size,
                          text_encoder=text_encoder, name=name, captions=[c for _, c in pairs])
    if conv_rank is not None:
        meta["ss_network_args"] = json.dumps({"conv_dim": str(conv_rank),
                                              "conv_alpha": str(conv_rank if conv_alpha is None else conv_alpha)})
    if peft:
        tensors, metadata = peft_file(branches)
        save_file(tensors, str(out / "pytorch_lora_weights.safetensors"), metadata=metadata)
    return write_lora(branches, out / f"{name}.safetensors", meta)


def write_lora(branches: nn.ModuleDict, path: Path, metadata: dict[str, str]) -> Path:
    """Save the branches as a kohya file and take them off the model's layers."""
    save_file(kohya_tensors(branches), str(path), metadata=metadata)
    for b in branches.values():
        b.remove()
    return path
