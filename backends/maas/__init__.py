"""Per-request image APIs, one module each, on their real wire formats (shared/providers.md)."""

from ._http import ProviderConfig
from .base import ApiBackend
from .bria import BriaBackend
from .gemini import GeminiBackend
from .openai_images import OpenAIImagesBackend
from .reve import ReveBackend
from .seedream import SeedreamBackend

PROVIDERS: dict[str, type[ApiBackend]] = {
    "seedream": SeedreamBackend,
    "gemini": GeminiBackend,
    "reve": ReveBackend,
    "bria": BriaBackend,
    "openai": OpenAIImagesBackend,
}

__all__ = ["PROVIDERS", "ApiBackend", "BriaBackend", "GeminiBackend", "OpenAIImagesBackend", "ProviderConfig",
           "ReveBackend", "SeedreamBackend"]
