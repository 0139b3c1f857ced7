"""Shared fixtures: the documents the tests write for themselves (tests/documents.py), the real
paper for the few checks that need it, one loaded layout model, servers on loopback."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import numpy as np
import pymupdf
import pytest
from aiohttp import web

from ragws.bootstrap import create_app
from ragws.config import Settings

from . import documents

#: The shared fixtures folder beside the repository: optional, for benchmarks and the few
#: checks against the real paper (tests/documents.py writes everything else).
FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
REAL_PAPER = FIXTURES / "2310.01889v4.pdf"


@pytest.fixture(scope="session")
def paper() -> documents.Paper:
    """A born-digital two-column paper written for the tests (see tests/documents.py)."""
    return documents.write_paper()


@pytest.fixture(scope="session")
def paper_pdf(paper: documents.Paper) -> bytes:
    return paper.pdf


@pytest.fixture(scope="session")
def table_png(paper: documents.Paper) -> bytes:
    """Table 1 with its caption, cut from a 144 dpi render of its page, as a scan of it."""
    return paper.crop_png(documents.TABLES_PAGE, paper.tables[0])


@pytest.fixture(scope="session")
def title_png(paper: documents.Paper) -> bytes:
    """The paper's title and authors, cut from a 144 dpi render of its first page."""
    return paper.crop_png(0, paper.title_block)


@pytest.fixture(scope="session")
def documents_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The written documents as files: paper.pdf, table1.png, table2.png, title.png."""
    return documents.write_fixtures(tmp_path_factory.mktemp("documents"))


@pytest.fixture(scope="session")
def real_paper() -> bytes:
    """arXiv 2310.01889v4 from the shared fixtures folder, for checks of that exact paper."""
    if not REAL_PAPER.is_file():
        pytest.skip(
            f"checks the real paper {REAL_PAPER.name}, which is not there: {FIXTURES} is the "
            "optional shared fixtures folder beside the repository"
        )
    return REAL_PAPER.read_bytes()


def render_png(pdf: bytes, page: int, scale: float = 1.0) -> bytes:
    with pymupdf.open(stream=pdf, filetype="pdf") as doc:
        return doc[page].get_pixmap(matrix=pymupdf.Matrix(scale, scale)).tobytes("png")


def render_rgb(pdf: bytes, page: int, scale: float = 1.0) -> np.ndarray:
    with pymupdf.open(stream=pdf, filetype="pdf") as doc:
        pix = doc[page].get_pixmap(matrix=pymupdf.Matrix(scale, scale), alpha=False)
        return np.frombuffer(pix.samples, np.uint8).reshape(pix.height, pix.width, 3).copy()


@pytest.fixture(scope="session")
def embedded_model():
    from ragws.models.layout_onnx import OnnxLayoutModel

    return OnnxLayoutModel()


@dataclasses.dataclass
class Server:
    url: str  # http://127.0.0.1:PORT
    app: web.Application

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://") + "/ws"

    async def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Read one sample from /metrics over HTTP, as an operator's scraper would."""
        async with aiohttp.ClientSession() as http, http.get(self.url + "/metrics") as resp:
            text = await resp.text()
        want = ",".join(f'{k}="{v}"' for k, v in sorted((labels or {}).items()))
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            key, _, value = line.rpartition(" ")
            metric, _, rest = key.partition("{")
            got = ",".join(sorted(rest.rstrip("}").split(","))) if rest else ""
            if metric == name and got == want:
                return float(value)
        return 0.0


ServerFactory = Callable[..., "asyncio.Future[Server]"]


@pytest.fixture(scope="session")
def embedded_ocr() -> Any:
    """The embedded PP-OCR models, loaded once and shared by every test server."""
    from ragws.models.ppocr import PpOcrModels

    return PpOcrModels()


