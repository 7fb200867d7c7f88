"""Server settings: one frozen dataclass, filled by `stablekit serve` or by tests."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; anything more is refused with a 4xx before any work is done."""

    max_pixels: int = 1024 * 1024  # width * height of one generated picture
    max_steps: int = 150
    max_batch: int = 8  # pictures per request: batch_size * n_iter
    queue_size: int = 16  # jobs waiting behind the running one; more get 503 with Retry-After
    max_upload_bytes: int = 32 * 1024 * 1024  # request body, checked while it is read
    max_input_pixels: int = 4096 * 4096  # decoded size of an uploaded picture, checked from its header
    max_controls: int = 3  # ControlNet units per request (the extension's default unit count)


@dataclass(frozen=True)
class ServerConfig:
    model: str  # the checkpoint loaded at start (file, diffusers folder or hub id)
    models_dir: Path | None = None  # checkpoints a client may switch to
    outputs: Path = Path("outputs")  # saved pictures, one folder per job
    db: Path | None = None  # job records; default: <outputs>/jobs.sqlite3
    limits: Limits = field(default_factory=Limits)
    basic_auth: tuple[tuple[str, str], ...] = ()  # --api-auth user:pass,...
    token: str | None = None  # --token: "Authorization: Bearer <token>"
    cors_origins: tuple[str, ...] = ()  # CORS is off unless origins are named
    allow_url_images: bool = False  # init images given as http(s) URLs are fetched only when set
    dtype: str = "fp32"
    device: str | None = None
    prediction: str | None = None
    vae_tiling: bool = False  # decode and encode large pictures tile by tile
    vae: Path | None = None  # a VAE file replacing the model's
    vae_dir: Path | None = None  # VAE files a client may switch to (sd_vae; GET /sdapi/v1/sd-vae)
    lora_dir: Path | None = None  # where <lora:NAME> tags of prompts are found (GET /sdapi/v1/loras)
    embeddings_dir: Path | None = None  # textual-inversion embeddings (GET /sdapi/v1/embeddings)
    upscaler_model: str | None = None  # an SD x4 upscaler: the "SD x4" hires upscaler and extras upscaler
    controlnet_dir: Path | None = None  # ControlNets clients name (GET /controlnet/model_list)
    public_docs: bool = False  # /docs and /openapi.json without auth even when the API has it
    keep_results_days: float | None = None  # finished jobs older than this are removed (records and pictures)
    max_results_bytes: int | None = None  # past this, the oldest finished jobs are removed

    @property
    def db_path(self) -> Path:
        return self.db or self.outputs / "jobs.sqlite3"

    @property
    def auth_enabled(self) -> bool:
        return bool(self.basic_auth or self.token)
