import jax
import numpy as np
import pytest

from pae.train import data_mesh, distributed, shard_batch


def test_multi_host_launch_is_detected_from_environment(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.maybe_initialize_distributed() is False and calls == []
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert distributed.maybe_initialize_distributed() is False
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    assert distributed.maybe_initialize_distributed() is True
    assert calls[-1][0] == ("10.0.0.1:1234", 4, 2)
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert distributed.maybe_initialize_distributed() is True and calls[-1] == ((), {})


def test_shard_batch_splits_rows_across_devices():
    mesh = data_mesh()
    batch = {"inputs": np.arange(16 * 3, dtype=np.float32).reshape(16, 3),
             "targets": np.arange(16, dtype=np.int32)}
    sharded = shard_batch(batch, mesh)
    x = sharded["inputs"]
    assert len(x.addressable_shards) == 8
    for shard in x.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), batch["inputs"][shard.index])
        assert shard.data.shape == (2, 3)
    np.testing.assert_array_equal(np.asarray(x), batch["inputs"])
    with pytest.raises(ValueError, match="divisible by the number of devices \\(8\\)"):
        distributed.check_batch_size(12, mesh)
