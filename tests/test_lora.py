"""LoRA / LyCORIS: parity with diffusers' LoRA loader, the published formulas, exact restore, errors.

The LoRA files are written here with random factors (rank 4), naming the layers the way each format
does. Layer names and shapes come from diffusers' own pipeline (its module names are the kohya /
PEFT names); which LDM parameter a diffusers layer is comes from equal random weights in the two
models (diffusers' converter made the folder from the same single file), not from our tables.
Run with -s to see the measured differences.
"""

from __future__ import annotations

import hashlib
import math

import pytest
import torch
from safetensors.torch import save_file

from stablekit.addons.lora import LoraError, LoraPatcher, addnet_hash, infotext_hashes, read_lora
from stablekit.checkpoint import load_model
from stablekit.diffusion.cond import Cond

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft", reason="diffusers reads LoRA files only with peft installed (pip install peft)")

RANK = 4
TOL = 1e-4
U = "model.diffusion_model."


# --- models and references ----------------------------------------------------------------------


def ours(tiny, dtype=torch.float32):
    return load_model(tiny.single_file, dtype=dtype).model


def pipe_for(tiny):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny.diffusers_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def layers(pipe) -> dict[str, dict[str, torch.Size]]:
    """Every Linear / Conv2d weight of diffusers' UNet and text encoder, by module name."""
    out = {"unet": {}, "te": {}}
    for part, net in (("unet", pipe.unet), ("te", pipe.text_encoder)):
        for name, m in net.named_modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                # kohya and PEFT files name CLIP layers under text_model. (transformers 5 dropped it)
                key = name if part == "unet" or name.startswith("text_model.") else "text_model." + name
                out[part][key] = m.weight.shape
    return out


def inputs(tiny):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 77, tiny.config.unet.context_dim, generator=g)
    ids = torch.randint(1, 49406, (2, 77), generator=g)
    ids[:, 0], ids[:, 20:] = 49406, 49407  # BOS, prompt, EOS padding
    return x, torch.tensor([999.0, 37.0]), ctx, ids


@torch.no_grad()
def run_ours(model, x, t, ctx, ids):
    return model.text_encoder(ids), model.unet(x, t, Cond(ctx))


@torch.no_grad()
def run_ref(pipe, x, t, ctx, ids):
    return pipe.text_encoder(ids).last_hidden_state, pipe.unet(x, t, encoder_hidden_states=ctx).sample


def assert_matches_reference(tiny, model, pipe, base, label):
    """Our patched outputs equal diffusers', and the LoRA changed them far beyond the tolerance."""
    args = inputs(tiny)
    for what, o, r, b in zip(("text encoder", "UNet"), run_ours(model, *args), run_ref(pipe, *args), base):
        err, effect = (o - r).abs().max().item(), (o - b).abs().max().item()
        print(f"\n[lora] {label} {what}: max |ours - diffusers| {err:.1e} (LoRA moved it by {effect:.2f})")
        assert err < TOL * max(1.0, r.abs().max().item()), f"{what}: {err}"
        assert effect > 1000 * TOL


# --- writing LoRA files -------------------------------------------------------------------------


def factors(g, shape, rank=RANK):
    """(down, up) as kohya and PEFT store them: a conv's down carries the kernel, its up is 1x1."""
    kernel = tuple(shape[2:])
    down = torch.randn(rank, shape[1], *kernel, generator=g) * 0.1
    up = torch.randn(shape[0], rank, *(1 for _ in kernel), generator=g) * 0.1
    return down, up


def kohya_tensors(lay, seed, alpha=None, dtype=torch.float32, rank=RANK):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for part, prefix in (("unet", "lora_unet_"), ("te", "lora_te_")):
        for name, shape in lay[part].items():
            key = prefix + name.replace(".", "_")
            down, up = factors(g, shape, rank)
            out[f"{key}.lora_down.weight"], out[f"{key}.lora_up.weight"] = down.to(dtype), up.to(dtype)
            if alpha is not None:
                out[f"{key}.alpha"] = torch.tensor(alpha, dtype=dtype)  # 0-d, as kohya writes it
    return out


