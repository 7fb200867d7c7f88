"""Module names in LoRA files -> parameters of a stablekit model (SD 1.x and 2.x).

Names that occur in the wild, all accepted (the web UI's `networks.py` accepts the kohya ones):
  kohya, diffusers names  lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q
  kohya, original names   lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q
  kohya text encoder      lora_te_text_model_encoder_layers_0_self_attn_q_proj  (transformers-CLIP names on
                          SD 2 too; lora_te1_ is the same)
  diffusers / PEFT        unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q,
                          text_encoder.text_model.encoder.layers.0.self_attn.q_proj
Diffusers block names go through the project's one conversion table (`diffusers_keys`). Inside a
block, kohya's underscores cannot be turned back into dots reliably (`to_q`, `ff_net_0_proj`), so the
converted name is compared with the model's own module paths written with underscores, as the web UI
does. SD 2's text encoder fuses q/k/v into one `in_proj_weight` [3C, C]: a q, k or v module updates
its third.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from ..detect import CheckpointError
from ..diffusers_keys import clip_to_ldm, openclip_to_ldm, unet_to_ldm

UNET = "model.diffusion_model."
TEXT = "cond_stage_model."

# kohya's diffusers-named UNet blocks: underscored prefix -> dotted prefix, the rest stays underscored
_KOHYA_UNET_BLOCKS = [
    (r"(down|up)_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", "{0}_blocks.{1}.{2}.{3}.{4}"),
    (r"(down|up)_blocks_(\d+)_(downsamplers|upsamplers)_0_conv", "{0}_blocks.{1}.{2}.0.conv"),
    (r"mid_block_(attentions|resnets)_(\d+)_(.+)", "mid_block.{0}.{1}.{2}"),
    (r"time_embedding_linear_([12])", "time_embedding.linear_{0}"),
    (r"(conv_in|conv_out)", "{0}"),
]
_KOHYA_TEXT = re.compile(r"(?:text_model_)?encoder_layers_(\d+)_(self_attn_(?:q|k|v|out)_proj|mlp_fc[12])")
_HF_TEXT = re.compile(r"(?:text_model\.)?encoder\.layers\.(\d+)\.(self_attn\.([qkv]|out)_proj|mlp\.fc[12])")


@dataclass(frozen=True)
class Target:
    """Where one file module's delta goes: a parameter, or a row range of it (SD 2's fused q/k/v)."""

    param: str  # state-dict key, e.g. "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    rows: tuple[int, int] | None = None


class KeyMap:
    """File module name -> `Target` for one model. Built once per model from its parameter names."""

    def __init__(self, model: nn.Module):
        self.cfg = model.cfg
        params = {k for k, _ in model.named_parameters()}
        # module path with underscores -> weight key, as the web UI keys modules (relative to `model.`
        # for the UNet, to `cond_stage_model.` for the text encoder)
        self._unet = {k[len("model."):-len(".weight")].replace(".", "_"): k
                      for k in params if k.startswith(UNET) and k.endswith(".weight")}
        self._text = {k[len(TEXT):-len(".weight")].replace(".", "_"): k
                      for k in params if k.startswith(TEXT) and k.endswith(".weight")}
        self._fused = {k[len(TEXT):-len(".in_proj_weight")].replace(".", "_"): k
                       for k in params if k.startswith(TEXT) and k.endswith(".in_proj_weight")}
        self._params = params
        # Which up blocks have attention decides where an upsampler sits (output_blocks.N.1 or .2):
        # the conversion table reads that from its keys, so it is given one key per such block.
        L = self.cfg.unet.num_res_blocks
        levels = len(self.cfg.unet.channel_mult)
        self._up_attention = [f"up_blocks.{i}.attentions.0.norm.weight" for i in range(levels)
                              if f"{UNET}output_blocks.{i * (L + 1)}.1.norm.weight" in params]

    def target(self, name: str) -> Target | None:
        """The target of a file module name (without its `.lora_up.weight`-style suffix), or None."""
        if name.startswith("lora_unet_"):
            return self._kohya_unet(name[len("lora_unet_"):])
        for prefix in ("lora_te_", "lora_te1_"):
            if name.startswith(prefix):
                return self._kohya_text(name[len(prefix):])
        if name.startswith("unet."):
            return self._diffusers_unet(name[len("unet."):])
        if name.startswith("text_encoder."):
            return self._hf_text(name[len("text_encoder."):])
        return None

    # --- UNet ---------------------------------------------------------------------------------

    def _diffusers_unet(self, module: str) -> Target | None:
        source = module + ".weight"
        try:
            table = unet_to_ldm(self._up_attention + [source], self.cfg.unet.num_res_blocks)
        except (CheckpointError, KeyError):  # KeyError: an unknown resnet part such as "nonlinearity"
            return None
        ldm = next(k for k, (keys, _) in table.items() if keys == (source,))
        key = self._unet.get(ldm[len("model."):-len(".weight")].replace(".", "_"))
        return Target(key) if key else None

    def _kohya_unet(self, rest: str) -> Target | None:
        for pattern, dotted in _KOHYA_UNET_BLOCKS:
            m = re.fullmatch(pattern, rest)
            if m and (found := self._diffusers_unet(dotted.format(*m.groups()))):
                return found
        key = self._unet.get("diffusion_model_" + rest)  # original-layout names
        return Target(key) if key else None

    # --- text encoder -------------------------------------------------------------------------

    def _hf_text(self, module: str) -> Target | None:
        """transformers-CLIP module names (`text_model.encoder.layers.N.self_attn.q_proj`) on either layout."""
        m = _HF_TEXT.fullmatch(module)
        if not m:
            return None
        layer, qkv = int(m.group(1)), m.group(3)
        if self.cfg.text.layout == "openclip" and qkv in ("q", "k", "v"):
            key = f"{TEXT}model.transformer.resblocks.{layer}.attn.in_proj_weight"
            width = self.cfg.text.width
            i = "qkv".index(qkv)
            return Target(key, (i * width, (i + 1) * width)) if key in self._params else None
        convert = clip_to_ldm if self.cfg.text.layout == "clip" else openclip_to_ldm
        try:
            (key,) = convert([f"encoder.layers.{layer}.{m.group(2)}.weight"])
        except CheckpointError:
            return None
        return Target(key) if key in self._params else None

    def _kohya_text(self, rest: str) -> Target | None:
        m = _KOHYA_TEXT.fullmatch(rest)
        if m:
            part = m.group(2).replace("self_attn_", "self_attn.").replace("mlp_", "mlp.")
            if found := self._hf_text(f"encoder.layers.{m.group(1)}.{part}"):
                return found
        if key := self._text.get(rest):  # the model's own layout, e.g. model_transformer_resblocks_0_mlp_c_fc
            return Target(key)
        m = re.fullmatch(r"(.+_attn)_([qkv])_proj", rest)  # OpenCLIP attention with a q/k/v name
        if m and (key := self._fused.get(m.group(1))):
            width = self.cfg.text.width
            i = "qkv".index(m.group(2))
            return Target(key, (i * width, (i + 1) * width))
        return None
