"""Ahead-of-time compiled UNet and VAE decoder (AOTInductor packages), built once and loaded in seconds.

A package holds one component at one image size for every batch size up to the largest configured (the batch
dimension is dynamic), without the weights: they are the pipeline's own tensors, handed to the package at load
(`user_managed`), so a package is a few MB to copy and a folder of them serves any weights of the same
architecture. Packages live under a folder named by a digest of what they depend on (GPU, torch, diffusers,
triton, CUDA, the architecture, dtype and layout options); copy that folder to another host of the same GPU and
software and its workers load instead of compiling. A digest with no folder is a mismatch: the worker compiles
(and saves what it built), saying which field differed from the folders that are there. A package that fails to
load is never fatal: the component falls back to compiling.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ArtifactStore", "Component", "describe_mismatch", "environment", "fingerprint"]

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def environment(device) -> dict:
    """What a compiled package depends on besides the model: the device and the software that built it."""
    import diffusers
    import torch

    env = {"torch": torch.__version__, "diffusers": diffusers.__version__, "device": device.type}
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        env |= {"gpu": torch.cuda.get_device_name(device), "capability": f"{major}.{minor}",
                "cuda": torch.version.cuda}
        try:
            import triton

            env["triton"] = triton.__version__
        except ImportError:  # pragma: no cover - CUDA torch ships triton
            pass
    return env


def fingerprint(pipe, dtype, options: dict) -> dict:
    """The architecture (not the weights), dtype and the layout options the graph was traced with."""
    def config(module) -> str:
        cfg = {k: v for k, v in dict(module.config).items() if not k.startswith("_")}
        return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]

    return {"unet": f"{type(pipe.unet).__name__}:{config(pipe.unet)}",
            "vae": f"{type(pipe.vae).__name__}:{config(pipe.vae)}", "dtype": str(dtype).removeprefix("torch."),
            **{k: v for k, v in sorted(options.items())}}


def _digest(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def describe_mismatch(root: Path, fields: dict) -> str:
    """Why no folder under `root` fits: the fields each one there was built with that differ from these."""
    others = []
    for manifest in sorted(root.glob(f"*/{MANIFEST}")) if root.is_dir() else ():
        try:
            built = json.loads(manifest.read_text()).get("fields", {})
        except (OSError, ValueError):
            continue
        diff = [f"{k}={built.get(k)!r} (here {v!r})" for k, v in sorted(fields.items()) if built.get(k) != v]
        others.append(f"{manifest.parent.name}: " + ", ".join(diff[:4]))
    return "; ".join(others) if others else f"none under {root}"


@dataclass(frozen=True, slots=True)
class Component:
    """One compiled piece of the pipeline at one image size."""

    name: str  # "unet" | "vae"
    width: int
    height: int
    max_batch: int  # images; the UNet's batch is twice this under classifier-free guidance

    @property
    def filename(self) -> str:
        return f"{self.name}-{self.width}x{self.height}-b{self.max_batch}.pt2"


class ArtifactStore:
    """The folder of packages that fit this device, software and model."""

    def __init__(self, root: Path, fields: dict):
        self.root = Path(root)
        self.fields = fields
        self.folder = self.root / _digest(fields)

    def path(self, component: Component) -> Path:
        return self.folder / component.filename

    def has(self, component: Component) -> bool:
        return self.path(component).is_file()

    def save(self, component: Component, build) -> Path:
        """Run `build(path)` into a temporary file beside the final one, then move it in place (a half-written
        package is never loaded), and record the manifest."""
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.path(component)
        partial = final.with_suffix(f".partial-{os.getpid()}.pt2")
        started = time.perf_counter()
        try:
            build(str(partial))
            os.replace(partial, final)
        finally:
            partial.unlink(missing_ok=True)
        self.record(component.filename, {"build_s": round(time.perf_counter() - started, 1)})
        return final

    def record(self, filename: str, facts: dict) -> None:
        """Note a file in the folder's manifest (what built it is the folder's fields)."""
        path = self.folder / MANIFEST
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError):
            manifest = {"fields": self.fields, "packages": {}}
        manifest["packages"][filename] = {**facts, "built_at": int(time.time())}
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
        os.replace(tmp, path)

    def mismatch(self) -> str:
        return describe_mismatch(self.root, self.fields)
