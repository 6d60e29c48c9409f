"""The pipeline's UNet and VAE decoder run through AOTInductor packages, one per image size.

`AotCompiler.prepare(width, height)` makes a size fast: it loads the size's packages from the artifact store, or
builds them (torch.export with a dynamic batch, then AOTInductor) and saves them there first. The pipeline is
left as it is except for two entry points, `unet.forward` and `vae.decode`, which send a call of a prepared size
to its package and any other call to the original module: a size never prepared still runs (eagerly), so nothing
fails while packages load, and the engine's callers see no difference.

Example inputs are captured from a real one-step call of the pipeline, so the exported graph takes exactly what
the pipeline passes (timestep dtype, SDXL's added conditioning) for any diffusers text-to-image pipeline.
"""

from __future__ import annotations

import logging
import time

from .artifacts import ArtifactStore, Component

__all__ = ["AotCompiler"]

log = logging.getLogger(__name__)


def _capture(pipe, width: int, height: int) -> tuple[dict, object]:
    """Run the pipeline once (one step, two images: an example batch of 1 would be specialised by export) and
    keep the UNet's first inputs and the decoder's latents."""
    seen: dict = {}
    unet_forward, vae_decode = pipe.unet.forward, pipe.vae.decode

    def record_unet(sample, timestep, encoder_hidden_states, *args, **kwargs):
        seen.setdefault("unet", (sample, timestep, encoder_hidden_states, kwargs.get("added_cond_kwargs")))
        return unet_forward(sample, timestep, encoder_hidden_states, *args, **kwargs)

    def record_vae(z, *args, **kwargs):
        seen.setdefault("vae", z)
        return vae_decode(z, *args, **kwargs)

    pipe.unet.forward, pipe.vae.decode = record_unet, record_vae
    try:
        pipe(prompt=["capture"] * 2, width=width, height=height, num_inference_steps=1, output_type="pt")
    finally:
        pipe.unet.forward, pipe.vae.decode = unet_forward, vae_decode
    return seen["unet"], seen["vae"]


def _modules():
    import torch

    class UNetCall(torch.nn.Module):
        """The UNet's forward as the pipeline calls it, returning the noise prediction tensor."""

        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep, encoder_hidden_states, added_cond_kwargs=None):
            # The class's forward, not the instance's: that one is the dispatcher installed below.
            return type(self.unet).forward(self.unet, sample, timestep, encoder_hidden_states,
                                           added_cond_kwargs=added_cond_kwargs, return_dict=False)[0]

    class VaeDecode(torch.nn.Module):
        def __init__(self, vae):
            super().__init__()
            self.vae = vae

        def forward(self, z):
            return type(self.vae).decode(self.vae, z, return_dict=False)[0]

    return UNetCall, VaeDecode


def _export(module, args: tuple, kwargs: dict, batch_dims: dict, max_batch: int):
    import torch

    batch = torch.export.Dim("batch", min=1, max=max_batch)
    shapes = {name: (None if spec is None else _batch_spec(spec, batch)) for name, spec in batch_dims.items()}
    return torch.export.export(module, args, kwargs, dynamic_shapes=shapes, strict=False)


def _batch_spec(spec, batch):
    if isinstance(spec, dict):
        return {k: {0: batch} for k in spec}
    return {0: batch}


def _compile(exported, path: str) -> str:
    import torch

    # The weights stay out of the package: the pipeline's own tensors are handed over at load.
    configs = {"aot_inductor.package_constants_in_so": False, "conv_1x1_as_mm": True}
    return torch._inductor.aoti_compile_and_package(exported, package_path=path, inductor_configs=configs)


def _check_loads(path) -> None:
    """Load the package once in a child process before this one does: a loader that crashes (torch 2.11's
    segfaulted on an H200 for packages built without their weights) takes down the child, not the gateway. A
    package that loaded is marked for this torch and host, and later starts skip the check."""
    import socket
    import subprocess
    import sys

    import torch

    stamp = f"{torch.__version__} {socket.gethostname()}"
    marker = path.with_name(path.name + ".loads")
    if marker.is_file() and stamp in marker.read_text().splitlines():
        return
    code = "import sys, torch; torch._inductor.aoti_load_package(sys.argv[1])"
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
        tail = (proc.stderr.strip().splitlines() or [""])[-1][:200]
        raise RuntimeError(f"{path.name} does not load on this host: a check process died ({how}) {tail}")
    with marker.open("a") as f:
        f.write(stamp + "\n")


def _load(path, module):
    import torch

    _check_loads(path)
    compiled = torch._inductor.aoti_load_package(str(path))
    tensors = dict(module.named_parameters()) | dict(module.named_buffers())
    compiled.load_constants({fqn: tensors[fqn] for fqn in compiled.get_constant_fqns()},
                            check_full_update=True, user_managed=True)
    return compiled


