"""The web chat page at `/` (off with `--no-ui`): static files from `server/ui/`, shipped in the package.

The page is public; its API calls carry the key the user typed (`Authorization: Bearer`), so `--api-keys` guards
the API exactly as for any other client. Plain ES modules and CSS, no build step; the Content-Security-Policy lets
the page reach its own origin only (no CDN, no other host), images from data: and blob: URLs included.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import Response

from .errors import APIError

UI_DIR = Path(__file__).resolve().parent / "ui"

MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def ui_assets() -> dict[str, Path]:
    """The page's files by name (index.html and what it loads), as shipped in the package."""
    return {p.name: p for p in sorted(UI_DIR.iterdir()) if p.suffix in MEDIA_TYPES}


def install_ui_routes(app: FastAPI) -> None:
    """`GET /` (the page) and `GET /ui/{name}` (its modules and style sheet); read once, at start-up."""
    files = {name: (path.read_bytes(), MEDIA_TYPES[path.suffix]) for name, path in ui_assets().items()}
    headers = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache",
               "Referrer-Policy": "no-referrer"}

    def answer(name: str) -> Response:
        if name not in files:
            raise APIError(404, f"no such file of the web page: {name[:100]!r}", code="not_found")
        body, media_type = files[name]
        return Response(body, media_type=media_type, headers=headers)

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def index() -> Response:
        return answer("index.html")

    @app.api_route("/ui/{name}", methods=["GET", "HEAD"], include_in_schema=False)
    async def asset(name: str) -> Response:
        return answer(name)
