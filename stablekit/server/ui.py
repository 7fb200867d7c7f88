"""The browser UI: a hand-written page (HTML, JavaScript modules, CSS) served at `/`.

Nothing is built: the files in `static/` are what the browser runs, so the UI works offline
straight after install. The page talks only to this server's own API (the job API for runs,
progress and history; /sdapi/v1 for lists, interrupt and PNG info). The files themselves hold no
data, so they are served without credentials; every API call the page makes is checked as usual.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent / "static"
NO_CACHE = {"Cache-Control": "no-cache"}  # revalidate: an upgraded server serves its own page at once


def mount_ui(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html", headers=NO_CACHE)

    app.mount("/ui", StaticFiles(directory=STATIC), name="ui")
