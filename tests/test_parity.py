"""Parity with the reference implementations on the same weights and noise.

Networks: transformers' CLIPTextModel, diffusers' UNet2DConditionModel and AutoencoderKL.
Whole txt2img: diffusers' StableDiffusionPipeline (DDIM, DPM++ 2M Karras) and k-diffusion's
samplers run over diffusers' UNet the way the popular web UI runs them. All at 96x64, a size
that is a multiple of 8 but not of 64.
"""

from __future__ import annotations

import math

import pytest
import torch

import stablekit
from stablekit.diffusion.cond import Cond

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

W, H = 96, 64
PROMPT = "a photograph of an astronaut riding a horse, highly detailed"
NEGATIVE = "blurry, low quality"
IMAGE_TOL = 5e-4  # max abs difference on the [0, 1] picture (the issue asks 2e-3; measured errors are below 1e-4)


def assert_close_pictures(ours: torch.Tensor, ref: torch.Tensor, label: str) -> None:
    err = (ours - ref).abs().max().item()
    print(f"\n[parity] {label}: max abs difference {err:.2e} on [0, 1] pictures")  # shown with pytest -s
    assert ours.shape == ref.shape and err < IMAGE_TOL
    # The pictures carry information: not flat, and mostly not clipped to 0 or 1.
    assert ref.std() > 0.05 and ((ref > 0.002) & (ref < 0.998)).float().mean() > 0.5


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def pair(request, tiny_models):
    """(tiny model, our engine from the single file, diffusers pipeline from the folder)."""
    tiny = tiny_models[request.param]
    engine = stablekit.load(tiny.single_file)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny.diffusers_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return tiny, engine, pipe


def reference_embeddings(pipe, prompts: list[str], clip_skip: int = 1) -> torch.Tensor:
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        out = pipe.text_encoder(ids, output_hidden_states=True)
        if clip_skip == 1:
            return out.last_hidden_state
        text_model = getattr(pipe.text_encoder, "text_model", pipe.text_encoder)  # transformers 5 flattened it
        return text_model.final_layer_norm(out.hidden_states[-clip_skip])


