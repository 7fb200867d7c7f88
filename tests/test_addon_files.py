"""Add-on files: textual-inversion embeddings and VAE files, read as the web UI and diffusers read them.

Files are written here the way their tools write them (torch.save, safetensors, diffusers'
save_pretrained); the expected values come from diffusers (its textual-inversion loader, its
AutoencoderKL and single-file converter) or from hashlib, never from the code under test.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import stablekit
from stablekit.addons.embeddings import check_width, read_embedding, read_embeddings_dir
from stablekit.addons.vae_files import read_vae_file, replace_vae, vae_hash
from stablekit.config import VAEConfig
from stablekit.detect import CheckpointError
from stablekit.models.vae import AutoencoderKL

from .conftest import ldm_state_dict, randomize, tiny_config
from .test_bad_input import payload, save_pickle

VAE = "first_stage_model."


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- embedding files as their tools write them -----------------------------------------------------


def write_embedding(fmt: str, folder: Path, stem: str, vectors: torch.Tensor) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "webui-pt":  # the web UI's Embedding.save; the vector is a trained (grad-carrying) tensor
        path = folder / f"{stem}.pt"
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors.clone().requires_grad_()},
                    "name": "stored-name", "step": 1200, "sd_checkpoint": "0123456789",
                    "sd_checkpoint_name": "some-model"}, path)
    elif fmt == "emb_params":
        path = folder / f"{stem}.safetensors"
        save_file({"emb_params": vectors.contiguous()}, str(path))
    elif fmt == "emb_params-fp16":
        path = folder / f"{stem}.safetensors"
        save_file({"emb_params": vectors.half().contiguous()}, str(path))
    elif fmt == "learned-bin":  # diffusers' textual_inversion training script
        path = folder / f"{stem}.bin"
        torch.save({"<concept>": vectors}, path)
    elif fmt == "learned-safetensors":
        path = folder / f"{stem}.safetensors"
        save_file({"<concept>": vectors.contiguous()}, str(path))
    elif fmt == "learned-1d":  # older diffusers files: one vector stored as [dim]
        path = folder / f"{stem}.bin"
        torch.save({"<concept>": vectors[0]}, path)
    else:
        raise AssertionError(fmt)
    return path


FORMATS = [("webui-pt", 1), ("webui-pt", 3), ("emb_params", 2), ("emb_params-fp16", 2), ("learned-bin", 1),
           ("learned-bin", 4), ("learned-safetensors", 2), ("learned-1d", 1)]


@pytest.fixture(scope="module")
def sd1_pipe(tiny_models):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(str(tiny_models["sd1"].diffusers_dir), safety_checker=None)


@pytest.mark.parametrize("fmt,n", FORMATS)
def test_embedding_vectors_match_diffusers(sd1_pipe, tiny_models, tmp_path, fmt, n):
    """The rows diffusers puts into its token-embedding table are the vectors read here."""
    width = tiny_models["sd1"].config.text.width
    vectors = torch.randn(n, width, generator=torch.Generator().manual_seed(n + len(fmt)))
    path = write_embedding(fmt, tmp_path, "my-style", vectors)
    token = f"<{fmt}-{n}>"
    sd1_pipe.load_textual_inversion(str(path), token=token)
    tokens = [token] + [f"{token}_{i}" for i in range(1, n)]  # diffusers' names for multi-vector tokens
    ids = sd1_pipe.tokenizer.convert_tokens_to_ids(tokens)
    theirs = sd1_pipe.text_encoder.get_input_embeddings().weight.detach()[ids]  # [n, width]

    emb = read_embedding(path)
    assert emb.vectors.dtype == torch.float32 and emb.vectors.shape == (n, width) == (emb.num_vectors, emb.dim)
    assert (emb.vectors - theirs).abs().max().item() == 0.0
    assert emb.name == "my-style"  # the web UI's trigger word, whatever the file stores
    check_width(emb, width)


@pytest.mark.parametrize("width", [768, 1024])
def test_sd1_and_sd2_widths(tmp_path, width):
    vectors = torch.randn(2, width)
    emb = read_embedding(write_embedding("webui-pt", tmp_path, "wide", vectors))
    assert emb.dim == width and torch.equal(emb.vectors, vectors)
    check_width(emb, width)
    other = 1024 if width == 768 else 768
    with pytest.raises(CheckpointError) as e:
        check_width(emb, other)
    assert "wide.pt" in str(e.value) and str(width) in str(e.value) and str(other) in str(e.value)


def test_name_step_and_hash(tmp_path):
    pt = read_embedding(write_embedding("webui-pt", tmp_path, "Fancy Style", torch.randn(1, 768)))
    assert pt.name == "Fancy Style"  # not the stored "stored-name"
    assert pt.step == 1200
    assert pt.hash == sha256(pt.path)[:12]  # "TI hashes: Fancy Style: <12 hex>"
    st = read_embedding(write_embedding("emb_params", tmp_path, "other", torch.randn(1, 768)))
    assert st.name == "other" and st.step is None  # not "emb_params", which diffusers would use
    assert st.hash == sha256(st.path)[:12] and st.hash != pt.hash


def test_embeddings_dir(tmp_path):
    write_embedding("webui-pt", tmp_path, "Zeta", torch.randn(1, 768))
    write_embedding("emb_params", tmp_path / "sub" / "deeper", "beta", torch.randn(2, 768))
    write_embedding("learned-bin", tmp_path / "sub", "alpha", torch.randn(1, 768))
    (tmp_path / "empty.pt").write_bytes(b"")  # the web UI skips empty files
    (tmp_path / "alpha.preview.png").write_bytes(b"\x89PNG not really")
    torch.save({"hash": "abcd", "optimizer_state_dict": {}}, tmp_path / "Zeta.pt.optim")  # training state
    (tmp_path / "notes.txt").write_text("hello")
    found = read_embeddings_dir(tmp_path)
    assert list(found) == ["alpha", "beta", "Zeta"]  # sorted without regard to case, as the web UI lists them
    assert found["beta"].num_vectors == 2 and found["beta"].path == tmp_path / "sub" / "deeper" / "beta.safetensors"


def test_embeddings_dir_refuses_ambiguous_names_and_bad_files(tmp_path):
    write_embedding("webui-pt", tmp_path / "a", "same", torch.randn(1, 768))
    write_embedding("emb_params", tmp_path / "b", "same", torch.randn(1, 768))
    with pytest.raises(CheckpointError, match="two embeddings are named 'same'"):
        read_embeddings_dir(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(CheckpointError, match="^broken.safetensors: "):
        read_embeddings_dir(bad)
    with pytest.raises(CheckpointError, match="not found"):
        read_embeddings_dir(tmp_path / "nowhere")


def bad_embedding(tmp_path: Path, case: str) -> Path:
    v = torch.randn(2, 768)
    if case == "two-tensors":
        save_file({"a": v, "b": v.clone()}, str(path := tmp_path / "two.safetensors"))
    elif case == "two-terms":
        torch.save({"string_to_param": {"*": v, "+": v}, "name": "x"}, path := tmp_path / "terms.pt")
    elif case == "sdxl":
        save_file({"clip_g": torch.randn(2, 1280), "clip_l": v}, str(path := tmp_path / "xl.safetensors"))
    elif case == "3d":
        torch.save({"<t>": torch.randn(1, 2, 768)}, path := tmp_path / "cube.bin")
    elif case == "ints":
        torch.save({"<t>": torch.ones(2, 768, dtype=torch.int64)}, path := tmp_path / "ints.bin")
    elif case == "no-vectors":
        torch.save({"<t>": torch.empty(0, 768)}, path := tmp_path / "none.bin")
    elif case == "not-dict":
        torch.save([v], path := tmp_path / "list.pt")
    elif case == "garbage":
        (path := tmp_path / "garbage.pt").write_bytes(os.urandom(300))
    elif case == "image":
        (path := tmp_path / "emb.png").write_bytes(b"\x89PNG\r\n")
    else:
        raise AssertionError(case)
    return path


@pytest.mark.parametrize("case,message", [
    ("two-tensors", "found 2 keys"), ("two-terms", "exactly one tensor"), ("sdxl", "SDXL"), ("3d", r"\(1, 2, 768\)"),
    ("ints", "not a floating-point"), ("no-vectors", r"\(0, 768\)"), ("not-dict", "holds a list"),
    ("garbage", "not a readable PyTorch checkpoint"), ("image", "not an embedding file"),
])
def test_bad_embeddings_give_clear_errors(tmp_path, case, message):
    path = bad_embedding(tmp_path, case)
    with pytest.raises(CheckpointError, match=message) as e:
        read_embedding(path)
    assert str(e.value).startswith(path.name + ": ")
    with pytest.raises(CheckpointError, match="not found"):
        read_embedding(tmp_path / "missing.pt")


# --- malicious pickles -----------------------------------------------------------------------------


def evil_embedding(kind: str, path: Path, marker: Path) -> Path:
    obj = {"string_to_token": {"*": 265}, "string_to_param": {"*": payload(kind, marker)}, "name": "evil", "step": 1}
    return save_pickle(obj, path, kind)


@pytest.mark.parametrize("kind", ["zip", "legacy", "shell"])
def test_evil_embedding_really_would_run(tmp_path, kind):
    marker = tmp_path / "ran"
    path = evil_embedding(kind, tmp_path / "evil.pt", marker)
    assert not marker.exists()
    pickle.loads(path.read_bytes()) if kind == "legacy" else torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("kind", ["zip", "legacy", "shell"])
def test_evil_embedding_is_refused_without_running(tmp_path, kind):
    marker = tmp_path / "pwned"
    (tmp_path / "emb").mkdir()
    path = evil_embedding(kind, tmp_path / "emb" / "evil.pt", marker)
    with pytest.raises(CheckpointError, match="nothing in it was executed") as e:
        read_embedding(path)
    assert str(e.value).startswith("evil.pt: refused to load")
    with pytest.raises(CheckpointError, match="nothing in it was executed"):
        read_embeddings_dir(tmp_path / "emb")
    assert not marker.exists()


# --- VAE files ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def new_vae(tiny_models, tmp_path_factory):
    """A second tiny model (another seed): its full checkpoint, its VAE in original keys, and diffusers' copy."""
    from diffusers import AutoencoderKL as DiffusersVAE
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    root = tmp_path_factory.mktemp("new_vae")
    full = ldm_state_dict(tiny_config("sd1"), seed=7)
    bare = {k.removeprefix(VAE): v for k, v in full.items() if k.startswith(VAE)}
    config = DiffusersVAE.load_config(str(tiny_models["sd1"].diffusers_dir), subfolder="vae")
    ref = DiffusersVAE.from_config(config)
    ref.load_state_dict(convert_ldm_vae_checkpoint(full, config), strict=True)
    ref.save_pretrained(str(root / "diffusers-vae"))
    save_file(full, str(root / "second-model.safetensors"))
    return {"root": root, "full": full, "bare": bare, "config": config, "ref": ref.eval()}


