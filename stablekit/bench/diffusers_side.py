"""The diffusers side of a benchmark job: the pipeline folder loaded with `from_pretrained`, then one part.

The only benchmark module that imports diffusers and transformers (test/benchmark dependencies,
never the engine's), and only inside the child process that runs this side.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .inputs import CFG_SCALE, NEGATIVE, PROMPT, Job, txt2img_noise, unet_inputs, vae_latent
from .stablekit_side import Prepared

MISSING = ("the diffusers side needs diffusers and transformers (test extras): pip install -e .[test]\n"
           "or run only stablekit with --sides stablekit")


def prepare(job: Job) -> Prepared:
    try:
        import diffusers
        import transformers  # noqa: F401  (the pipeline's text encoder and tokenizer)
    except ImportError as e:
        raise SystemExit(f"{MISSING}\n({e})") from None
    diffusers.utils.logging.set_verbosity_error()

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(job.diffusers_folder, torch_dtype=job.torch_dtype,
                                                             safety_checker=None)
    # Euler with "linspace" spacing: the same timesteps as the web UI's Euler (uniform in t from 999 to 0) and
    # init_noise_sigma = sigma_max, so `latents=noise` starts where stablekit starts. Between integer
    # timesteps diffusers interpolates sigma linearly, k-diffusion log-linearly: a small, real difference.
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="linspace")
    pipe.set_progress_bar_config(disable=True)
    extra = []
    if job.compiles_unet:
        pipe.unet = torch.compile(pipe.unet)
        extra.append("pipe.unet = torch.compile(pipe.unet)")
    if job.vae_tiling:
        pipe.vae.enable_tiling()
        extra.append("pipe.vae.enable_tiling()")
    loaded = "; ".join([f"StableDiffusionPipeline.from_pretrained(folder, torch_dtype={job.dtype})", *extra])

    if job.part == "text":
        def text() -> torch.Tensor:
            ids = pipe.tokenizer([PROMPT, NEGATIVE], padding="max_length", max_length=77, truncation=True,
                                 return_tensors="pt").input_ids
            with torch.inference_mode():
                return pipe.text_encoder(ids)[0]

        return Prepared(text, text, f"{loaded}; pipe.tokenizer + pipe.text_encoder([prompt, negative]), batch 2")

    if job.part == "unet":
        x, t, context = unet_inputs(job)

        @torch.inference_mode()
        def unet() -> torch.Tensor:
            return pipe.unet(x, t, encoder_hidden_states=context).sample

        return Prepared(unet, unet, f"{loaded}; pipe.unet(x, t, encoder_hidden_states=context).sample")

    if job.part == "vae":
        z = vae_latent(job.size)

        @torch.inference_mode()
        def vae() -> torch.Tensor:
            pictures = pipe.vae.decode((z / pipe.vae.config.scaling_factor).to(job.torch_dtype)).sample
            return ((pictures.float() + 1) / 2).clamp(0, 1)  # as the pipeline's output_type="pt" does

        return Prepared(vae, vae, f"{loaded}; pipe.vae.decode(latent / scaling_factor) -> [0, 1]")

    noise = txt2img_noise(job.size).to(job.torch_dtype)  # the pipeline takes latents in its own dtype
    with_lora = ""
    if job.part == "lora":  # merged into the weights once, as stablekit does: no cost per step
        lora = Path(job.lora)
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
        pipe.fuse_lora(lora_scale=1.0)
        with_lora = "; load_lora_weights + fuse_lora(1.0)"

    def generate(n_steps: int) -> torch.Tensor:
        out = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, height=job.size, width=job.size,
                   num_inference_steps=n_steps, guidance_scale=CFG_SCALE, latents=noise, output_type="pt")
        return out.images.float()

    ran = (f"{loaded}; pipe({job.size}x{job.size}, {job.steps} steps, EulerDiscreteScheduler "
           f"timestep_spacing=linspace, guidance_scale {CFG_SCALE:g}, latents=noise{with_lora})")
    warmup = None if job.part == "large" else (lambda: generate(1))
    return Prepared(lambda: generate(job.steps), warmup, ran)
