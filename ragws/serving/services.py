"""What the serving layer needs from the running application, under one typed key.

:mod:`ragws.bootstrap` builds the services from the settings (one clean-up context each) and
puts them here; handlers, sessions, readiness and the OpenAI routes read them through
:data:`SERVICES`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ragws.config import Settings
from ragws.metrics import Metrics
from ragws.pipeline.document_service import DocumentService
from ragws.pipeline.layout import LayoutService
from ragws.pipeline.ocr.backend import OcrBackend
from ragws.pipeline.parse import ParseService
from ragws.serving.admission import Admission
from ragws.serving.protocol import Limits
from ragws.serving.receive import ReceiveBudget

if TYPE_CHECKING:
    from ragws.serving.session import Session


@dataclass(slots=True)
class Services:
    """Built once at start-up; shared by every connection."""

    settings: Settings
    metrics: Metrics
    admission: Admission
    documents: DocumentService
    layout: LayoutService
    ocr: OcrBackend | None  # None: started with --ocr-model none
    parse: ParseService
    hello: dict[str, Any]
    limits: Limits
    receive: ReceiveBudget  # bytes of frames and bodies still arriving, across all clients
    sessions: set[Session] = field(default_factory=set)  # open sockets, for shutdown


SERVICES = web.AppKey("services", Services)
#: The settings the application was built with (read by routes installed before start-up).
SETTINGS = web.AppKey("settings", Settings)
