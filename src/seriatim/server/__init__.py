"""OpenAI-compatible HTTP server over AsyncEngine (`seriatim serve`)."""

from .app import create_app
from .runner import serve
from .state import ServerConfig

__all__ = ["ServerConfig", "create_app", "serve"]
