"""Command line: a thin adapter from arguments to GenerationParams and the Engine."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from . import __version__
from .detect import CheckpointError
from .params import GenerationParams, settings
from .task_table import TASKS, Task
from .threads import CpuSample

DEFAULTS = GenerationParams()


def _add_prediction_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prediction", choices=["eps", "v"], help="override the prediction type (weights cannot tell)")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    _add_prediction_arg(p)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="weights and compute dtype")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--zero-terminal-snr", action="store_true", default=None,
                   help="the model was trained with zero-terminal-SNR betas (Lin et al. 2023)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: the cores other programs leave free, measured at start)")
    p.add_argument("--vae-tiling", action="store_true",
                   help="decode and encode in overlapping tiles: large pictures in bounded memory")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet (the first step is slow while it compiles)")
    p.add_argument("--vae", type=Path, default=None,
                   help="a VAE file (original layout) or diffusers AutoencoderKL folder replacing the model's")
    p.add_argument("--lora-dir", type=Path, default=None, help="where <lora:NAME:WEIGHT> tags of the prompt are found")
    p.add_argument("--embeddings-dir", type=Path, default=None,
                   help="textual-inversion embeddings; each file's name is its trigger word")
    p.add_argument("--upscaler-model", default=None,
                   help="an SD x4 upscaler checkpoint, for --hires-upscaler x4")
    p.add_argument("--controlnet-dir", type=Path, default=None, help="where --control names are found")


CONTROL_MODES = ("balanced", "prompt", "control")  # pipeline.control.CONTROL_MODES, without importing torch
CONTROL_RESIZE = ("just-resize", "crop", "fill")


def control_arg(text: str) -> tuple[str, str, float]:
    """MODEL:IMAGE[:WEIGHT] -> (model, image, weight); the weight defaults to 1."""
    rest, sep, weight = text.rpartition(":")
    if sep and weight.replace(".", "", 1).isdigit():
        text, value = rest, float(weight)
    else:
        value = 1.0
    model, sep, image = text.rpartition(":")
    if not sep or not model or not image:
        raise ValueError(f"--control is MODEL:IMAGE[:WEIGHT] (a ControlNet file or name, its picture), got {text!r}")
    return model, image, value


def _add_control_args(t: argparse.ArgumentParser) -> None:
    t.add_argument("--control", dest="controls", type=_argument_type(control_arg), action="append", default=[],
                   metavar="MODEL:IMAGE[:WEIGHT]",
                   help="a ControlNet (file, folder or name in --controlnet-dir) and its picture; repeat for several "
                        "(their effects add up)")
    t.add_argument("--control-module", default="none",
                   help="preprocessor of the control pictures: none (the picture is the map), canny, depth_midas, "
                        "lineart_standard, invert, scribble_xdog, blur_gaussian (see: stablekit preprocess --help)")
    t.add_argument("--control-start", type=float, default=0.0, help="fraction of the steps before the ControlNets act")
    t.add_argument("--control-end", type=float, default=1.0, help="fraction of the steps after which they stop")
    t.add_argument("--control-mode", default="balanced", choices=CONTROL_MODES,
                   help='prompt: "My prompt is more important"; control: "ControlNet is more important"')
    t.add_argument("--control-resize", default="crop", choices=CONTROL_RESIZE,
                   help="how control maps of another size are fitted (crop: cover and centre-crop)")
    t.add_argument("--control-guess-mode", action="store_true",
                   help="diffusers' guess mode: the negative prompt's half gets no control, log-spaced block scales")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stablekit", description="Stable Diffusion 1.x / 2.x on your own machine.")
    parser.add_argument("--version", action="version", version=f"stablekit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    for task in TASKS.values():  # one subcommand per task, its flags derived from the declarations
        t = sub.add_parser(task.name, help=task.help)
        t.set_defaults(task=task.name)
        _add_task_args(t, task)

    sub.add_parser("samplers", help="list samplers, their aliases and the schedules they accept")

    d = sub.add_parser("depth", help="estimate a picture's depth map (16-bit PNG, larger = nearer) for depth2img")
    d.add_argument("--image", "-i", type=Path, required=True, help="the picture")
    d.add_argument("--model", "-m", default=None, help="an SD 2 depth checkpoint that carries its estimator")
    d.add_argument("--depth-model", default=None, help="a DPT folder (Intel/dpt-hybrid-midas layout)")
    d.add_argument("--out", default="outputs", help="output folder (files are never overwritten)")
    d.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")

    pre = sub.add_parser("preprocess", help="write a ControlNet control map (canny edges, depth, ...) of a picture")
    pre.add_argument("module", help="none, canny, depth_midas, lineart_standard, invert, scribble_xdog, blur_gaussian")
    pre.add_argument("image", type=Path, help="the picture")
    pre.add_argument("--res", type=int, default=-1, help="processor resolution (default: the module's, 512)")
    pre.add_argument("--threshold-a", type=float, default=-1, help="first threshold (canny low: 100)")
    pre.add_argument("--threshold-b", type=float, default=-1, help="second threshold (canny high: 200)")
    pre.add_argument("--model", "-m", default=None, help="depth_midas: an SD 2 depth checkpoint carrying its estimator")
    pre.add_argument("--depth-model", default=None, help="depth_midas: a DPT folder (Intel/dpt-hybrid-midas layout)")
    pre.add_argument("--out", default="outputs", help="output folder (files are never overwritten)")

    i = sub.add_parser("info", help="show what a checkpoint is")
    i.add_argument("model", help="checkpoint file, diffusers folder or hub repo id")
    _add_prediction_arg(i)

    from .server.serve import add_serve_parser  # argparse only; FastAPI is imported when serving
    add_serve_parser(sub)
    from .train.command import add_train_parser  # argparse only; training code is imported when training
    add_train_parser(sub)
    return parser


_SIZE_HELP = {True: " (default: the picture's, rounded down to a multiple of 8)",
              False: " (default: the model's resolution, 512 for SD 1.x, 64 for the demo model)"}


def _add_task_args(t: argparse.ArgumentParser, task: Task) -> None:
    """The task's inputs, then its GenerationParams fields (help, flags and choices as declared)."""
    for i in task.inputs:
        flags = i.flags or (f"--{i.name.replace('_', '-')}",)
        if i.kind == "flag":
            t.add_argument(*flags, dest=i.name, action="store_true", help=i.help)
        else:
            kind = {"picture": Path, "mask": Path, "depthmap": Path, "int": int}.get(i.kind, str)
            t.add_argument(*flags, dest=i.name, type=kind, default=i.default, required=i.required,
                           choices=i.choices, help=i.help)
    t.add_argument("--model", "-m", default=None,
                   help="checkpoint file, diffusers folder or hub repo id (default: the built-in shapes demo model)")
    declared = settings()
    for name in task.fields:
        s = declared[name]
        default = task.defaults.get(name, getattr(DEFAULTS, name))
        flags = s.flags or (f"--{name.replace('_', '-')}",)
        help = s.help + (_SIZE_HELP[task.size_fn is not None] if name in ("width", "height") else "")
        if isinstance(default, bool):  # a switch: --x turns a False default on, --no-x a True one off
            t.add_argument(*flags, dest=name, action="store_false" if default else "store_true", help=help)
        elif s.repeat:
            t.add_argument(*flags, dest=name, type=_argument_type(s.parse), action="append", default=[],
                           metavar=s.metavar, help=help)
        else:
            kind = _argument_type(s.parse) if s.parse else s.type or type(default)
            t.add_argument(*flags, dest=name, type=kind, default=default, choices=s.choices, metavar=s.metavar,
                           required=name == "prompt", help=help)
    _add_control_args(t)
    t.add_argument("--out", default="outputs", help="output folder (files are never overwritten)")
    _add_model_args(t)


