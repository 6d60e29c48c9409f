"""CUDA speed-ups for a diffusers pipeline: fused QKV, channels-last, torch.compile with CUDA graphs,
and an FP8 (e4m3, row-wise scaled) Linear for Hopper.

Each is a small function of the pipeline, applied by the engine from its spec.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

__all__ = ["Float8Linear", "apply_fp8", "compile_pipeline", "prefer_attention", "relative_error", "tune_layout"]

log = logging.getLogger(__name__)


def tune_layout(pipe) -> None:
    """Fuse Q/K/V projections into one matmul and store convolution weights channels-last."""
    import torch

    if hasattr(pipe, "fuse_qkv_projections"):
        try:
            pipe.fuse_qkv_projections()
        except Exception as exc:  # older diffusers, or a model without fusable attention
            log.info("fuse_qkv_projections skipped: %s", exc)
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)


def prefer_attention(kernel: str) -> None:
    """Steer scaled_dot_product_attention to one kernel family, process-wide (a worker owns its GPU).
    Set before compiling: the compiled graph keeps the kernel chosen while tracing. The math kernel
    stays enabled as the fallback for shapes the chosen one cannot take."""
    import torch

    if kernel == "auto":
        return
    if kernel not in ("cudnn", "flash"):
        raise ValueError(f"unknown attention kernel {kernel!r} (auto, cudnn, flash)")
    torch.backends.cuda.enable_cudnn_sdp(kernel == "cudnn")
    torch.backends.cuda.enable_flash_sdp(kernel == "flash")
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    torch.backends.cuda.enable_math_sdp(True)


def use_compile_cache(cache_dir: Path | None) -> None:
    """Keep inductor's compiled kernels and FX graphs in the configured folder between restarts. Assigned, not
    defaulted: importing diffusers has already set TORCHINDUCTOR_CACHE_DIR to a temporary folder by then, so a
    setdefault left the configured folder empty (issue 15 measured 4 KB there, 372 MB in /tmp). Inductor reads
    the variable when it compiles, so setting it before the first compile is enough."""
    if cache_dir is None:
        return
    cache_dir.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)
    os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "1"
    os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "1"


def compile_pipeline(pipe, mode: str = "reduce-overhead", cache_dir: Path | None = None,
                     compile_vae: bool = False, dynamic_batch: bool = False) -> None:
    """Compile the UNet (and optionally the VAE decoder). Static: one graph per batch shape (CUDA graphs in this
    mode), each traced and compiled, at build and at every start. Dynamic batch: one UNet graph whose batch
    dimension is symbolic, traced once for every batch size (CUDA graphs are still captured per size, in well
    under a second), and a VAE graph at batch 1 that decodes a batch image by image; starting a pool then costs
    one trace of each, not one per warm shape. The VAE is 2-5% of the FLOPs."""
    import torch

    use_compile_cache(cache_dir)
    cfg = torch._inductor.config
    cfg.conv_1x1_as_mm = True
    # coordinate-descent tuning was tried: it multiplies compile time (past 10 minutes for SD1.5's shapes).
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    torch._dynamo.config.automatic_dynamic_shapes = False  # only what is marked dynamic is
    compiled = torch.compile(pipe.unet, mode=mode, fullgraph=True)
    if dynamic_batch:
        compiled.forward = _batch_marked_dynamic(compiled.forward)
    pipe.unet = compiled
    if compile_vae:  # autotuning the VAE, run once per image, costs compile time for next to nothing
        vae_mode = "reduce-overhead" if mode.startswith("max-autotune") else mode
        decode = torch.compile(pipe.vae.decode, mode=vae_mode, fullgraph=True)
        pipe.vae.decode = _image_by_image(decode) if dynamic_batch else decode


def _batch_marked_dynamic(forward):
    """`forward` with the batch dimension of every tensor argument marked dynamic (marks go on the call's own
    tensors, outside the compiled frame). A batch of 1 is left static: dynamo specialises sizes 0 and 1."""
    import torch

    def call(*args, **kwargs):
        tensors = [t for t in (*args, *kwargs.values(), *_nested(kwargs)) if isinstance(t, torch.Tensor) and t.ndim]
        batch = tensors[0].shape[0] if tensors else 0
        if batch >= 2:
            for t in tensors:
                if t.shape[0] == batch:
                    torch._dynamo.mark_dynamic(t, 0)
        return forward(*args, **kwargs)

    return call


def _nested(kwargs: dict) -> list:
    """Tensors one dict deep (SDXL's added_cond_kwargs: text_embeds and time_ids carry the batch too)."""
    return [v for value in kwargs.values() if isinstance(value, dict) for v in value.values()]


def _image_by_image(decode):
    """VAE decode of a batch as batch-1 calls of one compiled graph (decoding is linear in images, so nothing is
    lost; each output is copied out of the CUDA graph's buffer before the next call reuses it)."""
    import torch

    def call(latents, return_dict: bool = True, **kwargs):
        images = torch.cat([decode(latents[i:i + 1], return_dict=False, **kwargs)[0].clone()
                            for i in range(latents.shape[0])])
        if return_dict:
            from diffusers.models.autoencoders.vae import DecoderOutput

            return DecoderOutput(sample=images)
        return (images,)

    return call


class Float8Linear:
    """Factory for an nn.Module computing x @ W^T in FP8 e4m3 with row-wise scales (torch._scaled_mm).

    Weights are quantised once; activations per row at run time (torch.compile fuses that
    into the producer). Output in the input's dtype.
    """

    @staticmethod
    def from_linear(linear):
        import torch
        from torch import nn

        class _F8(nn.Module):
            def __init__(self, lin: nn.Linear):
                super().__init__()
                w = lin.weight.detach()
                scale = w.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / 448.0
                self.register_buffer("w_f8", (w.float() / scale).to(torch.float8_e4m3fn).t())  # (in, out) col-major
                self.register_buffer("w_scale", scale.t().contiguous())  # (1, out)
                self.bias = lin.bias
                self.in_features, self.out_features = lin.in_features, lin.out_features  # pipelines read these

            def forward(self, x):
                shape = x.shape
                x2 = x.reshape(-1, shape[-1])
                rows = x2.shape[0]
                if rows % 16:  # the FP8 GEMM wants every dimension a multiple of 16
                    x2 = torch.nn.functional.pad(x2, (0, 0, 0, 16 - rows % 16))
                x_scale = x2.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / 448.0
                x_f8 = (x2.float() / x_scale).to(torch.float8_e4m3fn)
                out = torch._scaled_mm(x_f8, self.w_f8, scale_a=x_scale, scale_b=self.w_scale,
                                       bias=self.bias, out_dtype=x.dtype)
                return out[:rows].reshape(*shape[:-1], self.out_features)

        return _F8(linear)


def apply_fp8(module, min_features: int = 512) -> int:
    """Swap large nn.Linear layers (attention and feed-forward) for Float8Linear; returns how many."""
    from torch import nn

    swapped = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear) and min(child.in_features, child.out_features) >= min_features \
                and child.in_features % 16 == 0 and child.out_features % 16 == 0:
            setattr(module, name, Float8Linear.from_linear(child))
            swapped += 1
        else:
            swapped += apply_fp8(child, min_features)
    return swapped


def relative_error(out, ref) -> float:
    """‖out − ref‖ / ‖ref‖ in float64."""
    return float((out.double() - ref.double()).norm() / ref.double().norm())
