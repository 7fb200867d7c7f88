"""Prompts and add-ons on the engine path: emphasis against transformers' CLIPTextModel with the web
UI's formula, chunks and BREAK, cond/uncond of different lengths, prompt editing at the web UI's
steps, LoRA tags and files against diffusers, textual inversion against diffusers, VAE files."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import stablekit
from stablekit.cli import main
from stablekit.pipeline.text import TextSettings, encode_texts

from .test_lora import kohya_tensors, layers, write
from .test_parity import H, IMAGE_TOL, W, assert_close_pictures

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def sd1(tiny_models):
    tiny = tiny_models["sd1"]
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny.diffusers_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return tiny, stablekit.load(tiny.single_file), pipe


def reference_chunk(pipe, pieces: list[tuple[str, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' CLIPTextModel on [BOS] + the pieces' tokens + EOS padding to 77, and the per-token
    weights, built from the pieces as the web UI builds them (each piece tokenized on its own)."""
    ids, weights = [49406], [1.0]
    for text, weight in pieces:
        piece = pipe.tokenizer(text, add_special_tokens=False).input_ids
        ids += piece
        weights += [weight] * len(piece)
    ids += [49407] * (77 - len(ids))
    weights += [1.0] * (77 - len(weights))
    with torch.no_grad():
        z = pipe.text_encoder(torch.tensor([ids])).last_hidden_state
    return z, torch.tensor([weights])


