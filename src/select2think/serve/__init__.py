"""The OpenAI-compatible server (`s2t serve`): app.py (routes and the remote-LLM contract), worker.py (the decode
thread and its continuous batches), settings.py (defaults and per-request S2T fields)."""

from .app import create_app
from .settings import ServeConfig

__all__ = ["ServeConfig", "create_app"]
