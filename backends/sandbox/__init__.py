"""Emulators of the four providers' HTTP APIs for demos and end-to-end, load and fault tests."""

from .faults import FaultProfile, SandboxConfig
from .server import create_sandbox_app

__all__ = ["FaultProfile", "SandboxConfig", "create_sandbox_app"]
