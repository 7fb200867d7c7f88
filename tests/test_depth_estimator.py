"""The built-in DPT-Hybrid depth estimator against transformers' DPTForDepthEstimation.

A tiny random DPT-Hybrid (real structure: BiT stem + 3 stages with 32-group GroupNorm, ViT
with readout projection, reassembly, 4 fusion blocks, head) is made by transformers and saved
as a Hugging Face folder with a non-default preprocessor_config.json. Our estimator loads that
folder, and the same weights in the MiDaS layout an SD 2 depth single file uses; both must give
transformers' predicted_depth on pictures processed by transformers' DPTImageProcessor (PIL).
"""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch
from PIL import Image

from stablekit.images import to_pil
from stablekit.models import dpt_keys
from stablekit.models.dpt import DPTDepthModel
from stablekit.pipeline.depth import (
    DepthPreprocess,
    DPTConfig,
    depth_estimator_from_checkpoint,
    depth_for_latents,
    depth_map_from_picture,
    has_checkpoint_depth_model,
    load_depth_estimator,
    save_depth_png,
)

from .conftest import randomize

transformers = pytest.importorskip("transformers")

TOL = 1e-4
PROCESSOR = {"size": {"height": 64, "width": 64}, "resample": 2, "image_mean": [0.485, 0.456, 0.406],
             "image_std": [0.229, 0.224, 0.225], "ensure_multiple_of": 32}  # bilinear, ImageNet statistics


def tiny_hf_config():
    bit = transformers.BitConfig(layer_type="bottleneck", global_padding="same", embedding_dynamic_padding=True,
                                 depths=[1, 1, 2], hidden_sizes=[128, 256, 512], embedding_size=32, num_groups=32,
                                 out_features=["stage1", "stage2", "stage3"])
    # 128 wide with 2 heads, 4 blocks tapping 2 and 3: what the MiDaS shapes imply (64-wide heads, 2L/3, L-1).
    return transformers.DPTConfig(is_hybrid=True, backbone_config=bit, hidden_size=128, num_hidden_layers=4,
                                  num_attention_heads=2, intermediate_size=256, image_size=64, patch_size=16,
                                  backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[128, 256, 64, 64],
                                  reassemble_factors=[1, 1, 1, 0.5], fusion_hidden_size=32,
                                  backbone_featmap_shape=[1, 512, 4, 4], readout_type="project")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    model = transformers.DPTForDepthEstimation(tiny_hf_config()).eval()
    randomize(model, seed=3)
    with torch.no_grad():
        model.head.head[4].bias.fill_(0.3)  # keep most of the output above the final ReLU
    folder = tmp_path_factory.mktemp("dpt-hybrid")
    model.save_pretrained(folder)
    transformers.DPTImageProcessorPil(**PROCESSOR).save_pretrained(folder)
    return folder, model


def pictures(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def reference_depth(model, pics: torch.Tensor, **processor) -> torch.Tensor:
    proc = transformers.DPTImageProcessorPil(**(processor or PROCESSOR))
    pixel_values = proc(images=to_pil(pics), return_tensors="pt").pixel_values
    with torch.no_grad():
        return model(pixel_values=pixel_values).predicted_depth[:, None]


def assert_close_depth(ours: torch.Tensor, ref: torch.Tensor, label: str) -> None:
    err = (ours - ref).abs().max().item()
    print(f"\n[depth parity] {label}: max abs difference {err:.2e} (depth range {ref.min():.3f}..{ref.max():.3f})")
    assert ours.shape == ref.shape and err < TOL
    assert (ref > 0).float().mean() > 0.5 and ref.std() > 1e-3  # informative, not clipped flat by the ReLU


def midas_checkpoint(model) -> dict[str, torch.Tensor]:
    """The HF weights as an SD 2 depth single file carries them: MiDaS names under depth_model.model.,
    with the timm classifier head and the rest of the checkpoint around them."""
    hf_sd = model.state_dict()
    recipes, unknown = dpt_keys.hf_to_midas(hf_sd)
    assert not unknown
    sd = {f"depth_model.model.{k}": combine(*(hf_sd[s] for s in src)) for k, (src, combine) in recipes.items()}
    hidden = model.config.hidden_size
    sd["depth_model.model.pretrained.model.head.weight"] = torch.randn(1000, hidden)
    sd["depth_model.model.pretrained.model.head.bias"] = torch.zeros(1000)
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(8, 5, 3, 3)
    return sd


def test_config_from_hf_json_matches_the_network(hf_folder):
    folder, _ = hf_folder
    cfg = DPTConfig.from_hf_json(json.loads((folder / "config.json").read_text()))
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.backbone_depths, cfg.backbone_widths) == \
        (128, 4, 2, (1, 1, 2), (128, 256, 512))
    assert DPTConfig() == DPTConfig.from_hf_json(transformers.DPTConfig(
        is_hybrid=True, reassemble_factors=[1, 1, 1, 0.5], neck_hidden_sizes=[256, 512, 768, 768]).to_dict())


