"""Backends: one small module each, behind `backends.protocol.Backend`."""

from .errors import BackendError
from .protocol import Backend, GeneratedImage, GenerationJob, GenerationResult, LoadReport, Offer

__all__ = [
    "Backend",
    "BackendError",
    "GeneratedImage",
    "GenerationJob",
    "GenerationResult",
    "LoadReport",
    "Offer",
]