def peft_tensors(lay, seed):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for part, prefix in (("unet", "unet."), ("te", "text_encoder.")):
        for name, shape in lay[part].items():
            out[f"{prefix}{name}.lora_A.weight"], out[f"{prefix}{name}.lora_B.weight"] = factors(g, shape)
    return out


def write(path, tensors, metadata=None):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def ldm_names(model, pipe) -> dict[str, str]:
    """diffusers UNet module name -> our parameter key, found by equal random weights."""
    ours_by_value = {}
    for k, p in model.named_parameters():
        if k.startswith(U) and k.endswith(".weight") and p.ndim >= 2:
            ours_by_value.setdefault(tuple(p.shape), []).append((k, p))
    out = {}
    for name, m in pipe.unet.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            w = m.weight.detach()
            (hit,) = [k for k, p in ours_by_value.get(tuple(w.shape), []) if torch.equal(p, w)]
            out[name] = hit
    return out


def snapshot(model):
    return {k: p.detach().clone() for k, p in model.named_parameters()}


# --- parity with diffusers ----------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_kohya_file_matches_diffusers(family, tiny_models, tmp_path):
    """kohya names (diffusers blocks), every Linear and Conv2d incl. 3x3 LoCon, fp16, alpha = rank / 2."""
    tiny = tiny_models[family]
    pipe, model = pipe_for(tiny), ours(tiny)
    base = run_ours(model, *inputs(tiny))
    path = write(tmp_path / "k.safetensors", kohya_tensors(layers(pipe), seed=1, alpha=2.0, dtype=torch.float16))
    lora = read_lora(path)
    assert lora.kinds == ["lora"] and {m.scale for m in lora.modules.values()} == {0.5}
    LoraPatcher(model).apply([(lora, 0.6, 0.9)])
    pipe.load_lora_weights(str(tmp_path), weight_name=path.name)
    pipe.fuse_lora(components=["unet"], lora_scale=0.9)
    pipe.fuse_lora(components=["text_encoder"], lora_scale=0.6)
    assert_matches_reference(tiny, model, pipe, base, f"{family} kohya")


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_peft_file_matches_diffusers(family, tiny_models, tmp_path):
    """diffusers / PEFT names (unet.…lora_A.weight, text_encoder.…), no alpha: scale 1."""
    tiny = tiny_models[family]
    pipe, model = pipe_for(tiny), ours(tiny)
    base = run_ours(model, *inputs(tiny))
    path = write(tmp_path / "p.safetensors", peft_tensors(layers(pipe), seed=2))
    LoraPatcher(model).apply([(read_lora(path), 0.8, 0.8)])
    pipe.load_lora_weights(str(tmp_path), weight_name=path.name)
    pipe.fuse_lora(lora_scale=0.8)
    assert_matches_reference(tiny, model, pipe, base, f"{family} PEFT")


