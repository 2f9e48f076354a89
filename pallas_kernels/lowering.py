"""Prove that a kernel lowers for its real platform without the hardware (``jax.export``).

``jax.export.export(jax.jit(f), platforms=[...])`` runs the Mosaic TPU / Pallas Triton / Mosaic GPU
lowering and its checks (block rules, unsupported ops, shared-memory limits) on any machine.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels import _layout as L
from pallas_kernels.format import PackedSegment, PackedWeight

PLATFORM = {"tpu": "tpu", "triton": "cuda", "mosaic_gpu": "cuda"}  # jax.export platform names
_DEVICE = {"tpu": "tpu", "triton": "gpu", "mosaic_gpu": "gpu"}  # resolve_backend's names
MARKER = {"tpu": "tpu_custom_call", "triton": "__gpu$xla.gpu.triton", "mosaic_gpu": "mosaic_gpu"}
_TRITON_CALL = "__gpu$xla.gpu.triton"
TARGET_GPU = "NVIDIA H100 80GB HBM3"  # the GPU a CPU-side export lowers for (compute capability 9.0)


@contextlib.contextmanager
def gpu_target(device_kind: str = TARGET_GPU, num_cores: int = 132):
    """Lower GPU kernels for ``device_kind`` on a machine without that GPU.

    jax 0.11 asks the default device for the GPU's compute capability when lowering Pallas Triton
    and refuses on CPU unless an abstract GPU device is set (``jax.sharding.AbstractDevice`` in an
    abstract mesh); jax 0.10 assumes one.  Without the API this is a no-op.
    """
    abstract_device = getattr(jax.sharding, "AbstractDevice", None)
    use = getattr(jax.sharding, "use_abstract_mesh", None)
    try:
        mesh = jax.sharding.AbstractMesh((1,), ("_target",), abstract_device=abstract_device(
            device_kind=device_kind, num_cores=num_cores, platform="gpu"))
    except TypeError:  # pragma: no cover - jax without abstract devices
        mesh = None
    if mesh is None or use is None:  # pragma: no cover
        yield
        return
    with use(mesh):
        yield


def abstract_packed(bits: list[int], ks: list[int], n: int, *, group_size: int | None = None,
                    k_tile: int = 512, n_tile: int = 128, perm: bool = False) -> PackedWeight:
    """A ``PackedWeight`` of ``jax.ShapeDtypeStruct`` leaves with the format's exact shapes."""
    n_pad = L.round_up(n, n_tile)
    segs = []
    for b, k in zip(bits, ks):
        kp = L.round_up(k, k_tile)
        words = tuple(jax.ShapeDtypeStruct((L.word_rows(kp, sb), n_pad), jnp.int32) for sb in L.shards(b))
        g = 1 if group_size is None else kp // group_size
        segs.append(PackedSegment(words=words, scales=jax.ShapeDtypeStruct((g, n_pad), jnp.float32),
                                  bits=b, k=k, offset=(2 ** b - 1) / 2))
    p = jax.ShapeDtypeStruct((sum(ks),), jnp.int32) if perm else None
    return PackedWeight(segments=tuple(segs), input_perm=p, n=n, k_tile=k_tile, n_tile=n_tile,
                        group_size=group_size)


def export_kernel(backend: str, x: Any, packed: PackedWeight, x_scale: Any = None,
                  blocks: Any = None, dispatch: bool = False) -> jax.export.Exported:
    """Export ``packed_matmul(backend=...)`` for the backend's platform (arguments may be abstract).

    The kernel itself at every M, unless ``dispatch=True`` (then large M may take the XLA path)."""
    from pallas_kernels.dispatch import packed_matmul

    if backend not in PLATFORM:
        raise ValueError(f"backend={backend!r} is not one of {tuple(PLATFORM)}")

    def f(x, packed, x_scale):
        return packed_matmul(x, packed, x_scale=x_scale, backend=backend, interpret=False,
                             blocks=blocks, _platform=_DEVICE[backend],
                             _large_m=None if dispatch else 2 ** 62)

    disabled = [jax.export.DisabledSafetyCheck.custom_call(_TRITON_CALL)] if backend == "triton" else []
    ctx = gpu_target() if PLATFORM[backend] == "cuda" else contextlib.nullcontext()
    with ctx, warnings.catch_warnings():
        # jax 0.11 warns at lowering that the Triton backend is deprecated; the caller chose it.
        warnings.filterwarnings("ignore", message=".*Triton backend is deprecated.*")
        return jax.export.export(jax.jit(f), platforms=[PLATFORM[backend]], disabled_checks=disabled)(
            x, packed, x_scale)


def lowers(backend: str, x: Any, packed: PackedWeight, x_scale: Any = None, blocks: Any = None) -> bool:
    """True when the export succeeds and contains the backend's kernel call."""
    text = export_kernel(backend, x, packed, x_scale, blocks).mlir_module()
    return MARKER[backend] in text
