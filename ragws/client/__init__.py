"""Python client for the ragws WebSocket protocol (docs/protocol.md, usage in docs/client.md).

:class:`AsyncClient` keeps one WebSocket open and multiplexes every request over it: each
request gets a client-generated ``id`` and its own queue, and one reader task hands each
incoming frame to the queue of the request it names. :class:`Client` offers the same operations
with blocking calls, by running an :class:`AsyncClient` on a private event-loop thread.

Results are small dataclasses; a server ``error`` frame becomes :class:`RagwsError`. A dropped
socket fails the requests that were on it with code ``disconnected``, and the next request opens
a new socket, retrying with exponential backoff. The client needs only aiohttp and msgpack.

The package, one concept a module; the names below are its public API:

- :mod:`ragws.client.types`: result dataclasses, made from the server's frames, and
  :class:`RagwsError`;
- :mod:`ragws.client.connection`: one socket (handshake, hello, sending) and the requests on it;
- :mod:`ragws.client.streams`: the streaming requests (``pdf``, ``ocr``, ``parse``);
- :mod:`ragws.client.aio`: :class:`AsyncClient`: requests, reconnection, split documents;
- :mod:`ragws.client.sync`: :class:`Client` and :class:`SyncStream`, blocking;
- :mod:`ragws.client.split`: a document parsed in page ranges put back together (imported when
  a document is split: it needs pymupdf and the server's pipeline).
"""

from ragws.client.aio import DEFAULT_URL as DEFAULT_URL
from ragws.client.aio import AsyncClient
from ragws.client.aio import is_pdf as is_pdf
from ragws.client.streams import OcrStream, ParseStream, PdfStream
from ragws.client.sync import Client, SyncStream
from ragws.client.types import CANCELLED as CANCELLED
from ragws.client.types import DISCONNECTED as DISCONNECTED
from ragws.client.types import UNAUTHORIZED as UNAUTHORIZED
from ragws.client.types import (
    Block,
    Cell,
    Chunk,
    ChunkBox,
    Document,
    Hello,
    Layout,
    ListItem,
    OcrResult,
    ParsedPage,
    PdfPage,
    PdfSummary,
    RagwsError,
    Token,
)
from ragws.client.types import RequestId as RequestId

# The names imported ``as`` themselves (DEFAULT_URL, is_pdf, the client's error codes,
# RequestId) stay importable from here, as before, outside ``__all__``.
__all__ = [
    "AsyncClient",
    "Block",
    "Cell",
    "Chunk",
    "ChunkBox",
    "Client",
    "Document",
    "Hello",
    "Layout",
    "ListItem",
    "OcrResult",
    "OcrStream",
    "ParseStream",
    "ParsedPage",
    "PdfPage",
    "PdfStream",
    "PdfSummary",
    "RagwsError",
    "SyncStream",
    "Token",
]
