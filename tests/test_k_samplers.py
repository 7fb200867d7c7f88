"""The k-diffusion family beyond Euler / Euler a / DPM++ 2M: Heun, LMS, DPM2, DPM2 a, DPM++ 2S a,
DPM++ SDE, DPM++ 2M SDE, DPM++ 3M SDE, against k-diffusion's `sample_*` functions.

(a) on the analytic Gaussian denoiser, same sigmas and the same noise injected into both sides;
(b) our Brownian-tree noise against k-diffusion's BrownianTreeNoiseSampler as the web UI builds it;
(c) end to end on the tiny models, k-diffusion run over diffusers' UNet the way the web UI runs it;
(d) the names, aliases and defaults the web UI (1.9+) uses.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import stablekit
from stablekit.diffusion.brownian import BrownianNoise, brownian_noise
from stablekit.diffusion.k_samplers import _lms_coefficients
from stablekit.diffusion.samplers import find_sampler
from stablekit.diffusion.schedule import ModelSchedule, make_sigmas

from .test_parity import NEGATIVE, PROMPT, H, W, _CompVisModel, assert_close_pictures, reference_embeddings
from .test_samplers import exact_denoiser, start

diffusers = pytest.importorskip("diffusers")

# name -> (k-diffusion function, kind of noise): None deterministic, "gen" per-image generators, "tree" Brownian
KD = {
    "Heun": ("sample_heun", None),
    "LMS": ("sample_lms", None),
    "DPM2": ("sample_dpm_2", None),
    "DPM2 a": ("sample_dpm_2_ancestral", "gen"),
    "DPM++ 2S a": ("sample_dpmpp_2s_ancestral", "gen"),
    "DPM++ SDE": ("sample_dpmpp_sde", "tree"),
    "DPM++ 2M SDE": ("sample_dpmpp_2m_sde", "tree"),
    "DPM++ 3M SDE": ("sample_dpmpp_3m_sde", "tree"),
}
SEEDS = [5, 6]


def sigmas_for(kd, name: str, schedule: str, steps: int) -> torch.Tensor:
    """Ours for uniform / karras (float64), k-diffusion's for exponential (as float64) and karras-float32
    (float32, as the web UI has them); steps+1 less the next-to-last for the samplers that discard it."""
    spec = find_sampler(name)[0]
    n = steps + 1 if spec.discard_penultimate_sigma else steps
    ms = ModelSchedule()
    if schedule == "exponential":
        sigmas = kd.sampling.get_sigmas_exponential(n, ms.sigma_min, ms.sigma_max).double()
    elif schedule == "karras-float32":  # the web UI's float32 sigmas: the Brownian tree sees exactly these
        sigmas = kd.sampling.get_sigmas_karras(n, ms.sigma_min, ms.sigma_max)
    else:
        sigmas = make_sigmas(ms, schedule, n)
    return torch.cat([sigmas[:-2], sigmas[-1:]]) if spec.discard_penultimate_sigma else sigmas


def kd_noise_sampler(kd, kind: str | None, x: torch.Tensor, sigmas: torch.Tensor, generators):
    """What the web UI hands k-diffusion: the images' generators, or a float32 Brownian tree per seed."""
    if kind == "gen":
        return {"noise_sampler": lambda s, s_next: torch.stack(
            [torch.randn(x.shape[1:], generator=g) for g in generators]).to(x)}
    if kind == "tree":
        positive = sigmas[sigmas > 0]
        return {"noise_sampler": kd.sampling.BrownianTreeNoiseSampler(
            x.float(), positive.min(), sigmas.max(), seed=SEEDS)}
    return {}


CASES = [(name, schedule) for name in KD for schedule in ("karras", "uniform")]
CASES += [("DPM++ 2M SDE", "exponential"), ("DPM++ 3M SDE", "exponential")]
CASES += [(name, "karras-float32") for name in ("DPM++ SDE", "DPM++ 2M SDE", "DPM++ 3M SDE")]


@pytest.mark.parametrize("name, schedule", CASES)
def test_matches_kdiffusion_on_the_exact_denoiser(kdiffusion, name, schedule):
    spec = find_sampler(name)[0]
    kd_name, kind = KD[name]
    sigmas = sigmas_for(kdiffusion, name, schedule, 10)
    noise, generators = start(SEEDS[0], len(SEEDS))
    x = noise * float(sigmas[0])
    given = {"seeds": SEEDS} if "seeds" in spec.inputs else {}
    ours = spec.fn(exact_denoiser, x.clone(), sigmas, generator=generators, **given)

    _, kd_generators = start(SEEDS[0], len(SEEDS))  # the same streams, past the initial noise as ours were
    extra = kd_noise_sampler(kdiffusion, kind, x, sigmas, kd_generators)
    ref = getattr(kdiffusion.sampling, kd_name)(exact_denoiser, x.clone(), sigmas, disable=True, **extra)
    err = (ours - ref).abs().max().item()
    print(f"\n[k-samplers] {name} ({schedule}) vs k-diffusion, exact denoiser: max abs difference {err:.1e}")
    assert err < (1e-8 if kind is None else 1e-6)
    if kind is not None:  # the noise did something: eta 0 gives another answer
        plain = spec.fn(exact_denoiser, x.clone(), sigmas, generator=start(SEEDS[0], 2)[1], eta=0.0, **given)
        assert (plain - ours).abs().max() > 1e-2


