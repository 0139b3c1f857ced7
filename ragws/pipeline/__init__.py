"""From document bytes to layout, text, blocks, markdown and chunks.

Documents are opened and rendered in worker processes (:mod:`.document_pool`); the layout,
table and OCR services put their work on the shared batchers and the OCR engine; :mod:`.parse`
walks a document's pages and assembles what a RAG system ingests. Knows nothing of frames."""