@pytest.fixture
async def start_server(embedded_model, embedded_ocr) -> AsyncIterator[Callable[..., Any]]:
    """Start ragws on a free loopback port; settings override the test defaults."""
    runners: list[web.AppRunner] = []

    async def start(
        model: Any = None, *, load_model: bool = False, ocr_runner: Any = None, **overrides: Any
    ) -> Server:
        """``load_model`` loads the models named by the settings, as ``ragws serve`` does;
        otherwise the session's embedded layout and OCR models are shared. ``ocr_runner``
        serves OCR with an already loaded runner (a GOT-OCR2 runner with injected faults)."""
        base = {"port": 0, "layout_preferred_batch_size": "1", "max_wait_ms": 5.0}
        settings = Settings(**{**base, **overrides})
        shared_ocr = settings.ocr_model == "embedded" and not load_model
        app = create_app(
            settings,
            layout_model=None if load_model else model or embedded_model,
            ocr_runner=ocr_runner or (embedded_ocr if shared_ocr else None),
        )
        runner = web.AppRunner(app, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return Server(f"http://127.0.0.1:{port}", app)

    yield start
    for runner in runners:
        await runner.cleanup()


class WsClient:
    """A thin msgpack-over-WebSocket client for tests."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws

    async def send(self, frame: Any) -> None:
        await self.ws.send_bytes(msgpack.packb(frame, use_bin_type=True))

    async def recv(self, timeout: float = 60.0) -> dict[str, Any]:
        msg = await asyncio.wait_for(self.ws.receive(), timeout)
        assert msg.type == aiohttp.WSMsgType.BINARY, f"expected a binary frame, got {msg.type}"
        return msgpack.unpackb(msg.data, raw=False)

    async def until(self, request_id: Any, *types: str, timeout: float = 60.0) -> dict[str, Any]:
        """Receive until a frame of one of ``types`` about ``request_id`` arrives.

        Frames about other requests are dropped: use :meth:`finish` to follow several."""
        while True:
            frame = await self.recv(timeout)
            if frame.get("id") == request_id and frame["type"] in types:
                return frame

    async def finish(self, *request_ids: Any) -> dict[Any, list[dict[str, Any]]]:
        """Every frame of each request, in arrival order, until all have ended."""
        frames: dict[Any, list[dict[str, Any]]] = {rid: [] for rid in request_ids}
        open_ids = set(request_ids)
        while open_ids:
            frame = await self.recv()
            if frame.get("id") in frames:
                frames[frame["id"]].append(frame)
                if frame["type"] in ("done", "error", "layout"):
                    open_ids.discard(frame["id"])
        return frames


@pytest.fixture
async def connect() -> AsyncIterator[Callable[..., Any]]:
    """Open WebSockets to a server; returns (client, hello)."""
    sessions: list[aiohttp.ClientSession] = []

    async def open_ws(server: Server, **kwargs: Any) -> tuple[WsClient, dict[str, Any]]:
        http = aiohttp.ClientSession()
        sessions.append(http)
        ws = await http.ws_connect(server.ws_url, max_msg_size=0, **kwargs)
        client = WsClient(ws)
        hello = await client.recv()
        assert hello["type"] == "hello"
        return client, hello

    yield open_ws
    for http in sessions:
        await http.close()


@pytest.fixture(scope="session")
def got_tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight GOT-OCR2, saved with save_pretrained like a real checkpoint."""
    pytest.importorskip("torch")
    from ragws.testing.got_tiny import build_tiny_got_ocr2

    return build_tiny_got_ocr2(tmp_path_factory.mktemp("got_tiny"))


@pytest.fixture(scope="session")
def qwen2_vl_tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Qwen2-VL (MinerU2.5's architecture), saved like a real checkpoint."""
    pytest.importorskip("torch")
    from ragws.testing.qwen2_vl_tiny import build_tiny_qwen2_vl

    return build_tiny_qwen2_vl(tmp_path_factory.mktemp("qwen2_vl_tiny"), "qwen2_vl")


@pytest.fixture(scope="session")
def qwen2_5_vl_tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Qwen2.5-VL (olmOCR-2's architecture), saved like a real checkpoint."""
    pytest.importorskip("torch")
    from ragws.testing.qwen2_vl_tiny import build_tiny_qwen2_vl

    return build_tiny_qwen2_vl(tmp_path_factory.mktemp("qwen2_5_vl_tiny"), "qwen2_5_vl")


@pytest.fixture(scope="session")
def paddleocr_vl_tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight PaddleOCR-VL, saved like a real checkpoint."""
    pytest.importorskip("torch")
    from ragws.testing.paddleocr_vl_tiny import build_tiny_paddleocr_vl

    return build_tiny_paddleocr_vl(tmp_path_factory.mktemp("paddleocr_vl_tiny"))
