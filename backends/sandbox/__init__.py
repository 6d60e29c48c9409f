"""Emulators of the four providers' HTTP APIs for demos and end-to-end, load and fault tests."""

from .faults import FaultProfile, SandboxConfig
from .server import create_sandbox_app

__all__ = ["FaultProfile", "SandboxConfig", "create_sandbox_app"]

# Where each provider's API lives inside the sandbox (its base_url suffix).
SANDBOX_PREFIX = {"seedream": "/seedream/api/v3", "gemini": "/gemini", "reve": "/reve", "bria": "/bria"}
__all__ += ["SANDBOX_PREFIX"]
