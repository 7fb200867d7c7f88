"""The speed and memory paths keep their meaning: each is compared with the plain fp32 path.

Tolerances are stated per test. bf16 keeps 8 bits of mantissa, so bf16 results are close, not
equal; chunking and tiling a tile-local computation are exact.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

import stablekit
from stablekit.checkpoint import CheckpointError, read_tensors
from stablekit.cli import main
from stablekit.models import attention as attention_module
from stablekit.models.attention import attention
from stablekit.models.unet import GroupNorm32
from stablekit.models.vae_tiling import Tiling, tile_starts, tiled

W, H = 96, 64


@pytest.fixture(scope="module")
def fp32(tiny_models):
    return stablekit.load(tiny_models["sd1"].single_file)


def params(**fields) -> stablekit.GenerationParams:
    base = dict(prompt="a red circle", negative_prompt="blurry", width=W, height=H, steps=4, seed=3, sampler="Euler")
    return stablekit.GenerationParams(**{**base, **fields})


def test_bf16_group_norm_statistics_are_float32():
    """Native bf16 GroupNorm equals normalising in float32 and rounding to bf16 (at most 1 bf16 step)."""
    torch.manual_seed(0)
    x = (torch.randn(2, 64, 16, 16) * 30 + 100).bfloat16()  # a large mean: bf16 sums would lose it
    norm = GroupNorm32(8, 64).bfloat16()
    with torch.no_grad():
        norm.weight.normal_()
        native = norm(x).float()
        via_fp32 = F.group_norm(x.float(), 8, norm.weight.float(), norm.bias.float(), norm.eps).bfloat16().float()
    step = via_fp32.abs().clamp_min(1e-3) * 2**-7  # one unit in the last place of bf16
    assert ((native - via_fp32).abs() <= step).all()


def test_bf16_txt2img_close_to_fp32(tiny_models, fp32):
    bf16 = stablekit.load(tiny_models["sd1"].single_file, dtype="bf16")
    a, _ = fp32.txt2img_tensor(params())
    b, _ = bf16.txt2img_tensor(params())
    assert (a - b).abs().mean() < 0.02  # pictures in [0, 1]
    assert (a - b).abs().max() < 0.25


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_attention_equals_whole(dtype):
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 3, 50, 8).to(dtype) for _ in range(3))
    whole = attention(q, k, v)
    chunked = attention(q, k, v, chunk_elements=2 * 3 * 50 * 7)  # 7 query rows a chunk, the last one short
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert (whole.float() - chunked.float()).abs().max() <= tol


def test_models_with_chunked_attention_match(fp32, monkeypatch):
    """The whole pipeline (UNet transformers and VAE attention) with tiny chunks gives the same pictures."""
    a, _ = fp32.txt2img_tensor(params())
    monkeypatch.setattr(attention_module, "CHUNK_ELEMENTS", 64)
    b, _ = fp32.txt2img_tensor(params())
    assert (a - b).abs().max() < 1e-5


def test_tile_starts_cover_and_overlap():
    assert tile_starts(40, 64, 16) == [0]
    assert tile_starts(64, 64, 16) == [0]
    starts = tile_starts(150, 64, 16)
    assert starts[0] == 0 and starts[-1] == 150 - 64
    assert all(b - a <= 64 - 16 for a, b in zip(starts, starts[1:]))  # every neighbour pair overlaps enough


@pytest.mark.parametrize("scale", [8, 1 / 8])
def test_tiled_local_function_is_exact(scale):
    """Blending mechanics: a function that looks at each pixel alone gives the same result tiled."""
    torch.manual_seed(2)
    size = (37, 53) if scale == 8 else (296, 424)
    x = torch.randn(1, 4, *size)

    def fn(t: torch.Tensor) -> torch.Tensor:
        if scale == 8:
            return F.interpolate(t, scale_factor=8, mode="nearest") * 2 + 1
        return F.avg_pool2d(t, 8) * 2 + 1

    tile, overlap = (16, 4) if scale == 8 else (128, 32)
    assert (tiled(fn, x, tile, overlap, scale) - fn(x)).abs().max() < 1e-5


def test_tiled_decode_smaller_than_a_tile_is_exact(fp32):
    vae = fp32.loaded.model.vae
    z = torch.randn(1, 4, H // 8, W // 8)
    with torch.no_grad():
        whole = vae.decode(z)
        vae.tiling = Tiling(tile=16, overlap=4)
        try:
            tiled_picture = vae.decode(z)
            mean_tiled, _ = vae.encode(whole.clamp(-1, 1))
            vae.tiling = None
            mean_whole, _ = vae.encode(whole.clamp(-1, 1))
        finally:
            vae.tiling = None
    assert torch.equal(whole, tiled_picture)
    assert torch.equal(mean_whole, mean_tiled)


def test_tiled_txt2img_is_close_and_seamless(tiny_models):
    """Tiles normalise with their own statistics, so results differ a little; blending hides the seams."""
    whole = stablekit.load(tiny_models["sd1"].single_file)
    small_tiles = stablekit.load(tiny_models["sd1"].single_file, vae_tiling=Tiling(tile=8, overlap=2))
    p = params(width=128, height=96)
    a, _ = whole.txt2img_tensor(p)
    b, _ = small_tiles.txt2img_tensor(p)
    assert (a - b).abs().mean() < 0.06  # 64-pixel tiles of a random VAE: measured 0.04
    # No seam: neighbouring columns differ no more in the tiled picture than in the whole one, at any column.
    col_step = lambda t: (t[..., 1:] - t[..., :-1]).abs().mean(dim=(0, 1, 2))  # noqa: E731
    assert col_step(b).max() < col_step(a).max() * 1.5 + 0.02


def test_vae_tiling_rejects_bad_sizes():
    with pytest.raises(ValueError, match="overlap"):
        Tiling(tile=16, overlap=8)


@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None, reason="torch.compile needs a C compiler")
def test_compiled_unet_matches_eager(tiny_models, fp32):
    compiled = stablekit.load(tiny_models["sd1"].single_file, compile=True)
    p = params(steps=2)
    a, _ = fp32.txt2img_tensor(p)
    b, _ = compiled.txt2img_tensor(p)
    assert (a - b).abs().max() < 1e-4  # fused kernels sum in another order


def test_own_safetensors_reader_matches_the_reference_reader(tmp_path):
    torch.manual_seed(3)
    tensors = {
        "a.f32": torch.randn(3, 5), "b.bf16": torch.randn(7).bfloat16(), "c.f16": torch.randn(2, 2, 2).half(),
        "d.i64": torch.arange(6).view(2, 3), "e.empty": torch.zeros(0, 4), "f.scalar": torch.tensor(4.5),
    }
    path = tmp_path / "mixed.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    ours = read_tensors(path)
    assert sorted(ours) == sorted(tensors)
    with safe_open(str(path), framework="pt") as ref:
        for key in tensors:
            assert ours[key].dtype == ref.get_tensor(key).dtype
            assert torch.equal(ours[key], ref.get_tensor(key))
    ours.release("a.f32")  # dropping pages never loses data: the next read faults them back in
    assert torch.equal(ours["a.f32"], tensors["a.f32"])


def test_safetensors_header_lies_are_clear_errors(tmp_path):
    path = tmp_path / "liar.safetensors"
    header = b'{"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}'
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)
    with pytest.raises(CheckpointError, match="not a readable safetensors file.*outside"):
        read_tensors(path)
    path.write_bytes((10**12).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        read_tensors(path)


@pytest.fixture
def keep_threads():
    """--threads sets the process's thread count; later tests compare with a server on the default."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_cli_speed_flags(tiny_models, tmp_path, capsys, keep_threads):
    out = tmp_path / "out"
    code = main(["txt2img", "--model", str(tiny_models["sd1"].single_file), "--prompt", "a red circle", "--steps", "2",
                 "--width", "96", "--height", "64", "--threads", "1", "--vae-tiling", "--out", str(out)])
    assert code == 0
    assert len(list(out.glob("*.png"))) == 1
    assert "peak memory" in capsys.readouterr().err
    assert main(["txt2img", "--model", str(tiny_models["sd1"].single_file), "--prompt", "x", "--threads", "0",
                 "--out", str(out)]) == 2
    assert "--threads must be at least 1" in capsys.readouterr().err
