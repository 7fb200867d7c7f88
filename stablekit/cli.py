"""Command line: a thin adapter from arguments to GenerationParams and the Engine."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from . import __version__
from .detect import CheckpointError
from .images import RESIZE_MODES
from .masks import MASKED_CONTENT
from .params import INPAINT_METHODS, GenerationParams

DEFAULTS = GenerationParams()


def _add_prediction_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prediction", choices=["eps", "v"], help="override the prediction type (weights cannot tell)")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    _add_prediction_arg(p)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="weights and compute dtype")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--zero-terminal-snr", action="store_true", default=None,
                   help="the model was trained with zero-terminal-SNR betas (Lin et al. 2023)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: one per core)")
    p.add_argument("--vae-tiling", action="store_true",
                   help="decode and encode in overlapping tiles: large pictures in bounded memory")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet (the first step is slow while it compiles)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stablekit", description="Stable Diffusion 1.x / 2.x on your own machine.")
    parser.add_argument("--version", action="version", version=f"stablekit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("txt2img", help="generate pictures from a prompt")
    _add_generation_args(t, follows_picture=False)
    i2i = sub.add_parser("img2img", help="generate pictures from a picture and a prompt")
    i2i.add_argument("--image", "-i", required=True, type=Path, help="the starting picture")
    i2i.add_argument("--strength", "--denoising-strength", dest="strength", type=float,
                     default=DEFAULTS.denoising_strength, help="0 keeps the picture, 1 repaints it entirely")
    i2i.add_argument("--resize-mode", default=DEFAULTS.resize_mode, choices=RESIZE_MODES,
                     help="how a picture of another size is fitted to --width/--height")
    _add_generation_args(i2i, follows_picture=True)
    inp = sub.add_parser("inpaint", help="repaint the white (or transparent) part of a mask")
    inp.add_argument("--image", "-i", required=True, type=Path, help="the picture to edit")
    inp.add_argument("--mask", required=True, type=Path, help="white repaints, black keeps; or an RGBA picture's alpha")
    inp.add_argument("--invert-mask", action="store_true", help="repaint the black part instead")
    inp.add_argument("--resize-mask", action="store_true", help="resize a mask of another size instead of refusing it")
    inp.add_argument("--mask-blur", type=float, default=DEFAULTS.mask_blur, help="soft edge, Gaussian sigma in pixels")
    inp.add_argument("--strength", "--denoising-strength", dest="strength", type=float, default=1.0,
                     help="1 repaints the masked region from noise; lower keeps more of it")
    inp.add_argument("--method", default=DEFAULTS.inpaint_method, choices=INPAINT_METHODS,
                     help="blend (any model), model (9-channel inpainting checkpoints), auto")
    inp.add_argument("--masked-content", default=DEFAULTS.masked_content, choices=MASKED_CONTENT)
    inp.add_argument("--mask-strength", type=float, default=DEFAULTS.mask_strength,
                     help="inpainting models: how much of the masked picture is hidden from the model")
    inp.add_argument("--no-paste-back", dest="paste_back", action="store_false",
                     help="keep the generated pixels outside the mask too")
    inp.add_argument("--resize-mode", default=DEFAULTS.resize_mode, choices=RESIZE_MODES)
    inp.add_argument("--inpaint-area", default=DEFAULTS.inpaint_area, choices=("whole", "masked"),
                     help="masked: generate a box around the mask at full --width x --height and put it back")
    inp.add_argument("--padding", type=int, default=DEFAULTS.inpaint_padding, help="pixels around the mask's box")
    inp.add_argument("--soft", action="store_true", help="use the greyscale mask as per-pixel denoising strength")
    _add_generation_args(inp, follows_picture=True)

    out = sub.add_parser("outpaint", help="extend the canvas and paint the new area")
    out.add_argument("--image", "-i", required=True, type=Path)
    for side in ("left", "right", "top", "bottom"):
        out.add_argument(f"--{side}", type=int, default=0, help=f"pixels to add on the {side}")
    out.add_argument("--fill", default="edges", choices=("edges", "noise"), help="what the new area starts as")
    out.add_argument("--strength", "--denoising-strength", dest="strength", type=float, default=1.0)
    out.add_argument("--mask-blur", type=float, default=DEFAULTS.mask_blur)
    out.add_argument("--masked-content", default="original", choices=MASKED_CONTENT)
    _add_generation_args(out, follows_picture=True)

    sub.add_parser("samplers", help="list samplers, their aliases and the schedules they accept")

    i = sub.add_parser("info", help="show what a checkpoint is")
    i.add_argument("model", help="checkpoint file, diffusers folder or hub repo id")
    _add_prediction_arg(i)

    from .server.serve import add_serve_parser  # argparse only; FastAPI is imported when serving
    add_serve_parser(sub)
    from .train.command import add_train_parser  # argparse only; training code is imported when training
    add_train_parser(sub)
    return parser


def _add_generation_args(t: argparse.ArgumentParser, follows_picture: bool) -> None:
    t.add_argument("--model", "-m", default=None,
                   help="checkpoint file, diffusers folder or hub repo id (default: the built-in shapes demo model)")
    t.add_argument("--prompt", "-p", required=True)
    t.add_argument("--negative-prompt", "-n", default=DEFAULTS.negative_prompt)
    t.add_argument("--steps", type=int, default=DEFAULTS.steps)
    t.add_argument("--cfg-scale", type=float, default=DEFAULTS.cfg_scale)
    t.add_argument("--sampler", default=DEFAULTS.sampler, help='e.g. "DPM++ 2M", "Euler a", ddim (see: stablekit samplers)')
    t.add_argument("--scheduler", default=DEFAULTS.scheduler, help="automatic, karras, ... (see: stablekit samplers)")
    t.add_argument("--seed", type=int, default=DEFAULTS.seed, help="-1 = random; image i uses seed + i")
    follow = (" (default: the picture's, rounded to a multiple of 8)" if follows_picture
              else " (default: the model's resolution, 512 for SD 1.x, 64 for the demo model)")
    t.add_argument("--width", type=int, default=None, help="multiple of 8" + follow)
    t.add_argument("--height", type=int, default=None, help="multiple of 8" + follow)
    t.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    t.add_argument("--clip-skip", type=int, default=DEFAULTS.clip_skip)
    t.add_argument("--eta", type=float, default=None, help="noise of ancestral samplers and DDIM")
    t.add_argument("--s-noise", type=float, default=DEFAULTS.s_noise, help="noise multiplier of ancestral/SDE samplers")
    t.add_argument("--guidance-rescale", type=float, default=DEFAULTS.guidance_rescale,
                   help="CFG rescale phi (Lin et al. 2023), 0..1; 0.7 suits zero-terminal-SNR v-models")
    t.add_argument("--out", default="outputs", help="output folder (files are never overwritten)")
    _add_model_args(t)


def _params(args: argparse.Namespace, **task_fields) -> GenerationParams:
    """Arguments -> validated params, checked before any time is spent on loading."""
    return GenerationParams(
        prompt=args.prompt, negative_prompt=args.negative_prompt, steps=args.steps, cfg_scale=args.cfg_scale,
        sampler=args.sampler, scheduler=args.scheduler, seed=args.seed, width=args.width, height=args.height,
        batch_size=args.batch_size, clip_skip=args.clip_skip, eta=args.eta, s_noise=args.s_noise,
        guidance_rescale=args.guidance_rescale, **task_fields,
    ).validated()


def _generate(args: argparse.Namespace, params: GenerationParams, run) -> int:
    """Load the model, run `run(engine, params, callback)` with a progress bar, save and print the paths."""
    from tqdm import tqdm

    from .engine import load, set_threads
    from .images import save_png

    t0 = time.perf_counter()
    if args.model is None:
        from .demo import demo_model

        args.model = demo_model()
    set_threads(args.threads)
    engine = load(args.model, dtype=args.dtype, device=args.device, prediction=args.prediction,
                  zero_terminal_snr=args.zero_terminal_snr, vae_tiling=args.vae_tiling, compile=args.compile)
    for note in engine.loaded.notes:
        print(f"stablekit: {note}", file=sys.stderr)
    print(f"stablekit: loaded {engine.config.name} in {time.perf_counter() - t0:.1f}s "
          f"({engine.device.type}, {args.dtype})", file=sys.stderr)
    with tqdm(unit="step", file=sys.stderr, desc="sampling") as bar:
        images = run(engine, params, lambda i, n, x0: (setattr(bar, "total", n), bar.update(1)))
    for k, image in enumerate(images):
        print(save_png(image, Path(args.out), params.seed + k), flush=True)
    print(f"stablekit: done in {time.perf_counter() - t0:.1f}s; peak memory {peak_memory(engine.device)}", file=sys.stderr)
    return 0


def peak_memory(device) -> str:
    """Peak resident memory of this process (and of the GPU, when one is used), for the user."""
    import torch

    from .engine import peak_rss_bytes

    text = f"{peak_rss_bytes() / 2**30:.2f} GiB resident"
    if device.type == "cuda":
        text += f", {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB on the GPU"
    return text


def _txt2img(args: argparse.Namespace) -> int:
    params = _params(args)
    return _generate(args, params, lambda engine, p, cb: engine.txt2img(p, callback=cb))


def _picture_size(args: argparse.Namespace, image) -> None:
    """--width/--height default to the picture's size, rounded down to multiples of 8."""
    width, height = args.width, args.height
    if width is None or height is None:  # follow the picture, rounded down to multiples of 8
        width = width or max(8, image.width // 8 * 8)
        height = height or max(8, image.height // 8 * 8)
        if (width, height) != image.size:
            print(f"stablekit: note: working at {width}x{height} (the picture is {image.width}x{image.height})",
                  file=sys.stderr)
    args.width, args.height = width, height


def _img2img(args: argparse.Namespace) -> int:
    from .images import load_picture

    image = load_picture(args.image)
    _picture_size(args, image)
    params = _params(args, denoising_strength=args.strength, resize_mode=args.resize_mode)
    return _generate(args, params, lambda engine, p, cb: engine.img2img(image, p, callback=cb))


def _inpaint(args: argparse.Namespace) -> int:
    from .images import load_picture

    image = load_picture(args.image)
    try:
        from PIL import Image

        with Image.open(args.mask) as m:
            mask = m.copy()
    except (OSError, ValueError) as e:
        raise ValueError(f"{args.mask}: not a readable picture ({e})") from None
    _picture_size(args, image)
    params = _params(
        args, denoising_strength=args.strength, resize_mode=args.resize_mode, mask_blur=args.mask_blur,
        invert_mask=args.invert_mask, inpaint_method=args.method, masked_content=args.masked_content,
        mask_strength=args.mask_strength, paste_back=args.paste_back, inpaint_area=args.inpaint_area,
        inpaint_padding=args.padding, soft_inpainting=args.soft,
    )
    return _generate(args, params, lambda engine, p, cb: engine.inpaint(image, mask, p, callback=cb,
                                                                         resize_mask=args.resize_mask))


def _outpaint(args: argparse.Namespace) -> int:
    from .images import load_picture
    from .pipeline.editing import outpaint_canvas

    image = load_picture(args.image)
    canvas, mask = outpaint_canvas(image, args.left, args.right, args.top, args.bottom, args.fill)
    print(f"stablekit: note: canvas {canvas.width}x{canvas.height}", file=sys.stderr)
    args.width, args.height = args.width or canvas.width, args.height or canvas.height
    params = _params(args, denoising_strength=args.strength, mask_blur=args.mask_blur,
                     masked_content=args.masked_content)
    return _generate(args, params, lambda engine, p, cb: engine.inpaint(canvas, mask, p, callback=cb))


def _info(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import shapes_of, open_checkpoint
    from .models import StableDiffusionModel

    ckpt = open_checkpoint(args.model, prediction=args.prediction)
    cfg = ckpt.config
    with torch.device("meta"):
        model = StableDiffusionModel(cfg)

    def count(m: torch.nn.Module) -> str:
        return f"{sum(p.numel() for p in m.parameters()) / 1e6:,.1f}M"

    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in shapes_of(ckpt.tensors).values()})
    rows = [
        ("model", ckpt.name),
        ("family", cfg.family),
        ("variant", cfg.variant),
        ("prediction", cfg.prediction),
        ("stored dtype", ", ".join(dtypes)),
        ("text encoder", f"{cfg.text.layout}, {cfg.text.layers} layers, width {cfg.text.width}: {count(model.text_encoder)}"),
        ("unet", f"{cfg.unet.in_channels} input channels, context {cfg.unet.context_dim}: {count(model.unet)}"),
        ("vae", f"{cfg.vae.z_channels}-channel latent, scale {cfg.vae.scale_factor:g}: {count(model.vae)}"),
        ("resolution", f"{cfg.resolution}x{cfg.resolution} (the default picture size)"),
    ]
    for key, value in rows:
        print(f"{key:14} {value}")
    for note in ckpt.notes:
        print(f"{'note':14} {note}")
    return 0


def _samplers(args: argparse.Namespace) -> int:
    from .diffusion.samplers import SAMPLERS
    from .diffusion.schedule import SCHEDULE_LABELS

    every = [k for k in SCHEDULE_LABELS if k != "automatic"]
    print(f"{'sampler':14} {'aliases':40} {'automatic':12} {'options':16} schedules")
    for spec in SAMPLERS:
        options = ", ".join(spec.options) or "-"
        schedules = "all" if spec.schedules is None else ", ".join(spec.schedules)
        print(f"{spec.name:14} {', '.join(spec.aliases):40} {spec.default_schedule:12} {options:16} {schedules}")
    print(f"\nschedules (--scheduler): automatic, {', '.join(every)}")
    print('names with a schedule in them also work, as in the web UI: "DPM++ 2M Karras"')
    return 0


def _train(args: argparse.Namespace) -> int:
    from .train.command import run

    return run(args)


def _serve(args: argparse.Namespace) -> int:
    from .server.serve import run

    return run(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        commands = {"txt2img": _txt2img, "img2img": _img2img, "inpaint": _inpaint, "outpaint": _outpaint,
                    "info": _info, "samplers": _samplers, "serve": _serve,
                    "train": _train}
        return commands[args.command](args)
    except (CheckpointError, ValueError, OSError) as e:  # bad input, unreadable or unwritable files
        print(f"stablekit: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # e.g. out of memory; the first line says what torch ran into
        if os.environ.get("STABLEKIT_DEBUG"):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f"stablekit: error: {first} (set STABLEKIT_DEBUG=1 for the full traceback)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stablekit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
