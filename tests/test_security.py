"""API key and Origin checks on real loopback servers: refused before any upgrade or work."""

from __future__ import annotations

import aiohttp

from ragws.serving.security import (
    LOOPBACK_HOSTS,
    host_allowed,
    parse_hosts,
    parse_origins,
    split_host,
)

KEY = "s3cret-key"


async def handshake(server, **kwargs) -> int:
    """The HTTP status of a WebSocket handshake (101 when it upgrades)."""
    async with aiohttp.ClientSession() as http:
        try:
            async with http.ws_connect(server.url + "/ws", **kwargs) as ws:
                hello = await ws.receive_bytes()
                assert hello  # upgraded and spoke
                return 101
        except aiohttp.WSServerHandshakeError as exc:
            return exc.status


async def test_api_key_guards_sockets_and_endpoints_but_not_health(start_server):
    server = await start_server(api_key=KEY)
    assert await handshake(server) == 401
    assert await handshake(server, headers={"Authorization": "Bearer wrong"}) == 401
    assert await handshake(server, headers={"Authorization": f"Bearer {KEY}"}) == 101
    assert await handshake(server, params={"api_key": KEY}) == 101
    async with aiohttp.ClientSession() as http:
        async with http.get(server.url + "/health") as resp:
            assert resp.status == 200
        for path in ("/", "/static/ragws.js"):
            async with http.get(server.url + path) as resp:
                assert resp.status == 200, path
        async with http.get(server.url + "/metrics") as resp:
            assert resp.status == 401
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
            assert (await resp.json())["error"] == "unauthorized"
        form = aiohttp.FormData()
        form.add_field("image", b"not even read", filename="x.png")
        async with http.post(server.url + "/ocr", data=form) as resp:
            assert resp.status == 401
        headers = {"Authorization": f"Bearer {KEY}"}
        async with http.get(server.url + "/metrics", headers=headers) as resp:
            assert resp.status == 200
    # Refused handshakes never became sessions.
    assert await server.metric("ragws_websocket_connections") == 0


async def test_foreign_origins_cannot_open_sockets(start_server):
    server = await start_server(allowed_origins="https://app.example")
    own = server.url  # http://127.0.0.1:PORT: the viewer's own pages
    assert await handshake(server, headers={"Origin": "https://evil.example"}) == 403
    assert await handshake(server, headers={"Origin": own}) == 101
    assert await handshake(server, headers={"Origin": "https://app.example"}) == 101
    assert await handshake(server, headers={"Origin": "https://app.example:443/"}) == 101
    assert await handshake(server) == 101  # programs send no Origin
    anyone = await start_server(allowed_origins="*")
    assert await handshake(anyone, headers={"Origin": "https://evil.example"}) == 101


def test_origins_are_normalised():
    assert parse_origins(" https://App.Example:443/, http://localhost:3000 ,") == {
        "https://app.example",
        "http://localhost:3000",
    }
    assert parse_origins("http://a.example:80") == {"http://a.example"}
    assert parse_origins("") == frozenset()


def test_host_names_are_split_and_matched():
    assert split_host("[::1]:7088") == ("[::1]", "7088")
    assert split_host("LocalHost.") == ("localhost", None)
    assert split_host("a.example:80") == ("a.example", "80")
    # Loopback binds answer to the loopback names on any port; other binds to any host.
    assert parse_hosts("", "127.0.0.1") == LOOPBACK_HOSTS == parse_hosts("", "::1")
    assert parse_hosts("", "localhost") == LOOPBACK_HOSTS
    assert parse_hosts("", "0.0.0.0") is None and parse_hosts("", "10.0.0.5") is None
    assert parse_hosts("a.example, *", "127.0.0.1") is None
    allowed = parse_hosts(" Docs.Example , 10.0.0.5:8080, ::1", "0.0.0.0")
    assert allowed == {"docs.example", "10.0.0.5:8080", "[::1]"}
    assert host_allowed("docs.example:7088", allowed)
    assert host_allowed("10.0.0.5:8080", allowed) and not host_allowed("10.0.0.5:80", allowed)
    assert host_allowed("[::1]:1", allowed) and not host_allowed("evil.example", allowed)
    assert host_allowed("anything", None)
