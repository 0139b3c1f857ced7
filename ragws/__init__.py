"""ragws: a WebSocket inference server for document layout and OCR in RAG pipelines."""

__version__ = "0.1.0"
