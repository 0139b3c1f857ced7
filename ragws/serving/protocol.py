"""WebSocket protocol v1, the way in: msgpack frames read under limits, validated into typed
requests.

Every frame is one msgpack map in one binary WebSocket message. This module is the only place
that knows the fields a client sends and their rules; the session and the HTTP handlers work
with the dataclasses below, and :mod:`ragws.serving.frames` writes every frame that goes back.
See docs/protocol.md for the specification clients are written against.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgpack

from ragws.errors import ErrorCode, RequestError, RequestId, bad_request, shown, too_large
from ragws.pipeline.parse import ParseOptions
from ragws.runtime.deadlines import MAX_DEADLINE_MS

PROTOCOL_VERSION = 1

MAX_ID_CHARS = 128
MAX_SELECTED_PAGES = 100_000  # a sanity bound on the list itself; max_pages is the real cap
MAX_PAGE = 2**31  # page numbers beyond any pdf's; bounds the number echoed in messages


# --- requests -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LayoutRequest:
    id: RequestId
    image: bytes
    conf: float | None = None  # None: the model's default
    iou: float | None = None
    deadline_ms: float | None = None  # end with "timeout" if still queued after this long


@dataclass(frozen=True, slots=True)
class PdfRequest:
    id: RequestId
    pdf: bytes
    pages: tuple[int, ...] | None = None  # 0-based; None: every page
    scale: float = 2.0
    images: bool = False  # also send each rendered page as JPEG
    conf: float | None = None
    iou: float | None = None
    deadline_ms: float | None = None


@dataclass(frozen=True, slots=True)
class OcrRequest:
    id: RequestId
    image: bytes
    mode: str = "format"  # a task the model has (hello's ocr.modes): format, plain, table, ...
    prompt: str | None = None  # the instruction, in place of the task's own
    max_tokens: int | None = None  # None: the server's cap; larger values are capped to it
    box: tuple[float, float, float, float] | None = None  # crop to this region first
    crop: bool = False  # GOT's multi-patch mode for large, dense pages
    ignore_eos: bool = False  # generate max_tokens whatever the model says (benchmarks)
    deadline_ms: float | None = None


@dataclass(frozen=True, slots=True)
class ParseRequest:
    id: RequestId
    document: bytes  # sent as "pdf" or as "image" (options.is_pdf tells which)
    options: ParseOptions
    deadline_ms: float | None = None


@dataclass(frozen=True, slots=True)
class CancelRequest:
    id: RequestId


Request = LayoutRequest | PdfRequest | OcrRequest | ParseRequest | CancelRequest

# Request types a later version of the server may serve; named so that a client gets
# "unsupported" (this server cannot) rather than "bad_request" (no server can).
FUTURE_TYPES: tuple[str, ...] = ()
#: The OCR tasks every backend takes; a model may have more (hello's ``ocr.modes``).
OCR_MODES = ("format", "plain")
_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
#: An ``ocr`` request's own instruction (``prompt``), in characters.
MAX_PROMPT_CHARS = 16_384
#: auto: the PDF's own text where a region has it, OCR elsewhere; ocr / pdf: only that source.
TEXT_SOURCES = ("auto", "ocr", "pdf")
MAX_CHUNK_CHARS = 1_000_000


@dataclass(frozen=True, slots=True)
class Limits:
    """The subset of settings that frame validation needs."""

    max_render_scale: float = 4.0


#: Keys in one frame's map; a request has a dozen.
MAX_FIELDS = 1024
#: Bytes of one msgpack string: strings are ids, types and choices (documents are binaries).
MAX_STR_BYTES = 64 * 1024
#: Arrays in one frame, and items in all of them: a frame is one map whose values are
#: scalars, binaries or flat arrays of numbers (``pages``, ``box``).
MAX_ARRAYS = 8
MAX_ITEMS = MAX_SELECTED_PAGES + 1024


class _TooNested(ValueError):
    pass


class _Containers:
    """Counts the arrays and maps msgpack builds, and stops decoding past what a frame of the
    protocol holds. Every container costs a Python object per input byte or so (an array32
    of empty arrays: 10 MB in, 0.7 GB of lists out); the length limits bound one container,
    this bounds their number. msgpack builds inner containers first, so such a frame stops
    after a handful of objects."""

    __slots__ = ("arrays", "items", "maps", "max_maps")

    def __init__(self, max_maps: int) -> None:
        self.arrays = self.items = self.maps = 0
        self.max_maps = max_maps

    def array(self, value: list[Any]) -> list[Any]:
        self.arrays += 1
        self.items += len(value)
        if self.arrays > MAX_ARRAYS:
            raise _TooNested("arrays nested in arrays")
        if self.items > MAX_ITEMS:
            raise _TooNested(f"more than {MAX_ITEMS} array items")
        return value

    def map(self, value: dict[str, Any]) -> dict[str, Any]:
        self.maps += 1
        if self.maps > self.max_maps:
            raise _TooNested("a map inside the frame's map")
        return value


class Unreadable:
    """A field value the server does not decode (nested containers, an overlong string): it
    fails the field's validation like any wrong value, and a field the request does not use
    is ignored like any unknown field."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return self.reason


