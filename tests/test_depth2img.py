"""depth2img on a tiny SD 2 depth model: parity with a step-by-step reference built from diffusers'
components (its own `prepare_depth_map`, with a given map and with transformers' DPT estimator), the
checkpoint's own estimator, the depth command, bad input, CLI and HTTP."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

import stablekit
from stablekit.bench.diffusers_folder import ldm_yaml, write_diffusers
from stablekit.cli import main
from stablekit.images import to_tensor

from .conftest import ldm_state_dict, randomize, tiny_config
from .test_depth_estimator import midas_checkpoint, tiny_hf_config
from .test_img2img import make_picture
from .test_server_jobs import wait_for

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

W, H = 64, 48
PROMPT, NEGATIVE = "a red circle on a blue background", "blurry"


def depth_config():
    base = tiny_config("sd2")
    return replace(base, inputs="depth", prediction="eps", unet=replace(base.unet, in_channels=5))


@pytest.fixture(scope="module")
def depth_files(tmp_path_factory):
    return make_depth_model(tmp_path_factory.mktemp("tiny_depth"))


def make_depth_model(root):
    """The single file (UNet, VAE, text encoder and the DPT's depth_model.* weights, as 512-depth-ema
    carries them), its diffusers folder, and the DPT as transformers builds it."""
    cfg = depth_config()
    sd = ldm_state_dict(cfg, seed=300)
    conf = ldm_yaml(cfg)
    write_diffusers(sd, cfg, conf, root / "diffusers", root)
    dpt = transformers.DPTForDepthEstimation(replace_eps(tiny_hf_config())).eval()
    randomize(dpt, seed=5)
    with torch.no_grad():
        dpt.head.head[4].bias.fill_(0.3)  # keep most of the output above the final ReLU
    sd.update({k: v for k, v in midas_checkpoint(dpt).items() if k.startswith("depth_model.")})
    single = root / "tiny-sd2-depth.safetensors"
    save_file(sd, str(single))
    single.with_suffix(".yaml").write_text(yaml.safe_dump(conf))  # heads are not in the weights
    processor = transformers.DPTImageProcessorPil()  # the class defaults: 384x384, what a single file gets here
    return single, root / "diffusers", dpt, processor


def replace_eps(config):
    """The tiny DPT at the real input size (384: a 24x24 grid), with timm's LayerNorm eps 1e-6, which the
    single file's network uses (transformers' default: 1e-12)."""
    config.layer_norm_eps = 1e-6
    config.image_size = 384
    config.backbone_featmap_shape = [1, 512, 24, 24]
    return config


@pytest.fixture(scope="module")
def pair(depth_files):
    single, folder, dpt, processor = depth_files
    base = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe = diffusers.StableDiffusionDepth2ImgPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
        scheduler=diffusers.DDIMScheduler.from_config(base.scheduler.config), depth_estimator=dpt,
        feature_extractor=processor)
    return stablekit.load(single), pipe


@torch.no_grad()
def reference_depth2img(pipe, image: Image.Image, depth_map, noise, steps: int, strength: float, cfg: float):
    """diffusers' depth2img step by step: its own prepare_depth_map, the latent mean, explicit noise."""
    ids = lambda text: pipe.tokenizer([text] * len(noise), padding="max_length", max_length=77,  # noqa: E731
                                      truncation=True, return_tensors="pt").input_ids
    context = torch.cat([pipe.text_encoder(ids(NEGATIVE))[0], pipe.text_encoder(ids(PROMPT))[0]])
    depth = pipe.prepare_depth_map(image, depth_map, len(noise), True, torch.float32, torch.device("cpu"))
    picture = to_tensor(image)
    latents = pipe.vae.encode(picture * 2 - 1).latent_dist.mean * pipe.vae.config.scaling_factor
    latents = latents.expand(len(noise), -1, -1, -1)
    scheduler = pipe.scheduler
    scheduler.set_timesteps(steps)
    run = int(steps * strength)
    timesteps = scheduler.timesteps[steps - run:]
    x = scheduler.add_noise(latents, noise, timesteps[:1])
    for t in timesteps:
        x_in = torch.cat([scheduler.scale_model_input(torch.cat([x, x]), t), depth], dim=1)
        uncond, cond = pipe.unet(x_in, t, encoder_hidden_states=context).sample.chunk(2)
        x = scheduler.step(uncond + cfg * (cond - uncond), t, x).prev_sample
    pictures = pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample
    return (pictures / 2 + 0.5).clamp(0, 1), depth


