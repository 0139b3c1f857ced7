"""Who may talk to the server: a Host allow-list, an Origin allow-list and an optional API key.

All checks run in one aiohttp middleware, before any handler, so a refused WebSocket is
answered with an HTTP status and never upgraded.

* **Host** (``--allowed-hosts``): a request whose ``Host`` names a host the server does not
  answer to gets ``421``. This defeats DNS rebinding: a page on ``evil.example`` whose name is
  re-resolved to 127.0.0.1 reaches the server with ``Host: evil.example``, and since it is
  then same-origin with itself, the Origin check alone would let it in. By default a loopback
  bind answers to ``localhost``, ``127.0.0.1`` and ``[::1]`` on any port; another bind answers
  to any host (``ragws serve`` warns), since only its operator knows the names clients use.
  ``GET /health`` and ``GET /ready`` answer any host, for probes that address the server by
  its IP, and a request with no ``Host`` (HTTP/1.0 programs; browsers always send one) is not
  checked.
* **Origin** (``--allowed-origins``): browsers send ``Origin`` with every WebSocket handshake
  and let any page open a socket to any server, with the user's cookies and network position
  (cross-site WebSocket hijacking); they also let any page post a form anywhere. A handshake,
  or a request other than GET/HEAD/OPTIONS, whose ``Origin`` is neither the server's own (the
  host and port of the request's ``Host``, itself checked above) nor in the allow-list gets
  ``403``. Clients that send no ``Origin`` (programs, not browsers) are not affected; ``*``
  allows every origin.
* **API key** (``--api-key``): every request except ``GET /health`` and ``GET /ready`` (for
  load balancers and orchestrators) and the viewer's static files (``/`` and ``/static/``,
  which hold no data) must carry it, as ``Authorization: Bearer KEY`` or as the ``api_key``
  query parameter (browsers cannot set headers on a WebSocket). Keys are compared in constant
  time. A missing or wrong key gets ``401``.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from aiohttp import web

from ragws.errors import shown

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: Probes of load balancers and orchestrators: any host, no key (they address pods by IP).
PROBE_PATHS = ("/health", "/ready")
#: Paths served without a key: the probes and the viewer's static files.
PUBLIC_PATHS = (*PROBE_PATHS, "/")
PUBLIC_PREFIXES = ("/static/",)
#: What a loopback bind answers to by default (any port).
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]"})
#: Methods that change nothing; others carrying a foreign Origin are refused.
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def parse_hosts(setting: str, bind: str) -> frozenset[str] | None:
    """``"docs.example, 10.0.0.5:7088"`` → normalised names; None means any host.

    Empty: the loopback names on a loopback ``bind``, any host otherwise."""
    if not setting.strip():
        return LOOPBACK_HOSTS if is_loopback(bind) else None
    hosts = frozenset(_normalise_host(h) for h in setting.split(",") if h.strip())
    return None if "*" in hosts else hosts


def is_loopback(bind: str) -> bool:
    if bind.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(bind.strip("[]")).is_loopback
    except ValueError:
        return False


def _normalise_host(entry: str) -> str:
    entry = entry.strip().lower()
    try:  # a bare IPv6 address is written in brackets in a Host header
        if ipaddress.ip_address(entry).version == 6:
            return f"[{entry}]"
    except ValueError:
        pass
    return entry


def split_host(host: str) -> tuple[str, str | None]:
    """``"[::1]:7088"`` → ``("[::1]", "7088")``; ``"localhost."`` → ``("localhost", None)``."""
    host = host.strip().lower()
    if host.startswith("["):
        name, _, rest = host.partition("]")
        port = rest[1:] if rest.startswith(":") else None
        return name + "]", port
    name, colon, port = host.rpartition(":")
    if not colon or ":" in name:  # no port (or a bare IPv6 address, not a valid Host)
        name, port = host, ""
    return name.rstrip("."), port or None


def host_allowed(host: str, allowed: frozenset[str] | None) -> bool:
    if allowed is None:
        return True
    name, port = split_host(host)
    return name in allowed or (port is not None and f"{name}:{port}" in allowed)


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


def security_middleware(
    api_key: str, allowed_origins: str, allowed_hosts: frozenset[str] | None = None
) -> Callable:
    """``allowed_hosts``: from :func:`parse_hosts`; None answers any host."""
    allowed = parse_origins(allowed_origins)
    key = api_key.encode()

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        host = request.headers.get("Host")
        if (
            host is not None
            and request.path not in PROBE_PATHS
            and not host_allowed(host, allowed_hosts)
        ):
            return refuse(
                421,
                "misdirected",
                f"this server does not answer to host {shown(host)} (allowed_hosts)",
            )
        origin = request.headers.get("Origin")
        if origin is not None and not origin_allowed(origin, request, allowed):
            if request.headers.get("Upgrade", "").lower() == "websocket":
                return refuse(
                    403, "forbidden", f"origin {shown(origin)} may not open WebSockets here"
                )
            if request.method not in SAFE_METHODS:
                return refuse(
                    403, "forbidden", f"origin {shown(origin)} may not send requests here"
                )
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