def test_predict_matches_transformers(hf_folder):
    folder, model = hf_folder
    est = load_depth_estimator(folder)
    assert est.preprocess.size == (64, 64) and est.preprocess.resample == 2 and est.preprocess.ensure_multiple_of == 32
    pics = pictures(2, 50, 70)  # resized to 64x64 by the processor's rules
    ours = est.predict(pics)
    assert ours.shape == (2, 1, 64, 64)
    assert_close_depth(ours, reference_depth(model, pics), "HF folder, 2 pictures 50x70 -> 64x64")


@pytest.mark.parametrize("side", [96, 80])
def test_other_grids_interpolate_position_embeddings_as_transformers(hf_folder, side):
    """96: a 6x6 grid from the learnt 4x4; 80: a 5x5 grid, where the fusion resizes odd skips."""
    folder, model = hf_folder
    est = load_depth_estimator(folder)
    x = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(side))
    model.dpt.embeddings.image_size = (side, side)  # transformers checks the size, then interpolates anyway
    try:
        with torch.no_grad():
            ref = model(pixel_values=x).predicted_depth[:, None]
    finally:
        model.dpt.embeddings.image_size = (64, 64)
    with torch.no_grad():
        ours = est.net(x)
    assert_close_depth(ours, ref, f"pixel values {side}x{side}")


def test_non_square_input_runs():
    net = DPTDepthModel(DPTConfig.from_hf_json(tiny_hf_config().to_dict())).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, 64, 96))
    assert out.shape == (1, 1, 64, 96) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="multiples of 16"):
        net(torch.randn(1, 3, 64, 72))


def test_checkpoint_layout_matches_transformers(hf_folder):
    _, model = hf_folder
    sd = midas_checkpoint(model)
    assert has_checkpoint_depth_model(sd) and has_checkpoint_depth_model(list(sd))
    assert not has_checkpoint_depth_model(["model.diffusion_model.input_blocks.0.0.weight"])
    est = depth_estimator_from_checkpoint(sd)
    cfg = DPTConfig.from_hf_json(model.config.to_dict())
    assert est.config == DPTConfig(**{**cfg.__dict__, "layer_norm_eps": 1e-6})  # sizes read from the shapes
    assert est.preprocess == DepthPreprocess()  # DPTImageProcessor defaults: 384x384, bicubic, 0.5
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    for m in norms:  # timm's (and so the original network's) LayerNorm epsilon
        m.eps = 1e-6
    try:
        with torch.no_grad():
            ref = model(pixel_values=x).predicted_depth[:, None]
    finally:
        for m in norms:
            m.eps = model.config.layer_norm_eps
    with torch.no_grad():
        ours = est.net(x)
    assert_close_depth(ours, ref, "SD 2 single-file layout, LayerNorm eps 1e-6 on both sides")
    assert depth_estimator_from_checkpoint({"model.diffusion_model.x": torch.zeros(1)}) is None
    back = dpt_keys.midas_to_hf({k[len("depth_model.model."):]: v for k, v in sd.items() if k.startswith("depth_")})
    assert back.keys() == model.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())


def test_key_table_agrees_with_the_transformers_conversion_script():
    """Pairs read off transformers' convert_dpt_hybrid_to_pytorch.py (MiDaS -> HF)."""
    pairs = {
        "pretrained.model.patch_embed.backbone.stem.conv.weight":
            "dpt.embeddings.backbone.bit.embedder.convolution.weight",
        "pretrained.model.patch_embed.backbone.stem.norm.bias": "dpt.embeddings.backbone.bit.embedder.norm.bias",
        "pretrained.model.patch_embed.backbone.stages.2.blocks.8.conv3.weight":
            "dpt.embeddings.backbone.bit.encoder.stages.2.layers.8.conv3.weight",
        "pretrained.model.patch_embed.backbone.stages.1.blocks.0.downsample.norm.weight":
            "dpt.embeddings.backbone.bit.encoder.stages.1.layers.0.downsample.norm.weight",
        "pretrained.model.patch_embed.proj.weight": "dpt.embeddings.projection.weight",
        "pretrained.model.pos_embed": "dpt.embeddings.position_embeddings",
        "pretrained.model.blocks.11.attn.proj.bias": "dpt.encoder.layer.11.attention.output.dense.bias",
        "pretrained.model.blocks.3.mlp.fc2.weight": "dpt.encoder.layer.3.output.dense.weight",
        "pretrained.model.norm.weight": "dpt.layernorm.weight",
        "pretrained.act_postprocess3.0.project.0.bias": "neck.reassemble_stage.readout_projects.2.0.bias",
        "pretrained.act_postprocess4.4.weight": "neck.reassemble_stage.layers.3.resize.weight",
        "scratch.layer1_rn.weight": "neck.convs.0.weight",
        "scratch.refinenet4.resConfUnit1.conv2.bias": "neck.fusion_stage.layers.0.residual_layer1.convolution2.bias",
        "scratch.refinenet1.out_conv.weight": "neck.fusion_stage.layers.3.projection.weight",
        "scratch.output_conv.4.bias": "head.head.4.bias",
    }
    for midas, hf in pairs.items():
        assert dpt_keys.midas_name_to_hf(midas) == hf and dpt_keys.hf_name_to_midas(hf) == midas
    assert dpt_keys.hf_name_to_midas("dpt.encoder.layer.5.attention.attention.key.weight") == \
        "pretrained.model.blocks.5.attn.qkv.weight"


