"""The FastAPI app: the web UI's API, the job API, the browser UI, auth, limits, CORS and error shapes.

`create_app(config)` builds it; the backend (model, queue, worker) starts with the app's lifespan.
OpenAPI docs are served at /docs.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI

from .. import __version__
from ..engine import Engine
from .config import ServerConfig
from .controlnet_api import controlnet_router
from .errors import install_error_handlers
from .routes_jobs import jobs_router
from .routes_sdapi import sdapi_router
from .routes_tools import tools_router
from .security import BodyLimit, auth_dependency
from .ui import mount_ui
from .worker import EngineLoader, LocalBackend


def default_loader(config: ServerConfig) -> EngineLoader:
    def load(spec: str) -> Engine:
        from ..engine import load as load_engine

        return load_engine(spec, dtype=config.dtype, device=config.device, prediction=config.prediction,
                           vae_tiling=config.vae_tiling, vae=config.vae, lora_dir=config.lora_dir,
                           embeddings_dir=config.embeddings_dir, vae_dir=config.vae_dir,
                           upscaler=config.upscaler_model, controlnet_dir=config.controlnet_dir)
    return load


def create_app(config: ServerConfig, loader: EngineLoader | None = None) -> FastAPI:
    backend = LocalBackend(config, loader or default_loader(config))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        backend.start()
        try:
            yield
        finally:
            backend.stop()

    app = FastAPI(title="stablekit", version=__version__, lifespan=lifespan,
                  description="Stable Diffusion over HTTP: the popular web UI's /sdapi/v1 API and a job API.")
    app.state.backend = backend
    install_error_handlers(app)
    auth = auth_dependency(config)
    app.include_router(sdapi_router(backend, auth))
    app.include_router(jobs_router(backend, auth))
    app.include_router(tools_router(backend, auth))
    app.include_router(controlnet_router(backend, auth))
    mount_ui(app)  # the browser UI at /, on top of the two APIs above
    app.add_middleware(BodyLimit, limit=config.limits.max_upload_bytes)
    if config.cors_origins:  # off unless asked for: browsers on other sites cannot call the API
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_credentials=True,
                           allow_methods=["*"], allow_headers=["*"])
    return app