def test_file_saved_by_diffusers_with_alpha(tiny_models, tmp_path):
    """A file written by diffusers' own save_lora_weights, lora_alpha = 2 r kept in its metadata."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    tiny = tiny_models["sd1"]
    trainer = pipe_for(tiny)
    torch.manual_seed(0)  # peft initialises lora_A from the global generator
    trainer.unet.add_adapter(LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=["to_q", "to_v", "conv1", "proj_in"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in trainer.unet.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: give it values
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    # transformers 5 adds adapters to CLIP only with peft >= 0.22: the text-encoder layers are made by hand
    te_layers = {k.removeprefix("text_encoder."): v for k, v in peft_tensors(layers(trainer), seed=3).items()
                 if k.startswith("text_encoder.") and ("q_proj" in k or "fc1" in k)}
    te_config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=["q_proj", "fc1"])
    diffusers.StableDiffusionPipeline.save_lora_weights(
        tmp_path, weight_name="saved.safetensors",
        unet_lora_layers=get_peft_model_state_dict(trainer.unet), text_encoder_lora_layers=te_layers,
        unet_lora_adapter_metadata=trainer.unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=te_config.to_dict())
    lora = read_lora(tmp_path / "saved.safetensors")
    assert {m.scale for m in lora.modules.values()} == {2.0}
    model, pipe = ours(tiny), pipe_for(tiny)
    base = run_ours(model, *inputs(tiny))
    LoraPatcher(model).apply([(lora, 0.7, 0.7)])
    pipe.load_lora_weights(str(tmp_path), weight_name="saved.safetensors")
    pipe.fuse_lora(lora_scale=0.7)
    assert_matches_reference(tiny, model, pipe, base, "sd1 saved by diffusers")


def test_lokr_matches_diffusers(tiny_models, tmp_path):
    """PEFT-named LoKr (diffusers reads those): full w1, low-rank w2, on the UNet's attention layers."""
    from peft.tuners.lokr.layer import factorization

    tiny = tiny_models["sd1"]
    pipe, model = pipe_for(tiny), ours(tiny)
    base = run_ours(model, *inputs(tiny))
    g, tensors = torch.Generator().manual_seed(4), {}
    for name, shape in layers(pipe)["unet"].items():
        if "attn" in name and len(shape) == 2:
            (a, c), (b, d) = factorization(shape[0]), factorization(shape[1])
            tensors[f"unet.{name}.lokr_w1"] = torch.randn(a, b, generator=g) * 0.3
            tensors[f"unet.{name}.lokr_w2_a"] = torch.randn(c, 2, generator=g) * 0.3
            tensors[f"unet.{name}.lokr_w2_b"] = torch.randn(2, d, generator=g) * 0.3
    path = write(tmp_path / "lokr.safetensors", tensors)
    LoraPatcher(model).apply([(read_lora(path), 1.0, 0.75)])
    # the pipeline-level loader wants "lora" in every key; the UNet's own loader reads LoKr
    pipe.unet.load_lora_adapter(str(tmp_path), weight_name=path.name, prefix="unet", adapter_name="lokr")
    pipe.fuse_lora(components=["unet"], lora_scale=0.75)
    args = inputs(tiny)
    o, r, b = run_ours(model, *args)[1], run_ref(pipe, *args)[1], base[1]
    err = (o - r).abs().max().item()
    print(f"\n[lora] sd1 LoKr UNet: max |ours - diffusers| {err:.1e} (LoRA moved it by {(o - b).abs().max():.2f})")
    assert err < TOL and (o - b).abs().max() > 1000 * TOL


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_original_layout_names_patch_the_same_weights(family, tiny_models, tmp_path):
    """lora_unet_input_blocks_1_1_… (original names) and lora_unet_down_blocks_0_… are the same file."""
    tiny = tiny_models[family]
    pipe = pipe_for(tiny)
    lay = {"unet": layers(pipe)["unet"], "te": {}}
    names = ldm_names(ours(tiny), pipe)
    by_diffusers = kohya_tensors(lay, seed=5, alpha=1.0)
    by_original = {}
    for key, t in by_diffusers.items():
        module, suffix = key.split(".", 1)
        diff_name = next(n for n in lay["unet"] if "lora_unet_" + n.replace(".", "_") == module)
        original = "lora_unet_" + names[diff_name][len(U):-len(".weight")].replace(".", "_")
        by_original[f"{original}.{suffix}"] = t
    assert any("input_blocks" in k for k in by_original) and any("output_blocks" in k for k in by_original)
    patched = []
    for label, tensors in (("diffusers", by_diffusers), ("original", by_original)):
        model = ours(tiny)
        LoraPatcher(model).apply([(read_lora(write(tmp_path / f"{label}.safetensors", tensors)), 1.0, 1.0)])
        patched.append(snapshot(model))
    base = snapshot(ours(tiny))
    changed = [k for k in base if not torch.equal(base[k], patched[0][k])]
    assert len(changed) == len(lay["unet"])  # every layer of the file, and nothing else
    assert all(torch.equal(patched[0][k], patched[1][k]) for k in base)


# --- LyCORIS against the published formulas -----------------------------------------------------


