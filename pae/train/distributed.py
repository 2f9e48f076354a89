"""Data parallelism with ``jax.sharding``: one code path for 1 CPU, 8 GPUs or a TPU pod slice.

The state is replicated (``P()``) and every batch is split along a ``"data"`` mesh axis
(``P("data")``); XLA inserts the gradient all-reduce, and BatchNorm statistics are computed over the
global batch (so a step on 8 devices equals the same step on 1, up to float reassociation).
"""
from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def maybe_initialize_distributed() -> bool:
    """Call ``jax.distributed.initialize`` when a multi-process launch is detected; return whether it did.

    Detected: ``JAX_COORDINATOR_ADDRESS`` (+ ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``), or a SLURM /
    Open MPI launch of more than one task (which jax auto-configures).
    """
    if jax.process_count() > 1 or getattr(jax.distributed, "is_initialized", lambda: False)():
        return False
    if address := os.environ.get("JAX_COORDINATOR_ADDRESS"):
        count, index = _launch_processes(os.environ)
        jax.distributed.initialize(address, count, index)
        return True
    if _env_int(os.environ, "SLURM_NTASKS", "1") > 1 or \
            _env_int(os.environ, "OMPI_COMM_WORLD_SIZE", "1") > 1:
        jax.distributed.initialize()
        return True
    return False


def _env_int(env, name: str, default: str | None = None) -> int:
    """The integer environment variable ``name`` (``default`` when unset); ValueError naming it."""
    text = env.get(name, default)
    try:
        return int(text)
    except (TypeError, ValueError):
        raise ValueError(f"the environment variable {name} must be an integer, got {text!r}") from None


def _launch_processes(env) -> tuple[int, int]:
    """``(JAX_NUM_PROCESSES, JAX_PROCESS_ID)`` of a launch that sets ``JAX_COORDINATOR_ADDRESS``;
    ValueError naming a variable that is missing, not an integer or out of range."""
    missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if k not in env]
    if missing:
        raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {' and '.join(missing)} "
                         f"{'is' if len(missing) == 1 else 'are'} not: a multi-process launch sets "
                         f"JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (or none of them)")
    count, index = _env_int(env, "JAX_NUM_PROCESSES"), _env_int(env, "JAX_PROCESS_ID")
    if count < 1:
        raise ValueError(f"JAX_NUM_PROCESSES must be >= 1, got {count}")
    if not 0 <= index < count:
        raise ValueError(f"JAX_PROCESS_ID must be in [0, JAX_NUM_PROCESSES={count}), got {index}")
    return count, index


def data_mesh(devices=None) -> Mesh:
    """A 1-D mesh named ``"data"`` over ``devices`` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def replicate(tree, mesh: Mesh):
    """Place every leaf of ``tree`` on all devices of ``mesh``."""
    return jax.device_put(tree, replicated(mesh))


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Assemble global arrays split along ``"data"`` from this process's local batch."""
    sharding = NamedSharding(mesh, P("data"))
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}


def check_batch_size(batch_size: int, mesh: Mesh, name: str = "batch_size") -> None:
    devices = mesh.devices.size
    if batch_size % devices:
        raise ValueError(f"{name}={batch_size} must be divisible by the number of devices "
                         f"({devices}); use a multiple of {devices}")