def write_vae(fmt: str, new_vae: dict, folder: Path) -> Path:
    bare = new_vae["bare"]
    if fmt == "safetensors":  # vae-ft-mse-840000-ema-pruned.safetensors: flat, no prefix
        save_file(bare, str(path := folder / "vae-ft-mse.safetensors"))
    elif fmt == "fp16":
        save_file({k: v.half() for k, v in bare.items()}, str(path := folder / "vae-fp16.safetensors"))
    elif fmt == "ckpt":  # the .ckpt: under "state_dict", with the discriminator and EMA counters
        extras = {"loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.randn(8, 3, 4, 4),
                  "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(840000)}
        torch.save({"state_dict": {**bare, **extras}, "global_step": 840000}, path := folder / "vae-ft-mse.vae.ckpt")
    elif fmt == "prefixed":
        save_file({VAE + k: v for k, v in bare.items()}, str(path := folder / "prefixed.vae.safetensors"))
    elif fmt == "diffusers-folder":
        path = new_vae["root"] / "diffusers-vae"
    elif fmt == "diffusers-file":  # the folder's weights file on its own, renamed as people do
        shutil.copy(new_vae["root"] / "diffusers-vae" / "diffusion_pytorch_model.safetensors",
                    path := folder / "sd-vae-ft-mse.safetensors")
    elif fmt == "full-checkpoint":
        path = new_vae["root"] / "second-model.safetensors"
    else:
        raise AssertionError(fmt)
    return path


def diffusers_reference(fmt: str, new_vae: dict, path: Path):
    from diffusers import AutoencoderKL as DiffusersVAE

    if fmt == "diffusers-folder":
        return DiffusersVAE.from_pretrained(str(path)).eval()
    if fmt == "fp16":  # the same rounded weights, in float32 as the model holds them
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

        ref = DiffusersVAE.from_config(new_vae["config"])
        rounded = {k: v.half().float() for k, v in new_vae["bare"].items()}
        ref.load_state_dict(convert_ldm_vae_checkpoint(rounded, new_vae["config"]), strict=True)
        return ref.eval()
    return new_vae["ref"]


def fresh_model(tiny_models):
    return stablekit.load(tiny_models["sd1"].single_file, device="cpu").loaded.model


VAE_FORMATS = ["safetensors", "fp16", "ckpt", "prefixed", "diffusers-folder", "diffusers-file", "full-checkpoint"]


@torch.no_grad()
@pytest.mark.parametrize("fmt", VAE_FORMATS)
def test_replaced_vae_matches_diffusers(tiny_models, new_vae, tmp_path, fmt):
    path = write_vae(fmt, new_vae, tmp_path)
    ref = diffusers_reference(fmt, new_vae, path)
    model = fresh_model(tiny_models)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, 8, 8, generator=g)
    x = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    before = model.first_stage_model.decode(z)

    tensors = read_vae_file(path)
    assert set(tensors) == {VAE + k for k in model.first_stage_model.state_dict()}
    replace_vae(model, tensors)

    theirs = ref.decode(z).sample
    assert (model.first_stage_model.decode(z) - theirs).abs().max().item() < 1e-4
    assert (before - theirs).abs().max().item() > 1e-2  # the file's VAE really is another one
    mean, _ = model.first_stage_model.encode(x)
    assert (mean - ref.encode(x).latent_dist.mean).abs().max().item() < 1e-4