def _argument_type(parse):
    """A field's value reader whose ValueError message argparse shows as it is."""
    def read(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return read


def _params(args: argparse.Namespace, task: Task) -> GenerationParams:
    """Arguments -> validated params, checked before any time is spent on loading."""
    return GenerationParams(**{name: _value(getattr(args, name)) for name in task.fields}).validated()


def _value(arg):
    return tuple(arg) if isinstance(arg, list) else arg  # repeated flags are tuples in the params


def _inputs(args: argparse.Namespace, task: Task) -> dict:
    """The task's inputs from the arguments: picture files are read here, with clear errors."""
    from .images import load_picture, read_mask

    readers = {"picture": load_picture, "mask": read_mask}
    return {i.name: readers.get(i.kind, lambda v: v)(getattr(args, i.name)) for i in task.inputs}


def _control_units(args: argparse.Namespace) -> tuple:
    """The --control flags as ControlUnits, pictures read and units checked before loading."""
    if not args.controls:
        return ()
    from .images import load_picture
    from .pipeline.control import ControlUnit

    return tuple(ControlUnit(model, image=load_picture(Path(image)), weight=weight, start=args.control_start,
                             end=args.control_end, mode=args.control_mode, resize=args.control_resize,
                             module=args.control_module, guess_mode=args.control_guess_mode).validated()
                 for model, image, weight in args.controls)


def _generate(args: argparse.Namespace) -> int:
    """Read the inputs, check the params, load the model, run the task with a progress bar, save, print paths."""
    started = time.perf_counter()
    from tqdm import tqdm

    from .engine import load  # torch and the pipeline: imported only to run
    from .images import save_png

    imported = time.perf_counter()
    task = TASKS[args.task]
    inputs = _inputs(args, task)
    mask, image = inputs.get("mask"), inputs.get("image")
    if mask is not None and image is not None and mask.size != image.size and not inputs.get("resize_mask"):
        raise ValueError(f"the mask is {mask.width}x{mask.height} but the picture is {image.width}x{image.height}; "
                         "give a mask of the same size, or pass --resize-mask")  # before the model loads
    params = _params(args, task)
    controls = _control_units(args)
    if task.size_fn is not None:
        width, height = task.working_size(params, inputs, 0)
        if "image" in inputs and (width, height) != inputs["image"].size:
            print(f"stablekit: note: working at {width}x{height} (the picture is "
                  f"{inputs['image'].width}x{inputs['image'].height})", file=sys.stderr)
    t0 = time.perf_counter()
    if args.model is None:
        from .demo import demo_model

        args.model = demo_model()
    engine = load(args.model, dtype=args.dtype, device=args.device, prediction=args.prediction,
                  zero_terminal_snr=args.zero_terminal_snr, vae_tiling=args.vae_tiling, compile=args.compile,
                  vae=args.vae, lora_dir=args.lora_dir, embeddings_dir=args.embeddings_dir,
                  upscaler=args.upscaler_model, controlnet_dir=args.controlnet_dir)
    for note in engine.loaded.notes:
        print(f"stablekit: {note}", file=sys.stderr)
    threads = _threads(args, engine.device.type)
    print(f"stablekit: loaded {engine.config.name} in {time.perf_counter() - t0:.1f}s "
          f"({engine.device.type}, {args.dtype}{threads})", file=sys.stderr)
    loaded = time.perf_counter()
    with tqdm(unit="step", file=sys.stderr, desc="sampling") as bar:
        images = engine.run(task.name, params, callback=lambda i, n, x0: (setattr(bar, "total", n), bar.update(1)),
                            controls=controls, **inputs)
    ran = time.perf_counter()
    for k, image in enumerate(images):
        print(save_png(image, Path(args.out), params.seed + k), flush=True)
    done = time.perf_counter()
    print(f"stablekit: done in {done - started:.1f}s (imports {imported - started:.1f}s, model load {loaded - t0:.1f}s, "
          f"{task.name} {ran - loaded:.1f}s, saving {done - ran:.1f}s); peak memory {peak_memory(engine.device)}",
          file=sys.stderr)
    return 0


def _threads(args: argparse.Namespace, device: str) -> str:
    """Set the CPU threads (--threads, else the cores free since the command started); says how many."""
    from .engine import set_threads
    from .threads import auto_threads, usable_cores

    chosen = args.threads is None
    threads = auto_threads(args.cpu_start) if chosen else args.threads
    set_threads(threads)
    if device != "cpu":
        return ""
    return f", {threads} thread{'s' * (threads > 1)}" + (f" of {usable_cores()} cores" if chosen else "")


def peak_memory(device) -> str:
    """Peak resident memory of this process (and of the GPU, when one is used), for the user."""
    import torch

    from .engine import peak_rss_bytes

    text = f"{peak_rss_bytes() / 2**30:.2f} GiB resident"
    if device.type == "cuda":
        text += f", {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB on the GPU"
    return text


def _info(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import shapes_of, open_checkpoint
    from .models import StableDiffusionModel
    from .models.meta import empty_modules

    ckpt = open_checkpoint(args.model, prediction=args.prediction)
    cfg = ckpt.config
    with empty_modules():
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


def _depth(args: argparse.Namespace) -> int:
    """The estimated depth at the picture's size, min-max normalised to 16 bits; editable, and usable as
    depth2img's --depth-map."""
    import torch.nn.functional as F

    from .checkpoint.sources import resolve
    from .engine import resolve_device
    from .images import load_picture, to_tensor
    from .pipeline.depth import checkpoint_depth_estimator, load_depth_estimator, save_depth_png

    if args.depth_model is None and args.model is None:
        raise ValueError("give --depth-model (a DPT folder) or --model (an SD 2 depth checkpoint that carries one)")
    device = resolve_device(args.device)
    if args.depth_model is not None:
        estimator = load_depth_estimator(args.depth_model, device=device)
    else:
        estimator = checkpoint_depth_estimator(resolve(args.model), device=device)
    image = load_picture(args.image)
    depth = estimator.predict(to_tensor(image).to(device))
    depth = F.interpolate(depth, size=(image.height, image.width), mode="bicubic", align_corners=False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path, n = out / f"{args.image.stem}-depth.png", 1
    while path.exists():
        path, n = out / f"{args.image.stem}-depth-{n}.png", n + 1
    print(save_depth_png(depth[0], path), flush=True)
    return 0


def _preprocess(args: argparse.Namespace) -> int:
    """The map a ControlNet unit would see, at the preprocessor's resolution, as a PNG."""
    from PIL import Image

    from .images import load_picture
    from .pipeline.control import ControlUnit, detect_map

    unit = ControlUnit("-", module=args.module, processor_res=args.res, threshold_a=args.threshold_a,
                       threshold_b=args.threshold_b).validated()
    image = load_picture(args.image)
    depth = None
    if args.module == "depth_midas":
        depth = _depth_net(args)
    detected, _ = detect_map(unit, image, image.width, image.height, depth)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path, n = out / f"{args.image.stem}-{args.module}.png", 1
    while path.exists():
        path, n = out / f"{args.image.stem}-{args.module}-{n}.png", n + 1
    Image.fromarray(detected).save(path)
    print(path, flush=True)
    return 0


def _depth_net(args: argparse.Namespace):
    """The DPT network as depth_midas runs it: [1, 3, H, W] in [-1, 1] -> [1, 1, H, W]."""
    from .checkpoint.sources import resolve
    from .pipeline.depth import checkpoint_depth_estimator, load_depth_estimator

    if args.depth_model is None and args.model is None:
        raise ValueError("depth_midas needs --depth-model (a DPT folder) or --model (an SD 2 depth checkpoint)")
    estimator = load_depth_estimator(args.depth_model) if args.depth_model is not None else \
        checkpoint_depth_estimator(resolve(args.model))
    return estimator.network


def _samplers(args: argparse.Namespace) -> int:
    from .diffusion.samplers import SAMPLERS
    from .diffusion.schedule_names import SCHEDULE_LABELS

    every = [k for k in SCHEDULE_LABELS if k != "automatic"]
    rows = [(spec.name, ", ".join(spec.aliases), spec.default_schedule, ", ".join(spec.options) or "-",
             "all" if spec.schedules is None else ", ".join(spec.schedules)) for spec in SAMPLERS]
    header = ("sampler", "aliases", "automatic", "options", "schedules")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]  # columns as wide as their longest
    for row in [header, *rows]:
        print("  ".join(f"{cell:{w}}" for cell, w in zip(row, widths)) + "  " + row[4])
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
    cpu_start = CpuSample.now()  # the imports that follow are the window other programs' CPU use is measured over
    args = build_parser().parse_args(argv)
    args.cpu_start = cpu_start
    try:
        if args.command in TASKS:
            return _generate(args)
        commands = {"info": _info, "samplers": _samplers, "serve": _serve, "train": _train, "depth": _depth,
                    "preprocess": _preprocess}
        return commands[args.command](args)
    except BrokenPipeError:  # the reader went away (`stablekit samplers | head`): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 141
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