def _unpack(data: bytes, containers: _Containers) -> Any:
    return msgpack.unpackb(
        data,
        raw=False,
        strict_map_key=True,
        max_str_len=MAX_STR_BYTES,
        max_bin_len=len(data),
        max_array_len=MAX_SELECTED_PAGES,
        max_map_len=MAX_FIELDS,
        max_ext_len=0,
        list_hook=containers.array,
        object_hook=containers.map,
    )


def decode_frame(data: bytes) -> Any:
    """Unpack one binary frame; any malformation is a ``bad_request``.

    Decoding is bounded so that no frame can amplify: strings, arrays and maps have length
    limits checked before anything is allocated, extension types are refused, and a frame
    holds one map and at most :data:`MAX_ARRAYS` flat arrays (see :class:`_Containers`).
    Binaries are bounded by the frame itself (``max_frame_bytes``). A frame over a limit is
    read again field by field (:func:`_decode_fields`), so that its error carries its id.
    """
    try:
        return _unpack(data, _Containers(max_maps=1))
    except (_TooNested, ValueError) as exc:
        # Too deep for msgpack's stack in one piece is a limit too: each value alone may
        # still decode, and the frame's id is read all the same.
        over = isinstance(exc, (_TooNested, msgpack.StackError)) or "exceeds max_" in str(exc)
        if not over:
            # Malformed (msgpack's messages quote lengths and types, never client data).
            message = str(exc)[:200] or type(exc).__name__
            raise bad_request(f"frame is not valid msgpack: {message}") from None
        fields = _decode_fields(data)
        if fields is None:
            raise bad_request(f"frame exceeds a limit of the protocol: {exc}") from None
        return fields
    except Exception as exc:  # msgpack raises a zoo of types (ExtraData, FormatError, ...)
        raise bad_request(f"frame is not valid msgpack: {type(exc).__name__}") from None


def _decode_fields(data: bytes) -> dict[Any, Any] | None:
    """The frame's map, each value decoded alone within the limits or else
    :class:`Unreadable`; None when the frame is not a map of string keys. Skipping a value
    builds nothing, so this is as bounded as the first attempt."""
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=len(data))
    unpacker.feed(data)
    fields: dict[Any, Any] = {}
    items = 0
    try:
        count = unpacker.read_map_header()
        if count > MAX_FIELDS:
            return None
        for _ in range(count):
            start = unpacker.tell()
            unpacker.skip()
            key = _unpack(data[start : unpacker.tell()], _Containers(max_maps=0))
            if not isinstance(key, (str, bytes)):
                return None
            start = unpacker.tell()
            unpacker.skip()
            containers = _Containers(max_maps=0)
            containers.items = items
            try:
                fields[key] = _unpack(data[start : unpacker.tell()], containers)
                items = containers.items
            except _TooNested as exc:
                if not _keys_readable(data, start, unpacker.tell()):
                    return None  # a map key no msgpack client reads: the frame is unreadable
                fields[key] = Unreadable(str(exc))
            except ValueError as exc:
                if "exceeds max_" not in str(exc):
                    return None
                fields[key] = Unreadable(str(exc))
        if unpacker.tell() != len(data):
            return None  # trailing bytes
    except Exception:  # malformed after all
        return None
    return fields


_MAP_BYTES = {0xDE: 3, 0xDF: 5}  # map16, map32: header length
_ARRAY_BYTES = {0xDC: 3, 0xDD: 5}
_STR_KEYS = frozenset(range(0xA0, 0xC0)) | {0xD9, 0xDA, 0xDB, 0xC4, 0xC5, 0xC6}


