"""Server settings: one dataclass, filled from defaults < config.toml < RAGWS_* env < CLI flags.

Every setting is a field of :class:`Settings`; its CLI flag (``--max-concurrent``), environment
variable (``RAGWS_MAX_CONCURRENT``) and config.toml key (``max_concurrent``) are derived from the
field name, so the three can never drift apart. Validation lives in ``__post_init__`` and every
message names the setting it rejects.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

ENV_PREFIX = "RAGWS_"
DEFAULT_CONFIG = Path("config.toml")

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
DEVICES = ("auto", "cpu", "cuda")
LAYOUT_MODELS = ("embedded", "doclayout-yolo")
#: Causal OCR VLMs by short name → their Hugging Face hub repository (``--ocr-model``).
OCR_HUB_MODELS = {
    "got-ocr2": "stepfun-ai/GOT-OCR-2.0-hf",
    "mineru2.5": "opendatalab/MinerU2.5-2509-1.2B",
    "paddleocr-vl": "PaddlePaddle/PaddleOCR-VL",
    "olmocr-2": "allenai/olmOCR-2-7B-1025",
    "nanonets-ocr2": "nanonets/Nanonets-OCR2-3B",
    "rolmocr": "reducto/RolmOCR",
}
OCR_MODELS = ("embedded", "none", *OCR_HUB_MODELS)
#: A Hugging Face hub id, ``owner/name``.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class ConfigError(ValueError):
    """A setting has an invalid value; the message names the setting."""


def _setting(default: Any, help: str, *, choices: tuple[str, ...] | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class Settings:
    """Everything ``ragws serve`` can be told. Field order is the order of ``--help``."""

    host: str = _setting("127.0.0.1", "address to bind; keep loopback unless fronted by a proxy")
    port: int = _setting(7088, "TCP port to listen on")
    api_key: str = _setting(
        "",
        "require this key on every request but /health and the viewer's files "
        "(Authorization: Bearer KEY, or ?api_key=KEY); empty = no key",
    )
    allowed_origins: str = _setting(
        "",
        "comma-separated origins whose pages may open WebSockets (e.g. https://app.example); "
        "the server's own origin always may; * = any",
    )
    allowed_hosts: str = _setting(
        "",
        "comma-separated Host names the server answers to (a name, or name:port; * = any); "
        "others get 421, which defeats DNS rebinding; empty = localhost, 127.0.0.1 and [::1] "
        "on a loopback bind, any host (with a warning) on other binds",
    )
    log_level: str = _setting("info", "log verbosity", choices=LOG_LEVELS)
    log_format: str = _setting(
        "text",
        "log lines as text, or as one JSON object per line (for log collectors)",
        choices=LOG_FORMATS,
    )
    device: str = _setting("auto", "where models run; auto = cuda when available", choices=DEVICES)
    layout_model: str = _setting(
        "embedded",
        "layout backend: embedded (PP-PicoDet CDLA, ONNX, offline), doclayout-yolo (weights from "
        "the Hugging Face hub), or a local path to a .onnx (PicoDet-style) or .pt (DocLayout-YOLO)",
    )
    ocr_model: str = _setting(
        "embedded",
        "OCR backend: embedded (PP-OCRv6 from the rapidocr wheel, ONNX, offline); a causal "
        "VLM: a short name (got-ocr2, mineru2.5, paddleocr-vl, olmocr-2, nanonets-ocr2, "
        "rolmocr), a Hugging Face hub id, or a local checkpoint directory (GOT-OCR2, "
        "Qwen2-VL, Qwen2.5-VL, PaddleOCR-VL); or none (OCR disabled)",
    )
    ocr_det_max_side: int = _setting(
        960,
        "embedded OCR: longest image side the text detector sees (PaddleOCR's default); "
        "0 = rapidocr's rule (shortest side at least 736)",
    )
    ocr_line_batch_size: int = _setting(
        32, "embedded OCR: most text lines per recognition batch (lines of all requests)"
    )
    ocr_batch_size: int = _setting(
        16, "most OCR sequences decoding at once (KV-cache slots, preallocated)"
    )
    max_model_len: int = _setting(
        4096, "KV-cache length per slot: prompt (image tokens included) plus generated tokens"
    )
    ocr_kv_cache_mb: float = _setting(
        0.0,
        "KV-cache memory budget in MiB; the slot count becomes the smaller of ocr_batch_size "
        "and the slots of max_model_len tokens that fit; 0 = no budget (ocr_batch_size slots)",
    )
    ocr_max_tokens: int = _setting(
        4096, "most tokens one OCR request may generate; larger max_tokens are capped to it"
    )
    ocr_vision_batch: int = _setting(
        0,
        "most images (GOT-OCR2: image tiles) per vision-encoder call; 0 = all of a step's, "
        "except GOT-OCR2 on CPU: 2 tiles",
    )
    ocr_max_prefill_tokens: int = _setting(
        2048,
        "prompt tokens prefilled per engine step; bounds how long new requests delay running "
        "streams (a longer prompt is prefilled in chunks over several steps)",
    )
    parse_pages_in_flight: int = _setting(
        4,
        "pages of one parse request worked on at once: more fill batches better, fewer stream "
        "the first pages sooner (all requests' pages still share every batch)",
    )
    max_inflight_per_socket: int = _setting(
        32, "requests one WebSocket may have in flight; beyond it that socket gets overloaded"
    )
    idle_timeout_s: float = _setting(
        300.0, "close a WebSocket with nothing in flight and no frame for this long; 0 = never"
    )
    heartbeat_s: float = _setting(
        30.0,
        "ping each WebSocket after this long without a frame from it; a peer that does not "
        "answer within half of it is disconnected and its requests cancelled; 0 = never",
    )
    send_queue_bytes: int = _setting(
        4 * 1024 * 1024,
        "bytes a WebSocket may have queued for a client that reads slowly; beyond it that "
        "socket's streams pause until the client catches up",
    )
    send_stall_timeout_s: float = _setting(
        60.0,
        "a WebSocket whose send queue stays full this long (its client stopped reading) is "
        "closed with 1008 and its requests cancelled",
    )
    shutdown_grace_s: float = _setting(
        30.0,
        "on SIGTERM/SIGINT, how long running requests may take to finish before they are "
        "ended with finish_reason 'shutdown'",
    )
    drain_delay_s: float = _setting(
        0.0,
        "on SIGTERM/SIGINT, how long GET /ready answers 503 while new requests are still "
        "served, before they are refused (time for a load balancer to notice); the grace "
        "period follows it",
    )
    ready_max_ocr_waiting: int = _setting(
        0,
        "GET /ready answers 503 (saturated) while more OCR work than this waits: GOT-OCR2 "
        "sequences waiting for a KV slot, or embedded-OCR text lines waiting for "
        "recognition; 0 = never (only a full max_concurrent makes a replica saturated)",
    )
    max_concurrent: int = _setting(
        100, "global cap on in-flight requests; beyond it requests are rejected at once"
    )
    layout_batch_size: int = _setting(16, "largest layout batch (pages per model call)")
    layout_preferred_batch_size: str = _setting(
        "auto",
        "batch size the layout batcher prefers to send at once; auto = measured at start-up "
        "(on CPU small batches are often faster per page), an integer = that size",
    )
    max_wait_ms: float = _setting(
        10.0, "batch window: the longest the oldest queued page waits for a fuller batch"
    )
    max_pages: int = _setting(300, "most pages taken from one PDF")
    max_pdf_bytes: int = _setting(64 * 1024 * 1024, "largest PDF accepted, in bytes")
    max_frame_bytes: int = _setting(
        96 * 1024 * 1024, "largest WebSocket frame; a bigger one closes the socket with 1009"
    )
    max_receive_buffer_mb: int = _setting(
        256,
        "MiB held across all clients for WebSocket frames and HTTP bodies still arriving; a "
        "frame over 1 MiB that finds it spent closes its socket with 1013, a body gets 429",
    )
    frame_timeout_s: float = _setting(
        60.0,
        "a WebSocket frame not complete this long after its first byte closes its socket "
        "with 1008 (what it held is freed)",
    )
    body_timeout_s: float = _setting(
        60.0,
        "an HTTP request body not read in full this long after the headers is answered 408; "
        "bodies are read before a request takes a max_concurrent slot",
    )
    max_image_pixels: int = _setting(
        40_000_000, "largest image (width × height) decoded or rendered; checked before decoding"
    )
    max_render_scale: float = _setting(4.0, "largest PDF render scale a request may ask for")
    preprocess_threads: int = _setting(
        0, "threads that preprocess pages for the models; 0 = one per CPU core"
    )
    document_workers: int = _setting(
        0,
        "processes that decode images and open, render and read PDFs (a client's bytes never "
        "touch the server process); 0 = one per CPU core",
    )
    document_worker_memory_mb: int = _setting(
        2048,
        "memory a document worker may take beyond what it holds at start; a document that "
        "needs more is answered too_large and its worker replaced",
    )
    document_timeout_s: float = _setting(
        60.0,
        "longest a document worker may spend on one task (decoding an image, opening a PDF, "
        "rendering or reading one page); past it the request is answered timeout and the "
        "worker killed and replaced",
    )
    inference_threads: int = _setting(
        0, "threads the CPU layout model may use per call; 0 = the runtime's default"
    )

    def __post_init__(self) -> None:
        for f in fields(self):
            choices = f.metadata["choices"]
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise ConfigError(f"{f.name}={value!r}: must be one of {', '.join(choices)}")
        _require(0 <= self.port <= 65535, "port", self.port, "must be 0..65535")
        _require(self.max_concurrent >= 1, "max_concurrent", self.max_concurrent, "must be ≥ 1")
        _require(
            1 <= self.layout_batch_size <= 256,
            "layout_batch_size",
            self.layout_batch_size,
            "must be 1..256",
        )
        pref = self.layout_preferred_batch_size
        if pref != "auto":
            ok = pref.isdigit() and 1 <= int(pref) <= self.layout_batch_size
            _require(
                ok, "layout_preferred_batch_size", pref, "must be auto or 1..layout_batch_size"
            )
        _require(
            0 <= self.max_wait_ms <= 10_000, "max_wait_ms", self.max_wait_ms, "must be 0..10000"
        )
        _require(self.max_pages >= 1, "max_pages", self.max_pages, "must be ≥ 1")
        _require(self.max_pdf_bytes >= 1024, "max_pdf_bytes", self.max_pdf_bytes, "must be ≥ 1024")
        _require(
            self.max_frame_bytes >= 1024, "max_frame_bytes", self.max_frame_bytes, "must be ≥ 1024"
        )
        _require(
            self.max_receive_buffer_mb * 2**20 >= self.max_frame_bytes,
            "max_receive_buffer_mb",
            self.max_receive_buffer_mb,
            "must hold at least one frame of max_frame_bytes",
        )
        _require(
            0 < self.frame_timeout_s <= 3600, "frame_timeout_s", self.frame_timeout_s, "(0, 3600]"
        )
        _require(
            0 < self.body_timeout_s <= 3600, "body_timeout_s", self.body_timeout_s, "(0, 3600]"
        )
        _require(
            self.max_image_pixels >= 64 * 64,
            "max_image_pixels",
            self.max_image_pixels,
            "must be ≥ 4096",
        )
        _require(
            0 < self.max_render_scale <= 10,
            "max_render_scale",
            self.max_render_scale,
            "must be in (0, 10]",
        )
        _require(self.preprocess_threads >= 0, "preprocess_threads", self.preprocess_threads, "≥ 0")
        _require(
            0 <= self.document_workers <= 256, "document_workers", self.document_workers, "0..256"
        )
        _require(
            self.document_worker_memory_mb >= 64,
            "document_worker_memory_mb",
            self.document_worker_memory_mb,
            "must be ≥ 64",
        )
        _require(
            0 < self.document_timeout_s <= 3600,
            "document_timeout_s",
            self.document_timeout_s,
            "in (0, 3600]",
        )
        _require(self.inference_threads >= 0, "inference_threads", self.inference_threads, "≥ 0")
        if self.layout_model not in LAYOUT_MODELS:
            path = Path(self.layout_model)
            _require(
                path.suffix in (".onnx", ".pt"),
                "layout_model",
                self.layout_model,
                f"must be one of {', '.join(LAYOUT_MODELS)} or a path to a .onnx or .pt file",
            )
            _require(path.is_file(), "layout_model", self.layout_model, "no such file")
        if self.ocr_model not in OCR_MODELS:
            path = Path(self.ocr_model).expanduser()
            _require(
                (path / "config.json").is_file()
                or (not path.exists() and HUB_ID.fullmatch(self.ocr_model) is not None),
                "ocr_model",
                self.ocr_model,
                f"must be one of {', '.join(OCR_MODELS)}, a model directory with config.json, "
                "or a Hugging Face hub id (owner/name)",
            )
        _require(
            self.ocr_det_max_side == 0 or 64 <= self.ocr_det_max_side <= 8192,
            "ocr_det_max_side",
            self.ocr_det_max_side,
            "0 or 64..8192",
        )
        _require(
            1 <= self.ocr_line_batch_size <= 4096,
            "ocr_line_batch_size",
            self.ocr_line_batch_size,
            "1..4096",
        )
        _require(
            1 <= self.max_inflight_per_socket <= 100_000,
            "max_inflight_per_socket",
            self.max_inflight_per_socket,
            "1..100000",
        )
        _require(self.idle_timeout_s >= 0, "idle_timeout_s", self.idle_timeout_s, "≥ 0")
        _require(
            0 <= self.shutdown_grace_s <= 3600, "shutdown_grace_s", self.shutdown_grace_s, "0..3600"
        )
        _require(0 <= self.drain_delay_s <= 3600, "drain_delay_s", self.drain_delay_s, "0..3600")
        _require(
            self.ready_max_ocr_waiting >= 0,
            "ready_max_ocr_waiting",
            self.ready_max_ocr_waiting,
            "must be ≥ 0",
        )
        _require(0 <= self.heartbeat_s <= 3600, "heartbeat_s", self.heartbeat_s, "0..3600")
        _require(
            4096 <= self.send_queue_bytes <= 1024**3,
            "send_queue_bytes",
            self.send_queue_bytes,
            "4096..1073741824",
        )
        _require(
            0 < self.send_stall_timeout_s <= 3600,
            "send_stall_timeout_s",
            self.send_stall_timeout_s,
            "in (0, 3600]",
        )
        _require(
            1 <= self.parse_pages_in_flight <= 256,
            "parse_pages_in_flight",
            self.parse_pages_in_flight,
            "1..256",
        )
        _require(1 <= self.ocr_batch_size <= 1024, "ocr_batch_size", self.ocr_batch_size, "1..1024")
        _require(self.max_model_len >= 16, "max_model_len", self.max_model_len, "must be ≥ 16")
        _require(self.ocr_kv_cache_mb >= 0, "ocr_kv_cache_mb", self.ocr_kv_cache_mb, "≥ 0")
        _require(self.ocr_vision_batch >= 0, "ocr_vision_batch", self.ocr_vision_batch, "≥ 0")
        _require(self.ocr_max_tokens >= 1, "ocr_max_tokens", self.ocr_max_tokens, "must be ≥ 1")
        _require(
            self.ocr_max_prefill_tokens >= 1,
            "ocr_max_prefill_tokens",
            self.ocr_max_prefill_tokens,
            "must be ≥ 1",
        )

    @property
    def preferred_batch_size(self) -> int | None:
        """The configured preferred layout batch size, or None when it is to be measured."""
        pref = self.layout_preferred_batch_size
        return None if pref == "auto" else int(pref)

    def public_limits(self) -> dict[str, int | float]:
        """The limits a client needs to know, as sent in the ``hello`` frame."""
        return {
            "max_concurrent": self.max_concurrent,
            "max_inflight_per_socket": self.max_inflight_per_socket,
            "idle_timeout_s": self.idle_timeout_s,
            "heartbeat_s": self.heartbeat_s,
            "send_queue_bytes": self.send_queue_bytes,
            "send_stall_timeout_s": self.send_stall_timeout_s,
            "max_pages": self.max_pages,
            "max_pdf_bytes": self.max_pdf_bytes,
            "max_frame_bytes": self.max_frame_bytes,
            "max_receive_buffer_mb": self.max_receive_buffer_mb,
            "frame_timeout_s": self.frame_timeout_s,
            "body_timeout_s": self.body_timeout_s,
            "max_image_pixels": self.max_image_pixels,
            "max_render_scale": self.max_render_scale,
            "layout_batch_size": self.layout_batch_size,
            "ocr_max_tokens": self.ocr_max_tokens,
            "max_model_len": self.max_model_len,
        }


def _require(ok: bool, name: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r}: {why}")


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def truthy(text: object) -> bool:
    """Whether a flag given as text (an env variable, a form field) says yes."""
    return str(text).strip().lower() in TRUE_WORDS


def setting_fields() -> tuple[dataclasses.Field[Any], ...]:
    return fields(Settings)


def _coerce(name: str, kind: type, raw: Any, source: str) -> Any:
    """Turn a value from toml, env or argv into the field's type, naming the setting on failure."""
    try:
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            if truthy(raw):
                return True
            if str(raw).strip().lower() in FALSE_WORDS:
                return False
            raise ValueError(raw)
        if kind is int and isinstance(raw, float) and not raw.is_integer():
            raise ValueError(raw)
        if kind is int and isinstance(raw, bool):
            raise ValueError(raw)
        return kind(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={raw!r} (from {source}): expected {kind.__name__}") from None


_TYPES: dict[str, type] = {"str": str, "int": int, "float": float, "bool": bool}


def _field_types() -> dict[str, type]:
    # `from __future__ import annotations` leaves annotations as strings.
    return {f.name: _TYPES[str(f.type)] for f in fields(Settings)}


def load_settings(
    cli: Mapping[str, Any] | None = None,
    *,
    config_path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Merge the four layers and validate.

    ``cli`` holds only the flags the user gave (None values are ignored). ``config_path`` None
    means ./config.toml when it exists; an explicit path that does not exist is an error.
    """
    environ = os.environ if environ is None else environ
    types = _field_types()
    merged: dict[str, Any] = {}

    if config_path is None and DEFAULT_CONFIG.is_file():
        config_path = DEFAULT_CONFIG
    if config_path is not None:
        path = Path(config_path)
        try:
            with path.open("rb") as fh:
                table = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config={str(path)!r}: no such file") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config={str(path)!r}: not valid TOML: {exc}") from None
        for key, raw in table.items():
            if key not in types:
                raise ConfigError(f"{key} (in {path}): unknown setting")
            merged[key] = _coerce(key, types[key], raw, str(path))

    for name, kind in types.items():
        if (raw := environ.get(env_name(name))) is not None:
            merged[name] = _coerce(name, kind, raw, env_name(name))

    for name, raw in (cli or {}).items():
        if raw is not None:
            merged[name] = _coerce(name, types[name], raw, flag_name(name))

    return Settings(**merged)
