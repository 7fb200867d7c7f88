"""The FastAPI app: the web UI's API, the job API, the browser UI, auth, limits, CORS and error shapes.

`create_app(config)` builds it; the backend (model, queue, worker) starts with the app's lifespan.
OpenAPI docs are served at /docs (behind the API's auth when it has one, unless --public-docs) and
Prometheus metrics at /metrics.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import APIRouter, Depends, FastAPI

from .. import __version__
from ..engine import Engine
from .config import ServerConfig
from .controlnet_api import controlnet_router
from .errors import install_error_handlers
from .metrics import metrics_router
from .routes_jobs import jobs_router
from .routes_sdapi import sdapi_router
from .routes_tools import tools_router
from .security import BodyLimit, auth_dependency
from .ui import mount_ui
from .worker import Backend, EngineLoader, LocalBackend


def default_loader(config: ServerConfig) -> EngineLoader:
    def load(spec: str) -> Engine:
        from ..engine import load as load_engine

        return load_engine(spec, dtype=config.dtype, device=config.device, prediction=config.prediction,
                           vae_tiling=config.vae_tiling, vae=config.vae, lora_dir=config.lora_dir,
                           embeddings_dir=config.embeddings_dir, vae_dir=config.vae_dir,
                           upscaler=config.upscaler_model, controlnet_dir=config.controlnet_dir)
    return load


def create_app(config: ServerConfig, loader: EngineLoader | None = None, backend: Backend | None = None) -> FastAPI:
    """The app over `backend` (default: a LocalBackend with `loader`, which defaults to the engine's own)."""
    backend = backend or LocalBackend(config, loader or default_loader(config))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        backend.start()
        try:
            yield
        finally:
            backend.stop()

    # with auth on, the API's description is for those who may use it (--public-docs opens it)
    open_docs = config.public_docs or not config.auth_enabled
    app = FastAPI(title="stablekit", version=__version__, lifespan=lifespan,
                  description="Stable Diffusion over HTTP: the popular web UI's /sdapi/v1 API and a job API.",
                  docs_url="/docs" if open_docs else None, openapi_url="/openapi.json" if open_docs else None)
    app.state.backend = backend
    install_error_handlers(app)
    auth = auth_dependency(config)
    if not open_docs:
        app.include_router(docs_router(app, auth))
    app.include_router(metrics_router(backend, auth))
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


def docs_router(app: FastAPI, auth: Any) -> APIRouter:
    """/openapi.json and /docs behind the API's own auth."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.responses import HTMLResponse, JSONResponse

    router = APIRouter(dependencies=[Depends(auth)], include_in_schema=False)

    @router.get("/openapi.json")
    def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @router.get("/docs")
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="stablekit API")

    return router