def cp(t, a, b):
    """CP rebuild written out per kernel position: W[:, :, k, l] = a^T t[:, :, k, l] b."""
    return torch.stack([torch.stack([a.T @ t[:, :, k, l] @ b for l in range(t.shape[3])], -1)
                        for k in range(t.shape[2])], -2)


def kron(w1, w2):
    """Kronecker product written out block by block (w2 may carry a kernel)."""
    rows = [torch.cat([w1[i, j] * w2 for j in range(w1.shape[1])], dim=1) for i in range(w1.shape[0])]
    return torch.cat(rows, dim=0)


Q1 = "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # -> input_blocks.1.1…attn1.to_q
CONV1 = "down_blocks_0_resnets_0_conv1"  # -> input_blocks.1.0.in_layers.2, 3x3
CONV2 = "down_blocks_0_resnets_1_conv2"  # -> input_blocks.2.0.out_layers.3, 3x3
FC1 = "text_model_encoder_layers_0_mlp_fc1"
TARGETS = {f"lora_unet_{Q1}": f"{U}input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
           f"lora_unet_{CONV1}": f"{U}input_blocks.1.0.in_layers.2.weight",
           f"lora_unet_{CONV2}": f"{U}input_blocks.2.0.out_layers.3.weight",
           f"lora_te_{FC1}": "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"}


def check_formulas(tiny, path, expected: dict[str, torch.Tensor], te: float, unet: float, label: str):
    model = ours(tiny)
    base = snapshot(model)
    LoraPatcher(model).apply([(read_lora(path), te, unet)])
    after = dict(model.named_parameters())
    for module, want in expected.items():
        key = TARGETS[module]
        got = after[key].detach() - base[key]
        want = want.reshape(got.shape) * (te if module.startswith("lora_te") else unet)
        err = (got - want).abs().max().item()
        print(f"\n[lora] {label} {module}: max |patch - formula| {err:.1e}")
        assert err < 1e-5 and want.abs().max() > 0.01
    untouched = [k for k in base if k not in {TARGETS[m] for m in expected}]
    assert all(torch.equal(base[k], after[k]) for k in untouched)


def test_loha_formulas(tiny_models, tmp_path):
    """LoHa: dW = (w1a w1b) * (w2a w2b), and with CP cores t1/t2; scale alpha / rank where alpha is stored."""
    g = torch.Generator().manual_seed(6)
    r = lambda *s: torch.randn(*s, generator=g) * 0.3  # noqa: E731
    tensors, expected = {}, {}
    for module, (out, inp), alpha in ((f"lora_unet_{Q1}", (32, 32), 2.0), (f"lora_te_{FC1}", (256, 128), None),
                                      (f"lora_unet_{CONV1}", (32, 32 * 9), 8.0)):
        w1a, w1b, w2a, w2b = r(out, RANK), r(RANK, inp), r(out, RANK), r(RANK, inp)
        tensors.update({f"{module}.hada_w1_a": w1a, f"{module}.hada_w1_b": w1b,
                        f"{module}.hada_w2_a": w2a, f"{module}.hada_w2_b": w2b})
        if alpha is not None:
            tensors[f"{module}.alpha"] = torch.tensor(alpha)
        expected[module] = (w1a @ w1b) * (w2a @ w2b) * (alpha / RANK if alpha else 1.0)
    m = f"lora_unet_{CONV2}"  # CP: a-factors [r, out], b-factors [r, in], cores [r, r, 3, 3]
    t1, w1a, w1b, t2, w2a, w2b = r(RANK, RANK, 3, 3), r(RANK, 32), r(RANK, 32), r(RANK, RANK, 3, 3), r(RANK, 32), r(RANK, 32)
    tensors.update({f"{m}.hada_t1": t1, f"{m}.hada_w1_a": w1a, f"{m}.hada_w1_b": w1b,
                    f"{m}.hada_t2": t2, f"{m}.hada_w2_a": w2a, f"{m}.hada_w2_b": w2b, f"{m}.alpha": torch.tensor(1.0)})
    expected[m] = cp(t1, w1a, w1b) * cp(t2, w2a, w2b) / RANK
    path = write(tmp_path / "loha.safetensors", tensors)
    assert read_lora(path).kinds == ["loha"]
    check_formulas(tiny_models["sd1"], path, expected, te=0.5, unet=1.5, label="LoHa")