def _keys_readable(data: bytes, start: int, end: int) -> bool:
    """Whether every map key inside ``data[start:end]`` is a string or bytes, as a strict
    msgpack client requires, found by walking headers without building any value."""
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=len(data))
    unpacker.feed(data[start:end])
    pending = 1  # values still to walk
    keys = [False]  # for each of them, from the end: whether it is a map key
    while pending:
        pending -= 1
        is_key = keys.pop() if keys else False
        tag = data[start + unpacker.tell()]
        if 0x80 <= tag <= 0x8F or tag in _MAP_BYTES:
            if is_key:
                return False
            count = unpacker.read_map_header()
            pending += 2 * count
            keys.extend([False, True] * count)  # popped from the end: key first
        elif 0x90 <= tag <= 0x9F or tag in _ARRAY_BYTES:
            if is_key:
                return False
            count = unpacker.read_array_header()
            pending += count
            keys.extend([False] * count)
        else:
            if is_key and tag not in _STR_KEYS:
                return False
            unpacker.skip()
    return True


def parse_request(frame: Any, limits: Limits) -> Request:
    """Validate a decoded frame into a request; raise :class:`RequestError` naming the field."""
    if not isinstance(frame, Mapping):
        raise bad_request(f"frame must be a msgpack map, got {_kind(frame)}")
    request_id = _request_id(frame)
    kind = frame.get("type")
    try:
        if kind == "layout":
            return LayoutRequest(
                id=request_id,
                image=_bytes(frame, "image"),
                conf=_unit(frame, "conf"),
                iou=_unit(frame, "iou"),
                deadline_ms=_deadline(frame),
            )
        if kind == "pdf":
            return PdfRequest(
                id=request_id,
                pdf=_bytes(frame, "pdf"),
                pages=_pages(frame),
                scale=_scale(frame, limits.max_render_scale),
                images=_bool(frame, "images", False),
                conf=_unit(frame, "conf"),
                iou=_unit(frame, "iou"),
                deadline_ms=_deadline(frame),
            )
        if kind == "ocr":
            return OcrRequest(
                id=request_id,
                image=_bytes(frame, "image"),
                mode=_name(frame, "mode", "format"),
                prompt=_prompt(frame),
                max_tokens=_positive_int(frame, "max_tokens"),
                box=_box(frame),
                crop=_bool(frame, "crop", False),
                ignore_eos=_bool(frame, "ignore_eos", False),
                deadline_ms=_deadline(frame),
            )
        if kind == "parse":
            return _parse_request(frame, request_id, limits)
        if kind == "cancel":
            return CancelRequest(id=request_id)
    except RequestError as exc:
        exc.request_id = request_id
        raise
    if kind in FUTURE_TYPES:
        raise RequestError(
            ErrorCode.UNSUPPORTED, f"this server does not serve {shown(kind)} requests", request_id
        )
    if kind is None:
        raise bad_request("missing field 'type'", request_id)
    raise bad_request(
        f"unknown type {shown(kind)}; expected one of 'layout', 'pdf', 'ocr', 'parse', 'cancel'",
        request_id,
    )


def _parse_request(frame: Mapping[str, Any], request_id: RequestId, limits: Limits) -> ParseRequest:
    document, options = parse_fields(frame, limits)
    return ParseRequest(request_id, document, options, deadline_ms=_deadline(frame))


def parse_fields(fields: Mapping[str, Any], limits: Limits) -> tuple[bytes, ParseOptions]:
    """A parse request's document and options, validated: from a ``parse`` frame, or from
    the fields of a ``POST /parse`` form given the types a frame carries."""
    has_pdf, has_image = fields.get("pdf") is not None, fields.get("image") is not None
    if has_pdf == has_image:
        raise bad_request("a parse request needs exactly one of the fields 'pdf' and 'image'")
    text = _choice(fields, "text", TEXT_SOURCES, "auto")
    if has_image and text == "pdf":
        raise bad_request("field 'text' is 'pdf' but an image has no text layer")
    if has_image and fields.get("pages") is not None:
        raise bad_request("field 'pages' applies to a pdf, not to an image")
    chunk_chars = _positive_int(fields, "chunk_chars") or 1500
    if chunk_chars > MAX_CHUNK_CHARS:
        raise bad_request(f"field 'chunk_chars' must be at most {MAX_CHUNK_CHARS}")
    document = _bytes(fields, "pdf" if has_pdf else "image")  # checked first, as ever
    options = ParseOptions(
        is_pdf=has_pdf,
        pages=_pages(fields),
        text=text,
        chunk_chars=chunk_chars,
        scale=_scale(fields, limits.max_render_scale),
        figures=_bool(fields, "figures", False),
        furniture=_bool(fields, "furniture", False),
        style_pages=_pages(fields, "style_pages"),
    )
    return document, options


def peek_id(frame: Any) -> RequestId | None:
    """The frame's id when it is valid, so that an error about the frame can carry it."""
    try:
        return _request_id(frame) if isinstance(frame, Mapping) else None
    except RequestError:
        return None


def _kind(value: Any) -> str:
    if isinstance(value, Unreadable):
        return value.reason
    return "nil" if value is None else type(value).__name__