def test_token_ids_match_pipeline_tokenizer(pair):
    tiny, engine, pipe = pair
    prompts = [PROMPT, "", "a " * 100]
    ref = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(engine.context.tokenizer(prompts), ref)


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_text_encoder(pair, clip_skip):
    tiny, engine, pipe = pair
    ids = engine.context.tokenizer([PROMPT, NEGATIVE])
    with torch.no_grad():
        ours = engine.loaded.model.text_encoder(ids, clip_skip=clip_skip)
    ref = reference_embeddings(pipe, [PROMPT, NEGATIVE], clip_skip)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_unet(pair):
    tiny, engine, pipe = pair
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, H // 8, W // 8, generator=g)
    ctx = torch.randn(2, 77, tiny.config.text.width, generator=g)
    t = torch.tensor([999.0, 37.0])
    with torch.no_grad():
        ours = engine.loaded.model.unet(x, t, Cond(ctx))
        ref = pipe.unet(x, t, encoder_hidden_states=ctx).sample
    assert ours.abs().max() > 0.1  # the comparison below is not between two near-zero tensors
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_vae(pair):
    tiny, engine, pipe = pair
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 4, H // 8, W // 8, generator=g)
    picture = torch.rand(1, 3, H, W, generator=g) * 2 - 1
    vae = engine.loaded.model.vae
    with torch.no_grad():
        torch.testing.assert_close(vae.decode(z), pipe.vae.decode(z).sample, atol=1e-4, rtol=1e-4)
        mean, logvar = vae.encode(picture)
        dist = pipe.vae.encode(picture).latent_dist
        torch.testing.assert_close(mean, dist.mean, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(logvar, dist.logvar, atol=1e-4, rtol=1e-4)


def _ours(engine, noise=None, **fields) -> torch.Tensor:
    params = stablekit.GenerationParams(prompt=PROMPT, negative_prompt=NEGATIVE, width=W, height=H, **fields)
    return engine.txt2img_tensor(params, noise=noise)[0]


def _diffusers(pipe, scheduler, seeds: list[int], steps: int, cfg: float, eta: float = 0.0, **extra) -> torch.Tensor:
    saved, pipe.scheduler = pipe.scheduler, scheduler  # later tests build theirs from the saved config
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    try:
        out = pipe([PROMPT] * len(seeds), negative_prompt=[NEGATIVE] * len(seeds), height=H, width=W,
                   num_inference_steps=steps, guidance_scale=cfg, generator=generators, eta=eta, output_type="pt",
                   **extra)
    finally:
        pipe.scheduler = saved
    return out.images


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_txt2img_ddim_matches_diffusers(pair, eta):
    tiny, engine, pipe = pair
    scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    ref = _diffusers(pipe, scheduler, [7, 8], steps=8, cfg=7.0, eta=eta)
    ours = _ours(engine, sampler="DDIM", steps=8, cfg_scale=7.0, seed=7, batch_size=2, eta=eta)
    assert_close_pictures(ours, ref, f"{tiny.name} DDIM eta={eta} vs diffusers")


def test_guidance_rescale_matches_diffusers(pair):
    tiny, engine, pipe = pair
    scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    ref = _diffusers(pipe, scheduler, [21], steps=8, cfg=9.0, guidance_rescale=0.7)
    plain = _ours(engine, sampler="DDIM", steps=8, cfg_scale=9.0, seed=21)
    ours = _ours(engine, sampler="DDIM", steps=8, cfg_scale=9.0, seed=21, guidance_rescale=0.7)
    assert (plain - ours).abs().max() > 10 * IMAGE_TOL  # the option changes the picture ...
    assert_close_pictures(ours, ref, f"{tiny.name} DDIM guidance_rescale=0.7 vs diffusers")  # ... as diffusers does


def test_zero_terminal_snr_trailing_euler_matches_diffusers(tiny_models, pair):
    """The recipe for zero-terminal-SNR v-models: rescaled betas, trailing timesteps, CFG rescale."""
    tiny, _, pipe = pair
    scheduler = diffusers.EulerDiscreteScheduler.from_config(
        pipe.scheduler.config, rescale_betas_zero_snr=True, timestep_spacing="trailing")
    ref = _diffusers(pipe, scheduler, [4], steps=6, cfg=7.0, guidance_rescale=0.7)
    engine = stablekit.load(tiny.single_file, zero_terminal_snr=True)
    assert engine.context.schedule.sigma_max > 4000  # the last step is (almost) pure noise
    ours = _ours(engine, sampler="Euler", scheduler="trailing", steps=6, cfg_scale=7.0, seed=4, guidance_rescale=0.7)
    assert_close_pictures(ours, ref, f"{tiny.name} Euler trailing, zero terminal SNR, rescale 0.7 vs diffusers")


def test_txt2img_dpmpp_2m_karras_matches_diffusers(tiny_models, pair):
    tiny, _, pipe = pair
    scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)
    ref = _diffusers(pipe, scheduler, [3], steps=10, cfg=6.0)
    # diffusers' conventions here: timesteps rounded to integers, and initial noise of unit
    # variance in the variance-preserving space (noise * sqrt(1 + sigma_max^2) in sigma space).
    engine = stablekit.load(tiny.single_file, quantize_timesteps=True)
    sigma_max = engine.context.schedule.sigma_max
    noise = torch.randn((1, 4, H // 8, W // 8), generator=torch.Generator().manual_seed(3))
    noise = noise * math.sqrt(1 + sigma_max**2) / sigma_max
    ours = _ours(engine, noise=noise, sampler="DPM++ 2M", scheduler="karras", steps=10, cfg_scale=6.0, seed=3)
    assert_close_pictures(ours, ref, f"{tiny.name} DPM++ 2M Karras vs diffusers")


# --- k-diffusion, run the way the popular web UI runs it ---------------------------------------------


class _CompVisModel(torch.nn.Module):
    """What k-diffusion's CompVisDenoiser expects (`alphas_cumprod`, `apply_model`), over diffusers' UNet."""

    def __init__(self, pipe):
        super().__init__()
        self.unet = pipe.unet
        self.register_buffer("alphas_cumprod", pipe.scheduler.alphas_cumprod.float())

    def apply_model(self, x, t, cond):
        return self.unet(x, t, encoder_hidden_states=cond).sample


def _kdiffusion_txt2img(kd, pipe, prediction, sampler, schedule, seeds, steps, cfg):
    wrapper = _CompVisModel(pipe)
    denoiser = (kd.external.CompVisVDenoiser if prediction == "v" else kd.external.CompVisDenoiser)(wrapper)
    if schedule == "karras":
        sigmas = kd.sampling.get_sigmas_karras(steps, denoiser.sigma_min.item(), denoiser.sigma_max.item())
    else:
        sigmas = denoiser.get_sigmas(steps)
    n = len(seeds)
    cond = reference_embeddings(pipe, [PROMPT] * n)
    uncond = reference_embeddings(pipe, [NEGATIVE] * n)

    def cfg_denoiser(x, sigma):  # cond and uncond in one batch, guidance on the x0 estimates
        out = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=torch.cat([cond, uncond]))
        c, u = out.chunk(2)
        return u + (c - u) * cfg

    generators = [torch.Generator().manual_seed(s) for s in seeds]

    def randn():
        return torch.cat([torch.randn((1, 4, H // 8, W // 8), generator=g) for g in generators])

    x = randn() * sigmas[0]
    fn = getattr(kd.sampling, sampler)
    extra = {"noise_sampler": lambda s, s_next: randn()} if sampler == "sample_euler_ancestral" else {}
    with torch.no_grad():
        latents = fn(cfg_denoiser, x, sigmas, disable=True, **extra)
        pictures = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return (pictures / 2 + 0.5).clamp(0, 1)


@pytest.mark.parametrize(
    "name, kd_name, schedule",
    [
        ("Euler", "sample_euler", "automatic"),
        ("Euler a", "sample_euler_ancestral", "automatic"),
        ("DPM++ 2M", "sample_dpmpp_2m", "automatic"),
        ("DPM++ 2M", "sample_dpmpp_2m", "uniform"),
    ],
)
def test_txt2img_matches_kdiffusion(pair, kdiffusion, name, kd_name, schedule):
    tiny, engine, pipe = pair
    # "automatic": uniform for Euler / Euler a, Karras for DPM++ 2M, as the web UI (1.9+) does.
    kd_schedule = "karras" if (name, schedule) == ("DPM++ 2M", "automatic") else "uniform"
    ref = _kdiffusion_txt2img(kdiffusion, pipe, tiny.config.prediction, kd_name, kd_schedule, [11, 12], 8, 7.5)
    ours = _ours(engine, sampler=name, scheduler=schedule, steps=8, cfg_scale=7.5, seed=11, batch_size=2)
    assert_close_pictures(ours, ref, f"{tiny.name} {name} ({schedule}) vs k-diffusion")


def test_cfg_scale_one_matches_diffusers(pair):
    tiny, engine, pipe = pair
    scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    ref = _diffusers(pipe, scheduler, [5], steps=5, cfg=1.0)
    ours = _ours(engine, sampler="ddim", steps=5, cfg_scale=1.0, seed=5)
    assert_close_pictures(ours, ref, f"{tiny.name} DDIM cfg 1 vs diffusers")


def test_tokenizer_pad_id(pair):
    tiny, engine, _ = pair
    ids = engine.context.tokenizer([""])[0]
    expected_pad = 49407 if tiny.config.family == "sd1" else 0
    assert ids[0] == 49406 and ids[1] == 49407 and (ids[2:] == expected_pad).all()
