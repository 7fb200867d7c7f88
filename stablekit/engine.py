"""Engine: owns a loaded model, its device and dtype; turns GenerationParams into pictures."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image

from . import __version__
from .checkpoint import LoadedModel, load_model
from .config import ModelConfig, Prediction
from .diffusion.samplers import Callback
from .diffusion.schedule import ModelSchedule
from .images import fit_picture, infotext, to_pil, to_tensor
from .models.tokenizer import CLIPTokenizer
from .models.vae_tiling import Tiling
from .params import GenerationParams
from .pipeline import editing, tasks

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA device is available")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"unknown device '{device}'; choose cpu, cuda or auto")
    return torch.device(device)


def set_threads(threads: int | None) -> None:
    """CPU threads for this process (None: PyTorch's default, one per core)."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far, in bytes."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux kilobytes


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype '{name}'; choose from {', '.join(DTYPES)}")
    if name == "fp16" and device.type == "cpu":
        raise ValueError("fp16 is not supported on the CPU (slow and overflow-prone); use --dtype bf16 or fp32")
    return DTYPES[name]


class Engine:
    """Load once, generate many: `engine = stablekit.load(path)`; `engine.txt2img(prompt=...)`."""

    def __init__(self, loaded: LoadedModel, device: torch.device, dtype: torch.dtype, quantize_timesteps: bool = False):
        self.loaded = loaded
        self.device = device
        self.dtype = dtype
        cfg = loaded.config
        self.context = tasks.TaskContext(
            loaded.model, CLIPTokenizer(pad_id=cfg.text.pad_id), ModelSchedule(cfg.schedule), device, dtype,
            quantize_timesteps,
        )

    def set_vae_tiling(self, tiling: bool | Tiling) -> None:
        """Decode and encode pictures tile by tile (True: the default tiles), or whole (False)."""
        self.loaded.model.vae.tiling = Tiling() if tiling is True else (tiling or None)

    @property
    def config(self) -> ModelConfig:
        return self.loaded.config

    def complete(self, params: GenerationParams) -> GenerationParams:
        """Validated params with the model's resolution where width or height is None, and a concrete seed."""
        size = self.config.resolution
        return replace(params, width=params.width or size, height=params.height or size).validated()

    def _infotext(self, p: GenerationParams, seed: int, extra: dict[str, object] | None = None) -> str:
        fields = {
            "Steps": p.steps,
            "Sampler": p.sampler,
            "Schedule type": p.schedule_label,
            "CFG scale": float(p.cfg_scale),
            "Seed": seed,
            "Size": f"{p.width}x{p.height}",
            "Model hash": self.loaded.short_hash,
            "Model": self.loaded.name,
            "Clip skip": p.clip_skip if p.clip_skip > 1 else None,
            "CFG Rescale phi": p.guidance_rescale or None,  # the key the web UI's CFG-rescale extension writes
            **(extra or {}),
            **p.eta_infotext(),
            "Version": f"stablekit {__version__}",
        }
        return infotext(p.prompt, p.negative_prompt, fields)

    def txt2img_tensor(
        self, params: GenerationParams, *, noise: torch.Tensor | None = None, callback: Callback | None = None
    ) -> tuple[torch.Tensor, GenerationParams]:
        """Float pictures [B, 3, H, W] in [0, 1] and the validated params (with the concrete seed)."""
        p = self.complete(params)
        return tasks.txt2img(self.context, p, noise=noise, callback=callback), p

    def txt2img(
        self, params: GenerationParams | None = None, *, noise: torch.Tensor | None = None,
        callback: Callback | None = None, **fields,
    ) -> list[Image.Image]:
        """PIL pictures, each carrying its A1111 infotext in `image.info["parameters"]`."""
        params = replace(params or GenerationParams(), **fields)
        pictures, p = self.txt2img_tensor(params, noise=noise, callback=callback)
        return self._with_infotext(pictures, p)

    def img2img_tensor(
        self, image: Image.Image, params: GenerationParams, *, noise: torch.Tensor | None = None,
        callback: Callback | None = None,
    ) -> tuple[torch.Tensor, GenerationParams]:
        """`image` fitted to the params' size with their resize mode, then img2img; see txt2img_tensor."""
        p = self.complete(params)
        picture = to_tensor(fit_picture(image, p.width, p.height, p.resize_mode))
        return tasks.img2img(self.context, p, picture.to(self.device), noise=noise, callback=callback), p

    def img2img(
        self, image: Image.Image, params: GenerationParams | None = None, *, noise: torch.Tensor | None = None,
        callback: Callback | None = None, **fields,
    ) -> list[Image.Image]:
        params = replace(params or GenerationParams(), **fields)
        pictures, p = self.img2img_tensor(image, params, noise=noise, callback=callback)
        return self._with_infotext(pictures, p, {"Denoising strength": p.denoising_strength})

    def inpaint_tensor(
        self, image: Image.Image, mask: Image.Image, params: GenerationParams, *,
        noise: torch.Tensor | None = None, callback: Callback | None = None, resize_mask: bool = False,
    ) -> tuple[torch.Tensor, GenerationParams]:
        """Inpaint `image` where `mask` is white (or transparent); pixels outside it are pasted back.

        With inpaint_area "masked" the result has the picture's own size; otherwise width x height.
        """
        p = self.complete(params)
        pictures = editing.inpaint_pictures(self.context, p, image, mask, noise=noise, callback=callback,
                                            resize_mask=resize_mask)
        return pictures, p

    def inpaint(
        self, image: Image.Image, mask: Image.Image, params: GenerationParams | None = None, *,
        noise: torch.Tensor | None = None, callback: Callback | None = None, resize_mask: bool = False, **fields,
    ) -> list[Image.Image]:
        params = replace(params or GenerationParams(denoising_strength=1.0), **fields)
        pictures, p = self.inpaint_tensor(image, mask, params, noise=noise, callback=callback, resize_mask=resize_mask)
        extra = {
            "Denoising strength": p.denoising_strength,
            "Conditional mask weight": p.mask_strength if self.config.variant == "inpaint" else None,
            "Mask blur": p.mask_blur,
            "Mask mode": "Inpaint not masked" if p.invert_mask else None,
            "Masked content": p.masked_content.replace("-", " "),
            "Inpaint area": "Only masked" if p.inpaint_area == "masked" else None,
            "Masked area padding": p.inpaint_padding if p.inpaint_area == "masked" else None,
            "Soft inpainting": True if p.soft_inpainting else None,
            "Inpaint method": p.inpaint_method if p.inpaint_method != "auto" else None,
        }
        return self._with_infotext(pictures, p, extra)

    def outpaint(
        self, image: Image.Image, *, left: int = 0, right: int = 0, top: int = 0, bottom: int = 0,
        fill: str = "edges", params: GenerationParams | None = None, callback: Callback | None = None, **fields,
    ) -> list[Image.Image]:
        """Extend the canvas, fill the new area with edge colours or noise, and inpaint it."""
        canvas, mask = editing.outpaint_canvas(image, left, right, top, bottom, fill)
        base = params or GenerationParams(denoising_strength=1.0, masked_content="original")
        fields = {"width": canvas.width, "height": canvas.height, **fields}
        return self.inpaint(canvas, mask, base, callback=callback, **fields)

    def _with_infotext(
        self, pictures: torch.Tensor, p: GenerationParams, extra: dict[str, object] | None = None
    ) -> list[Image.Image]:
        images = to_pil(pictures)
        for i, image in enumerate(images):
            image.info["parameters"] = self._infotext(p, p.seed + i, extra)
        return images


def load(
    model: str | Path,
    *,
    dtype: str = "fp32",
    device: str | None = None,
    prediction: Prediction | None = None,
    quantize_timesteps: bool = False,
    zero_terminal_snr: bool | None = None,
    vae_tiling: bool | Tiling = False,
    compile: bool = False,
) -> Engine:
    """Load a checkpoint file, diffusers folder or hub id into an Engine.

    `zero_terminal_snr` overrides the model's schedule (diffusers' rescale_betas_zero_snr) for
    models trained that way; None keeps what the checkpoint's config says. `vae_tiling` decodes
    and encodes in tiles (True: 512-pixel tiles; or a Tiling). `compile` runs the UNet through
    torch.compile; it compiles on its first call.
    """
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    loaded = load_model(model, dtype=torch_dtype, device=dev, prediction=prediction, zero_terminal_snr=zero_terminal_snr)
    engine = Engine(loaded, dev, torch_dtype, quantize_timesteps)
    engine.set_vae_tiling(vae_tiling)
    if compile:
        loaded.model.unet.compile()  # in place: parameter names (and so saving and hashing) stay as they are
    return engine