def test_lokr_formulas(tiny_models, tmp_path):
    """LoKr: dW = kron(w1, w2) with w1 / w2 full, low-rank, or CP (t2); a full-matrix LoKr ignores alpha."""
    g = torch.Generator().manual_seed(7)
    r = lambda *s: torch.randn(*s, generator=g) * 0.3  # noqa: E731
    m1, m2, m3, m4 = f"lora_unet_{Q1}", f"lora_te_{FC1}", f"lora_unet_{CONV1}", f"lora_unet_{CONV2}"
    w1, w2 = r(4, 4), r(8, 8)  # full both, alpha stored but no rank: scale 1
    w1b_, (w2a, w2b) = r(16, 8), (r(16, 2), r(2, 16))  # fc1 [256, 128]: full w1, low-rank w2, scale 3 / 2
    w1a3, w1b3, w2a3, w2b3 = r(4, 2), r(2, 4), r(8, 2), r(2, 8 * 9)  # 3x3 conv, both low rank, flat w2
    w1c, t2, w2ac, w2bc = r(4, 4), r(2, 2, 3, 3), r(2, 8), r(2, 8)  # 3x3 conv, CP w2, no alpha
    tensors = {f"{m1}.lokr_w1": w1, f"{m1}.lokr_w2": w2, f"{m1}.alpha": torch.tensor(7.0),
               f"{m2}.lokr_w1": w1b_, f"{m2}.lokr_w2_a": w2a, f"{m2}.lokr_w2_b": w2b, f"{m2}.alpha": torch.tensor(3.0),
               f"{m3}.lokr_w1_a": w1a3, f"{m3}.lokr_w1_b": w1b3, f"{m3}.lokr_w2_a": w2a3, f"{m3}.lokr_w2_b": w2b3,
               f"{m4}.lokr_w1": w1c, f"{m4}.lokr_t2": t2, f"{m4}.lokr_w2_a": w2ac, f"{m4}.lokr_w2_b": w2bc}
    expected = {m1: kron(w1, w2), m2: kron(w1b_, w2a @ w2b) * 1.5, m3: kron(w1a3 @ w1b3, w2a3 @ w2b3),
                m4: kron(w1c[:, :, None, None], cp(t2, w2ac, w2bc))}
    path = write(tmp_path / "lokr.safetensors", tensors)
    check_formulas(tiny_models["sd1"], path, expected, te=0.8, unet=1.2, label="LoKr")


def test_locon_cp_formula(tiny_models, tmp_path):
    """LoCon with lora_mid (CP): dW[:, :, k, l] = up mid[:, :, k, l] down, 1x1 up and down."""
    g = torch.Generator().manual_seed(8)
    up, mid, down = torch.randn(32, RANK, 1, 1, generator=g), torch.randn(RANK, RANK, 3, 3, generator=g), \
        torch.randn(RANK, 32, 1, 1, generator=g)
    m = f"lora_unet_{CONV2}"
    path = write(tmp_path / "cp.safetensors", {f"{m}.lora_up.weight": up * 0.2, f"{m}.lora_mid.weight": mid * 0.2,
                                               f"{m}.lora_down.weight": down * 0.2, f"{m}.alpha": torch.tensor(2.0)})
    want = cp(mid * 0.2, up[:, :, 0, 0].T * 0.2, down[:, :, 0, 0] * 0.2) * 2.0 / RANK
    check_formulas(tiny_models["sd1"], path, {m: want}, te=1.0, unet=0.7, label="LoCon CP")


