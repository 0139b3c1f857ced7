"""Who may talk to the server: an optional API key, and an Origin allow-list for WebSockets.

Both checks run in one aiohttp middleware, before any handler, so a refused WebSocket is
answered with an HTTP status and never upgraded.

* **API key** (``--api-key``): every request except ``GET /health`` (for load balancers and
  orchestrators) and the viewer's static files (``/`` and ``/static/``, which hold no data)
  must carry it, as ``Authorization: Bearer KEY`` or as the ``api_key`` query parameter
  (browsers cannot set headers on a WebSocket). Keys are compared in constant time. A missing
  or wrong key gets ``401``.
* **Origin** (``--allowed-origins``): browsers send ``Origin`` with every WebSocket handshake
  and let any page open a socket to any server, with the user's cookies and network position
  (cross-site WebSocket hijacking). A handshake whose ``Origin`` is neither the server's own
  (the host and port of the request's ``Host``) nor in the allow-list gets ``403``.
  Clients that send no ``Origin`` (programs, not browsers) are not affected; ``*`` allows
  every origin.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: Paths served without a key: the health probe and the viewer's static files.
PUBLIC_PATHS = ("/health", "/")
PUBLIC_PREFIXES = ("/static/",)


def parse_origins(setting: str) -> frozenset[str]:
    """``"https://a.example, http://localhost:3000"`` → normalised origins; ``*`` means any."""
    return frozenset(normalise_origin(o) for o in setting.split(",") if o.strip())


def normalise_origin(origin: str) -> str:
    origin = origin.strip().rstrip("/").lower()
    if origin == "*":
        return origin
    parts = urlsplit(origin)
    default = {"http": 80, "https": 443}.get(parts.scheme)
    port = parts.port if parts.port not in (None, default) else None
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}" + (f":{port}" if port else "")


def security_middleware(api_key: str, allowed_origins: str) -> Callable:
    allowed = parse_origins(allowed_origins)
    key = api_key.encode()

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            origin = request.headers.get("Origin")
            if origin is not None and not origin_allowed(origin, request, allowed):
                return refuse(403, "forbidden", f"origin {origin!r} may not open WebSockets here")
        if key and not is_public(request.path) and not has_key(request, key):
            return refuse(
                401,
                "unauthorized",
                "an API key is required: 'Authorization: Bearer KEY' or '?api_key=KEY'",
            )
        return await handler(request)

    return check


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def has_key(request: web.Request, key: bytes) -> bool:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    given = token.strip() if scheme.lower() == "bearer" else request.query.get("api_key", "")
    # compare_digest takes time independent of where the strings differ.
    return hmac.compare_digest(given.encode(), key)


def origin_allowed(origin: str, request: web.Request, allowed: frozenset[str]) -> bool:
    if "*" in allowed:
        return True
    normalised = normalise_origin(origin)
    if normalised in allowed:
        return True
    # Same origin: the page was served by this host. The scheme is not compared, because
    # behind a TLS-terminating proxy the page is https while the proxied request is http.
    host = request.host.lower()
    for default in (":80", ":443"):
        host = host.removesuffix(default)
    return normalised.partition("://")[2] == host


def refuse(status: int, code: str, message: str) -> web.Response:
    response = web.json_response({"error": code, "message": message}, status=status)
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="ragws"'
    return response
