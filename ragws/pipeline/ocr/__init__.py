"""OCR backends behind one protocol: a causal VLM on the continuous-batching engine
(:mod:`.vlm`) and line OCR on the dynamic batcher (:mod:`.lines`)."""