def test_sd2_qkv_updates_its_third_of_in_proj(tiny_models, tmp_path):
    tiny = tiny_models["sd2"]
    c = tiny.config.text.width
    g = torch.Generator().manual_seed(9)
    tensors = {}
    for i, p in enumerate("qkv"):
        key = f"lora_te_text_model_encoder_layers_1_self_attn_{p}_proj"
        tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = factors(g, (c, c))
    path = write(tmp_path / "qkv.safetensors", tensors)
    model = ours(tiny)
    key = "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight"
    before = dict(model.named_parameters())[key].detach().clone()
    LoraPatcher(model).apply([(read_lora(path), 1.0, 1.0)])
    got = dict(model.named_parameters())[key].detach() - before
    for i, p in enumerate("qkv"):  # rows [q; k; v], as OpenCLIP's in_proj stacks them
        k = f"lora_te_text_model_encoder_layers_1_self_attn_{p}_proj"
        want = tensors[f"{k}.lora_up.weight"] @ tensors[f"{k}.lora_down.weight"]
        torch.testing.assert_close(got[i * c:(i + 1) * c], want, atol=1e-6, rtol=1e-5)


def test_inpaint_conv_in_gets_the_delta_on_its_first_4_channels(tiny_models, tmp_path):
    """A 4-channel conv_in delta on the 9-channel inpainting UNet is zero-padded (web UI behaviour)."""
    g = torch.Generator().manual_seed(10)
    down, up = factors(g, (32, 4, 3, 3))
    path = write(tmp_path / "in.safetensors", {"lora_unet_conv_in.lora_down.weight": down,
                                               "lora_unet_conv_in.lora_up.weight": up})
    model = ours(tiny_models["sd1-inpaint"])
    key = f"{U}input_blocks.0.0.weight"
    before = dict(model.named_parameters())[key].detach().clone()
    LoraPatcher(model).apply([(read_lora(path), 1.0, 1.0)])
    got = dict(model.named_parameters())[key].detach() - before
    torch.testing.assert_close(got[:, :4], (up.flatten(1) @ down.flatten(1)).reshape(32, 4, 3, 3), atol=1e-6, rtol=1e-5)
    assert torch.equal(got[:, 4:], torch.zeros_like(got[:, 4:]))


