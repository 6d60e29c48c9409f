"""Ahead-of-time compiled packages: built once by `imagegw pool build`, loaded by any worker like this one, and a
folder that does not fit (another GPU, other software) is said so and compiled anew, never a crash."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from backends.local.artifacts import ArtifactStore, Component, describe_mismatch
from backends.local.engine import DiffusionEngine, EngineSpec
from gateway.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_a_folder_built_elsewhere_is_named_with_the_fields_that_differ(tmp_path):
    here = {"gpu": "NVIDIA H200", "torch": "2.11.0", "unet": "UNet2DConditionModel:abc"}
    theirs = ArtifactStore(tmp_path, here | {"gpu": "NVIDIA H100 80GB HBM3"})
    theirs.save(Component("unet", 64, 64, 2), lambda path: Path(path).write_bytes(b"package"))
    ours = ArtifactStore(tmp_path, here)
    assert ours.folder != theirs.folder and not ours.has(Component("unet", 64, 64, 2))
    why = describe_mismatch(tmp_path, here)
    assert "gpu='NVIDIA H100 80GB HBM3' (here 'NVIDIA H200')" in why and "torch" not in why
    assert describe_mismatch(tmp_path / "none", here).startswith("none under")


def test_a_build_that_fails_leaves_no_half_written_package(tmp_path):
    store = ArtifactStore(tmp_path, {"gpu": "x"})
    component = Component("vae", 64, 64, 2)

    def broken(path):
        Path(path).write_bytes(b"half")
        raise RuntimeError("compiler died")

    with pytest.raises(RuntimeError):
        store.save(component, broken)
    assert not store.has(component) and list(store.folder.glob("*.pt2")) == []
    store.save(component, lambda path: Path(path).write_bytes(b"whole"))
    manifest = json.loads((store.folder / "manifest.json").read_text())
    assert manifest["fields"] == {"gpu": "x"} and component.filename in manifest["packages"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """`imagegw pool build` on the tiny preset (CPU): the one slow step (~1 minute), shared by the tests below."""
    folder = tmp_path_factory.mktemp("build")
    config = folder / "config"
    config.mkdir()
    shutil.copy(ROOT / "config" / "policy.yaml", config / "policy.yaml")
    (config / "gateway.yaml").write_text(json.dumps({
        "data_dir": str(folder / "data"),
        "local": {"preset": "tiny", "devices": ["cpu"], "compile": True, "compile_backend": "aot", "max_batch": 2,
                  "tune_layout": False,
                  "warm_shapes": [{"width": 64, "height": 64, "steps": 2, "batch_sizes": [1, 2]}]},
    }))
    code = main(["pool", "build", "--config", str(config), "--jobs", "2"])
    return code, folder


def _spec(folder: Path) -> EngineSpec:
    return EngineSpec(preset="tiny", device="cpu", compile=True, compile_backend="aot", max_batch=2,
                      tune_layout=False, artifacts_dir=folder / "data" / "artifacts", cache_dir=folder / "cache")


def test_pool_build_writes_packages_that_a_fresh_engine_loads_instead_of_compiling(built, capsys):
    code, folder = built
    assert code == 0
    packages = sorted(p.name for p in (folder / "data" / "artifacts").glob("*/*.pt2"))
    assert packages == ["unet-64x64-b2.pt2", "vae-64x64-b2.pt2"]
    engine = DiffusionEngine(_spec(folder))
    engine.load()
    timings = engine.prepare(64, 64)
    assert set(timings) == {"load_s"}  # loaded, nothing built
    # each package was loaded by a child process first (a loader that crashes takes the child down, not us)
    assert sorted(p.name for p in (folder / "data" / "artifacts").glob("*/*.loads")) == \
        ["unet-64x64-b2.pt2.loads", "vae-64x64-b2.pt2.loads"]
    eager = DiffusionEngine(EngineSpec(preset="tiny", device="cpu"))
    eager.load()
    for batch in (1, 2):  # one package, every batch size
        ours = engine.generate(["a lighthouse"] * batch, width=64, height=64, steps=2, seeds=list(range(batch)))
        ref = eager.generate(["a lighthouse"] * batch, width=64, height=64, steps=2, seeds=list(range(batch)))
        for a, b in zip(ours, ref, strict=True):
            assert np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max() <= 2
    assert engine.aot._unet.by_size and engine.aot._vae.by_size  # the packages ran, not the eager modules


def test_a_second_build_finds_everything_built(built, capsys):
    code, folder = built
    assert main(["pool", "build", "--config", str(folder / "config")]) == 0
    assert "64x64: already built" in capsys.readouterr().out


def test_a_package_that_does_not_load_falls_back_to_torch_compile_with_a_log_line(built, tmp_path, caplog):
    code, folder = built
    spec = _spec(folder)
    copy = tmp_path / "artifacts"
    shutil.copytree(spec.artifacts_dir, copy)
    for package in copy.glob("*/unet-*.pt2"):
        package.write_bytes(b"not a package")
    for marker in copy.glob("*/*.loads"):  # a host that never loaded them: the check process runs
        marker.unlink()
    engine = DiffusionEngine(dataclasses.replace(spec, artifacts_dir=copy))
    engine.load()
    with caplog.at_level(logging.WARNING):
        assert engine.prepare(64, 64) == {"fallback": "jit"}
    assert "AOT compile of 64x64 failed" in caplog.text and "torch.compile instead" in caplog.text
    assert "does not load on this host: a check process died" in caplog.text
    assert engine.aot is None and engine.compiled  # torch.compile compiles lazily: nothing ran yet


def test_pool_build_under_jit_compiles_sizes_in_parallel_into_one_cache_that_makes_another_hosts_compiles_hits(
        tmp_path, capsys):
    """Two sizes, each compiled in its own process; a size's batch sizes share one graph (dynamic batch), so a
    fresh host traces the UNet once for batch 1 and 2, finds it in the cache, and computes what eager does."""
    import subprocess
    import sys

    config = tmp_path / "config"
    config.mkdir()
    shutil.copy(ROOT / "config" / "policy.yaml", config / "policy.yaml")
    (config / "gateway.yaml").write_text(json.dumps({
        "data_dir": str(tmp_path / "data"),
        "local": {"preset": "tiny", "devices": ["cpu"], "compile": True, "compile_backend": "jit",
                  "compile_mode": "default", "compile_vae": False, "max_batch": 2,
                  "warm_shapes": [{"width": 64, "height": 64, "steps": 2, "batch_sizes": [1, 2]},
                                  {"width": 64, "height": 96, "steps": 2, "batch_sizes": [1]}]},
    }))
    assert main(["pool", "build", "--config", str(config), "--jobs", "2"]) == 0
    assert "3 shape(s) with torch.compile in 2 process(es), 2 at a time" in capsys.readouterr().out
    artifacts = tmp_path / "data" / "artifacts"
    assert list(artifacts.glob("*/compile_cache"))
    # "Another host": a fresh process whose own compile cache is empty, given only the artifact folder.
    child = f"""
