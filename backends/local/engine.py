"""The diffusion engine: one diffusers pipeline on one device, run synchronously.

Callers run it off the event loop (see `backends.local.backend`).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from policies.profile import padded_batch

from . import jit_cache
from .presets import PRESETS, build_preset_pipeline

__all__ = ["DiffusionEngine", "EngineSpec"]

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
    dynamic_batch: bool = True  # jit: one UNet graph for every batch size (one trace per start, not one per shape)
    fp8: bool = False  # FP8 Linear layers in the UNet (Hopper); check the error with benchmarks/local_pool.py
    tune_layout: bool = True  # fused QKV and channels-last on CUDA
    attention: str = "auto"  # auto | cudnn | flash: the SDPA kernel (cuDNN's is Hopper-tuned)
    cache_dir: Path | None = None  # compile cache kept between restarts
    run_sizes: tuple[int, ...] = ()  # compiled batch sizes: a smaller batch is padded up (no compile mid-serving)
    # jit: torch.compile with CUDA graphs, per batch shape (artifacts_dir's compiled file loaded first when there);
    # aot: AOTInductor packages per image size, every batch size up to max_batch, loaded from artifacts_dir
    # (built and saved there when missing).
    compile_backend: str = "jit"
    artifacts_dir: Path | None = None
    max_batch: int = 8


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


class DiffusionEngine:
    """Loads a pipeline (weights folder or preset) and turns prompts into PIL images."""

    def __init__(self, spec: EngineSpec):
        self.spec = spec
        self.pipe = None
        self.device = None
        self.load_seconds: float | None = None
        self.load_phases: dict[str, float] = {}  # where load() spent its time (cold-start benchmark)
        self.compiled = False
        self.aot = None  # AotCompiler, when compile_backend is aot
        self.store = None  # ArtifactStore, when compiled

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
        phases = self.load_phases = {}
        if self.spec.weights_dir is not None:
            from diffusers import DiffusionPipeline

            folder = str(self.spec.weights_dir)
            pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True, torch_dtype=dtype)
        else:
            pipe = build_preset_pipeline(self.spec.preset, seed=self.spec.seed, device=str(self.device))
        phases["build_s"] = round(time.perf_counter() - started, 2)
        pipe = pipe.to(self.device) if dtype == torch.float32 else pipe.to(self.device, dtype)
        phases["to_device_s"] = round(time.perf_counter() - started - phases["build_s"], 2)
        if dtype == torch.bfloat16 and getattr(pipe.vae.config, "force_upcast", False):
            pipe.vae.register_to_config(force_upcast=False)  # bf16 cannot overflow where fp16 would
        pipe.set_progress_bar_config(disable=True)
        torch.set_grad_enabled(False)
        if self.device.type == "cuda" or self.spec.compile:  # compile=True compiles on the CPU too (tests)
            self._optimize(pipe)
        self.pipe = pipe
        self.load_seconds = time.perf_counter() - started
        phases["optimize_s"] = round(self.load_seconds - phases["build_s"] - phases["to_device_s"], 2)
        log.info("engine %s loaded on %s in %.1fs", self.spec.preset, self.device, self.load_seconds)

    def _optimize(self, pipe) -> None:
        from . import optimize

        cuda = self.device.type == "cuda"
        if self.spec.tune_layout and cuda:
            optimize.tune_layout(pipe)
        if cuda:
            optimize.prefer_attention(self.spec.attention)
        if self.spec.fp8 and cuda:
            swapped = optimize.apply_fp8(pipe.unet)
            log.info("fp8: %d UNet Linear layers swapped", swapped)
        if self.spec.compile is False:
            return
        optimize.use_compile_cache(self.spec.cache_dir)  # a rebuild after a mismatch reuses kernels it can
        self.store = self._artifact_store(pipe)
        if self.spec.compile_backend == "aot":
            from .aot import AotCompiler

            self.aot = AotCompiler(pipe, self.store, self.spec.max_batch)
        else:
            jit_cache.load(self.store, self.spec.cache_dir)
            optimize.compile_pipeline(pipe, self.spec.compile_mode, self.spec.cache_dir, self.spec.compile_vae,
                                      self.spec.dynamic_batch)
        self.compiled = True

    def _artifact_store(self, pipe):
        from .artifacts import ArtifactStore, environment, fingerprint

        options = {"tune_layout": self.spec.tune_layout, "fp8": self.spec.fp8, "attention": self.spec.attention}
        fields = environment(self.device) | fingerprint(pipe, _resolve_dtype(self.spec, self.device), options)
        root = self.spec.artifacts_dir or Path(self.spec.cache_dir or ".") / "artifacts"
        return ArtifactStore(root, fields)

    def save_jit_cache(self) -> int:
        """The compile cache (what torch.compile built), into the artifact folder (`imagegw pool build`)."""
        return jit_cache.save(self.store, self.spec.cache_dir)

    def is_prepared(self, width: int, height: int) -> bool:
        return self.aot is None or (width, height) in self.aot.prepared

    def prepare(self, width: int, height: int, report=lambda detail: None) -> dict:
        """Make one image size fast before it is served: load its compiled packages (or build and save them).
        A package that cannot be built or loaded is logged and that size runs on torch.compile instead."""
        if self.aot is None:
            return {}
        try:
            return self.aot.prepare(width, height, report)
        except Exception as exc:
            log.warning("AOT compile of %dx%d failed (%s: %s); serving it with torch.compile instead", width,
                        height, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            self._fall_back_to_jit()
            return {"fallback": "jit"}

    def _fall_back_to_jit(self) -> None:
        import torch

        from . import optimize

        self.aot.uninstall()
        self.aot = None
        optimize.compile_pipeline(self.pipe, self.spec.compile_mode, self.spec.cache_dir, self.spec.compile_vae)
        torch._dynamo.config.automatic_dynamic_shapes = True  # one graph for the batch sizes AOT would have run

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
        between_steps=None,
        nested: bool = False,
    ) -> list:
        """One pipeline call for len(prompts) images; one seed per image. output_type="latent" stops
        before the VAE (benchmarks use it to split denoising from decoding). `between_steps()` is called after
        each denoising step: it may run other batches there (`nested`), which pauses this one."""
        import torch

        if self.pipe is None:
            raise RuntimeError("engine not loaded")
        # A batch run while another is paused mid-loop gets a pipeline of its own over the same modules (compiled
        # graphs and weights shared): the paused call's scheduler and loop state live on the pipeline object.
        pipe = self._sibling() if nested else self.pipe
        extra = {}
        if between_steps is not None:
            def callback(_pipe, _step, _timestep, tensors):
                between_steps()
                return tensors

            extra["callback_on_step_end"] = callback
        wanted = len(prompts)
        pad = self._padding(wanted)
        if pad:  # a compiled engine runs only its static batch shapes; the padding images are thrown away
            prompts, seeds = prompts + prompts[-1:] * pad, seeds + seeds[-1:] * pad
            negative_prompts = negative_prompts + negative_prompts[-1:] * pad if negative_prompts else None
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        with torch.inference_mode():
            out = pipe(
                prompt=prompts,
                negative_prompt=negative_prompts,
                width=width,
                height=height,
                num_inference_steps=steps,
                guidance_scale=self.spec.guidance_scale if guidance_scale is None else guidance_scale,
                generator=generators,
                output_type="pt" if output_type in ("pil", "uint8") else output_type,
                **extra,
            )
        if output_type == "uint8":  # (B, 3, H, W) uint8 on the device, for `encode.encode_batch`
            return _quantise(out.images[:wanted])
        images = _to_pil(out.images) if output_type == "pil" else list(out.images)
        return images[:wanted]

    def _sibling(self):
        """The pipeline over the same modules with a scheduler of its own (built per call: a few ms, and never
        stale when the modules are swapped, as an AOT fallback does)."""
        pipe = type(self.pipe)(**{**self.pipe.components, "scheduler": copy.deepcopy(self.pipe.scheduler)})
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _padding(self, batch: int) -> int:
        if not self.compiled or self.spec.compile_backend == "aot":  # AOT packages take any batch size
            return 0
        return padded_batch(tuple(sorted(self.spec.run_sizes)), batch) - batch


def _to_pil(images) -> list:
    """(B, 3, H, W) floats in [0, 1] on the device -> PIL images. Quantised to uint8 on the device, so a
    quarter of the bytes cross to the host and numpy does no float work (diffusers' own "pil" output
    costs ~20 ms per 1024x1024 image on the CPU)."""
    from PIL import Image

    pixels = _quantise(images).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(p) for p in pixels]


def _quantise(images):
    import torch

    return (images * 255).round_().clamp_(0, 255).to(torch.uint8)


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