@torch.no_grad()
def test_pipeline_folder_gives_its_vae(tiny_models):
    """A whole diffusers pipeline folder: its vae/ is read; it is the tiny model's own VAE."""
    from diffusers import AutoencoderKL as DiffusersVAE

    tiny = tiny_models["sd1"]
    model = fresh_model(tiny_models)
    randomize(model.first_stage_model, seed=3)  # so that the replacement has something to undo
    replace_vae(model, read_vae_file(tiny.diffusers_dir))
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ref = DiffusersVAE.from_pretrained(str(tiny.diffusers_dir), subfolder="vae").eval()
    assert (model.first_stage_model.decode(z) - ref.decode(z).sample).abs().max().item() < 1e-4


def test_vae_hash(new_vae, tmp_path):
    path = write_vae("safetensors", new_vae, tmp_path)
    assert vae_hash(path) == sha256(path)[:10]  # infotext "VAE hash: <10 hex>"
    folder = write_vae("diffusers-folder", new_vae, tmp_path)
    assert vae_hash(folder) == sha256(folder / "diffusion_pytorch_model.safetensors")[:10]
    with pytest.raises(CheckpointError, match="not found"):
        vae_hash(tmp_path / "missing.safetensors")


@torch.no_grad()
def test_mismatched_vae_names_key_and_both_shapes_and_leaves_model(tiny_models, tmp_path):
    big = AutoencoderKL(VAEConfig(ch=64, ch_mult=(1, 1, 2, 2), num_res_blocks=1))
    save_file({k: v.contiguous() for k, v in big.state_dict().items()}, str(path := tmp_path / "big.safetensors"))
    model = fresh_model(tiny_models)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    before = model.first_stage_model.decode(z)
    with pytest.raises(CheckpointError) as e:
        replace_vae(model, read_vae_file(path))
    msg = str(e.value)
    assert "first_stage_model.encoder.conv_in.weight: file (64, 3, 3, 3) vs model (32, 3, 3, 3)" in msg, msg
    assert "64 base channels" in msg and "32 base channels" in msg
    assert torch.equal(model.first_stage_model.decode(z), before)


