"""The web chat page: static files shipped in the package (server/web/), served at /ui; browsers at / go there."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from .http import APIError

router = APIRouter()

PAGE_PATH = "/ui"
# Every file of the page, with its media type; nothing else under /ui is served.
FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
         "style.css": "text/css; charset=utf-8"}
# The page holds no secrets and loads before the user can enter an API key; what it calls is guarded.
PUBLIC_PREFIX = PAGE_PATH


def wants_page(request: Request) -> bool:
    """A browser navigating to the server (Accept: text/html), not a client probing whether it runs."""
    return "text/html" in request.headers.get("accept", "")


def page_redirect() -> RedirectResponse:
    return RedirectResponse(PAGE_PATH + "/", status_code=307)


def _file(name: str) -> Response:
    if name not in FILES:
        raise APIError(404, f"{PAGE_PATH}/{name} is not part of the web page", type_="not_found_error")
    body = resources.files(__package__).joinpath("web", name).read_bytes()
    # The page only talks to this origin: no scripts, styles or connections elsewhere, no framing.
    csp = "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"
    return Response(body, media_type=FILES[name], headers={"Content-Security-Policy": csp,
                                                           "X-Content-Type-Options": "nosniff",
                                                           "Cache-Control": "no-cache"})


@router.get(PAGE_PATH, include_in_schema=False)
async def page_root():
    return page_redirect()


@router.get(PAGE_PATH + "/", include_in_schema=False)
async def page():
    return _file("index.html")


@router.get(PAGE_PATH + "/{name}", include_in_schema=False)
async def page_file(name: str):
    return _file(name)