def _request_id(frame: Mapping[str, Any]) -> RequestId:
    if "id" not in frame:
        raise bad_request("missing field 'id'")
    value = frame["id"]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise bad_request(f"field 'id' must be a string or an integer, got {_kind(value)}")
    if isinstance(value, str) and not 0 < len(value) <= MAX_ID_CHARS:
        raise bad_request(f"field 'id' must be 1..{MAX_ID_CHARS} characters")
    return value


def _bytes(frame: Mapping[str, Any], name: str) -> bytes:
    if name not in frame:
        raise bad_request(f"missing field {name!r}")
    value = frame[name]
    if not isinstance(value, bytes):
        raise bad_request(f"field {name!r} must be binary (msgpack bin), got {_kind(value)}")
    if not value:
        raise bad_request(f"field {name!r} is empty")
    return value


def _number(frame: Mapping[str, Any], name: str) -> float | None:
    value = frame.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad_request(f"field {name!r} must be a number, got {_kind(value)}")
    if not math.isfinite(value):
        raise bad_request(f"field {name!r} must be finite")
    return float(value)


def _unit(frame: Mapping[str, Any], name: str) -> float | None:
    value = _number(frame, name)
    if value is not None and not 0.0 <= value <= 1.0:
        raise bad_request(f"field {name!r} must be in [0, 1], got {value}")
    return value


def _scale(frame: Mapping[str, Any], max_scale: float) -> float:
    value = _number(frame, "scale")
    if value is None:
        return min(2.0, max_scale)
    if not 0.0 < value <= max_scale:
        raise bad_request(f"field 'scale' must be in (0, {max_scale}], got {value}")
    return value


def _deadline(frame: Mapping[str, Any]) -> float | None:
    value = _number(frame, "deadline_ms")
    if value is not None and not 0 < value <= MAX_DEADLINE_MS:
        raise bad_request(f"field 'deadline_ms' must be in (0, {MAX_DEADLINE_MS}], got {value}")
    return value


def _choice(frame: Mapping[str, Any], name: str, choices: tuple[str, ...], default: str) -> str:
    value = frame.get(name)
    if value is None:
        return default
    if value not in choices:
        raise bad_request(f"field {name!r} must be one of {', '.join(choices)}, got {shown(value)}")
    return value


def _name(frame: Mapping[str, Any], name: str, default: str) -> str:
    """A short identifier (a task name): which ones a server takes is the backend's to say."""
    value = frame.get(name)
    if value is None:
        return default
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise bad_request(
            f"field {name!r} must be a name of at most 32 lowercase letters, digits or _, "
            f"got {shown(value)}"
        )
    return value


def _prompt(frame: Mapping[str, Any]) -> str | None:
    value = frame.get("prompt")
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise bad_request(f"field 'prompt' must be a non-empty string, got {shown(value)}")
    if len(value) > MAX_PROMPT_CHARS:
        raise bad_request(f"field 'prompt' must be at most {MAX_PROMPT_CHARS} characters")
    return value


def _positive_int(frame: Mapping[str, Any], name: str) -> int | None:
    value = frame.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise bad_request(f"field {name!r} must be an integer ≥ 1, got {shown(value)}")
    return value


def _box(frame: Mapping[str, Any]) -> tuple[float, float, float, float] | None:
    value = frame.get("box")
    if value is None:
        return None
    ok = isinstance(value, (list, tuple)) and len(value) == 4
    ok = ok and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value
    )
    if not ok or not (value[0] < value[2] and value[1] < value[3]):
        raise bad_request("field 'box' must be [x0, y0, x1, y1] with x0 < x1 and y0 < y1")
    return (float(value[0]), float(value[1]), float(value[2]), float(value[3]))


def _bool(frame: Mapping[str, Any], name: str, default: bool) -> bool:
    value = frame.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"field {name!r} must be a boolean, got {_kind(value)}")
    return value


def _pages(frame: Mapping[str, Any], name: str = "pages") -> tuple[int, ...] | None:
    value = frame.get(name)
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not value:
        raise bad_request(f"field {name!r} must be a non-empty array of 0-based page numbers")
    if len(value) > MAX_SELECTED_PAGES:
        raise too_large(f"field {name!r} lists {len(value)} pages")
    for page in value:
        if isinstance(page, bool) or not isinstance(page, int) or not 0 <= page < MAX_PAGE:
            raise bad_request(
                f"field {name!r} must hold integers in [0, {MAX_PAGE}), got {shown(page)}"
            )
    if len(set(value)) != len(value):
        raise bad_request(f"field {name!r} lists a page more than once")
    return tuple(value)