class _Dispatch:
    """An entry point that sends prepared sizes to their package and everything else to the original."""

    def __init__(self, original, size_of):
        self.original = original
        self.size_of = size_of
        self.by_size: dict[tuple[int, int], object] = {}

    def package_for(self, tensor):
        return self.by_size.get(self.size_of(tensor)) if self.by_size else None


class AotCompiler:
    """Prepares image sizes of one loaded pipeline: load or build their packages, then route calls to them."""

    def __init__(self, pipe, store: ArtifactStore, max_batch: int):
        self.pipe = pipe
        self.store = store
        self.max_batch = max_batch
        unet_call, vae_decode = _modules()
        self._unet_module, self._vae_module = unet_call(pipe.unet), vae_decode(pipe.vae)
        self._unet = _Dispatch(pipe.unet.forward, lambda t: tuple(t.shape[-2:]))
        self._vae = _Dispatch(pipe.vae.decode, lambda t: tuple(t.shape[-2:]))
        self._install()
        self.prepared: dict[tuple[int, int], dict] = {}

    def _install(self) -> None:
        unet, vae = self._unet, self._vae

        def unet_forward(sample, timestep, encoder_hidden_states, *args, added_cond_kwargs=None,
                         return_dict=True, **kwargs):
            package = unet.package_for(sample)
            if package is None or args or any(v is not None for v in kwargs.values()):
                return unet.original(sample, timestep, encoder_hidden_states, *args,
                                     added_cond_kwargs=added_cond_kwargs, return_dict=return_dict, **kwargs)
            out = package(sample, timestep, encoder_hidden_states, added_cond_kwargs)
            return (out,) if not return_dict else _unet_output(out)

        def vae_decode(z, *args, return_dict=True, **kwargs):
            package = vae.package_for(z)
            if package is None or args or kwargs:
                return vae.original(z, *args, return_dict=return_dict, **kwargs)
            out = package(z)
            return (out,) if not return_dict else _decoder_output(out)

        self.pipe.unet.forward, self.pipe.vae.decode = unet_forward, vae_decode

    def uninstall(self) -> None:
        self.pipe.unet.forward, self.pipe.vae.decode = self._unet.original, self._vae.original

    def components(self, width: int, height: int) -> list[Component]:
        return [Component("unet", width, height, self.max_batch), Component("vae", width, height, self.max_batch)]

    def prepare(self, width: int, height: int, report=lambda detail: None) -> dict:
        """Load (or build, then load) the size's packages; returns seconds spent on each step."""
        if (width, height) in self.prepared:
            return self.prepared[(width, height)]
        missing = [c for c in self.components(width, height) if not self.store.has(c)]
        timings: dict = {}
        if missing:
            log.info("no compiled packages for %dx%d in %s (%s): building them", width, height, self.store.folder,
                     self.store.mismatch() if not self.store.folder.is_dir() else "not built yet")
            timings |= self.build(width, height, missing, report)
        report(f"loading compiled {width}x{height}")
        started = time.perf_counter()
        unet_pkg = _load(self.store.path(Component("unet", width, height, self.max_batch)), self._unet_module)
        vae_pkg = _load(self.store.path(Component("vae", width, height, self.max_batch)), self._vae_module)
        self._unet.by_size[(height // self._vae_scale(), width // self._vae_scale())] = unet_pkg
        self._vae.by_size[(height // self._vae_scale(), width // self._vae_scale())] = vae_pkg
        timings["load_s"] = round(time.perf_counter() - started, 2)
        self.prepared[(width, height)] = timings
        return timings

    def _vae_scale(self) -> int:
        return getattr(self.pipe, "vae_scale_factor", 8)

    def build(self, width: int, height: int, missing: list[Component], report=lambda detail: None) -> dict:
        """Export and compile these components of one size into the store (no loading)."""
        (sample, timestep, hidden, added), latents = _capture(self.pipe, width, height)
        timings = {}
        for component in missing:
            report(f"compiling {component.name} {width}x{height} (batch 1-{component.max_batch})")
            started = time.perf_counter()
            if component.name == "unet":
                dims = {"sample": 0, "timestep": None, "encoder_hidden_states": 0}
                if added:
                    dims["added_cond_kwargs"] = dict.fromkeys(added)
                exported = _export(self._unet_module, (sample, timestep, hidden),
                                   {"added_cond_kwargs": added} if added else {}, dims, 2 * component.max_batch)
            else:
                exported = _export(self._vae_module, (latents,), {}, {"z": 0}, component.max_batch)
            self.store.save(component, lambda path, ep=exported: _compile(ep, path))
            timings[f"build_{component.name}_s"] = round(time.perf_counter() - started, 1)
            log.info("compiled %s %dx%d in %.1fs", component.name, width, height, timings[f"build_{component.name}_s"])
        return timings


def _unet_output(sample):
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    return UNet2DConditionOutput(sample=sample)


def _decoder_output(sample):
    from diffusers.models.autoencoders.vae import DecoderOutput

    return DecoderOutput(sample=sample)
