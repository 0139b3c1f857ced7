"""The errors a request can end with, as every layer raises them.

A :class:`RequestError` carries the code a client sees (an ``error`` frame's ``code``, or the
HTTP status the serving layer maps it to) and a message the client can act on. The pipeline
and the services raise it; :mod:`ragws.serving` turns it into a frame or a response.
"""

from __future__ import annotations

import enum
import reprlib
from typing import Any

RequestId = str | int


class ErrorCode(str, enum.Enum):
    BAD_REQUEST = "bad_request"
    TOO_LARGE = "too_large"
    OVERLOADED = "overloaded"
    UNSUPPORTED = "unsupported"
    INTERNAL = "internal"
    UNAVAILABLE = "unavailable"  # a model service is down (e.g. the OCR engine thread died)
    TIMEOUT = "timeout"  # HTTP only: still queued at its deadline (WebSocket: done "timeout")


class RequestError(Exception):
    """A request cannot be served; becomes an ``error`` frame (or an HTTP 4xx/5xx)."""

    def __init__(self, code: ErrorCode, message: str, request_id: RequestId | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


#: How client values appear in error messages: short, and never nested more than a few levels
#: (a frame's values can nest a thousand levels deep, past what repr() survives).
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 60, 60


def shown(value: Any) -> str:
    """A client-sent value as an error message may quote it."""
    return _REPR.repr(value)


def bad_request(message: str, request_id: RequestId | None = None) -> RequestError:
    return RequestError(ErrorCode.BAD_REQUEST, message, request_id)


def too_large(message: str, request_id: RequestId | None = None) -> RequestError:
    return RequestError(ErrorCode.TOO_LARGE, message, request_id)
