"""The diffusion engine: one diffusers pipeline on one device, run synchronously.

Callers run it off the event loop (see `backends.local.backend`).
"""

from __future__ import annotations

import io
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from policies.profile import padded_batch

from .presets import PRESETS, build_preset_pipeline

__all__ = ["DiffusionEngine", "EngineSpec", "encode_image", "encode_images"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EngineSpec:
    preset: str = "tiny"
    weights_dir: Path | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16
    guidance_scale: float = 5.0
    seed: int = 0  # for random-weight builds
    compile: bool | None = None  # None: on for CUDA, off for CPU
    compile_mode: str = "reduce-overhead"  # CUDA graphs, one static graph per batch shape
    compile_vae: bool = True  # the VAE decoder too: -0.1 s per SDXL image on an H100 (docs/benchmarks.md)
    fp8: bool = False  # FP8 Linear layers in the UNet (Hopper); check the error with benchmarks/local_pool.py
    tune_layout: bool = True  # fused QKV and channels-last on CUDA
    attention: str = "auto"  # auto | cudnn | flash: the SDPA kernel (cuDNN's is Hopper-tuned)
    cache_dir: Path | None = None  # compile cache kept between restarts
    run_sizes: tuple[int, ...] = ()  # compiled batch sizes: a smaller batch is padded up (no compile mid-serving)


def _resolve_device(spec: EngineSpec):
    import torch

    if spec.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec.device)


def _resolve_dtype(spec: EngineSpec, device):
    import torch

    if spec.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, spec.dtype)


def encode_image(image, output_format: str = "png") -> bytes:
    """PIL image -> file bytes. PNG at low compression: generation dominates, not zlib."""
    buf = io.BytesIO()
    if output_format == "png":
        image.save(buf, format="PNG", compress_level=1)
    elif output_format == "jpeg":
        image.convert("RGB").save(buf, format="JPEG", quality=90)
    else:
        image.save(buf, format=output_format.upper())
    return buf.getvalue()


_encoders: ThreadPoolExecutor | None = None


def encode_images(images: list, output_format: str = "png") -> list[bytes]:
    """A batch's images to file bytes, in parallel: Pillow's encoders release the GIL, and a worker holds
    its device until its batch is encoded (SD1.5 on an H200: 8 PNGs took 0.28 s one by one, a quarter of
    the batch's cycle)."""
    global _encoders
    if len(images) == 1:
        return [encode_image(images[0], output_format)]
    if _encoders is None:
        _encoders = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="encode")
    return list(_encoders.map(encode_image, images, [output_format] * len(images)))


class DiffusionEngine:
    """Loads a pipeline (weights folder or preset) and turns prompts into PIL images."""

    def __init__(self, spec: EngineSpec):
        self.spec = spec
        self.pipe = None
        self.device = None
        self.load_seconds: float | None = None
        self.compiled = False

    @property
    def default_steps(self) -> int:
        return PRESETS[self.spec.preset].default_steps if self.spec.preset in PRESETS else 30

    def load(self) -> None:
        """Build or load the pipeline and move it to its device (blocking, seconds to minutes)."""
        import torch

        _quiet_image_processor_notice()
        started = time.perf_counter()
        self.device = _resolve_device(self.spec)
        dtype = _resolve_dtype(self.spec, self.device)
        if self.spec.weights_dir is not None:
            from diffusers import DiffusionPipeline

            folder = str(self.spec.weights_dir)
            pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True, torch_dtype=dtype)
        else:
            pipe = build_preset_pipeline(self.spec.preset, seed=self.spec.seed, device=str(self.device))
        pipe = pipe.to(self.device) if dtype == torch.float32 else pipe.to(self.device, dtype)
        if dtype == torch.bfloat16 and getattr(pipe.vae.config, "force_upcast", False):
            pipe.vae.register_to_config(force_upcast=False)  # bf16 cannot overflow where fp16 would
        pipe.set_progress_bar_config(disable=True)
        torch.set_grad_enabled(False)
        if self.device.type == "cuda":
            self._optimize(pipe)
        self.pipe = pipe
        self.load_seconds = time.perf_counter() - started
        log.info("engine %s loaded on %s in %.1fs", self.spec.preset, self.device, self.load_seconds)

    def _optimize(self, pipe) -> None:
        from . import optimize

        if self.spec.tune_layout:
            optimize.tune_layout(pipe)
        optimize.prefer_attention(self.spec.attention)
        if self.spec.fp8:
            swapped = optimize.apply_fp8(pipe.unet)
            log.info("fp8: %d UNet Linear layers swapped", swapped)
        if self.spec.compile is not False:
            optimize.compile_pipeline(pipe, self.spec.compile_mode, self.spec.cache_dir, self.spec.compile_vae)
            self.compiled = True

    def generate(
        self,
        prompts: list[str],
        *,
        width: int,
        height: int,
        steps: int,
        seeds: list[int],
        negative_prompts: list[str] | None = None,
        guidance_scale: float | None = None,
        output_type: str = "pil",
    ) -> list:
        """One pipeline call for len(prompts) images; one seed per image. output_type="latent" stops
        before the VAE (benchmarks use it to split denoising from decoding)."""
        import torch

        if self.pipe is None:
            raise RuntimeError("engine not loaded")
        wanted = len(prompts)
        pad = self._padding(wanted)
        if pad:  # a compiled engine runs only its static batch shapes; the padding images are thrown away
            prompts, seeds = prompts + prompts[-1:] * pad, seeds + seeds[-1:] * pad
            negative_prompts = negative_prompts + negative_prompts[-1:] * pad if negative_prompts else None
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        with torch.inference_mode():
            out = self.pipe(
                prompt=prompts,
                negative_prompt=negative_prompts,
                width=width,
                height=height,
                num_inference_steps=steps,
                guidance_scale=self.spec.guidance_scale if guidance_scale is None else guidance_scale,
                generator=generators,
                output_type="pt" if output_type == "pil" else output_type,
            )
        images = _to_pil(out.images) if output_type == "pil" else list(out.images)
        return images[:wanted]

    def _padding(self, batch: int) -> int:
        if not self.compiled:
            return 0
        return padded_batch(tuple(sorted(self.spec.run_sizes)), batch) - batch


def _to_pil(images) -> list:
    """(B, 3, H, W) floats in [0, 1] on the device -> PIL images. Quantised to uint8 on the device, so a
    quarter of the bytes cross to the host and numpy does no float work (diffusers' own "pil" output
    costs ~20 ms per 1024x1024 image on the CPU)."""
    import torch
    from PIL import Image

    pixels = (images * 255).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(p) for p in pixels]


class _NoImageProcessorFallback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


def _quiet_image_processor_notice() -> None:
    """Importing diffusers' pipelines makes transformers say, twice on every start, that its image processors
    fall back to PIL without torchvision. Text-to-image pipelines use no image processor: that notice alone is
    dropped (every other transformers warning still shows)."""
    target = logging.getLogger("transformers.utils.import_utils")
    if not any(isinstance(f, _NoImageProcessorFallback) for f in target.filters):
        target.addFilter(_NoImageProcessorFallback())