def original_emphasis(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The web UI's "Original" emphasis, written out: one mean over the whole tensor before and after."""
    before = z.mean()
    z = z * weights[..., None]
    return z * (before / z.mean())


def test_emphasis_original_and_no_norm_match_the_web_uis_formula(sd1):
    tiny, engine, pipe = sd1
    prompt = "a (red:1.5) circle, [blue] square"  # (x:1.5) weighs 1.5, [x] 1/1.1
    z, weights = reference_chunk(pipe, [("a", 1.0), ("red", 1.5), ("circle, ", 1.0), ("blue", 1 / 1.1),
                                        ("square", 1.0)])
    ours = encode_texts(engine.context, [prompt], TextSettings())
    torch.testing.assert_close(ours, original_emphasis(z, weights), atol=1e-5, rtol=1e-5)
    assert (ours - z).abs().max() > 1e-2  # the weights act
    no_norm = encode_texts(engine.context, [prompt], TextSettings(emphasis="no-norm"))
    torch.testing.assert_close(no_norm, z * weights[..., None], atol=1e-5, rtol=1e-5)
    ignored = encode_texts(engine.context, [prompt], TextSettings(emphasis="ignore"))
    torch.testing.assert_close(ignored, z, atol=1e-5, rtol=1e-5)
    literal = encode_texts(engine.context, [prompt], TextSettings(emphasis="none"))
    ref_literal, _ = reference_chunk(pipe, [(prompt, 1.0)])
    torch.testing.assert_close(literal, ref_literal, atol=1e-5, rtol=1e-5)


def test_emphasis_mean_spans_every_schedule_text_of_the_prompt(sd1):
    """Prompt editing encodes all its texts together: the rescale uses one mean over both."""
    tiny, engine, pipe = sd1
    texts = ["a (red:1.5) circle", "a blue circle"]
    za, wa = reference_chunk(pipe, [("a", 1.0), ("red", 1.5), ("circle", 1.0)])
    zb, wb = reference_chunk(pipe, [("a blue circle", 1.0)])
    want = original_emphasis(torch.cat([za, zb]), torch.cat([wa, wb]))
    torch.testing.assert_close(encode_texts(engine.context, texts, TextSettings()), want, atol=1e-5, rtol=1e-5)


def test_break_and_long_prompts_concatenate_77_token_chunks(sd1):
    tiny, engine, pipe = sd1
    ours = encode_texts(engine.context, ["a red circle BREAK a blue square"], TextSettings())
    first, _ = reference_chunk(pipe, [("a red circle", 1.0)])
    second, _ = reference_chunk(pipe, [("a blue square", 1.0)])
    assert ours.shape == (1, 154, tiny.config.text.width)
    torch.testing.assert_close(ours, torch.cat([first, second], dim=1), atol=1e-5, rtol=1e-5)
    words = ", ".join(["red circle"] * 40)  # 120 tokens: two chunks, split after a comma
    assert encode_texts(engine.context, [words], TextSettings()).shape[1] == 154


def unet_calls(engine):
    """Record (batch size, token count) of every UNet call."""
    calls = []
    hook = engine.loaded.model.unet.register_forward_pre_hook(
        lambda m, args: calls.append((args[0].shape[0], args[2].crossattn.shape[1], args[2].crossattn)))
    return calls, hook


def test_prompt_and_negative_of_different_lengths_run_as_separate_calls(sd1):
    tiny, engine, _ = sd1
    long_prompt = "a red circle BREAK on a blue background"
    calls, hook = unet_calls(engine)
    try:
        engine.txt2img_tensor(stablekit.GenerationParams(prompt=long_prompt, negative_prompt="blurry", steps=2,
                                                         width=W, height=H, sampler="Euler", seed=1))
        engine.txt2img_tensor(stablekit.GenerationParams(prompt="a red circle", negative_prompt="blurry", steps=2,
                                                         width=W, height=H, sampler="Euler", seed=1))
    finally:
        hook.remove()
    assert [(b, n) for b, n, _ in calls] == [(1, 154), (1, 77)] * 2 + [(2, 77)] * 2


@pytest.mark.parametrize("sampler, calls_first", [("Euler", 3), ("Heun", 5)])
def test_prompt_editing_switches_at_the_web_uis_denoiser_call(sd1, sampler, calls_first):
    """[red:blue:0.5] with 4 steps: the web UI's schedule ends "red" at int(0.5 * 4) = 2 (Euler) or, for a
    second-order sampler, int(0.5 * 8) = 4; its call counter starts at 0 and a text serves calls <= its end."""
    tiny, engine, _ = sd1
    red, blue = encode_texts(engine.context, ["a red circle", "a blue circle"], TextSettings()).chunk(2)
    calls, hook = unet_calls(engine)
    try:
        engine.txt2img_tensor(stablekit.GenerationParams(prompt="a [red:blue:0.5] circle", steps=4, cfg_scale=1.0,
                                                         width=W, height=H, sampler=sampler, seed=1))
    finally:
        hook.remove()
    used = ["red" if torch.allclose(c[:1], red, atol=1e-5) else "blue" if torch.allclose(c[:1], blue, atol=1e-5)
            else "?" for _, _, c in calls]
    assert used[:calls_first] == ["red"] * calls_first and set(used[calls_first:]) == {"blue"}


@pytest.fixture
def lora_dir(sd1, tmp_path):
    tiny, _, pipe = sd1
    folder = tmp_path / "loras"
    folder.mkdir()
    write(folder / "shiny.safetensors", kohya_tensors(layers(pipe), seed=5, alpha=2.0))
    return folder


def test_lora_tag_and_file_match_diffusers_and_leave_the_base_weights(sd1, lora_dir):
    tiny, _, pipe = sd1
    engine = stablekit.load(tiny.single_file, lora_dir=lora_dir)
    base = {k: v.clone() for k, v in engine.loaded.model.state_dict().items()}
    fields = dict(negative_prompt="blurry", width=W, height=H, steps=8, sampler="DDIM", seed=3, cfg_scale=7.0)  # 8 divides 1000
    tagged = engine.txt2img(prompt="<lora:shiny:0.8> a red circle", **fields)[0]
    by_file = engine.txt2img_tensor(stablekit.GenerationParams(
        prompt="a red circle", loras=((str(lora_dir / "shiny.safetensors"), 0.8),), **fields))[0]
    plain = engine.txt2img_tensor(stablekit.GenerationParams(prompt="a red circle", **fields))[0]
    assert all(torch.equal(v, base[k]) for k, v in engine.loaded.model.state_dict().items())
    assert "Lora hashes: \"shiny: " in tagged.info["parameters"]
    assert "<lora:shiny:0.8> a red circle" in tagged.info["parameters"]  # the prompt keeps its tag

    pipe.load_lora_weights(str(lora_dir), weight_name="shiny.safetensors")
    pipe.fuse_lora(lora_scale=0.8)
    try:
        scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
        saved, pipe.scheduler = pipe.scheduler, scheduler
        ref = pipe("a red circle", negative_prompt="blurry", height=H, width=W, num_inference_steps=8,
                   guidance_scale=7.0, generator=torch.Generator().manual_seed(3), output_type="pt").images
    finally:
        pipe.scheduler = saved
        pipe.unfuse_lora()
        pipe.unload_lora_weights()
    assert (by_file - plain).abs().max() > 10 * IMAGE_TOL
    assert_close_pictures(by_file, ref, "LoRA 0.8 vs diffusers fuse_lora")
    from stablekit.images import to_tensor
    assert (to_tensor(tagged) - by_file).abs().max() <= 1 / 255 + 1e-6  # the tag is the file (8-bit picture)


def test_unknown_lora_names_the_folder(sd1, lora_dir, tmp_path, capsys):
    tiny, _, _ = sd1
    engine = stablekit.load(tiny.single_file, lora_dir=lora_dir)
    with pytest.raises(ValueError, match=f"unknown LoRA 'nope' in {lora_dir}"):
        engine.txt2img(prompt="<lora:nope:1> x", width=W, height=H, steps=1)
    code = main(["txt2img", "--model", str(tiny.single_file), "--lora-dir", str(lora_dir), "--prompt", "<lora:nope> x",
                 "--steps", "1", "--width", str(W), "--height", str(H), "--out", str(tmp_path)])
    assert code == 2 and "unknown LoRA 'nope'" in capsys.readouterr().err


def test_textual_inversion_matches_diffusers(sd1, tmp_path):
    tiny, _, pipe = sd1
    folder = tmp_path / "embeddings"
    folder.mkdir()
    vectors = torch.randn(2, tiny.config.text.width, generator=torch.Generator().manual_seed(4))
    save_file({"emb_params": vectors}, str(folder / "sparkle.safetensors"))
    engine = stablekit.load(tiny.single_file, embeddings_dir=folder)
    ours = encode_texts(engine.context, ["a sparkle circle"], TextSettings(embeddings=engine.addons.embeddings))
    pipe.load_textual_inversion(str(folder / "sparkle.safetensors"), token="sparkle")
    try:  # diffusers spells a 2-vector token "sparkle sparkle_1"
        ids = pipe.tokenizer("a sparkle sparkle_1 circle", padding="max_length", max_length=77,
                             return_tensors="pt").input_ids
        with torch.no_grad():
            ref = pipe.text_encoder(ids).last_hidden_state
    finally:
        pipe.unload_textual_inversion()
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    image = engine.txt2img(prompt="a sparkle circle", width=W, height=H, steps=1)[0]
    assert "TI hashes: \"sparkle: " in image.info["parameters"]


def test_vae_file_replaces_the_models_vae(tiny_models, tmp_path):
    other = tiny_models["sd2"]  # the same VAE shape, other weights
    from safetensors.torch import load_file

    vae = {k.removeprefix("first_stage_model."): v for k, v in load_file(str(other.single_file)).items()
           if k.startswith("first_stage_model.")}
    path = tmp_path / "other-vae.safetensors"
    save_file(vae, str(path))
    plain = stablekit.load(tiny_models["sd1"].single_file)
    swapped = stablekit.load(tiny_models["sd1"].single_file, vae=path)
    ref = diffusers.AutoencoderKL.from_pretrained(other.diffusers_dir / "vae")
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(swapped.loaded.model.vae.decode(z), ref.decode(z).sample, atol=1e-4, rtol=1e-4)
        assert (plain.loaded.model.vae.decode(z) - swapped.loaded.model.vae.decode(z)).abs().max() > 1e-2
    image = swapped.txt2img(prompt="x", width=W, height=H, steps=1)[0]
    assert "VAE: other-vae" in image.info["parameters"] and "VAE hash: " in image.info["parameters"]


def test_emphasis_infotext_and_cli(sd1, lora_dir, tmp_path, capsys):
    tiny, _, _ = sd1
    code = main(["txt2img", "--model", str(tiny.single_file), "--prompt", "a (red:1.3) circle", "--emphasis",
                 "no-norm", "--lora", f"{lora_dir / 'shiny.safetensors'}:0.5", "--steps", "1", "--width", str(W),
                 "--height", str(H), "--out", str(tmp_path)])
    assert code == 0
    from PIL import Image

    info = Image.open(capsys.readouterr().out.strip().splitlines()[-1]).info["parameters"]
    assert "Emphasis: No norm" in info and "Lora hashes: \"shiny: " in info


def test_server_takes_lora_tags_and_lists_add_ons(sd1, lora_dir, tmp_path):
    import json

    from fastapi.testclient import TestClient

    from stablekit.server.app import create_app
    from stablekit.server.config import ServerConfig

    tiny, _, _ = sd1
    config = ServerConfig(model=str(tiny.single_file), outputs=tmp_path / "out", lora_dir=lora_dir)
    with TestClient(create_app(config), raise_server_exceptions=False) as c:
        assert [x["name"] for x in c.get("/sdapi/v1/loras").json()] == ["shiny"]
        assert c.get("/sdapi/v1/embeddings").json() == {"loaded": {}, "skipped": {}}
        body = {"prompt": "<lora:shiny:0.7> a (red:1.2) circle", "steps": 2, "width": W, "height": H, "seed": 2,
                "override_settings": {"emphasis": "No norm"}}
        r = c.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 200, r.text
        infotext = json.loads(r.json()["info"])["infotexts"][0]
        assert "Lora hashes: \"shiny: " in infotext and "Emphasis: No norm" in infotext
        bad = c.post("/sdapi/v1/txt2img", json={**body, "prompt": "<lora:missing:1> x"})
        assert bad.status_code == 400 and "unknown LoRA 'missing'" in bad.json()["errors"]
        # The picture's own infotext, read back by png-info and sent as `infotext`, makes the same picture.
        picture = r.json()["images"][0]
        read = c.post("/sdapi/v1/png-info", json={"image": picture}).json()["info"]
        assert read == infotext
        again = c.post("/sdapi/v1/txt2img", json={"infotext": read})
        assert again.status_code == 200 and again.json()["images"][0] == picture


def test_webuiapi_client_sends_tags_and_weights_unchanged(sd1, lora_dir, tmp_path):
    webuiapi = pytest.importorskip("webuiapi")
    from .server_support import Server

    tiny, _, _ = sd1
    srv = Server(tiny.single_file, tmp_path, "--lora-dir", str(lora_dir))
    try:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=srv.port)
        prompt = "<lora:shiny:0.6> a (red:1.2) circle BREAK [on:in:1] a blue background"
        got = api.txt2img(prompt=prompt, negative_prompt="blurry", seed=5, steps=3, width=W, height=H)
    finally:
        srv.stop()
    engine = stablekit.load(tiny.single_file, lora_dir=lora_dir)
    want = engine.txt2img(prompt=prompt, negative_prompt="blurry", seed=5, steps=3, width=W, height=H,
                          sampler="Euler a", eta=1.0)[0]  # what webuiapi sends by default
    import numpy as np

    assert np.array_equal(np.asarray(got.image), np.asarray(want))
    assert "Lora hashes" in got.info["infotexts"][0]