def test_options_reach_the_math(kdiffusion):
    """eta, s_noise, r and solver_type against k-diffusion with the same values."""
    sigmas = sigmas_for(kdiffusion, "DPM++ SDE", "karras", 8)
    x = start(1, 2)[0] * float(sigmas[0])
    tree = brownian_noise(x, sigmas, SEEDS)  # float64 noise to both sides: no float32 rounding in the products
    kd = kdiffusion.sampling
    for name, kd_fn, options in [
        ("DPM++ SDE", kd.sample_dpmpp_sde, {"eta": 0.7, "s_noise": 0.9, "r": 0.3}),
        ("DPM++ 2M SDE", kd.sample_dpmpp_2m_sde, {"eta": 0.5, "s_noise": 1.1, "solver_type": "heun"}),
        ("DPM++ 3M SDE", kd.sample_dpmpp_3m_sde, {"eta": 0.6, "s_noise": 0.8}),
    ]:
        ours = find_sampler(name)[0].fn(exact_denoiser, x.clone(), sigmas, noise_sampler=tree, **options)
        ref = kd_fn(exact_denoiser, x.clone(), sigmas, disable=True, noise_sampler=tree, **options)
        torch.testing.assert_close(ours, ref, atol=1e-10, rtol=0)
    for name, kd_fn in [("DPM2 a", kd.sample_dpm_2_ancestral), ("DPM++ 2S a", kd.sample_dpmpp_2s_ancestral)]:
        _, gens = start(3, 2)
        _, kd_gens = start(3, 2)
        ours = find_sampler(name)[0].fn(exact_denoiser, x.clone(), sigmas, generator=gens, eta=0.5, s_noise=1.2)
        ref = kd_fn(exact_denoiser, x.clone(), sigmas, disable=True, eta=0.5, s_noise=1.2,
                    **kd_noise_sampler(kdiffusion, "gen", x, sigmas, kd_gens))
        torch.testing.assert_close(ours, ref, atol=1e-10, rtol=0)


def test_lms_weights_are_the_integrals_of_the_lagrange_basis():
    """Exact polynomial integration against scipy's quadrature (what k-diffusion uses) on uneven nodes."""
    integrate = pytest.importorskip("scipy.integrate")
    t = make_sigmas(ModelSchedule(), "karras", 7).tolist()
    for i in range(len(t) - 1):
        order = min(i + 1, 4)
        ours = _lms_coefficients(t, i, order)

        def basis(tau, j, i=i, order=order):
            others = [t[i - k] for k in range(order) if k != j]
            return math.prod((tau - o) / (t[i - j] - o) for o in others)

        ref = [integrate.quad(basis, t[i], t[i + 1], args=(j,), epsabs=0, epsrel=1e-13)[0] for j in range(order)]
        assert ours == pytest.approx(ref, rel=1e-11, abs=1e-12)
        assert sum(ours) == pytest.approx(t[i + 1] - t[i], rel=1e-12)  # the weights integrate a constant exactly


