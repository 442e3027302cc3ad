"""The web console: static files under /console, served with a strict Content-Security-Policy.

The console is a client of the public API (api/console/static/*.js call `/v1/...` with the
key the user typed, kept in sessionStorage): this module only serves its files. The list of
files is read once from the package folder, so a request can name nothing else.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

from api.errors import NotFound

STATIC = Path(__file__).resolve().parent.parent / "console" / "static"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
}
# No inline script or style, nothing from another origin, never framed (clickjacking).
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
    # The files are small and change with the code: always revalidated.
    "Cache-Control": "no-cache",
}

router = APIRouter(prefix="/console", include_in_schema=False)


def _assets() -> dict[str, Path]:
    return {p.name: p for p in STATIC.iterdir() if p.suffix in MEDIA_TYPES and p.is_file()}


ASSETS = _assets()


def _file(name: str) -> FileResponse:
    path = ASSETS.get(name)
    if path is None:
        raise NotFound(f"No console file named {name!r}.")
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=SECURITY_HEADERS)


@router.get("")
def console_root() -> RedirectResponse:
    return RedirectResponse("/console/", headers=SECURITY_HEADERS)


@router.get("/")
def console_page() -> FileResponse:
    return _file("index.html")


@router.get("/{name}")
def console_asset(name: str) -> FileResponse:
    return _file(name)
