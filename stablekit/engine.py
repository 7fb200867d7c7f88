"""Engine: owns a loaded model, its device and dtype; turns GenerationParams into pictures."""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from . import __version__
from .addons.session import Addons
from .checkpoint import LoadedModel, load_model
from .config import ModelConfig, Prediction
from .detect import CheckpointError
from .diffusion.common import Callback
from .diffusion.schedule import ModelSchedule
from .images import infotext, to_pil, to_tensor
from .models.tokenizer import CLIPTokenizer
from .models.vae_tiling import Tiling
from .params import GenerationParams
from . import task_table
from .pipeline.tasks import run_task
from .addons.controlnet_files import LoadedControlNet, controlnet_labels, find_controlnet, load_controlnet
from .pipeline.conditioning import TaskContext
from .pipeline.control import Control, ControlUnit, detect_map
from .pipeline.depth import DepthEstimator, checkpoint_depth_estimator, load_depth_estimator
from .pipeline.seeds import variation_infotext

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
    """Load once, generate many: `engine = stablekit.load(path)`; `engine.txt2img(prompt=...)`.

    Every task of the table (`task_table.TASKS`) runs through `run(task, ...)`; the named
    methods are short spellings of it.
    """

    def __init__(self, loaded: LoadedModel, device: torch.device, dtype: torch.dtype, quantize_timesteps: bool = False,
                 addons: Addons | None = None):
        cfg = loaded.config
        if not task_table.runnable(cfg):
            raise CheckpointError(f"this is {cfg.kind.what}; no task here runs it yet")
        self.loaded = loaded
        self.device = device
        self.dtype = dtype
        self.addons = addons or Addons(loaded.model, checkpoint=loaded.path)
        self._depth_estimators: dict[str | None, DepthEstimator] = {}
        self._controlnets: dict[Path, LoadedControlNet] = {}
        self.controlnet_dir: Path | None = None  # where ControlNet names are found
        self.upscaler: Engine | None = None
        self.context = TaskContext(
            loaded.model, CLIPTokenizer(pad_id=cfg.text.pad_id), ModelSchedule(cfg.schedule), device, dtype,
            quantize_timesteps, self.addons.embeddings, depth_estimator=self.depth_estimator,
        )

    def set_upscaler(self, upscaler: Engine | None) -> None:
        """An SD x4 upscaler engine for the "x4" hires upscaler and extras (None: none)."""
        if upscaler is not None and upscaler.config.inputs != "lowres":
            raise ValueError(f"the upscaler model must be an SD x4 upscaler; this is {upscaler.config.kind.what}")
        self.upscaler = upscaler
        self.context.upscaler = None if upscaler is None else upscaler.upscale_pictures

    def upscale_pictures(self, pictures: torch.Tensor, prompt: str = "", seed: int = 0) -> torch.Tensor:
        """Pictures [B, 3, h, w] in [0, 1] -> [B, 3, 4h, 4w] by this x4 upscaler, as an upscaler step of
        another job: 20 DDIM steps, CFG 9, noise level 20, in 128-pixel tiles."""
        out = []
        for i, picture in enumerate(pictures):
            p = GenerationParams(prompt=prompt, steps=20, cfg_scale=9.0, sampler="DDIM", seed=seed + i,
                                 noise_level=20, upscale_tile=128)
            out.append(self.run_tensor("upscale", p, image=to_pil(picture[None])[0])[0])
        return torch.cat(out)

    def depth_estimator(self, path: str | Path | None = None) -> DepthEstimator:
        """A DPT depth estimator: from a Hugging Face folder, or (None) the one the checkpoint carries
        (a single file's depth_model.* weights, a diffusers folder's depth_estimator/). Loaded once."""
        key = None if path is None else str(path)
        if key not in self._depth_estimators:
            if path is not None:
                estimator = load_depth_estimator(path, device=self.device)
            else:
                estimator = checkpoint_depth_estimator(self.loaded.path, device=self.device)
            self._depth_estimators[key] = estimator
        return self._depth_estimators[key]

    def estimate_depth(self, image: Image.Image, depth_model: str | Path | None = None) -> torch.Tensor:
        """A picture's relative inverse depth (larger = nearer) [1, 1, h, w] at the estimator's input size."""
        return self.depth_estimator(depth_model).predict(to_tensor(image.convert("RGB")).to(self.device))

    def controlnet(self, model: str | Path) -> LoadedControlNet:
        """A ControlNet by path or by name in `controlnet_dir`, checked against this model; loaded once."""
        path = find_controlnet(str(model), self.controlnet_dir).absolute()  # a link keeps its own name
        if path not in self._controlnets:
            self._controlnets[path] = load_controlnet(path, self.config, self.loaded.model.unet, self.device,
                                                      self.dtype)
        return self._controlnets[path]

    def controlnet_names(self) -> list[str]:
        """The ControlNets of `controlnet_dir` as the extension lists them: "name [hash]"."""
        return controlnet_labels(self.controlnet_dir)

    def control_map(self, unit: ControlUnit, image: Image.Image, width: int, height: int,
                    depth_model: str | Path | None = None) -> np.ndarray:
        """A unit's preprocessed map of `image` (what `stablekit preprocess` writes) [H, W, 3] uint8."""
        return self._detect(unit.validated(), image, width, height, depth_model)[0]

    def _detect(self, unit: ControlUnit, image: Image.Image, width: int, height: int,
                depth_model: str | Path | None = None) -> tuple[np.ndarray, dict[str, object]]:
        return detect_map(unit, image, width, height, lambda x: self.depth_estimator(depth_model).network(x))

    def prepare_controls(self, task: str, params: GenerationParams, units: tuple[ControlUnit, ...],
                         **inputs: Any) -> tuple[Control, ...]:
        """Units with their networks loaded and maps detected for this task's working size: pass them as
        `controls=` to runs of the same size (the batches of one request) to preprocess once."""
        given = task_table.find_task(task).check_inputs(inputs)
        return self._controls(units, self.complete(params, task, given), given)

    def _controls(self, units: tuple[ControlUnit | Control, ...], p: GenerationParams, inputs: dict[str, Any],
                  ) -> tuple[Control, ...]:
        """The job's units with their networks loaded and maps detected (a unit without a picture reads
        the task's own); already prepared ones are taken as they are."""
        if units and self.config.inputs == "lowres":
            raise ValueError("ControlNet does not run on the x4 upscaler")
        controls = []
        for unit in units:
            if isinstance(unit, Control):
                controls.append(unit)
                continue
            unit = unit.validated()
            image = unit.image if unit.image is not None else inputs.get("image")
            if image is None:
                raise ValueError(f"the ControlNet unit for '{unit.model}' has no picture, and this task has none")
            net = self.controlnet(unit.model)
            detected, settings = self._detect(unit, image, p.width, p.height)
            controls.append(Control(unit, net, detected, settings))
        return tuple(controls)

    def set_vae_tiling(self, tiling: bool | Tiling) -> None:
        """Decode and encode pictures tile by tile (True: the default tiles), or whole (False)."""
        self.loaded.model.vae.tiling = Tiling() if tiling is True else (tiling or None)

    @property
    def config(self) -> ModelConfig:
        return self.loaded.config

    def complete(self, params: GenerationParams, task: str = "txt2img", inputs: dict[str, Any] | None = None,
                 ) -> GenerationParams:
        """Validated params with a concrete seed and the task's working size (see Task.working_size)."""
        width, height = task_table.find_task(task).working_size(params, inputs or {}, self.config.resolution)
        return replace(params, width=width, height=height).validated()

    def run_tensor(
        self, task: str, params: GenerationParams, *, noise: torch.Tensor | None = None,
        callback: Callback | None = None, controls: tuple[ControlUnit | Control, ...] = (), **inputs: Any,
    ) -> tuple[torch.Tensor, GenerationParams]:
        """Float pictures [B, 3, H, W] in [0, 1] and the validated params (with the concrete seed).

        `inputs` are the task's own (image, mask, ...); `noise` [B, 4, H/8, W/8] replaces the seeded noise;
        `controls`: ControlNet units (their residuals add up).
        """
        pictures, p, _ = self._run(task_table.find_task(task), params, noise, callback, inputs, tuple(controls))
        return pictures, p

    def _run(self, t: task_table.Task, params: GenerationParams, noise: torch.Tensor | None, callback: Callback | None,
             inputs: dict[str, Any], units: tuple[ControlUnit | Control, ...] = (),
             ) -> tuple[torch.Tensor, GenerationParams, dict[str, object]]:
        given = t.check_inputs(inputs)
        if noise is not None and params.seed == -1:
            # the caller's noise is the first noise: a random seed would claim a picture it cannot give
            # back; seed 0 drives only the stochastic samplers' step noise, so the run repeats
            params = replace(params, seed=0)
        p = self.complete(params, t.name, given)
        controls = self._controls(units, p, given)
        notes = self.addons.apply(p.prompt, p.loras)  # the job's LoRAs in the weights (tags and files)
        pictures, job_notes = run_task(replace(self.context, controls=controls), t, p, given, noise, callback)
        control_notes = {f"ControlNet {i}": c.infotext() for i, c in enumerate(controls)}
        noise_note = {"Initial noise": "given"} if noise is not None else {}
        return pictures, p, {**notes, **job_notes, **control_notes, **noise_note}

    def run(
        self, task: str, params: GenerationParams | None = None, *, noise: torch.Tensor | None = None,
        callback: Callback | None = None, controls: tuple[ControlUnit | Control, ...] = (), **inputs_and_fields: Any,
    ) -> list[Image.Image]:
        """PIL pictures, each carrying its A1111 infotext in `image.info["parameters"]`.

        Keyword arguments are the task's inputs (image, mask, ...) or GenerationParams fields,
        which override `params` (default: GenerationParams with the task's own defaults);
        `controls`: ControlNet units (`ControlUnit`), on any task.
        """
        t = task_table.find_task(task)
        names = {f.name for f in fields(GenerationParams)}
        overrides = {k: v for k, v in inputs_and_fields.items() if k in names}
        inputs = {k: v for k, v in inputs_and_fields.items() if k not in names}
        params = replace(params or GenerationParams(**t.defaults), **overrides)
        pictures, p, notes = self._run(t, params, noise, callback, inputs, tuple(controls))
        return self._with_infotext(pictures, p, {**t.infotext(p, self.config), **notes})

    def txt2img_tensor(self, params: GenerationParams, **kw: Any) -> tuple[torch.Tensor, GenerationParams]:
        return self.run_tensor("txt2img", params, **kw)

    def txt2img(self, params: GenerationParams | None = None, **kw: Any) -> list[Image.Image]:
        return self.run("txt2img", params, **kw)

    def img2img_tensor(self, image: Image.Image, params: GenerationParams, **kw: Any) -> tuple[torch.Tensor, GenerationParams]:
        """`image` fitted to the params' size with their resize mode, then img2img; see run_tensor."""
        return self.run_tensor("img2img", params, image=image, **kw)

    def img2img(self, image: Image.Image, params: GenerationParams | None = None, **kw: Any) -> list[Image.Image]:
        return self.run("img2img", params, image=image, **kw)

    def inpaint_tensor(
        self, image: Image.Image, mask: Image.Image, params: GenerationParams, **kw: Any
    ) -> tuple[torch.Tensor, GenerationParams]:
        """Inpaint `image` where `mask` is white (or transparent); pixels outside it are pasted back.

        With inpaint_area "masked" the result has the picture's own size; otherwise width x height.
        """
        return self.run_tensor("inpaint", params, image=image, mask=mask, **kw)

    def inpaint(self, image: Image.Image, mask: Image.Image, params: GenerationParams | None = None,
                **kw: Any) -> list[Image.Image]:
        return self.run("inpaint", params, image=image, mask=mask, **kw)

    def depth2img(self, image: Image.Image, params: GenerationParams | None = None, **kw: Any) -> list[Image.Image]:
        """img2img that keeps the picture's depth (a depth model): depth_map= a picture, else estimated."""
        return self.run("depth2img", params, image=image, **kw)

    def upscale(self, image: Image.Image, params: GenerationParams | None = None, **kw: Any) -> list[Image.Image]:
        """The SD x4 upscaler: a picture 4x the size (noise_level=, upscale_tile= for large pictures)."""
        return self.run("upscale", params, image=image, **kw)

    def outpaint(self, image: Image.Image, params: GenerationParams | None = None, **kw: Any) -> list[Image.Image]:
        """Extend the canvas (left=, right=, top=, bottom= pixels; fill= edges or noise) and inpaint the new area."""
        return self.run("outpaint", params, image=image, **kw)

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
            # As the web UI: only when the prompts have brackets for it to act on.
            "Emphasis": EMPHASIS_LABELS[p.emphasis] if p.emphasis != "original" and _has_brackets(p) else None,
            "VAE hash": self.addons.vae[1] if self.addons.vae else None,
            "VAE": self.addons.vae[0] if self.addons.vae else None,
            **(extra or {}),
            **p.eta_infotext(),
            "Version": f"stablekit {__version__}",
        }
        return infotext(p.prompt, p.negative_prompt, fields)

    def _with_infotext(
        self, pictures: torch.Tensor, p: GenerationParams, extra: dict[str, object] | None = None
    ) -> list[Image.Image]:
        images = to_pil(pictures)
        for i, image in enumerate(images):
            image.info["parameters"] = self._infotext(p, p.image_seeds[i], {**variation_infotext(p, i), **(extra or {})})
        return images