import json, logging, sys
sys.path.insert(0, {str(ROOT)!r})
logging.basicConfig(level=logging.INFO)
from pathlib import Path
import torch
from backends.local.engine import DiffusionEngine, EngineSpec
spec = EngineSpec(preset="tiny", device="cpu", compile=True, compile_backend="jit", compile_mode="default",
                  compile_vae=False, artifacts_dir=Path({str(artifacts)!r}),
                  cache_dir=Path({str(tmp_path / "fresh")!r}), max_batch=2, run_sizes=(1, 2))
engine = DiffusionEngine(spec)
engine.load()
engine.generate(["x"], width=64, height=64, steps=2, seeds=[0])
two = engine.generate(["x", "y"], width=64, height=64, steps=2, seeds=[0, 1], output_type="pt")
eager = DiffusionEngine(EngineSpec(preset="tiny", device="cpu"))
eager.load()
ref = eager.generate(["x", "y"], width=64, height=64, steps=2, seeds=[0, 1], output_type="pt")
c = torch._dynamo.utils.counters
print(json.dumps({{"hit": c["inductor"]["fxgraph_cache_hit"], "miss": c["inductor"]["fxgraph_cache_miss"],
                  "graphs": c["stats"]["unique_graphs"],
                  "error": max(float((a - b).abs().max()) for a, b in zip(two, ref))}}))
"""
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert counts["hit"] >= 1 and counts["miss"] == 0, counts  # compiled elsewhere, by another process
    assert counts["graphs"] == 1, counts  # batch 1 and batch 2: one UNet graph (the VAE is not compiled here)
    assert counts["error"] < 1e-4, counts
    assert "merged into" in proc.stderr