def test_batch_image_equals_single_run_with_its_seed():
    """Per-image noise: image i of a batch equals a run of its own seed alone, for every noisy sampler."""
    sigmas = make_sigmas(ModelSchedule(), "karras", 6)
    for name in ("DPM2 a", "DPM++ 2S a", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 3M SDE"):
        spec = find_sampler(name)[0]
        seeds = {"seeds": [20, 21, 22]} if spec.inputs else {}
        noise, generators = start(20, 3)
        batch = spec.fn(exact_denoiser, noise * float(sigmas[0]), sigmas, generator=generators, **seeds)
        for i in range(3):
            one, gen = start(20 + i, 1)
            seed = {"seeds": [20 + i]} if spec.inputs else {}
            single = spec.fn(exact_denoiser, one * float(sigmas[0]), sigmas, generator=gen, **seed)
            torch.testing.assert_close(batch[i : i + 1], single, atol=1e-12, rtol=0)


# --- (b) Brownian-tree noise --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_brownian_noise_equals_kdiffusion_brownian_tree_noise_sampler(kdiffusion, dtype):
    sigmas = make_sigmas(ModelSchedule(), "karras", 12).to(dtype)  # float32: as the web UI has them
    atol = 1e-6 if dtype == torch.float32 else 0  # k-diffusion divides by sqrt(dt) in the sigmas' dtype
    x = torch.zeros(3, 4, 8, 6)
    seeds = [7, 8, 2**32 + 5]
    ours = brownian_noise(x, sigmas, seeds)
    ref = kdiffusion.sampling.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=seeds)
    s = sigmas.tolist()
    steps = list(itertools.pairwise(s[:-1]))  # each step, walking down, short of the last one to 0
    intervals = steps + [(a, (a * b) ** 0.5) for a, b in steps]  # and to the log-midpoints (DPM++ SDE)
    intervals += [(s[-2], s[0]), (s[3], s[1])]  # upwards and skipping steps
    for a, b in intervals:
        expected = ref(torch.tensor(a, dtype=dtype), torch.tensor(b, dtype=dtype))
        torch.testing.assert_close(ours(a, b), expected, atol=atol, rtol=0)
        assert ours(a, b).dtype == torch.float32 and ours(a, b).shape == x.shape
    for i, seed in enumerate(seeds):  # image i depends on its own seed only
        alone = BrownianNoise(x[:1], float(sigmas[-2]), float(sigmas[0]), [seed])
        torch.testing.assert_close(alone(s[2], s[3])[0], ours(s[2], s[3])[i], atol=0, rtol=0)
    noise = torch.stack([ours(a, b) for a, b in steps])
    assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1) < 0.05  # unit-variance increments


@pytest.mark.parametrize("name", ["DPM++ SDE", "DPM++ 2M SDE", "DPM++ 3M SDE"])
def test_sde_samplers_take_a_single_step_to_zero(name):
    """One step (or img2img at low strength) goes straight to the estimate; the tree's range is a point."""
    sigmas = torch.tensor([3.0, 0.0], dtype=torch.float64)
    x, _ = start(0, 2)
    out = find_sampler(name)[0].fn(exact_denoiser, x * 3.0, sigmas, seeds=SEEDS)
    torch.testing.assert_close(out, exact_denoiser(x * 3.0, 3.0), atol=1e-12, rtol=0)


def test_sde_samplers_need_seeds_or_a_noise_sampler():
    sigmas = make_sigmas(ModelSchedule(), "karras", 4)
    with pytest.raises(ValueError, match="seeds"):
        find_sampler("DPM++ SDE")[0].fn(exact_denoiser, torch.zeros(1, 4, 8, 8), sigmas)


def test_torchsde_is_imported_only_when_an_sde_sampler_runs():
    """No module of the package imports torchsde at its top level: it is an optional extra."""
    import ast
    from pathlib import Path

    for path in Path(stablekit.__file__).parent.rglob("*.py"):
        tree = ast.parse(path.read_text())
        in_functions = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) for n in ast.walk(f)}
        for node in (n for n in ast.walk(tree) if id(n) not in in_functions):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] == "torchsde" for n in names), f"{path} imports torchsde at import time"


def test_missing_torchsde_is_a_helpful_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_torchsde(name, *args, **kwargs):
        if name == "torchsde":
            raise ImportError("No module named 'torchsde'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchsde)
    with pytest.raises(ValueError, match=r"torchsde.*stablekit\[sde\]"):
        brownian_noise(torch.zeros(1, 4, 8, 8), make_sigmas(ModelSchedule(), "karras", 4), [1])


# --- (c) end to end on the tiny models ----------------------------------------------------------------

@pytest.fixture(scope="module", params=["sd1", "sd2"])
def pair(request, tiny_models):
    tiny = tiny_models[request.param]
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny.diffusers_dir, safety_checker=None)
    return tiny, stablekit.load(tiny.single_file), pipe


