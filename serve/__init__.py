"""imagegen: image generation on Ray Serve.

Public surface: the app builder's import path (`serve.app:build_app`, not
imported here so `import serve` stays light), settings, wire types and errors.
Everything else is internal.
"""

from .config import Settings, load_settings
from .errors import ImagegenError
from .schemas import GenerateRequest, GenerateResponse

__all__ = ["GenerateRequest", "GenerateResponse", "ImagegenError", "Settings", "load_settings"]
