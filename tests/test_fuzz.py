"""Property-based fuzzing of the WebSocket protocol against a real server on a loopback port.

Hypothesis sends random frames to a real ragws server (the embedded layout and OCR models):
arbitrary msgpack values, request-like maps with random fields and types, truncated
encodings, random bytes, text messages and frames over ``max_frame_bytes``. The properties:

* the server never crashes and never drops a socket except for an oversize frame (1009);
* every frame is answered as docs/protocol.md says: an unreadable one with an ``error`` whose
  ``id`` is null, a readable one with frames carrying its id, and an admitted request with
  exactly one end (``layout``, ``done`` or ``error``), after which no frame about it arrives;
* everything the server sends is a well-formed frame, and no bad input is ever ``internal``;
* a bystander socket doing real work throughout gets the same results as it got alone, and at
  the end nothing is left in flight and a fresh socket is served.

Hypothesis runs synchronous test functions only, so the server, the fuzzing client and the
bystander all live on one asyncio event loop in a background thread, and each example is one
coroutine handed to that loop. To know that a frame has been answered, each example ends with
a probe, a ``cancel`` of an id never in flight: the server answers it in order, after whatever
it answers the fuzz frame with at once, so everything before the probe's answer belongs to the
fuzz frame, and an admitted request is then followed to its end.

Values nested about as deep as msgpack decodes are also sent from plain code, outside
Hypothesis, which raises the recursion limit while it runs (see test_deeply_nested_values).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import io
import math
import struct
import threading
import zlib
from collections import Counter
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
import msgpack
import pymupdf
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from ragws.bootstrap import create_app
from ragws.config import Settings

# Small limits, so that oversize frames, PDFs and images are cheap to send.
MAX_FRAME_BYTES = 256 * 1024
MAX_PDF_BYTES = 64 * 1024
MAX_IMAGE_PIXELS = 1_000_000
MAX_RENDER_SCALE = 4.0

# Generous, so that a slow machine does not flake; a healthy run never comes near them.
RECV_TIMEOUT_S = 30.0
EXAMPLE_TIMEOUT_S = 180.0
MAX_EXAMPLES = 800

REQUEST_TYPES = ("layout", "pdf", "ocr", "parse")
FRAME_TYPES = frozenset({"error", "layout", "page", "token", "done"})
ERROR_CODES = frozenset(
    {"bad_request", "too_large", "overloaded", "unsupported", "internal", "unavailable"}
)
TERMINAL = frozenset({"layout", "done", "error"})
#: Frames a request of each type may stream before its end, and the frames that may end it.
STREAMED = {"layout": frozenset(), "pdf": {"page"}, "ocr": {"token"}, "parse": {"page"}}
ENDS = {
    "layout": {"layout", "error", "done"},
    "pdf": {"done", "error"},
    "ocr": {"done", "error"},
    "parse": {"done", "error"},
}

T = TypeVar("T")


# --- payloads: small, so that the requests that are valid run quickly ----------------------


def _png(width: int, height: int) -> bytes:
    """A white page with a dark bar, the smallest thing that looks like a document."""
    image = Image.new("RGB", (width, height), "white")
    if width >= 20 and height >= 20:
        ImageDraw.Draw(image).rectangle(
            (10, height // 3, width - 10, height // 3 + 8), fill=(30, 30, 30)
        )
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _jpeg(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(_png(width, height))).save(buffer, "JPEG")
    return buffer.getvalue()


def _claiming_size(png: bytes, width: int, height: int) -> bytes:
    """The PNG with a header that claims another size (CRC fixed), so that only a server which
    checks the header before decoding refuses it cheaply."""
    head = bytearray(png[:33])  # signature (8), IHDR length and type (8), data (13), CRC (4)
    struct.pack_into(">II", head, 16, width, height)
    struct.pack_into(">I", head, 29, zlib.crc32(bytes(head[12:29])))
    return bytes(head) + png[33:]


def _pdf(pages: int, **save: Any) -> bytes:
    """A PDF of small pages (200×80 pt), each with one line of real text."""
    doc = pymupdf.open()
    for number in range(pages):
        page = doc.new_page(width=200, height=80)
        page.insert_text((12, 44), f"Page {number + 1}: ring attention", fontsize=11)
    data = doc.tobytes(**save)
    doc.close()
    return data


def _document() -> bytes:
    """The bystander's document: two letter pages with a title and paragraphs."""
    doc = pymupdf.open()
    body = (
        "Transformers have emerged as the architecture of choice for many state of the art "
        "systems. Their memory demands limit the length of the sequences they can process. "
    ) * 4
    for number in range(2):
        page = doc.new_page(width=612, height=792)
        page.insert_text((72, 90), f"Section {number + 1}: Blockwise Attention", fontsize=20)
        for row in range(3):
            top = 130 + row * 200
            page.insert_textbox(pymupdf.Rect(72, top, 540, top + 170), body, fontsize=11)
    data = doc.tobytes()
    doc.close()
    return data


