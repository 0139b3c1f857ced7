"""Continuous (iteration-level) batching for causal OCR models.

One engine thread steps the model: :mod:`.scheduler` decides who prefills and who decodes,
:mod:`.kv_slots` accounts for the preallocated KV cache, :mod:`.sequence` holds a request's
state, :mod:`.detokenizer` turns tokens into text, and :mod:`.runner` is the protocol a model
adapter (:mod:`ragws.models`) implements. Nothing here knows about sockets or documents.
"""