def test_server_switches_vae_by_name_and_back(tiny_models, tmp_path):
    import json

    from fastapi.testclient import TestClient
    from safetensors.torch import load_file

    from stablekit.server.app import create_app
    from stablekit.server.config import ServerConfig

    vaes = tmp_path / "vae"
    vaes.mkdir()
    other = {k.removeprefix("first_stage_model."): v for k, v in load_file(str(tiny_models["sd2"].single_file)).items()
             if k.startswith("first_stage_model.")}
    save_file(other, str(vaes / "other.vae.safetensors"))
    config = ServerConfig(model=str(tiny_models["sd1"].single_file), outputs=tmp_path / "out", vae_dir=vaes)
    body = {"prompt": "a red circle", "steps": 2, "width": W, "height": H, "seed": 4}
    with TestClient(create_app(config), raise_server_exceptions=False) as c:
        assert c.get("/sdapi/v1/sd-vae").json() == [{"model_name": "other.vae", "filename": "other.vae.safetensors"}]
        own = c.post("/sdapi/v1/txt2img", json=body).json()
        swapped = c.post("/sdapi/v1/txt2img", json={**body, "override_settings": {
            "sd_vae": "other.vae.safetensors"}}).json()
        back = c.post("/sdapi/v1/txt2img", json=body).json()  # the override is undone afterwards
        assert own["images"][0] != swapped["images"][0] and back["images"][0] == own["images"][0]
        assert "VAE: other.vae" in json.loads(swapped["info"])["infotexts"][0]
        assert c.post("/sdapi/v1/options", json={"sd_vae": "other.vae.safetensors"}).status_code == 200
        assert c.get("/sdapi/v1/options").json()["sd_vae"] == "other.vae.safetensors"
        assert c.post("/sdapi/v1/txt2img", json=body).json()["images"][0] == swapped["images"][0]
        bad = c.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"sd_vae": "nope.pt"}})
        assert bad.status_code == 400 and "unknown VAE 'nope.pt'" in bad.json()["errors"]