@pytest.mark.parametrize("keep,multiple", [(False, 1), (True, 1), (True, 32), (False, 32)])
@pytest.mark.parametrize("hw", [(50, 70), (300, 200), (384, 384), (123, 457)])
def test_preprocessing_matches_dpt_image_processor(keep, multiple, hw):
    settings = {"size": {"height": 96, "width": 128}, "keep_aspect_ratio": keep, "ensure_multiple_of": multiple,
                "do_pad": True, "size_divisor": 64}
    pics = pictures(1, *hw, seed=hw[0])
    ref = transformers.DPTImageProcessorPil(**settings)(images=to_pil(pics), return_tensors="pt").pixel_values
    pre = DepthPreprocess.from_json(settings)
    ours = pre(pics)
    assert ours.shape == ref.shape and torch.equal(ours, ref)


def test_depth_for_latents_matches_diffusers_prepare_depth_map():
    diffusers = pytest.importorskip("diffusers")
    depth = torch.rand(2, 1, 48, 40, generator=torch.Generator().manual_seed(2)) * 7 + 1
    pipe = types.SimpleNamespace(vae_scale_factor=8)
    image = torch.zeros(2, 3, 96, 72)  # the picture's size decides the latent size: 12 x 9
    prepare = diffusers.StableDiffusionDepth2ImgPipeline.prepare_depth_map
    ref = prepare(pipe, image, depth[:, 0], 2, False, torch.float32, torch.device("cpu"))
    ours = depth_for_latents(depth, (12, 9))
    assert ours.shape == ref.shape == (2, 1, 12, 9)
    assert (ours - ref).abs().max() < 1e-6 and ours.amin() == -1 and ours.amax() == 1
    assert depth_for_latents(torch.ones(1, 1, 8, 8), (4, 4)).eq(-1).all()  # flat maps: no NaN


def test_depth_map_from_picture_and_png_round_trip(tmp_path):
    grid = np.arange(12 * 16, dtype=np.float32).reshape(12, 16)
    png = save_depth_png(torch.from_numpy(grid)[None], tmp_path / "depth.png")
    with Image.open(png) as im:
        assert im.mode == "I;16" and im.size == (16, 12)
    loaded = depth_map_from_picture(png)
    assert loaded.shape == (1, 1, 12, 16) and loaded.min() == 0 and loaded.max() == 65535
    expected = np.round(grid / grid.max() * 65535)
    assert torch.equal(loaded[0, 0], torch.from_numpy(expected))
    grey = Image.fromarray(np.uint8(grid))
    assert torch.equal(depth_map_from_picture(grey)[0, 0], torch.from_numpy(np.uint8(grid).astype(np.float32)))
    assert torch.equal(depth_map_from_picture(grey.convert("RGB")), depth_map_from_picture(grey))
    with pytest.raises(ValueError, match="must be a picture"):
        depth_map_from_picture(np.zeros((4, 4)))
    (tmp_path / "not.png").write_text("hello")
    with pytest.raises(ValueError, match="not a readable depth-map picture"):
        depth_map_from_picture(tmp_path / "not.png")


def test_error_messages(hf_folder, tmp_path):
    folder, model = hf_folder
    with pytest.raises(ValueError, match="not a folder"):
        load_depth_estimator(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no config.json"):
        load_depth_estimator(tmp_path)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(ValueError, match=r"no weights \(model.safetensors or pytorch_model.bin\)"):
        load_depth_estimator(tmp_path)
    sd = model.state_dict()
    sd["neck.convs.0.extra"] = sd.pop("neck.convs.0.weight")
    del sd["dpt.encoder.layer.1.attention.attention.key.bias"]
    torch.save(sd, tmp_path / "pytorch_model.bin")
    missing = "dpt.encoder.layer.1.attention.attention.query/key/value.bias, neck.convs.0.weight"
    with pytest.raises(ValueError, match=f"missing 2 keys: {missing}; unexpected 1 keys: neck.convs.0.extra"):
        load_depth_estimator(tmp_path)
    large = transformers.DPTConfig().to_dict()  # DPT-Large: no hybrid backbone
    (tmp_path / "config.json").write_text(json.dumps(large))
    with pytest.raises(ValueError, match="only DPT-Hybrid"):
        load_depth_estimator(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="not a DPT config: model_type is 'bert'"):
        load_depth_estimator(tmp_path)
    bad = midas_checkpoint(model)
    bad["depth_model.model.scratch.layer2_rn.weight"] = torch.zeros(32, 256, 1, 1)
    with pytest.raises(ValueError, match=r"scratch.layer2_rn.weight \[32, 256, 1, 1\] vs \[32, 256, 3, 3\]"):
        depth_estimator_from_checkpoint(bad)
    with pytest.raises(ValueError, match="RGB pictures"):
        load_depth_estimator(folder).predict(torch.rand(1, 1, 8, 8))