EMPHASIS_LABELS = {"original": "Original", "no-norm": "No norm", "ignore": "Ignore", "none": "None"}


def _has_brackets(p: GenerationParams) -> bool:
    return any(c in p.prompt + p.negative_prompt for c in "([")


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
    vae: str | Path | None = None,
    lora_dir: str | Path | None = None,
    embeddings_dir: str | Path | None = None,
    vae_dir: str | Path | None = None,
    upscaler: str | Path | None = None,
    controlnet_dir: str | Path | None = None,
) -> Engine:
    """Load a checkpoint file, diffusers folder or hub id into an Engine.

    `zero_terminal_snr` overrides the model's schedule (diffusers' rescale_betas_zero_snr) for
    models trained that way; None keeps what the checkpoint's config says. `vae_tiling` decodes
    and encodes in tiles (True: 512-pixel tiles; or a Tiling). `compile` runs the UNet through
    torch.compile; it compiles on its first call. `vae`: a VAE file (original layout, or a diffusers
    AutoencoderKL folder) replacing the model's; `lora_dir`: where <lora:NAME> tags are found;
    `embeddings_dir`: textual-inversion embeddings, each file's name its trigger word; `vae_dir`:
    VAE files to switch between by name (`engine.addons.use_vae`); `upscaler`: an SD x4 upscaler
    checkpoint for the "x4" hires upscaler; `controlnet_dir`: where ControlNet names are found.
    """
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    loaded = load_model(model, dtype=torch_dtype, device=dev, prediction=prediction, zero_terminal_snr=zero_terminal_snr)
    addons = Addons(loaded.model, lora_dir, embeddings_dir, vae_dir, loaded.path)
    if vae is not None:
        addons.set_vae(vae)
    engine = Engine(loaded, dev, torch_dtype, quantize_timesteps, addons)
    engine.controlnet_dir = Path(controlnet_dir) if controlnet_dir is not None else None
    # The x4 upscaler's VAE attends over all latent cells at once (quadratic in the picture): it always
    # decodes in tiles; one tile covering the latent is the untiled decode.
    engine.set_vae_tiling(vae_tiling or (Tiling(128, 32) if loaded.config.inputs == "lowres" else False))
    if upscaler is not None:
        engine.set_upscaler(load(upscaler, dtype=dtype, device=device))
    if compile:
        loaded.model.unet.compile()  # in place: parameter names (and so saving and hashing) stay as they are
    return engine
