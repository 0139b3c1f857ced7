"""Log set-up: plain text for people, or one JSON object per line for log collectors.

Request lines carry their fields as ``extra`` (``event``, ``request_id``, ``socket``, ``type``,
``outcome``, ``total_ms``), so the JSON form has them as keys rather than inside a sentence.
"""

from __future__ import annotations

import json
import logging
import time

#: ``extra`` keys copied into JSON lines when a record has them.
FIELDS = ("event", "request_id", "socket", "type", "outcome", "total_ms", "queue_ms")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in FIELDS:
            if hasattr(record, key):
                line[key] = getattr(record, key)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def configure_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
