"""The stablekit side of a benchmark job: load the single file as a user would, then one part."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .lora_file import RANK
from .inputs import CFG_SCALE, NEGATIVE, PROMPT, SEED, Job, txt2img_noise, unet_inputs, vae_latent

Run = Callable[[], torch.Tensor]


@dataclass
class Prepared:
    """What a child times: `warmup` once (None: no warm-up), then `run` `repeats` times."""

    run: Run
    warmup: Run | None
    ran: str  # what this side computed, in words, for the report


def prepare(job: Job) -> Prepared:
    import stablekit
    from stablekit.diffusion.cond import Cond
    from stablekit.pipeline import conditioning, steps

    options = {"vae_tiling": job.vae_tiling, "compile": job.compiles_unet}
    engine = stablekit.load(job.checkpoint, dtype=job.dtype, device="cpu", **options)
    model = engine.context.model
    flags = "".join(f", {k}=True" for k, on in options.items() if on)
    loaded = f"stablekit.load(single file, dtype={job.dtype}{flags})"

    if job.part == "text":
        def text() -> torch.Tensor:
            return conditioning.encode_text(engine.context, [PROMPT, NEGATIVE])

        return Prepared(text, text, f"{loaded}; conditioning.encode_text([prompt, negative]): tokenizer + CLIP, batch 2")

    if job.part == "unet":
        x, t, context = unet_inputs(job)
        cond = Cond(context)

        @torch.inference_mode()
        def unet() -> torch.Tensor:
            return model.unet(x, t, cond)

        return Prepared(unet, unet, f"{loaded}; model.unet(x [2,4,{job.size // 8},{job.size // 8}], t, Cond(context))")

    if job.part == "vae":
        z = vae_latent(job.size)

        def vae() -> torch.Tensor:
            return steps.decode(model, z)

        return Prepared(vae, vae, f"{loaded}; steps.decode(latent [1,4,{job.size // 8},{job.size // 8}]) -> [0, 1]")

    # txt2img and large: the whole pipeline from prompt to picture, with the shared initial noise.
    noise = txt2img_noise(job.size)

    loras = ((job.lora, 1.0),) if job.part == "lora" else ()  # patched in by the warm-up's job, kept after

    def generate(n_steps: int) -> torch.Tensor:
        params = stablekit.GenerationParams(prompt=PROMPT, negative_prompt=NEGATIVE, width=job.size, height=job.size,
                                            steps=n_steps, cfg_scale=CFG_SCALE, sampler="Euler", seed=SEED,
                                            loras=loras)
        return engine.txt2img_tensor(params, noise=noise)[0]

    with_lora = f", loras=[(rank-{RANK} LoRA on the UNet attention, 1.0)]" if loras else ""
    ran = (f"{loaded}; engine.txt2img_tensor({job.size}x{job.size}, {job.steps} steps, sampler Euler, schedule "
           f"automatic = uniform (k-diffusion get_sigmas), CFG {CFG_SCALE:g}, noise given{with_lora})")
    warmup = None if job.part == "large" else (lambda: generate(1))
    return Prepared(lambda: generate(job.steps), warmup, ran)