def a_depth_map() -> Image.Image:
    """A 16-bit map at another size than the picture: a ramp, nearer at the bottom, with a near disc."""
    y, x = np.mgrid[0:40, 0:56]
    depth = 20000 + 800 * y + 30000 * (((x - 28) ** 2 + (y - 20) ** 2) < 80)
    return Image.fromarray(depth.astype(np.uint16))


@pytest.mark.parametrize("source", ["map", "estimator"])
def test_depth2img_matches_diffusers_step_by_step(pair, source):
    engine, pipe = pair
    image = make_picture(W, H)
    noise = torch.randn((2, 4, H // 8, W // 8), generator=torch.Generator().manual_seed(4))
    given = a_depth_map() if source == "map" else None
    params = stablekit.GenerationParams(prompt=PROMPT, negative_prompt=NEGATIVE, width=W, height=H, steps=10,
                                        cfg_scale=7.5, sampler="DDIM", seed=4, batch_size=2, denoising_strength=0.7)
    ours, _ = engine.run_tensor("depth2img", params, noise=noise, image=image, depth_map=given)
    ref_map = None if given is None else torch.from_numpy(np.asarray(given).astype(np.float32))[None]
    ref, _ = reference_depth2img(pipe, image, ref_map, noise, 10, 0.7, 7.5)
    err = (ours - ref).abs().max().item()
    print(f"\n[parity] depth2img ({source}) vs diffusers step by step: max abs difference {err:.2e}")
    assert err < 2e-3 and ref.std() > 0.05


def test_the_checkpoints_estimator_gives_transformers_depth(pair):
    engine, pipe = pair
    image = make_picture(W, H, seed=2)
    ours = engine.estimate_depth(image)
    with torch.no_grad():
        ref = pipe.depth_estimator(pipe.feature_extractor(images=[image], return_tensors="pt").pixel_values)
    err = (ours - ref.predicted_depth[:, None]).abs().max().item()
    print(f"\n[parity] depth map vs transformers DPTForDepthEstimation: max abs difference {err:.2e}")
    assert err < 1e-4


def test_the_depth_map_steers_the_picture(pair):
    engine, _ = pair
    base = dict(prompt=PROMPT, width=W, height=H, steps=4, seed=1, denoising_strength=0.9)
    flat_left = Image.fromarray(np.tile(np.linspace(0, 255, W, dtype=np.uint8), (H, 1)))
    a = engine.depth2img(make_picture(W, H), depth_map=flat_left, **base)[0]
    b = engine.depth2img(make_picture(W, H), depth_map=flat_left.transpose(Image.Transpose.FLIP_LEFT_RIGHT), **base)[0]
    assert np.abs(np.asarray(a, dtype=float) - np.asarray(b, dtype=float)).mean() > 1
    text = a.info["parameters"]
    assert "Denoising strength: 0.9" in text


def test_bad_inputs_are_clear_errors(pair, tiny_models, tmp_path):
    engine, _ = pair
    with pytest.raises(ValueError, match="not a readable depth-map picture.*No such file"):
        engine.depth2img(make_picture(W, H), depth_map=tmp_path / "missing.png", width=W, height=H, steps=2)
    not_a_picture = tmp_path / "notes.png"
    not_a_picture.write_text("hello")
    with pytest.raises(ValueError, match="not a readable depth-map picture"):
        engine.depth2img(make_picture(W, H), depth_map=not_a_picture, width=W, height=H, steps=2)
    with pytest.raises(ValueError, match="a depth map or a depth model, not both"):
        engine.depth2img(make_picture(W, H), depth_map=a_depth_map(), depth_model=tmp_path, steps=2)
    base = stablekit.load(tiny_models["sd1"].single_file)
    with pytest.raises(ValueError, match="depth2img needs a depth model.*this is a base model"):
        base.run("depth2img", image=make_picture(W, H), steps=2)
    with pytest.raises(ValueError, match="img2img needs a base model.*this is a depth model"):
        engine.img2img(make_picture(W, H), steps=2)


def test_cli_depth2img_and_the_depth_command(depth_files, tmp_path, capsys):
    single = depth_files[0]
    src = tmp_path / "in.png"
    make_picture(W, H).save(src)
    out = tmp_path / "out"
    assert main(["depth2img", "--model", str(single), "--image", str(src), "--prompt", "a cat", "--steps", "2",
                 "--seed", "3", "--out", str(out)]) == 0
    picture = Image.open(capsys.readouterr().out.strip().splitlines()[-1])
    assert picture.size == (W, H) and "Denoising strength: 0.8" in picture.info["parameters"]
    assert main(["depth", "--model", str(single), "--image", str(src), "--out", str(out)]) == 0
    depth_png = Image.open(capsys.readouterr().out.strip().splitlines()[-1])
    assert depth_png.mode in ("I;16", "I") and depth_png.size == (W, H)
    values = np.asarray(depth_png)
    assert values.max() == 65535 and values.min() == 0  # min-max normalised to the 16-bit range
    assert main(["depth", "--image", str(src), "--out", str(out)]) == 2
    assert "--depth-model" in capsys.readouterr().err


def test_http_depth2img_job_and_depth_route(depth_files, pair, tmp_path):
    import base64
    import io

    from fastapi.testclient import TestClient

    from stablekit.server.app import create_app
    from stablekit.server.config import ServerConfig

    engine, _ = pair
    picture = base64.b64encode(_png(make_picture(W, H))).decode()
    config = ServerConfig(model=str(depth_files[0]), outputs=tmp_path)
    with TestClient(create_app(config, loader=lambda spec: engine)) as client:
        r = client.post("/api/v1/jobs", json={"task": "depth2img", "init_images": [picture], "prompt": "a cat",
                                              "steps": 2, "seed": 3, "denoising_strength": 0.6, "width": W, "height": H,
                                              "depth_map": base64.b64encode(_png(a_depth_map())).decode()})
        assert r.status_code == 202, r.text
        job = wait_for(client, r.json()["id"])
        assert job["status"] == "done", job
        made = Image.open(io.BytesIO(client.get(job["images"][0]).content))
        depth = client.post("/api/v1/depth", json={"image": picture})
        assert depth.status_code == 200, depth.text
        shown = Image.open(io.BytesIO(base64.b64decode(depth.json()["image"])))
    assert shown.size == (W, H)
    want = engine.depth2img(make_picture(W, H), prompt="a cat", steps=2, seed=3, denoising_strength=0.6,
                            sampler="Euler", depth_map=a_depth_map())[0]
    assert np.array_equal(np.asarray(made), np.asarray(want))
    assert "Denoising strength: 0.6" in made.info["parameters"]


def _png(image: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_the_diffusers_depth_folder_loads_with_its_estimator(pair, tmp_path):
    """A StableDiffusionDepth2ImgPipeline folder (as stabilityai/stable-diffusion-2-depth): the same model
    and the same depth as the single file."""
    engine, pipe = pair
    pipe.save_pretrained(tmp_path / "depth-diffusers")
    folder = stablekit.load(tmp_path / "depth-diffusers")
    assert folder.config.inputs == "depth"
    image = make_picture(W, H, seed=4)
    assert (folder.estimate_depth(image) - engine.estimate_depth(image)).abs().max() < 1e-4  # LayerNorm eps
    params = stablekit.GenerationParams(prompt=PROMPT, steps=3, seed=2, denoising_strength=0.6)
    ours, _ = folder.run_tensor("depth2img", params, image=image, depth_map=a_depth_map())
    single, _ = engine.run_tensor("depth2img", params, image=image, depth_map=a_depth_map())
    assert (ours - single).abs().max() < 1e-4


def test_a_map_of_another_size_is_resized_with_a_note(pair):
    engine, _ = pair
    image = engine.depth2img(make_picture(W, H), depth_map=a_depth_map(), prompt=PROMPT, steps=2, seed=1)[0]
    assert "Depth map: 56x40 resized" in image.info["parameters"]


def test_depth_and_upscaler_models_refuse_each_others_tasks(pair, tiny_upscaler):
    engine, _ = pair
    with pytest.raises(ValueError, match="upscale needs an upscaler.*this is a depth model"):
        engine.upscale(make_picture(16, 16), steps=2)
    upscaler = stablekit.load(tiny_upscaler.single_file)
    with pytest.raises(ValueError, match="depth2img needs a depth model.*this is an upscaler"):
        upscaler.depth2img(make_picture(16, 16), steps=2)
