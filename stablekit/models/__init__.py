"""The three networks, assembled under the attribute names of an original LDM checkpoint."""

from __future__ import annotations

from torch import nn

from ..config import ModelConfig
from .clip import build_text_encoder
from .unet import DiffusionWrapper, UNetModel
from .vae import AutoencoderKL


class StableDiffusionModel(nn.Module):
    """`model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE), `cond_stage_model.*` (text)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = DiffusionWrapper(cfg.unet)
        self.first_stage_model = AutoencoderKL(cfg.vae)
        self.cond_stage_model = build_text_encoder(cfg.text)

    @property
    def unet(self) -> UNetModel:
        return self.model.diffusion_model

    @property
    def vae(self) -> AutoencoderKL:
        return self.first_stage_model

    @property
    def text_encoder(self) -> nn.Module:
        return self.cond_stage_model