def bad_vae(case: str, new_vae: dict, tmp_path: Path) -> Path:
    bare = new_vae["bare"]
    if case == "embedding":
        save_file({"emb_params": torch.randn(2, 768)}, str(path := tmp_path / "emb.safetensors"))
    elif case == "lora":
        save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(4, 4)},
                  str(path := tmp_path / "lora.safetensors"))
    elif case == "unet-only":
        unet = {k: v for k, v in new_vae["full"].items() if k.startswith("model.diffusion_model.")}
        save_file(unet, str(path := tmp_path / "unet.safetensors"))
    elif case == "stray":
        stray = {**bare, "model.diffusion_model.out.2.weight": torch.randn(4)}
        save_file(stray, str(path := tmp_path / "stray.safetensors"))
    elif case == "decoder-only":
        decoder = {k: v for k, v in bare.items() if not k.startswith("encoder.")}
        save_file(decoder, str(path := tmp_path / "dec.safetensors"))
    elif case == "no-config":
        (path := tmp_path / "folder").mkdir()
    elif case == "unet-folder":
        path = tmp_path / "unet-folder"
        shutil.copytree(new_vae["root"] / "diffusers-vae", path)
        (path / "config.json").write_text('{"_class_name": "UNet2DConditionModel", "block_out_channels": [32]}')
    elif case == "wrong-suffix":
        save_file(bare, str(path := tmp_path / "vae.onnx"))
    elif case == "missing":
        path = tmp_path / "missing.safetensors"
    else:
        raise AssertionError(case)
    return path


@pytest.mark.parametrize("case,message", [
    ("embedding", "emb.safetensors: not a VAE file"), ("lora", "lora.safetensors: not a VAE file"),
    ("unet-only", "unet.safetensors: not a VAE file"),
    ("stray", "no part of a VAE: model.diffusion_model.out.2.weight"),
    ("decoder-only", "missing keys: first_stage_model.encoder."), ("no-config", "config.json is missing"),
    ("unet-folder", "not an AutoencoderKL config"), ("wrong-suffix", "unknown VAE file type"), ("missing", "not found"),
])
def test_bad_vae_files_give_clear_errors(tiny_models, new_vae, tmp_path, case, message):
    path = bad_vae(case, new_vae, tmp_path)
    with pytest.raises(CheckpointError, match=message):
        replace_vae(fresh_model(tiny_models), read_vae_file(path))


def test_evil_vae_ckpt_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {"encoder.conv_in.weight": payload("zip", marker)}}, path := tmp_path / "evil.vae.ckpt")
    with pytest.raises(CheckpointError, match="nothing in it was executed"):
        read_vae_file(path)
    assert not marker.exists()
