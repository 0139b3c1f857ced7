"""The network face: the aiohttp application, WebSocket sessions, frames in and out,
admission, security, readiness and the OpenAI-compatible routes. Handlers stay thin: they
parse, validate, hand a request to :mod:`ragws.pipeline` and stream its results back."""
