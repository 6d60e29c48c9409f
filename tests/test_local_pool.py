"""The local diffusion backend: real diffusers pipelines built from presets, run off the event loop."""

from __future__ import annotations

import asyncio
import io
import time

import pytest
from PIL import Image

from backends.errors import BackendTimeout, BackendUnavailable
from backends.local import DiffusionEngine, EngineSpec, LocalPoolBackend
from backends.protocol import GenerationJob
from policies.types import Health


@pytest.fixture(scope="module")
def tiny_engine():
    engine = DiffusionEngine(EngineSpec(preset="tiny"))
    engine.load()
    return engine


def test_tiny_preset_is_a_real_pipeline_with_text_encoder_unet_scheduler_and_vae(tiny_engine):
    pipe = tiny_engine.pipe
    assert {"text_encoder", "tokenizer", "unet", "scheduler", "vae"} <= set(pipe.components)
    images = tiny_engine.generate(["a fox"], width=128, height=96, steps=2, seeds=[1])
    assert images[0].size == (128, 96)


def test_prompt_and_seed_change_the_pixels(tiny_engine):
    def px(prompt, seed):
        return tiny_engine.generate([prompt], width=64, height=64, steps=2, seeds=[seed])[0].tobytes()

    assert px("a fox", 1) == px("a fox", 1)
    assert px("a fox", 1) != px("a fox", 2)
    assert px("a fox", 1) != px("a whale", 1)


async def test_backend_warms_up_then_serves_pngs_and_learns_its_speed(tiny_engine):
    backend = LocalPoolBackend(tiny_engine, warmup=True)
    assert backend.load().health is Health.WARMING
    with pytest.raises(BackendUnavailable):
        await backend.generate(GenerationJob(id="a", prompt="p", width=64, height=64), time.monotonic() + 5)
    await backend.start()
    await backend.wait_ready()
    assert backend.load().health is Health.OK and backend.load().ms_per_unit > 0
    result = await backend.generate(GenerationJob(id="b", prompt="p", width=128, height=128, n=2, steps=2),
                                    time.monotonic() + 30)
    assert len(result.images) == 2 and result.gpu_seconds > 0
    assert Image.open(io.BytesIO(result.images[0].data)).format == "PNG"
    await backend.aclose()


async def test_generation_runs_off_the_event_loop(tiny_engine):
    backend = LocalPoolBackend(tiny_engine, warmup=False)
    await backend.start()
    await backend.wait_ready()
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    t = asyncio.create_task(ticker())
    await backend.generate(GenerationJob(id="c", prompt="p", width=256, height=256, steps=4), time.monotonic() + 30)
    t.cancel()
    assert ticks > 3  # the loop kept running while the pipeline did
    await backend.aclose()


async def test_queue_shows_in_the_load_report_and_a_job_past_its_deadline_fails(tiny_engine):
    backend = LocalPoolBackend(tiny_engine, warmup=True)
    await backend.start()
    await backend.wait_ready()
    first = asyncio.create_task(backend.generate(
        GenerationJob(id="d", prompt="p", width=256, height=256, steps=8), time.monotonic() + 30))
    await asyncio.sleep(0.01)
    assert backend.load().queue_ms > 0 and not backend.load().has_headroom
    with pytest.raises(BackendTimeout):
        await backend.generate(GenerationJob(id="e", prompt="p", width=256, height=256), time.monotonic() + 0.001)
    await first
    await backend.aclose()


def test_weights_folder_loads_locally_without_the_hub(tiny_engine, tmp_path):
    tiny_engine.pipe.save_pretrained(tmp_path / "tiny-weights")
    engine = DiffusionEngine(EngineSpec(weights_dir=tmp_path / "tiny-weights"))
    engine.load()
    assert engine.generate(["x"], width=64, height=64, steps=2, seeds=[0])[0].size == (64, 64)


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs a CUDA device")
def test_sd15_on_gpu_in_bf16():
    import torch

    engine = DiffusionEngine(EngineSpec(preset="sd15"))
    engine.load()
    assert engine.pipe.unet.dtype == torch.bfloat16
    assert engine.generate(["x"], width=512, height=512, steps=2, seeds=[0])[0].size == (512, 512)
