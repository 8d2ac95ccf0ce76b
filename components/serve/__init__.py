"""`reelforge serve`: the HTTP inference service (FastAPI + uvicorn) over a model directory or a registry alias.

- `model_source`: where the model comes from (a directory, `models:/NAME/VERSION`, or
  `models:/NAME@ALIAS`, which is followed: a new version is loaded in the background and swapped in).
- `batching`: the bounded request queue and the micro-batcher (compatible concurrent requests
  share one model call, generation runs in a worker thread).
- `encode`: uint8 frames -> PNG / WebP / GIF / MP4 bytes.
- `app`: the FastAPI app (validation, limits, auth, metrics, error handling) and `serve()`.
"""
