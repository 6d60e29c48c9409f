"""Architecture presets built with random weights: the real models' compute, noise for pixels.

`sd15` and `sdxl` use the public diffusers configs in `architectures/`;
`tiny` is small enough for CPU tests and demos (a few hundred ms an image).
"""

from __future__ import annotations

import contextlib
import json
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from importlib import resources

__all__ = ["PRESETS", "PresetInfo", "build_preset_pipeline"]


@dataclass(frozen=True, slots=True)
class PresetInfo:
    native_size: int
    default_steps: int
    max_side: int
    min_side: int = 64
    multiple_of: int = 8


PRESETS: dict[str, PresetInfo] = {
    "tiny": PresetInfo(native_size=256, default_steps=4, max_side=1024),
    "sd15": PresetInfo(native_size=512, default_steps=30, max_side=1024),
    "sdxl": PresetInfo(native_size=1024, default_steps=30, max_side=2048),
}

# CLIP ViT-L/14 text tower (SD1.5, SDXL encoder 1) and OpenCLIP bigG (SDXL encoder 2).
_CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
               num_attention_heads=12, hidden_act="quick_gelu", vocab_size=49408)
_CLIP_BIG_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                   num_attention_heads=20, hidden_act="gelu", vocab_size=49408,
                   projection_dim=1280)
_CLIP_TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, vocab_size=514)


@cache
def _architecture(name: str) -> dict:
    text = resources.files(__package__).joinpath("architectures", f"{name}.json").read_text()
    return json.loads(text)


def _text_config(tokenizer, **arch):
    from transformers import CLIPTextConfig

    ids = tokenizer.convert_tokens_to_ids
    return CLIPTextConfig(
        max_position_embeddings=77,
        bos_token_id=ids("<|startoftext|>"),
        eos_token_id=ids("<|endoftext|>"),
        pad_token_id=ids("<|endoftext|>"),
        **arch,
    )


def _scheduler():
    import torch
    from diffusers import EulerDiscreteScheduler

    with torch.device("cpu"):  # scheduler state is host-side (numpy)
        return EulerDiscreteScheduler(
            num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
            beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading",
        )


def _vae(block_out_channels, norm_groups, scaling_factor):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        block_out_channels=block_out_channels, layers_per_block=2 if norm_groups == 32 else 1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=norm_groups, scaling_factor=scaling_factor, force_upcast=False,
    )


def _tiny():
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from .tokenizer import byte_level_clip_tokenizer

    tokenizer = byte_level_clip_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32, 32), norm_num_groups=8, cross_attention_dim=32,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"), attention_head_dim=4,
    )
    return StableDiffusionPipeline(
        vae=_vae((4, 4, 8, 8), 4, 0.18215),
        text_encoder=CLIPTextModel(_text_config(tokenizer, **_CLIP_TINY)),
        tokenizer=tokenizer, unet=unet, scheduler=_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _sd15():
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from .tokenizer import byte_level_clip_tokenizer

    tokenizer = byte_level_clip_tokenizer()
    return StableDiffusionPipeline(
        vae=_vae((128, 256, 512, 512), 32, 0.18215),
        text_encoder=CLIPTextModel(_text_config(tokenizer, **_CLIP_L)),
        tokenizer=tokenizer, unet=UNet2DConditionModel(**_architecture("sd15_unet")),
        scheduler=_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _sdxl():
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from .tokenizer import byte_level_clip_tokenizer

    tokenizer = byte_level_clip_tokenizer()
    return StableDiffusionXLPipeline(
        # bf16 has fp32's range: no need for diffusers' fp32 VAE upcast (which would also defeat compile).
        vae=AutoencoderKL(**{**_architecture("sdxl_vae"), "force_upcast": False}),
        text_encoder=CLIPTextModel(_text_config(tokenizer, **_CLIP_L)),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(tokenizer, **_CLIP_BIG_G)),
        tokenizer=tokenizer, tokenizer_2=tokenizer,
        unet=UNet2DConditionModel(**_architecture("sdxl_unet")), scheduler=_scheduler(),
    )


_BUILDERS = {"tiny": _tiny, "sd15": _sd15, "sdxl": _sdxl}


def build_preset_pipeline(preset: str, seed: int = 0, device: str = "cpu"):
    """Build a preset's pipeline in fp32 with seeded random weights on `device`. The layers' own initialisers
    are skipped (transformers' and torch's: on an H200 they made SDXL's build 14 s of a 20 s start) and every
    parameter is then filled in one pass on the device (`fill_random`): noise of the same scale, in seconds."""
    import torch

    if preset not in _BUILDERS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(_BUILDERS)}")
    with torch.device(device), _layer_init_skipped():
        pipe = _BUILDERS[preset]()
    for name in ("text_encoder", "text_encoder_2", "unet", "vae"):
        if getattr(pipe, name, None) is not None:
            fill_random(getattr(pipe, name), seed)
    return pipe


_INIT_FUNCTIONS = ("uniform_", "normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_", "xavier_uniform_",
                   "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "trunc_normal_", "orthogonal_")
# torch modules that bind an initialiser by name at import (`from torch.nn.init import ...`) besides torch.nn.init.
_INIT_HOLDERS = ("torch.nn.init", "torch.nn.modules.linear", "torch.nn.modules.conv", "torch.nn.modules.sparse",
                 "torch.nn.modules.normalization", "torch.nn.modules.activation", "torch.nn.modules.batchnorm")


@contextmanager
def _layer_init_skipped():
    """Layers allocate their parameters uninitialised (buffers such as position ids are built as usual)."""
    import importlib

    def keep(tensor, *args, **kwargs):
        return tensor

    saved = []
    for holder in map(importlib.import_module, _INIT_HOLDERS):
        for name in _INIT_FUNCTIONS:
            if hasattr(holder, name):
                saved.append((holder, name, getattr(holder, name)))
                setattr(holder, name, keep)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_transformers_init_skipped())
        try:
            yield
        finally:
            for holder, name, function in saved:
                setattr(holder, name, function)


def _transformers_init_skipped():
    try:
        from transformers.initialization import no_init_weights  # transformers 5
        return no_init_weights()
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights  # transformers 4
            return no_init_weights(True)
        except ImportError:
            return contextlib.nullcontext()


def fill_random(module, seed: int) -> None:
    """Every parameter from one seeded generator on its device, in a fixed order: matrices and kernels uniform
    in +-1/sqrt(fan_in) (torch's default scale for Linear and Conv), norm scales 1, biases and the rest 0."""
    import torch

    params = list(module.named_parameters())
    if not params:
        return
    generator = torch.Generator(params[0][1].device).manual_seed(seed)
    with torch.no_grad():
        for name, param in params:
            if param.ndim >= 2:
                bound = param[0].numel() ** -0.5
                param.uniform_(-bound, bound, generator=generator)
            elif name.endswith("weight"):
                param.fill_(1.0)
            else:
                param.zero_()