# --- applying and restoring ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd1_layers(tiny_models):
    return layers(pipe_for(tiny_models["sd1"]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_restore_is_bit_identical(dtype, tiny_models, sd1_layers, tmp_path):
    model = ours(tiny_models["sd1"], dtype)
    base = snapshot(model)
    a = read_lora(write(tmp_path / "a.safetensors", kohya_tensors(sd1_layers, seed=11, alpha=1.0, dtype=torch.float16)))
    b = read_lora(write(tmp_path / "b.safetensors", peft_tensors(sd1_layers, seed=12)))
    patcher = LoraPatcher(model)
    patcher.apply([(a, 1.0, 1.0), (b, 0.5, -0.3)])
    changed = sum(not torch.equal(base[k], p) for k, p in model.named_parameters())
    assert changed == len(sd1_layers["unet"]) + len(sd1_layers["te"])
    patcher.apply([(a, 0.2, 0.4)])  # a new set replaces the old one (restore, then add)
    patcher.restore()
    assert all(p.dtype == dtype and torch.equal(base[k], p) for k, p in model.named_parameters())


def test_bf16_weights_are_the_float32_sum_rounded_once(tiny_models, sd1_layers, tmp_path):
    lora = read_lora(write(tmp_path / "a.safetensors", kohya_tensors(sd1_layers, seed=13, alpha=2.0)))
    low = ours(tiny_models["sd1"], torch.bfloat16)
    high = ours(tiny_models["sd1"])
    with torch.no_grad():  # the same base weights in float32 (bf16 -> fp32 is exact)
        for (_, p), (_, q) in zip(high.named_parameters(), low.named_parameters()):
            p.copy_(q.float())
    LoraPatcher(low).apply([(lora, 0.9, 1.1)])
    LoraPatcher(high).apply([(lora, 0.9, 1.1)])
    for (k, p), (_, q) in zip(high.named_parameters(), low.named_parameters()):
        assert torch.equal(p.bfloat16(), q), k


def test_two_loras_add_up(tiny_models, sd1_layers, tmp_path):
    a = read_lora(write(tmp_path / "a.safetensors", kohya_tensors(sd1_layers, seed=14, alpha=2.0)))
    b = read_lora(write(tmp_path / "b.safetensors", peft_tensors(sd1_layers, seed=15)))
    model = ours(tiny_models["sd1"])
    base, patcher, deltas = snapshot(model), LoraPatcher(model), []
    for loras in ([(a, 0.7, 0.4)], [(b, -0.5, 1.3)], [(a, 0.7, 0.4), (b, -0.5, 1.3)]):
        patcher.apply(loras)
        deltas.append({k: p.detach() - base[k] for k, p in model.named_parameters()})
    worst = max((deltas[0][k] + deltas[1][k] - deltas[2][k]).abs().max().item() for k in base)
    print(f"\n[lora] two LoRAs: max |dA + dB - d(A+B)| {worst:.1e}")
    assert worst < 1e-5 and max(d.abs().max().item() for d in deltas[2].values()) > 0.01


def test_same_list_twice_is_a_no_op_and_zero_weight_touches_nothing(tiny_models, sd1_layers, tmp_path):
    lora = read_lora(write(tmp_path / "a.safetensors", kohya_tensors(sd1_layers, seed=16)))
    model = ours(tiny_models["sd1"])
    base = snapshot(model)
    patcher = LoraPatcher(model)
    patcher.apply([(lora, 1.0, 1.0)])
    once = snapshot(model)
    patcher.apply([(lora, 1.0, 1.0)])
    assert all(torch.equal(once[k], p) for k, p in model.named_parameters())
    with patcher:
        patcher.apply([(lora, 0.0, 1.0)])  # text encoder off
        te = [k for k in base if k.startswith("cond_stage_model.")]
        assert all(torch.equal(base[k], dict(model.named_parameters())[k]) for k in te)
    assert all(torch.equal(base[k], p) for k, p in model.named_parameters())


# --- errors -------------------------------------------------------------------------------------


def lora_file(tmp_path, name, shapes: dict[str, tuple[int, ...]]):
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for module, shape in shapes.items():
        tensors[f"{module}.lora_down.weight"], tensors[f"{module}.lora_up.weight"] = factors(g, shape)
    return write(tmp_path / name, tensors)


def test_lora_for_the_other_family_says_so(tiny_models, tmp_path):
    """An SD 2 LoRA (1024-wide text encoder and context) on an SD 1 model."""
    path = lora_file(tmp_path, "sd2.safetensors", {
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (1024, 1024),
        f"lora_unet_{Q1[:-len('attn1_to_q')]}attn2_to_k": (32, 1024)})
    model = ours(tiny_models["sd1"])
    base = snapshot(model)
    with pytest.raises(ValueError, match=r"1024 wide \(SD 2.x\).*another model family") as e:
        LoraPatcher(model).apply([(read_lora(path), 1.0, 1.0)])
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in str(e.value)
    assert all(torch.equal(base[k], p) for k, p in model.named_parameters())


def test_unknown_modules_are_named_and_nothing_is_patched(tiny_models, sd1_layers, tmp_path):
    good = read_lora(write(tmp_path / "good.safetensors", kohya_tensors(sd1_layers, seed=17)))
    bad = read_lora(lora_file(tmp_path, "bad.safetensors", {
        "lora_unet_down_blocks_9_attentions_0_proj_in": (32, 32), "lora_unet_foo_bar": (32, 32),
        f"lora_unet_{Q1}": (32, 32)}))
    model = ours(tiny_models["sd1"])
    base = snapshot(model)
    with pytest.raises(LoraError, match="2 modules match nothing") as e:
        LoraPatcher(model).apply([(good, 1.0, 1.0), (bad, 1.0, 1.0)])
    assert "lora_unet_down_blocks_9_attentions_0_proj_in" in str(e.value) and "lora_unet_foo_bar" in str(e.value)
    assert all(torch.equal(base[k], p) for k, p in model.named_parameters())


def test_sdxl_lora_is_named_as_such(tiny_models, tmp_path):
    path = lora_file(tmp_path, "xl.safetensors", {"lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (1280, 1280)})
    with pytest.raises(LoraError, match="SDXL"):
        LoraPatcher(ours(tiny_models["sd1"])).check(read_lora(path))


def test_unreadable_files(tiny_models, tmp_path):
    full = lora_file(tmp_path, "full.safetensors", {f"lora_unet_{Q1}": (32, 32)})
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(full.read_bytes()[:-100])
    with pytest.raises(LoraError, match="truncated"):
        read_lora(cut)
    with pytest.raises(LoraError, match="not a LoRA or LyCORIS file.*full model checkpoint"):
        read_lora(tiny_models["sd1"].single_file)
    (tmp_path / "text.safetensors").write_text("hello")
    with pytest.raises(LoraError, match="cannot read LoRA file"):
        read_lora(tmp_path / "text.safetensors")
    with pytest.raises(LoraError, match="not found"):
        read_lora(tmp_path / "missing.safetensors")
    half = write(tmp_path / "half.safetensors", {f"lora_unet_{Q1}.lora_up.weight": torch.zeros(32, 4)})
    with pytest.raises(LoraError, match=f"incomplete modules: lora_unet_{Q1} \\(no down\\)"):
        read_lora(half)
    odd = write(tmp_path / "odd.safetensors", {f"lora_unet_{Q1}.lora_up.weight": torch.zeros(32, 4),
                                               f"lora_unet_{Q1}.lora_down.weight": torch.zeros(4, 32),
                                               f"lora_unet_{Q1}.dora_scale": torch.zeros(1, 32)})
    with pytest.raises(LoraError, match="DoRA"):
        read_lora(odd)


def test_pt_file_reads_weights_only(tiny_models, tmp_path):
    g = torch.Generator().manual_seed(18)
    down, up = factors(g, (32, 32))
    torch.save({f"lora_unet_{Q1}.lora_down.weight": down, f"lora_unet_{Q1}.lora_up.weight": up}, tmp_path / "a.pt")
    lora = read_lora(tmp_path / "a.pt")
    assert torch.equal(lora.modules[f"lora_unet_{Q1}"].delta(), up @ down)
    torch.save({"x": torch.zeros(1), "code": print}, tmp_path / "evil.pt")  # a pickle that names a callable
    with pytest.raises(LoraError, match="refused"):
        read_lora(tmp_path / "evil.pt")


# --- hashes -------------------------------------------------------------------------------------


def test_hashes_are_the_web_uis(tmp_path):
    g = torch.Generator().manual_seed(19)
    down, up = factors(g, (32, 32))
    tensors = {f"lora_unet_{Q1}.lora_down.weight": down, f"lora_unet_{Q1}.lora_up.weight": up}
    a = write(tmp_path / "a.safetensors", tensors, {"ss_output_name": "styleA"})
    b = write(tmp_path / "b.safetensors", tensors, {"ss_output_name": "another name, longer"})
    raw = a.read_bytes()
    after_header = hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little"):]).hexdigest()
    assert addnet_hash(a) == after_header == addnet_hash(b)  # metadata is not hashed
    lora = read_lora(a)
    assert lora.short_hash == after_header[:12] and lora.alias == "styleA" and lora.name == "a"
    stored = write(tmp_path / "c.safetensors", tensors, {"sshs_model_hash": "ABCDEF0123456789" * 4})
    assert read_lora(stored).short_hash == "abcdef012345"
    junk = write(tmp_path / "d.safetensors", tensors, {"sshs_model_hash": "<img src=x>"})
    assert read_lora(junk).short_hash == after_header[:12]
    torch.save(tensors, tmp_path / "e.pt")
    assert read_lora(tmp_path / "e.pt").short_hash == hashlib.sha256((tmp_path / "e.pt").read_bytes()).hexdigest()[:12]
    assert infotext_hashes([("styleA", lora), ("x:y,z", lora)]) == \
        f"styleA: {after_header[:12]}, xyz: {after_header[:12]}"
    assert math.isclose(lora.modules[f"lora_unet_{Q1}"].scale, 1.0)
