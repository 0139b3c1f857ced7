"""What runs inside a document worker: pool tasks (:mod:`ragws.pipeline.document_pool`), one at
a time.

Imported only in the workers and in the fork server they start from, never in the server: so
it may keep pymupdf's layout analyser out at import, before pymupdf is first imported.
"""

from __future__ import annotations

from ragws.pipeline.mupdf_setup import keep_layout_analyzer_out

keep_layout_analyzer_out()

import contextlib  # noqa: E402
import ctypes  # noqa: E402
import errno  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import signal  # noqa: E402
from collections import OrderedDict  # noqa: E402
from typing import NoReturn  # noqa: E402

from ragws.errors import ErrorCode, RequestError  # noqa: E402
from ragws.pipeline.document_pool import EXIT_NO_MEMORY, OPEN_DOCUMENTS, Channel  # noqa: E402
from ragws.pipeline.documents import PdfDocument, PdfLimits  # noqa: E402

PR_SET_PDEATHSIG = 1


def serve(channel: Channel, memory_mb: int) -> None:
    """Answer tasks until the server closes the pipe (or kills this process)."""
    # A Ctrl-C in a terminal reaches the whole process group; the server decides when a
    # worker ends.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    _limit_memory(memory_mb)
    documents: OrderedDict[str, PdfDocument] = OrderedDict()
    while True:
        try:
            message = channel.receive()
            if message[0] == "forget":
                _close(documents, message[1])
                continue
            _, fn, args, doc, forget = message
            _close(documents, forget)
            value = fn(*args) if doc is None else fn(_open(documents, *doc), *args)
            channel.send(("ok", value))
        except (EOFError, ConnectionError):
            return  # the server is gone
        except MemoryError as exc:
            _out_of_memory(channel, documents, exc)
        except RequestError as exc:
            channel.send(("error", exc.code.value, exc.message))
        except Exception as exc:
            if isinstance(exc, OSError) and exc.errno == errno.ENOMEM:  # mapping a sent image
                _out_of_memory(channel, documents, exc)
            channel.send(("error", ErrorCode.INTERNAL.value, f"{type(exc).__name__}: {exc}"))


def _out_of_memory(
    channel: Channel, documents: OrderedDict[str, PdfDocument], exc: Exception
) -> NoReturn:
    _close(documents, list(documents))
    with contextlib.suppress(Exception):
        channel.send(("memory", str(exc)))
    os._exit(EXIT_NO_MEMORY)  # what a failed allocation left behind goes with it


def _open(documents: OrderedDict[str, PdfDocument], path: str, limits: PdfLimits) -> PdfDocument:
    document = documents.pop(path, None) or PdfDocument.open(path, limits)
    documents[path] = document
    while len(documents) > OPEN_DOCUMENTS:
        documents.popitem(last=False)[1].close()
    return document


def _close(documents: OrderedDict[str, PdfDocument], paths: list[str]) -> None:
    for path in paths:
        document = documents.pop(path, None)
        if document is not None:
            document.close()


def _limit_memory(memory_mb: int) -> None:
    """Cap the address space at what the worker maps now plus ``memory_mb``: past it an
    allocation fails (a MemoryError in Python, a failed malloc in MuPDF) and the task is
    answered too_large, instead of the machine's memory growing by gigabytes."""
    try:
        with open("/proc/self/statm") as statm:
            mapped = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        mapped = 0
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = mapped + memory_mb * 2**20
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _die_with_parent() -> None:
    """On Linux, be killed when the parent goes (the fork server, which ends with the server),
    even in the middle of a render that would not notice the pipe closing."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