def _render(pdf: bytes, page: int, scale: float, clip: tuple[float, ...] | None = None) -> bytes:
    with pymupdf.open(stream=pdf, filetype="pdf") as doc:
        rect = pymupdf.Rect(*clip) if clip else None
        return doc[page].get_pixmap(matrix=pymupdf.Matrix(scale, scale), clip=rect).tobytes("png")


@dataclass(frozen=True)
class Payload:
    """Bytes sent as msgpack ``bin``, named so that a failing example reads well."""

    name: str
    data: bytes = field(repr=False)

    def __repr__(self) -> str:
        return f"<{self.name}: {len(self.data)} bytes>"


TINY_PNG = _png(120, 60)
ONE_PDF = _pdf(1)
BYSTANDER_PDF = _document()
BYSTANDER_PAGE = _render(BYSTANDER_PDF, 0, 1.0)
BYSTANDER_LINE = _render(BYSTANDER_PDF, 0, 2.0, clip=(60, 60, 560, 100))

IMAGES = [
    Payload("tiny.png", TINY_PNG),
    Payload("tiny.jpg", _jpeg(120, 60)),
    Payload("1x1.png", _png(1, 1)),
    Payload("claims-4000x4000.png", _claiming_size(TINY_PNG, 4000, 4000)),
    Payload("claims-0x0.png", _claiming_size(TINY_PNG, 0, 0)),
    Payload("truncated.png", TINY_PNG[: len(TINY_PNG) // 2]),
    Payload("one-page.pdf", ONE_PDF),
]
PDFS = [
    Payload("one-page.pdf", ONE_PDF),
    Payload("two-page.pdf", _pdf(2)),
    Payload(
        "encrypted.pdf",
        _pdf(1, encryption=pymupdf.PDF_ENCRYPT_AES_256, owner_pw="owner", user_pw="user"),
    ),
    Payload("truncated.pdf", ONE_PDF[: len(ONE_PDF) // 2]),
    Payload("header-only.pdf", b"%PDF-1.7\n%%EOF\n"),
    Payload("over-max_pdf_bytes.pdf", b"%PDF-1.7\n" + b"\0" * MAX_PDF_BYTES),
    Payload("tiny.png", TINY_PNG),
]


# --- msgpack values the standard packer cannot write ----------------------------------------


@dataclass(frozen=True)
class Deep:
    """``depth`` nested arrays (or one-key maps) around nil: deeper than the packer's own
    recursion limit, and deep enough that ``repr`` of the decoded value overflows the stack."""

    depth: int
    maps: bool = False

    def encode(self) -> bytes:
        return (b"\x81\xa1k" if self.maps else b"\x91") * self.depth + b"\xc0"


@dataclass(frozen=True)
class Pairs:
    """A msgpack map as its key-value pairs, in order; keys may repeat."""

    items: tuple[tuple[Any, Any], ...]

    def __repr__(self) -> str:
        return "Pairs({" + ", ".join(f"{k!r}: {v!r}" for k, v in self.items) + "})"


def encode(value: Any) -> bytes:
    """msgpack bytes of ``value``, which may hold :class:`Deep`, :class:`Pairs` and
    :class:`Payload` anywhere; iterative, so depth is not limited by the packer."""
    packer = msgpack.Packer(use_bin_type=True)
    out = bytearray()
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, Deep):
            out += item.encode()
        elif isinstance(item, Payload):
            out += packer.pack(item.data)
        elif isinstance(item, (Pairs, dict)):
            pairs = list(item.items if isinstance(item, Pairs) else item.items())
            out += packer.pack_map_header(len(pairs))
            for key, val in reversed(pairs):
                stack += [val, key]
        elif isinstance(item, (list, tuple)):
            out += packer.pack_array_header(len(item))
            stack.extend(reversed(item))
        else:
            out += packer.pack(item)
    return bytes(out)


# --- strategies -----------------------------------------------------------------------------


def weighted(*choices: tuple[int, st.SearchStrategy[T]]) -> st.SearchStrategy[T]:
    """One of the strategies, each ``weight`` times as likely as a weight of 1. (``one_of``
    with a strategy repeated would not do: it treats the repeats as one.)"""
    pool = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.sampled_from(pool).flatmap(lambda strategy: strategy)


INTS = st.integers(min_value=-(2**63), max_value=2**64 - 1)
SMALL_INTS = st.integers(min_value=-3, max_value=40)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    SMALL_INTS,
    INTS,
    st.floats(),  # nan and ±inf included
    st.text(max_size=12),
    st.binary(max_size=24),
)
# Map keys are mostly strings: a key of another type makes a whole frame unreadable
# (msgpack's strict_map_key), which would leave too few frames readable.
KEYS = weighted(
    (6, st.text(max_size=8)),
    (1, st.one_of(st.none(), st.booleans(), INTS, st.floats(), st.binary(max_size=6))),
)
# Shallow, or around msgpack's own nesting limit (1024 levels): within it a value decodes and
# is deep enough to overflow a recursive walk of it (see test_deeply_nested_values), beyond it
# decoding fails.
DEEP = st.builds(
    Deep,
    weighted((2, st.integers(1, 20)), (3, st.integers(900, 1030)), (1, st.integers(1, 1500))),
    st.booleans(),
)
MSGPACK: st.SearchStrategy[Any] = weighted(
    (
        6,
        st.recursive(
            SCALARS,
            lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
            max_leaves=10,
        ),
    ),
    (1, DEEP),
)

VALID_IDS = st.one_of(
    SMALL_INTS,
    st.text(min_size=1, max_size=6),
    st.sampled_from([2**64 - 1, -(2**63), "x" * 128, "é" * 128]),
)
INVALID_IDS = st.one_of(
    st.just(""),
    st.text(min_size=129, max_size=140),
    st.booleans(),
    st.none(),
    st.floats(),
    st.lists(SMALL_INTS, max_size=2),
    st.binary(max_size=4),
    DEEP,
)
MISSING = object()  # a field left out of the frame

TINY_IMAGES = [image for image in IMAGES if image.name.startswith("tiny")]
GOOD_PDFS = PDFS[:2]
#: Values every request that takes the field accepts (``pages`` and ``box`` depend on the
#: document, so they are drawn in :func:`valid_requests`).
VALID: dict[str, st.SearchStrategy[Any]] = {
    "image": st.sampled_from(TINY_IMAGES),
    "pdf": st.sampled_from(GOOD_PDFS),
    "scale": st.floats(min_value=0.05, max_value=MAX_RENDER_SCALE),
    "images": st.booleans(),
    "conf": st.floats(min_value=0.0, max_value=1.0),
    "iou": st.floats(min_value=0.0, max_value=1.0),
    "mode": st.sampled_from(["format", "plain"]),
    "max_tokens": st.integers(min_value=1, max_value=10_000),
    "crop": st.booleans(),
    "ignore_eos": st.booleans(),
    "chunk_chars": st.integers(min_value=1, max_value=3000),
    "figures": st.booleans(),
    "furniture": st.booleans(),
    # Short deadlines too, so that some requests end with their deadline.
    "deadline_ms": st.floats(min_value=0.01, max_value=60_000) | st.integers(1, 50),
}
#: Plausible values, valid or just outside what is valid, for every known field.
PLAUSIBLE: dict[str, st.SearchStrategy[Any]] = {
    "image": st.sampled_from(IMAGES) | st.binary(max_size=48),
    "pdf": st.sampled_from(PDFS) | st.binary(max_size=48),
    "pages": st.lists(st.integers(min_value=-1, max_value=3), max_size=3),
    "scale": VALID["scale"]
    | st.sampled_from([1e-300, 1e-6, 0.001, 0.0, -1.0, MAX_RENDER_SCALE + 1e-9, 1, 4]),
    "images": st.booleans(),
    "conf": VALID["conf"] | st.sampled_from([-0.1, 1.5]),
    "iou": VALID["iou"] | st.sampled_from([-0.1, 1.5]),
    "mode": st.sampled_from(["format", "plain", "", "FORMAT"]),
    "max_tokens": st.integers(min_value=-1, max_value=10_000) | st.just(2**64 - 1),
    "box": st.one_of(
        st.lists(st.integers(min_value=-10, max_value=130), min_size=4, max_size=4),
        st.lists(st.floats(min_value=-20, max_value=200, allow_nan=False), min_size=4, max_size=4),
        st.lists(st.floats(), max_size=5),
    ),
    "crop": st.booleans(),
    "ignore_eos": st.booleans(),
    "text": st.sampled_from(["auto", "ocr", "pdf", "none"]),
    "chunk_chars": st.integers(min_value=-1, max_value=3000)
    | st.sampled_from([1_000_000, 1_000_001, 2**64 - 1]),
    "figures": st.booleans(),
    "furniture": st.booleans(),
    "deadline_ms": VALID["deadline_ms"] | st.sampled_from([0, -1, 10**12, math.inf, math.nan]),
}
FIELDS = sorted(PLAUSIBLE)
#: The fields each request type takes (besides its payload), from docs/protocol.md.
OPTIONS = {
    "layout": ["conf", "iou", "deadline_ms"],
    "pdf": ["pages", "scale", "images", "conf", "iou", "deadline_ms"],
    "ocr": ["mode", "max_tokens", "box", "crop", "ignore_eos", "deadline_ms"],
    "parse": ["pages", "text", "chunk_chars", "scale", "figures", "furniture", "deadline_ms"],
}
#: The payload each request type needs, added to most request-like maps so that more of them
#: get past the first check.
NEEDS = {"layout": ["image"], "pdf": ["pdf"], "ocr": ["image"], "parse": ["pdf", "image"]}


@st.composite
def valid_requests(draw: st.DrawFn) -> Pairs:
    """A request the server must serve: small inputs, so that the models answer quickly."""
    kind = draw(st.sampled_from(REQUEST_TYPES))
    payload = draw(st.sampled_from(NEEDS[kind]))
    document = draw(VALID[payload])
    pairs: list[tuple[Any, Any]] = [
        ("type", kind),
        ("id", draw(VALID_IDS)),
        (payload, document),
    ]
    for name in draw(st.lists(st.sampled_from(OPTIONS[kind]), unique=True, max_size=4)):
        if name == "pages":
            if payload == "image":
                continue  # pages apply to a PDF only
            count = 2 if document.name.startswith("two") else 1
            value: Any = draw(st.permutations(range(count)).map(list))
        elif name == "box":
            x0, y0 = draw(st.integers(0, 100)), draw(st.integers(0, 40))
            value = [x0, y0, x0 + draw(st.integers(1, 40)), y0 + draw(st.integers(1, 40))]
        elif name == "text":
            sources = ["auto", "ocr"] if payload == "image" else ["auto", "ocr", "pdf"]
            value = draw(st.sampled_from(sources))
        else:
            value = draw(VALID[name])
        pairs.append((name, value))
    return Pairs(tuple(pairs))


@st.composite
def request_maps(draw: st.DrawFn) -> Pairs:
    """A map that looks like a request: known type and id, or not; known fields with plausible
    or random values; unknown fields; now and then a repeated key."""
    pairs: list[tuple[Any, Any]] = []
    kind = draw(
        weighted(
            (6, st.sampled_from([*REQUEST_TYPES, "cancel"])),
            (1, st.text(max_size=8)),
            (1, MSGPACK),
            (1, DEEP),
            (1, st.just(MISSING)),
        )
    )
    if kind is not MISSING:
        pairs.append(("type", kind))
    request_id = draw(weighted((6, VALID_IDS), (2, INVALID_IDS), (1, st.just(MISSING))))
    if request_id is not MISSING:
        pairs.append(("id", request_id))
    if isinstance(kind, str) and kind in NEEDS and draw(st.integers(0, 3)) > 0:
        name = draw(st.sampled_from(NEEDS[kind]))
        pairs.append((name, draw(PLAUSIBLE[name])))
    for name in draw(st.lists(st.sampled_from(FIELDS), unique=True, max_size=4)):
        pairs.append((name, draw(weighted((6, PLAUSIBLE[name]), (2, MSGPACK), (1, DEEP)))))
    for key, value in draw(st.dictionaries(st.text(max_size=8), MSGPACK, max_size=2)).items():
        pairs.append((key, value))
    for _ in range(draw(st.integers(0, 6)) // 6):  # about one map in seven repeats a key
        pairs.append((draw(st.sampled_from(["id", "type", *FIELDS])), draw(MSGPACK)))
    if draw(st.integers(0, 9)) == 0:
        pairs = draw(st.permutations(pairs))
    return Pairs(tuple(pairs))


@dataclass(frozen=True)
class Frame:
    """A binary message: one msgpack value."""

    value: Any

    def data(self) -> bytes:
        return encode(self.value)


@dataclass(frozen=True)
class Raw:
    """A binary message of arbitrary bytes."""

    content: bytes

    def data(self) -> bytes:
        return self.content


@dataclass(frozen=True)
class Text:
    """A text WebSocket message, which the protocol does not accept."""

    text: str


@st.composite
def truncated(draw: st.DrawFn) -> Raw:
    data = encode(draw(request_maps() | MSGPACK))
    if len(data) < 2:
        data = encode(Pairs((("type", "layout"), ("id", 1))))
    return Raw(data[: draw(st.integers(min_value=0, max_value=len(data) - 1))])


@st.composite
def trailing(draw: st.DrawFn) -> Raw:
    """A valid frame followed by more bytes: two values in one message."""
    return Raw(encode(draw(request_maps())) + draw(st.binary(min_size=1, max_size=8)))


MESSAGES = weighted(
    (5, st.builds(Frame, valid_requests())),
    (8, st.builds(Frame, request_maps())),
    (2, st.builds(Frame, MSGPACK)),
    (2, truncated()),
    (1, trailing()),
    (1, st.builds(Raw, st.binary(max_size=64))),
    (1, st.builds(Text, st.text(max_size=64))),
)


@dataclass(frozen=True)
class Step:
    """One fuzz message; if it is a request, ``cancel_own`` cancels it right behind."""

    cancel_own: bool  # drawn first: Hypothesis simplifies what is drawn late in big examples
    message: Frame | Raw | Text


@dataclass(frozen=True)
class Oversize:
    """A frame ``extra`` bytes over ``max_frame_bytes``, optionally with a request in flight."""

    extra: int
    request_in_flight: bool


EXAMPLES = weighted(
    (30, st.builds(Step, st.sampled_from([True, False, False, False, False]), MESSAGES)),
    (2, st.builds(Oversize, st.integers(min_value=1, max_value=64 * 1024), st.booleans())),
)


# --- what the protocol promises for a message -----------------------------------------------


@dataclass(frozen=True)
class Expectation:
    """``null``: unreadable, answered by one error with a null id; ``refused``: a readable id
    but not a request type, one error with that id; ``cancel``; ``request`` of ``kind``."""

    what: str
    request_id: Any = None
    kind: str | None = None
    frame: dict[str, Any] | None = None


def valid_id(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, str) and 1 <= len(value) <= 128)


def expectation(message: Frame | Raw | Text) -> Expectation:
    """What a message must get back, from docs/protocol.md: decoded the way any msgpack client
    decodes (str keys, UTF-8 str), a map with a valid id is answered under that id."""
    if isinstance(message, Text):
        return Expectation("null")
    try:
        frame = msgpack.unpackb(message.data())
    except msgpack.StackError:
        # Nested deeper than msgpack decodes in one piece: the server reads the frame's map
        # field by field (docs/protocol.md), so its id is still known to it.
        frame = fields_of(message.data())
    except Exception:
        return Expectation("null")
    if not isinstance(frame, dict) or "id" not in frame or not valid_id(frame["id"]):
        return Expectation("null")
    kind = frame.get("type")
    if isinstance(kind, str) and kind == "cancel":
        return Expectation("cancel", frame["id"])
    if isinstance(kind, str) and kind in REQUEST_TYPES:
        return Expectation("request", frame["id"], kind, frame)
    return Expectation("refused", frame["id"])


class TooDeep:
    """A value of a frame's map nested deeper than msgpack decodes even alone."""


def fields_of(data: bytes) -> dict[Any, Any] | None:
    """A frame's map read one field at a time, a value too deep to decode as :class:`TooDeep`;
    None when it is no map or a key cannot be read."""
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(data)
    fields: dict[Any, Any] = {}
    try:
        for _ in range(unpacker.read_map_header()):
            start = unpacker.tell()
            unpacker.skip()
            key = msgpack.unpackb(data[start : unpacker.tell()])
            start = unpacker.tell()
            unpacker.skip()
            try:
                value: Any = msgpack.unpackb(data[start : unpacker.tell()])
            except msgpack.StackError:
                value = TooDeep()
            fields[key] = value
        unpacker.skip()
    except msgpack.OutOfData:
        return fields
    except Exception:
        return None
    return None  # bytes after the map


def same_id(a: Any, b: Any) -> bool:
    """Ids compare by type too: 1 and "1" are different requests, and True is not an id."""
    return type(a) is type(b) and a == b


def check_frame(frame: Any, context: str) -> dict[str, Any]:
    """Every frame the server sends: a map with a known type and an id; errors name a known
    code and say what went wrong; ``internal`` is a server bug whatever the input."""
    assert isinstance(frame, dict), f"{context}: a frame that is not a map: {frame!r}"
    assert frame.get("type") in FRAME_TYPES, f"{context}: unknown frame type: {frame!r}"
    assert "id" in frame, f"{context}: a frame without an id: {frame!r}"
    if frame["type"] == "error":
        assert frame.get("code") in ERROR_CODES, f"{context}: unknown error code: {frame!r}"
        assert frame["code"] != "internal", f"{context}: server bug, internal error: {frame!r}"
        message = frame.get("message")
        assert isinstance(message, str) and message, f"{context}: error without text: {frame!r}"
    if frame["type"] == "done":
        reason = frame.get("finish_reason")
        assert isinstance(reason, str) and reason, f"{context}: done without reason: {frame!r}"
    return frame


def check_request(
    expect: Expectation, frames: list[dict[str, Any]], cancelled: bool, context: str
) -> str:
    """The frames of one request: its streamed frames, then its end; returns the outcome."""
    assert expect.kind is not None and expect.frame is not None
    streamed = [f for f in frames if f["type"] not in TERMINAL]
    ends = [f for f in frames if f["type"] in TERMINAL]
    assert frames[: len(streamed)] == streamed, f"{context}: a frame after the end: {frames!r}"
    assert all(f["type"] in STREAMED[expect.kind] for f in streamed), f"{context}: {frames!r}"
    assert all(f["type"] in ENDS[expect.kind] for f in ends), f"{context}: {frames!r}"
    # One end; a cancel right behind a refused request is itself refused, which is a second
    # error (the cancel names an id that was never in flight).
    assert len(ends) == 1 or (
        cancelled and len(ends) == 2 and not streamed and all(f["type"] == "error" for f in ends)
    ), f"{context}: {len(ends)} ends: {frames!r}"
    end = ends[0]
    if end["type"] == "error":
        return f"error:{end['code']}"
    if end["type"] == "layout":
        _check_layout(end, context)
        return "ok"
    reason = end["finish_reason"]
    if reason == "cancelled":
        assert cancelled, f"{context}: cancelled without a cancel: {frames!r}"
        return "cancelled"
    if not cancelled and "deadline_ms" not in expect.frame:
        assert reason in ("stop", "length"), f"{context}: unexpected end: {end!r}"
    if reason in ("stop", "length"):
        if expect.kind == "pdf":
            assert len(streamed) == end["pages"], f"{context}: pages: {frames!r}"
            for page in streamed:
                _check_layout(page, context)
        if expect.kind == "ocr":
            text = "".join(f["text"] for f in streamed)
            assert text == end["text"], f"{context}: tokens do not add up to done: {frames!r}"
    return reason


def _check_layout(frame: dict[str, Any], context: str) -> None:
    n = len(frame["boxes"])
    assert len(frame["classes"]) == len(frame["scores"]) == n, f"{context}: {frame!r}"
    assert all(len(box) == 4 for box in frame["boxes"]), f"{context}: {frame!r}"


# --- the harness: server, fuzzing client and bystander on a loop in a thread ----------------


class LoopThread:
    """An asyncio event loop running in a daemon thread, driven from synchronous code."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = EXAMPLE_TIMEOUT_S) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise AssertionError(f"no result within {timeout} s: the server hangs") from None

    def close(self) -> None:
        async def cancel_rest() -> None:
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in rest:
                task.cancel()
            await asyncio.gather(*rest, return_exceptions=True)
            await self.loop.shutdown_asyncgens()

        with contextlib.suppress(Exception):
            self.run(cancel_rest(), timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        if not self.thread.is_alive():
            self.loop.close()


Layout = tuple[list[str], list[list[float]]]  # classes and boxes of one page


def _layout_result(frame: dict[str, Any]) -> Layout:
    return frame["classes"], frame["boxes"]


def _same_layouts(got: list[Layout], want: list[Layout]) -> bool:
    """Equal classes, boxes within a pixel: a page's result never depends on its batch."""
    return len(got) == len(want) and all(
        classes == want_classes
        and all(
            abs(x - y) <= 1.0
            for box, want_box in zip(boxes, want_boxes, strict=True)
            for x, y in zip(box, want_box, strict=True)
        )
        for (classes, boxes), (want_classes, want_boxes) in zip(got, want, strict=True)
    )


class Harness:
    """Lives on the loop: the server, the fuzz socket, the bystander socket."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = aiohttp.ClientSession()
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.used_ids: list[Any] = []  # ids of non-cancel frames sent on the current socket
        self.probes = 0
        self.dirty = False  # the last example failed: start the next on a fresh socket
        self.outcomes: Counter[str] = Counter()
        self.last_message = "(none yet)"
        self.bystander: asyncio.Task[None] | None = None
        self.bystander_stop = asyncio.Event()
        self.bystander_rounds = 0
        self.bystander_failures: list[str] = []

    async def connect(self) -> aiohttp.ClientWebSocketResponse:
        ws = await self.http.ws_connect(self.url.replace("http", "ws", 1) + "/ws", max_msg_size=0)
        hello = msgpack.unpackb((await ws.receive(timeout=RECV_TIMEOUT_S)).data)
        assert hello["type"] == "hello", hello
        return ws

    async def reconnect(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        self.ws = await self.connect()
        self.used_ids = []

    async def recv(self, ws: aiohttp.ClientWebSocketResponse, waiting_for: str) -> dict[str, Any]:
        try:
            message = await ws.receive(timeout=RECV_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise AssertionError(f"no frame within {RECV_TIMEOUT_S} s, {waiting_for}") from None
        assert message.type == aiohttp.WSMsgType.BINARY, (
            f"{waiting_for}: expected a binary frame, got {message.type.name} "
            f"(close code {ws.close_code}, {message.extra or message.data!r})"
        )
        return check_frame(msgpack.unpackb(message.data), waiting_for)

    # --- one example ----------------------------------------------------------------------

    async def exercise(self, example: Step | Oversize) -> None:
        if self.dirty or self.ws is None or self.ws.closed:
            await self.reconnect()
        self.dirty = True
        self.last_message = repr(example)[:300]
        if isinstance(example, Oversize):
            await self._oversize(example)
        else:
            await self._step(example)
        self.dirty = False

    async def _step(self, step: Step) -> None:
        ws = self.ws
        assert ws is not None
        expect = expectation(step.message)
        if isinstance(step.message, Text):
            await ws.send_str(step.message.text)
        else:
            await ws.send_bytes(step.message.data())
        cancelled = step.cancel_own and expect.what == "request"
        if cancelled:
            await ws.send_bytes(encode({"type": "cancel", "id": expect.request_id}))
        self.probes += 1
        probe = f"probe-{self.probes}"
        await ws.send_bytes(encode({"type": "cancel", "id": probe}))

        frames: list[dict[str, Any]] = []
        while True:
            frame = await self.recv(ws, f"waiting for the answer to {probe}")
            if same_id(frame["id"], probe):
                assert frame["type"] == "error" and frame["code"] == "bad_request", (
                    f"the answer to {probe}, a cancel of an id never in flight: {frame!r}"
                )
                break
            frames.append(frame)
        if expect.what == "request":
            # Admitted requests end after the probe's answer; follow this one to its end.
            while not any(f["type"] in TERMINAL for f in frames):
                frames.append(await self.recv(ws, f"waiting for request {expect.request_id!r}"))

        context = f"{expect.what} {expect.request_id!r}"
        if expect.what == "null":
            # Unreadable: one error with a null id, and nothing else.
            assert [(f["type"], f["id"]) for f in frames] == [("error", None)], (
                f"{context}: {frames!r}"
            )
            self.outcomes[f"null:{frames[0]['code']}"] += 1
            return
        assert all(same_id(f["id"], expect.request_id) for f in frames), (
            f"{context}: frames about other requests: {frames!r}"
        )
        if expect.what == "refused":
            assert [f["type"] for f in frames] == ["error"], f"{context}: {frames!r}"
            self.outcomes[f"refused:{frames[0]['code']}"] += 1
            self.used_ids.append(expect.request_id)
        elif expect.what == "cancel":
            # Nothing of this socket is in flight. A cancel of an id that no frame here has
            # used is refused; one that ended lately (answered, even if only with an error)
            # may be ignored, as the protocol allows.
            known = any(same_id(expect.request_id, used) for used in self.used_ids)
            allowed = [[], ["bad_request"]] if known else [["bad_request"]]
            got = [f.get("code") for f in frames if f["type"] == "error"]
            assert len(got) == len(frames) and got in allowed, f"{context}: {frames!r}"
            self.outcomes["cancel"] += 1
        else:
            outcome = check_request(expect, frames, cancelled, context)
            self.outcomes[f"{expect.kind}:{outcome}"] += 1
            self.used_ids.append(expect.request_id)

    async def _oversize(self, example: Oversize) -> None:
        ws = self.ws
        assert ws is not None
        if example.request_in_flight:
            await ws.send_bytes(encode({"type": "pdf", "id": "before-oversize", "pdf": ONE_PDF}))
        image = b"\0" * (MAX_FRAME_BYTES + example.extra)
        with contextlib.suppress(ConnectionError):  # the server may close before reading it all
            await ws.send_bytes(encode({"type": "layout", "id": "oversize", "image": image}))
        while True:
            try:
                message = await ws.receive(timeout=RECV_TIMEOUT_S)
            except asyncio.TimeoutError:
                raise AssertionError("an oversize frame did not close the socket") from None
            if message.type != aiohttp.WSMsgType.BINARY:
                break
            # The request sent before it may answer before the socket closes.
            frame = check_frame(msgpack.unpackb(message.data), "before the oversize close")
            assert same_id(frame["id"], "before-oversize"), frame
        assert message.type in (
            aiohttp.WSMsgType.CLOSE,
            aiohttp.WSMsgType.CLOSING,
            aiohttp.WSMsgType.CLOSED,
        ), message
        assert ws.close_code == 1009, f"oversize frame: close code {ws.close_code}"
        self.outcomes["oversize"] += 1
        await self.reconnect()

    async def quiet(self) -> None:
        """The fuzz socket has nothing left over: a probe's answer is the next frame."""
        ws = self.ws
        assert ws is not None and not ws.closed
        await asyncio.sleep(0.2)
        await ws.send_bytes(encode({"type": "cancel", "id": "probe-last"}))
        frame = await self.recv(ws, "waiting for the last probe")
        assert same_id(frame["id"], "probe-last") and frame["type"] == "error", frame

    # --- the bystander --------------------------------------------------------------------

    def start_bystander(self) -> None:
        self.bystander = asyncio.create_task(self._bystander())

    async def stop_bystander(self) -> None:
        self.bystander_stop.set()
        assert self.bystander is not None
        await self.bystander

    async def _bystander(self) -> None:
        """Real work on another socket all through the fuzzing: a 2-page PDF, a page image and
        a line of text, again and again, each of which must end as it did the first time."""
        ws = await self.connect()
        baseline: dict[str, Any] = {}
        jobs = [
            ("pdf", {"type": "pdf", "pdf": BYSTANDER_PDF, "pages": [0, 1], "scale": 1.0}),
            ("layout", {"type": "layout", "image": BYSTANDER_PAGE}),
            ("ocr", {"type": "ocr", "image": BYSTANDER_LINE}),
        ]
        number = 0
        try:
            while not self.bystander_stop.is_set():
                for kind, request in jobs:
                    number += 1
                    await ws.send_bytes(encode({**request, "id": number}))
                    frames: list[dict[str, Any]] = []
                    while not frames or frames[-1]["type"] not in TERMINAL:
                        frame = await self.recv(ws, f"bystander {kind} {number}")
                        assert same_id(frame["id"], number), frame
                        frames.append(frame)
                    result = self._bystander_result(kind, frames)
                    if kind not in baseline:
                        baseline[kind] = result
                    same = (
                        result == baseline[kind]
                        if kind == "ocr"
                        else _same_layouts(result, baseline[kind])
                    )
                    assert same, f"bystander {kind}: {result!r} != {baseline[kind]!r}"
                self.bystander_rounds += 1
                await asyncio.sleep(0.05)  # leave the fuzzer some of the CPU
        except Exception as exc:
            self.bystander_failures.append(
                f"{type(exc).__name__}: {exc} (last fuzz example: {self.last_message})"
            )
        finally:
            await ws.close()

    @staticmethod
    def _bystander_result(kind: str, frames: list[dict[str, Any]]) -> Any:
        end = frames[-1]
        assert end["type"] != "error", f"bystander {kind}: {end!r}"
        if kind == "layout":
            return [_layout_result(end)]
        assert end["finish_reason"] == "stop", f"bystander {kind}: {end!r}"
        if kind == "ocr":
            assert end["text"], f"bystander ocr read nothing: {end!r}"
            return end["text"]
        pages = {f["page"]: _layout_result(f) for f in frames[:-1]}
        assert sorted(pages) == [0, 1] and end["pages"] == 2, f"bystander pdf: {frames!r}"
        return [pages[0], pages[1]]

    # --- the end --------------------------------------------------------------------------

    async def metrics(self) -> dict[str, float]:
        """/metrics, as an operator's scraper reads it: sample name with labels → value."""
        async with self.http.get(self.url + "/metrics") as response:
            text = await response.text()
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                samples[key] = float(value)
        return samples

    async def settle(self) -> dict[str, float]:
        """Wait until nothing is in flight (cancelled work may take a moment to unwind)."""
        for _ in range(100):
            samples = await self.metrics()
            if samples.get("ragws_inflight_requests") == 0:
                break
            await asyncio.sleep(0.1)
        return samples

    async def fresh_socket_is_served(self) -> dict[str, Any]:
        ws = await self.connect()
        try:
            await ws.send_bytes(encode({"type": "layout", "id": "fresh", "image": TINY_PNG}))
            return await self.recv(ws, "fresh socket's layout")
        finally:
            await ws.close()

    async def close(self) -> None:
        if self.bystander is not None and not self.bystander.done():
            self.bystander.cancel()
            await asyncio.gather(self.bystander, return_exceptions=True)
        if self.ws is not None:
            await self.ws.close()
        await self.http.close()


@dataclass
class Fuzzing:
    loop: LoopThread
    harness: Harness


@pytest.fixture(scope="module")
def fuzzing(embedded_model: Any, embedded_ocr: Any) -> Iterator[Fuzzing]:
    """A real server with the shared models, on a loop in a thread, with a fuzz socket open
    and the bystander at work."""
    loop = LoopThread()
    settings_ = Settings(
        port=0,
        layout_preferred_batch_size="1",
        max_wait_ms=5.0,
        max_frame_bytes=MAX_FRAME_BYTES,
        max_pdf_bytes=MAX_PDF_BYTES,
        max_image_pixels=MAX_IMAGE_PIXELS,
        max_render_scale=MAX_RENDER_SCALE,
    )

    async def start() -> tuple[web.AppRunner, Harness]:
        app = create_app(settings_, layout_model=embedded_model, ocr_runner=embedded_ocr)
        runner = web.AppRunner(app, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        harness = Harness(f"http://127.0.0.1:{port}")
        await harness.reconnect()
        harness.start_bystander()
        return runner, harness

    runner: web.AppRunner | None = None
    try:
        runner, harness = loop.run(start())
        yield Fuzzing(loop, harness)
        loop.run(harness.close())
    finally:
        if runner is not None:
            loop.run(runner.cleanup())
        loop.close()


def deep_steps() -> Iterator[Step]:
    """Each field of each request type (and its type and id, and an unknown field) holding a
    value nested nearly as deep as msgpack decodes (1024 levels, the frame's own map
    included), exactly as deep, and one level deeper."""
    payloads = {"image": IMAGES[0], "pdf": PDFS[0]}
    for kind in REQUEST_TYPES:
        payload = NEEDS[kind][0]
        base = {"type": kind, "id": 1, payload: payloads[payload]}
        for name in ["type", "id", payload, *OPTIONS[kind], "unknown"]:
            for depth in (990, 1023, 1024):
                for maps in (False, True):
                    frame = {**base, name: Deep(depth, maps)}
                    yield Step(False, Frame(Pairs(tuple(frame.items()))))


def test_deeply_nested_values(fuzzing: Fuzzing) -> None:
    """Values nested about as deep as msgpack allows are refused like any other bad value.

    Sent from plain code, not from Hypothesis: while it runs examples, Hypothesis raises the
    interpreter's recursion limit (for the whole process, the server's thread included), which
    would hide a server that overflows its stack on such a value, e.g. in ``repr``."""
    for step in deep_steps():
        try:
            fuzzing.loop.run(fuzzing.harness.exercise(step))
        except AssertionError as exc:
            raise AssertionError(f"{step!r}: {exc}") from None


def test_fuzz_protocol(fuzzing: Fuzzing) -> None:
    """Random frames, each answered as the protocol says; then the bystander, the gauges and a
    fresh socket show that nothing else was harmed."""
    loop, harness = fuzzing.loop, fuzzing.harness

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )
    @given(example=EXAMPLES)
    def fuzz(example: Step | Oversize) -> None:
        loop.run(harness.exercise(example))

    fuzz()

    # The fuzz socket is still in order, with nothing left over.
    loop.run(harness.quiet())
    # Bad input was refused and good input served: the fuzzer reached the models.
    served = sum(n for k, n in harness.outcomes.items() if k.endswith((":ok", ":stop")))
    assert served and harness.outcomes["null:bad_request"], harness.outcomes

    # The bystander was never harmed.
    loop.run(harness.stop_bystander())
    assert not harness.bystander_failures, harness.bystander_failures
    assert harness.bystander_rounds >= 1

    # Nothing is left in flight, nothing was internal, and a new socket is served.
    samples = loop.run(harness.settle())
    assert samples.get("ragws_inflight_requests") == 0, samples.get("ragws_inflight_requests")
    internal = {k: v for k, v in samples.items() if 'outcome="internal"' in k and v}
    assert not internal, internal
    frame = loop.run(harness.fresh_socket_is_served())
    assert frame["type"] == "layout" and same_id(frame["id"], "fresh"), frame
