"""The one job description both sides' child processes get, and the inputs they both draw from it.

Both sides build their inputs with the same seeded CPU generators here, so stablekit and diffusers
see bit-identical token strings, UNet inputs, latents and initial noise.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

PARTS = ("text", "unet", "vae", "txt2img", "lora", "large")  # lora: txt2img with a LoRA applied
SIDES = ("stablekit", "diffusers")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

PROMPT = "a photograph of an astronaut riding a horse, highly detailed"
NEGATIVE = "blurry, low quality"
SEED = 1
UNET_TIMESTEP = 500.0  # one mid-schedule CFG step: the same t for the cond and uncond halves
CFG_SCALE = 7.0


@dataclass(frozen=True)
class Job:
    """One (side, part, dtype) measurement, run in its own process."""

    side: str
    part: str
    dtype: str
    size: int  # picture side in pixels; latents are size // 8
    steps: int  # txt2img steps (the warm-up is always one step)
    repeats: int  # timed runs after the warm-up (0 warm-ups for `large`)
    threads: int
    compile: bool
    checkpoint: str  # the single file (stablekit side)
    diffusers_folder: str  # made from it by diffusers' converters (diffusers side)
    context_dim: int  # text width of the model: the UNet's cross-attention input
    output: str  # where the child saves its output tensor (float32)
    result: str  # where the child writes its result JSON
    lora: str = ""  # the `lora` part's LoRA file

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str) -> Job:
        return Job(**json.loads(text))

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def compiles_unet(self) -> bool:
        return self.compile and self.part in ("unet", "txt2img", "lora", "large")  # the parts that call the UNet

    @property
    def vae_tiling(self) -> bool:
        return self.part == "large"  # the large picture is the tiled-decode memory check


def _generator(offset: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(SEED * 1000 + offset)


def unet_inputs(job: Job) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [2, 4, size/8, size/8], t [2] (float32), context [2, 77, C]: one CFG step's UNet call, x and
    context drawn in float32 and then cast to the job's dtype, so both sides get the same values."""
    g = _generator(1)
    x = torch.randn(2, 4, job.size // 8, job.size // 8, generator=g)
    context = torch.randn(2, 77, job.context_dim, generator=g)
    return x.to(job.torch_dtype), torch.full((2,), UNET_TIMESTEP), context.to(job.torch_dtype)


def vae_latent(size: int) -> torch.Tensor:
    """A scaled latent [1, 4, size/8, size/8] (unit variance, as the sampler returns)."""
    return torch.randn(1, 4, size // 8, size // 8, generator=_generator(2))


def txt2img_noise(size: int) -> torch.Tensor:
    """Unit initial noise [1, 4, size/8, size/8], float32; each side scales it by its first sigma."""
    return torch.randn(1, 4, size // 8, size // 8, generator=_generator(3))


def save_output(job: Job, out: torch.Tensor) -> None:
    torch.save(out.detach().float().cpu().contiguous(), Path(job.output))


def load_output(job: Job) -> torch.Tensor:
    """The tensor `save_output` wrote; weights_only, so a planted pickle could not run code."""
    return torch.load(Path(job.output), weights_only=True)
