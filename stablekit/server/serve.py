"""`stablekit serve`: its command-line options and the uvicorn launch."""

from __future__ import annotations

import argparse
from pathlib import Path

from .config import Limits, ServerConfig

DEFAULT_LIMITS = Limits()


def add_serve_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    s = sub.add_parser("serve", help="serve the web UI's /sdapi/v1 API and a job API over HTTP")
    s.add_argument("--model", "-m", default=None,
                   help="checkpoint loaded at start (file, diffusers folder, hub id; default: the shapes demo model)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=7860)
    s.add_argument("--models-dir", type=Path, help="checkpoints clients may switch between")
    s.add_argument("--outputs", type=Path, default=Path("outputs"), help="saved pictures, one folder per job")
    s.add_argument("--db", type=Path, help="job records (SQLite); default OUTPUTS/jobs.sqlite3")
    s.add_argument("--max-pixels", type=int, default=DEFAULT_LIMITS.max_pixels, help="width x height per picture")
    s.add_argument("--max-steps", type=int, default=DEFAULT_LIMITS.max_steps)
    s.add_argument("--max-batch", type=int, default=DEFAULT_LIMITS.max_batch, help="pictures per request")
    s.add_argument("--queue-size", type=int, default=DEFAULT_LIMITS.queue_size, help="jobs waiting; more get 503")
    s.add_argument("--max-upload-mb", type=float, default=DEFAULT_LIMITS.max_upload_bytes / 2**20)
    s.add_argument("--api-auth", help="HTTP Basic credentials user:pass[,user2:pass2], as the web UI's flag")
    s.add_argument("--token", help="bearer token (Authorization: Bearer TOKEN)")
    s.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without authentication")
    s.add_argument("--cors-origins", default="", help="comma-separated origins allowed by CORS (default: none)")
    s.add_argument("--keep-results", type=float, default=None, metavar="DAYS",
                   help="remove finished jobs (records and pictures) older than this; never unfinished ones")
    s.add_argument("--max-results-gb", type=float, default=None, metavar="N",
                   help="remove the oldest finished jobs while the pictures take more than this")
    s.add_argument("--public-docs", action="store_true",
                   help="serve /docs and /openapi.json without auth even when the API has it")
    s.add_argument("--allow-url-images", action="store_true",
                   help="fetch init images given as http(s) URLs (never from local or private addresses)")
    s.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    s.add_argument("--device", default="auto")
    s.add_argument("--prediction", choices=["eps", "v"])
    s.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: the cores other programs leave free, measured at start)")
    s.add_argument("--vae-tiling", action="store_true", help="decode and encode large pictures tile by tile")
    s.add_argument("--vae", type=Path, help="a VAE file (original layout) or diffusers folder replacing the model's")
    s.add_argument("--vae-dir", type=Path, help="VAE files clients may switch to by name (sd_vae; GET /sdapi/v1/sd-vae)")
    s.add_argument("--lora-dir", type=Path, help="LoRA files for <lora:NAME:WEIGHT> prompt tags (GET /sdapi/v1/loras)")
    s.add_argument("--upscaler-model", default=None,
                   help='an SD x4 upscaler checkpoint: the "SD x4" hires upscaler and extras upscaler')
    s.add_argument("--embeddings-dir", type=Path, help="textual-inversion embeddings (GET /sdapi/v1/embeddings)")
    s.add_argument("--controlnet-dir", type=Path, help="ControlNet files clients may name (GET /controlnet/model_list)")
    s.add_argument("--max-controls", type=int, default=3, help="ControlNet units one request may use")
    ray = s.add_argument_group("Ray Serve (pip install 'stablekit[ray]')")
    ray.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                     help="run the engines as Ray Serve replicas: alone, a local Ray instance; with an address "
                          "(auto, ray://host:10001, host:6379), that cluster")
    ray.add_argument("--replicas", type=int, default=1, help="engine replicas, each with its own model (default 1)")
    ray.add_argument("--autoscale", metavar="MIN:MAX", help="let Serve scale the engine replicas between MIN and MAX")
    ray.add_argument("--replica-cpus", type=float, default=None,
                     help="CPUs per replica, also its threads (default: a local instance's cores / replicas, else 1)")
    ray.add_argument("--replica-gpus", type=float, default=0, help="GPUs per replica (e.g. 1)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return s


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    from .security import parse_basic_auth

    limits = Limits(max_pixels=args.max_pixels, max_steps=args.max_steps, max_batch=args.max_batch,
                    queue_size=args.queue_size, max_upload_bytes=int(args.max_upload_mb * 2**20),
                    max_controls=args.max_controls)
    for name in ("max_pixels", "max_steps", "max_batch", "queue_size", "max_upload_bytes"):
        if getattr(limits, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("keep_results", "max_results_gb"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    if args.token is not None and len(args.token) < 8:
        raise ValueError("--token must be at least 8 characters")
    from ..engine import set_threads
    from ..threads import CpuSample, auto_threads

    since = getattr(args, "cpu_start", None) or CpuSample.now()
    set_threads(auto_threads(since) if args.threads is None else args.threads)
    if args.model is None:
        from ..demo import demo_model

        args.model = str(demo_model())
    return ServerConfig(
        model=args.model, models_dir=args.models_dir, outputs=args.outputs, db=args.db, limits=limits,
        basic_auth=parse_basic_auth(args.api_auth), token=args.token,
        cors_origins=tuple(o.strip() for o in args.cors_origins.split(",") if o.strip()),
        allow_url_images=args.allow_url_images, dtype=args.dtype,
        device=None if args.device == "auto" else args.device, prediction=args.prediction,
        vae_tiling=args.vae_tiling, vae=args.vae, vae_dir=args.vae_dir, lora_dir=args.lora_dir,
        embeddings_dir=args.embeddings_dir, upscaler_model=args.upscaler_model, controlnet_dir=args.controlnet_dir,
        public_docs=args.public_docs, keep_results_days=args.keep_results,
        max_results_bytes=None if args.max_results_gb is None else int(args.max_results_gb * 2**30),
    )


def run(args: argparse.Namespace) -> int:
    """Check the settings, then serve until interrupted."""
    import uvicorn

    from .app import create_app
    from .security import check_bind

    config = config_from_args(args)
    check_bind(args.host, config, args.insecure)
    for flag, folder in (("--models-dir", args.models_dir), ("--controlnet-dir", args.controlnet_dir)):
        if folder is not None and not folder.is_dir():
            raise ValueError(f"{flag} {folder} is not a folder")
    if args.ray is not None:
        try:
            from . import ray_serve
        except ImportError as e:
            raise ValueError(f"--ray needs Ray Serve ({e}); install it with pip install 'stablekit[ray]'") from None
        return ray_serve.run(args, config)
    if args.replicas != 1 or args.autoscale or args.replica_cpus is not None or args.replica_gpus:
        raise ValueError("--replicas, --autoscale, --replica-cpus and --replica-gpus are for --ray")
    app = create_app(config)
    app.state.backend.start()  # load the model now: a bad checkpoint is a clear error, not a server that fails
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