def _webui_kdiffusion(kd, pipe, prediction, name, seeds, steps, cfg):
    """txt2img the way the web UI runs k-diffusion: Karras sigmas (steps+1 less the next-to-last
    where the sampler discards it), ancestral noise from the images' generators, Brownian noise from
    one tree per seed over [smallest nonzero sigma, largest sigma].

    The sigmas are the web UI's float32 ones, except for the Brownian-noise samplers: a Brownian path
    moves by ~sqrt(dt) when its times move by dt, and the web UI's float32 sigmas (from float32
    alphas_cumprod) sit ~1e-6 relative away from our float64 ones, which moves the noise by ~0.5%
    rms (pictures by ~1e-3 on sd1, ~1.5e-2 on the tiny v-model). Those get our schedule's sigmas,
    the same procedure otherwise.
    """
    kd_name, kind = KD[name]
    denoiser = (kd.external.CompVisVDenoiser if prediction == "v" else kd.external.CompVisDenoiser)(_CompVisModel(pipe))
    discard = find_sampler(name)[0].discard_penultimate_sigma
    if kind == "tree":
        sigmas = make_sigmas(ModelSchedule(), "karras", steps + discard)
    else:
        sigmas = kd.sampling.get_sigmas_karras(steps + discard, denoiser.sigma_min.item(), denoiser.sigma_max.item())
    if discard:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    cond = reference_embeddings(pipe, [PROMPT] * len(seeds))
    uncond = reference_embeddings(pipe, [NEGATIVE] * len(seeds))

    def cfg_denoiser(x, sigma):
        c, u = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=torch.cat([cond, uncond])).chunk(2)
        return u + (c - u) * cfg

    generators = [torch.Generator().manual_seed(s) for s in seeds]
    x = torch.cat([torch.randn((1, 4, H // 8, W // 8), generator=g) for g in generators]) * sigmas[0].float()
    extra = {}
    if kind == "gen":
        extra = {"noise_sampler": lambda s, s_next: torch.cat(
            [torch.randn((1, 4, H // 8, W // 8), generator=g) for g in generators])}
    elif kind == "tree":
        extra = {"noise_sampler": kd.sampling.BrownianTreeNoiseSampler(
            x, sigmas[sigmas > 0].min(), sigmas.max(), seed=seeds)}
    with torch.no_grad():
        latents = getattr(kd.sampling, kd_name)(cfg_denoiser, x, sigmas, disable=True, **extra)
        pictures = pipe.vae.decode(latents.float() / pipe.vae.config.scaling_factor).sample
    return (pictures / 2 + 0.5).clamp(0, 1)


@pytest.mark.parametrize("name", list(KD))
def test_txt2img_matches_kdiffusion_as_the_web_ui_runs_it(pair, kdiffusion, name):
    tiny, engine, pipe = pair
    ref = _webui_kdiffusion(kdiffusion, pipe, tiny.config.prediction, name, [11, 12], 8, 7.5)
    params = stablekit.GenerationParams(prompt=PROMPT, negative_prompt=NEGATIVE, width=W, height=H, sampler=name,
                                        scheduler="karras", steps=8, cfg_scale=7.5, seed=11, batch_size=2)
    ours = engine.txt2img_tensor(params)[0]
    assert_close_pictures(ours, ref, f"{tiny.name} {name} (karras) vs k-diffusion")


# --- (d) what the web UI calls them ----------------------------------------------------------------------

# (name, aliases the web UI accepts, "automatic" schedule in the web UI 1.9+, discards the penultimate sigma)
WEBUI = [
    ("Heun", ["k_heun"], "uniform", False),
    ("LMS", ["k_lms"], "uniform", False),
    ("DPM2", ["k_dpm_2"], "karras", True),
    ("DPM2 a", ["k_dpm_2_a"], "karras", True),
    ("DPM++ 2S a", ["k_dpmpp_2s_a"], "karras", False),
    ("DPM++ SDE", ["k_dpmpp_sde"], "karras", False),
    ("DPM++ 2M SDE", ["k_dpmpp_2m_sde"], "exponential", False),
    ("DPM++ 3M SDE", ["k_dpmpp_3m_sde"], "exponential", True),
    ("Euler a", ["k_euler_a", "k_euler_ancestral"], "uniform", False),
]


@pytest.mark.parametrize("name, webui_aliases, automatic, discard", WEBUI)
def test_names_aliases_and_defaults_follow_the_web_ui(name, webui_aliases, automatic, discard):
    spec = find_sampler(name)[0]
    assert spec.name == name and spec.default_schedule == automatic
    assert spec.discard_penultimate_sigma == discard
    for alias in webui_aliases + [name.lower().replace("+", "p").replace(" ", "_")]:
        assert find_sampler(alias)[0] is spec
    assert find_sampler(f"{name} Karras") == (spec, "karras")  # the old web-UI names
    noisy = KD.get(name, (None, "gen"))[1] is not None
    assert set(spec.options) == ({"eta", "s_noise"} if noisy else set())
    assert spec.inputs == (("seeds",) if KD.get(name, (None, None))[1] == "tree" else ())


@pytest.mark.parametrize("alias, name", [("heun", "Heun"), ("lms", "LMS"), ("dpm_2", "DPM2"), ("dpm_2_a", "DPM2 a"),
                                         ("dpmpp_2s_a", "DPM++ 2S a"), ("dpmpp_sde", "DPM++ SDE"),
                                         ("dpmpp_2m_sde", "DPM++ 2M SDE"), ("dpmpp_3m_sde", "DPM++ 3M SDE")])
def test_snake_case_aliases(alias, name):
    assert find_sampler(alias)[0].name == name
