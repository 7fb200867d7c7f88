"""Request and response models of the web UI's `/sdapi/v1` API, with its field names and defaults.

The web UI builds its request models from the signatures of its processing classes
(`StableDiffusionProcessingTxt2Img` / `...Img2Img`) plus a few API fields; every field is optional
and unknown fields are ignored. The defaults below are those of the API (not of the browser UI):
steps 50, sampler "Euler" (through `sampler_index`), inpaint_full_res True ("Only masked"),
inpaint_full_res_padding 0. A field sent as null means its default, as there.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields of extensions we do not have


class ProcessingFields(_Request):
    """The fields txt2img and img2img share (`StableDiffusionProcessing`)."""

    prompt: str | None = ""
    negative_prompt: str | None = ""
    styles: list[str] | None = None
    seed: int | None = -1
    subseed: int | None = -1
    subseed_strength: float | None = 0
    seed_resize_from_h: int | None = -1
    seed_resize_from_w: int | None = -1
    sampler_name: str | None = None
    scheduler: str | None = None
    batch_size: int | None = 1
    n_iter: int | None = 1
    steps: int | None = 50
    cfg_scale: float | None = 7.0
    width: int | None = 512
    height: int | None = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool | None = False
    do_not_save_grid: bool | None = False
    eta: float | None = None
    denoising_strength: float | None = 0.75
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool | None = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool | None = False
    firstpass_image: str | None = None
    comments: dict[str, Any] | None = None
    force_task_id: str | None = None
    # added by the API layer
    sampler_index: str | None = "Euler"
    script_name: str | None = None
    script_args: list[Any] | None = []  # pydantic copies mutable defaults per request
    send_images: bool | None = True
    save_images: bool | None = False
    alwayson_scripts: dict[str, Any] | None = {}
    infotext: str | None = None
    # stablekit's own (the web UI's core has none): diffusers' name, null = off
    guidance_rescale: float | None = None


class Txt2ImgRequest(ProcessingFields):
    """POST /sdapi/v1/txt2img, with hires fix when enable_hr is true (hr_checkpoint_name is refused)."""

    enable_hr: bool | None = False
    firstphase_width: int | None = 0
    firstphase_height: int | None = 0
    hr_scale: float | None = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int | None = 0
    hr_resize_x: int | None = 0
    hr_resize_y: int | None = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str | None = ""
    hr_negative_prompt: str | None = ""


class Img2ImgRequest(ProcessingFields):
    """POST /sdapi/v1/img2img: img2img, and inpainting when `mask` is given."""

    init_images: list[str] | None = None  # base64 pictures (a data-URL prefix is allowed)
    resize_mode: int | None = 0  # 0 just resize, 1 crop and resize, 2 resize and fill (3 latent: refused)
    image_cfg_scale: float | None = None
    mask: str | None = None  # white repaints, black keeps
    mask_blur_x: int | None = 4
    mask_blur_y: int | None = 4
    mask_blur: int | None = None  # sets both
    mask_round: bool | None = True
    inpainting_fill: int | None = 0  # 0 fill, 1 original, 2 latent noise, 3 latent nothing
    inpaint_full_res: bool | None = True  # True: "Only masked" (the API's default), False: "Whole picture"
    inpaint_full_res_padding: int | None = 0
    inpainting_mask_invert: int | None = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool | None = False
    # stablekit's own (the web UI has no such fields): null = the default
    inpainting_method: str | None = None  # auto, blend (any model) or model (9-channel checkpoint)
    paste_back: bool | None = None  # false: keep the generated pixels outside the mask too
    soft_inpainting: bool | None = None  # the greyscale mask as per-pixel denoising strength


class Depth2ImgRequest(Img2ImgRequest):
    """Job API task depth2img (stablekit's own): img2img on an SD 2 depth model."""

    depth_map: str | None = None  # base64 depth picture (8/16-bit grey, larger = nearer); null: estimated


class UpscaleRequest(Img2ImgRequest):
    """Job API task upscale (stablekit's own): the SD x4 upscaler on init_images[0]."""

    steps: int | None = 75  # the upscaler's usual settings (diffusers' StableDiffusionUpscalePipeline)
    cfg_scale: float | None = 9.0
    sampler_name: str | None = "DDIM"
    noise_level: int | None = 20  # 0..350: noise added to the low-resolution picture
    upscale_tile: int | None = 0  # tiles of this many input pixels (0: whole)


class DepthRequest(_Request):
    """POST /api/v1/depth: a picture's estimated depth map."""

    image: str  # base64 picture (a data-URL prefix is allowed)


class ExtrasSingleImageRequest(_Request):
    """POST /sdapi/v1/extra-single-image (the web UI's ExtrasSingleImageRequest, upscaling only)."""

    image: str = ""
    resize_mode: int | None = 0  # 0: by upscaling_resize; 1: to upscaling_resize_w x upscaling_resize_h
    show_extras_results: bool | None = True
    gfpgan_visibility: float | None = 0
    codeformer_visibility: float | None = 0
    codeformer_weight: float | None = 0
    upscaling_resize: float | None = 2
    upscaling_resize_w: int | None = 512
    upscaling_resize_h: int | None = 512
    upscaling_crop: bool | None = True
    upscaler_1: str | None = "None"
    upscaler_2: str | None = "None"
    extras_upscaler_2_visibility: float | None = 0
    upscale_first: bool | None = False


class GenerationResponse(BaseModel):
    """TextToImageResponse / ImageToImageResponse."""

    images: list[str] | None = Field(None, description="base64 PNGs carrying the `parameters` infotext chunk")
    parameters: dict[str, Any]
    info: str = Field(description="JSON string: prompt, all_prompts, seed, all_seeds, infotexts, ...")


class ProgressState(BaseModel):
    skipped: bool = False
    interrupted: bool = False
    stopping_generation: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: ProgressState
    current_image: str | None = None
    textinfo: str | None = None
    current_task: str | None = None


class PNGInfoRequest(_Request):
    image: str


class PNGInfoResponse(BaseModel):
    info: str
    items: dict[str, Any]
    parameters: dict[str, Any]


class SDModelItem(BaseModel):
    title: str
    model_name: str
    hash: str | None = None
    sha256: str | None = None
    filename: str
    config: str | None = None


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, str]


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: list[str] | None = None
    default_rho: float = -1
    need_inner_model: bool = False
