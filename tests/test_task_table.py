"""The task table and the field declarations: every field reachable from the CLI and over HTTP under
the web UI's name where it has one, and a new task is one table entry plus its function."""

from __future__ import annotations

import argparse
from dataclasses import fields

import pytest
import torch

import stablekit
from stablekit.cli import build_parser, main
from stablekit.params import GenerationParams, settings
from stablekit.pipeline.editing import fitted_canvas
from stablekit.pipeline.steps import encode_picture
from stablekit.task_table import IMAGE, TASKS, Task
from stablekit.server.api_models import Img2ImgRequest
from stablekit.server.config import Limits
from stablekit.server.webui import REQUESTS, to_work

from .test_img2img import make_picture
from .test_inpaint import make_mask
from .test_server_api import IMG2IMG_DEFAULTS, TXT2IMG_DEFAULTS

# The web UI's own names: its API request fields (StableDiffusionProcessing* and the API models) and the
# settings clients put in override_settings (the web UI's option names).
WEBUI_REQUEST_FIELDS = set(TXT2IMG_DEFAULTS) | set(IMG2IMG_DEFAULTS) | {"s_noise", "s_churn", "s_tmin", "s_tmax"}
WEBUI_OPTIONS = {"CLIP_stop_at_last_layers", "inpainting_mask_weight", "sd_model_checkpoint", "sd_vae", "emphasis"}
# Fields kept off HTTP on purpose: they name files on the server's disk (over HTTP, <lora:NAME> tags are used).
LOCAL_ONLY = {"loras"}


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_field_is_read_by_some_task():
    read = {name for task in TASKS.values() for name in task.fields}
    assert {f.name for f in fields(GenerationParams)} <= read


@pytest.mark.parametrize("task", list(TASKS))
def test_every_field_and_input_of_a_task_has_a_cli_flag(task):
    parser = _subcommands()[task]
    dests = {a.dest for a in parser._actions}
    t = TASKS[task]
    assert set(t.fields) <= dests, set(t.fields) - dests
    assert {i.name for i in t.inputs} <= dests


@pytest.mark.parametrize("task", list(REQUESTS))
def test_every_field_of_an_http_task_sits_under_the_web_uis_name(task):
    model = REQUESTS[task]
    for name in TASKS[task].fields:
        api = settings()[name].api
        if api is None:
            assert name in LOCAL_ONLY, f"{name} is not reachable over HTTP"
            continue
        if api.where == "override":
            assert api.key in WEBUI_OPTIONS, f"{name}: override_settings key {api.key!r} is not the web UI's"
            continue
        assert api.key in model.model_fields, f"{name}: the request model has no field {api.key!r}"
        if api.own:  # stablekit's own field: it must not shadow one of the web UI's
            assert api.key not in WEBUI_REQUEST_FIELDS, f"{name}: {api.key!r} is the web UI's name"
        else:
            assert api.key in WEBUI_REQUEST_FIELDS, f"{name}: {api.key!r} is not a web UI request field"


def test_fields_the_web_ui_lacks_are_reachable_over_http(tiny_models):
    picture = "data:image/png;base64," + _b64(make_picture())
    mask = _b64(make_mask())
    req = Img2ImgRequest.model_validate({
        "init_images": [picture], "mask": mask, "width": 64, "height": 64, "guidance_rescale": 0.5,
        "soft_inpainting": True, "paste_back": False, "inpainting_method": "blend", "inpainting_fill": 2,
        "inpaint_full_res": False, "override_settings": {"inpainting_mask_weight": 0.25, "CLIP_stop_at_last_layers": 2},
    })
    work = to_work("img2img", req, Limits(), allow_urls=False)
    p = work.params
    assert work.task == "inpaint" and set(work.inputs) == {"image", "mask", "resize_mask"}
    assert (p.guidance_rescale, p.soft_inpainting, p.paste_back, p.inpaint_method) == (0.5, True, False, "blend")
    assert (p.mask_strength, p.clip_skip, p.masked_content, p.inpaint_area) == (0.25, 2, "latent-noise", "whole")


def test_cli_flags_reach_the_params():
    args = build_parser().parse_args(["inpaint", "--image", "a.png", "--mask", "m.png", "--prompt", "p",
                                      "--guidance-rescale", "0.3", "--soft", "--no-paste-back", "--method", "blend",
                                      "--mask-strength", "0.5", "--padding", "8", "--inpaint-area", "masked"])
    p = GenerationParams(**{k: getattr(args, k) for k in TASKS["inpaint"].fields})
    assert (p.guidance_rescale, p.soft_inpainting, p.paste_back, p.inpaint_method) == (0.3, True, False, "blend")
    assert (p.mask_strength, p.inpaint_padding, p.inpaint_area, p.denoising_strength) == (0.5, 8, "masked", 1.0)


def _reconstruct(ctx, p, canvas, noise=None, callback=None) -> torch.Tensor:
    return encode_picture(ctx.model, canvas.picture.expand(p.batch_size, -1, -1, -1))  # no sampling at all


def test_a_new_task_is_one_table_entry(tiny_models, tmp_path, monkeypatch, capsys):
    """A VAE round trip registered as a task: the Engine and the CLI pick it up from the table."""
    task = Task("reconstruct", "encode and decode a picture", ("prompt", "seed", "width", "height", "batch_size"),
                lambda ctx, p, inputs: fitted_canvas(inputs["image"], p, ctx.device), _reconstruct, inputs=(IMAGE,))
    monkeypatch.setitem(TASKS, "reconstruct", task)
    engine = stablekit.load(tiny_models["sd1"].single_file)
    out = engine.run("reconstruct", image=make_picture(), seed=1, width=96, height=64)
    assert out[0].size == (96, 64) and "Seed: 1" in out[0].info["parameters"]
    make_picture().save(tmp_path / "in.png")
    assert main(["reconstruct", "--model", str(tiny_models["sd1"].single_file), "--image", str(tmp_path / "in.png"),
                 "--prompt", "", "--seed", "2", "--width", "96", "--height", "64", "--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.strip().endswith(".png")


def test_unknown_task_inputs_and_names_are_clear_errors(tiny_models):
    engine = stablekit.load(tiny_models["sd1"].single_file)
    with pytest.raises(ValueError, match="unknown task 'sharpen'"):
        engine.run("sharpen")
    with pytest.raises(ValueError, match="txt2img takes no image"):
        engine.run("txt2img", image=make_picture())
    with pytest.raises(ValueError, match="img2img needs image"):
        engine.run("img2img")


def _b64(image) -> str:
    import base64
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()
