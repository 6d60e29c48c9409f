"""The local diffusion pool: presets, engine and the pool backend."""

from .backend import LocalPoolBackend
from .engine import DiffusionEngine, EngineSpec

__all__ = ["DiffusionEngine", "EngineSpec", "LocalPoolBackend"]
