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
        jax.distributed.initialize(address, int(os.environ["JAX_NUM_PROCESSES"]),
                                   int(os.environ["JAX_PROCESS_ID"]))
        return True
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 or \
            int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        jax.distributed.initialize()
        return True
    return False


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
