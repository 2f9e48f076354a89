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


@pytest.mark.parametrize("env, says", [
    ({"JAX_PROCESS_ID": "0"}, "JAX_COORDINATOR_ADDRESS is set but JAX_NUM_PROCESSES is not"),
    ({}, "JAX_NUM_PROCESSES and JAX_PROCESS_ID are not"),
    ({"JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES must be an integer, got 'two'"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, r"JAX_PROCESS_ID must be in \[0, JAX_NUM_PROCESSES=2\)"),
    ({"JAX_NUM_PROCESSES": "0", "JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES must be >= 1")])
def test_a_half_set_launch_environment_is_refused_naming_the_variables(monkeypatch, env, says):
    """It gave a KeyError (a traceback from every script) or initialized with a bad process id."""
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    for var in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:12345")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match=says):
        distributed.maybe_initialize_distributed()
    assert calls == []


def test_a_non_integer_task_count_is_refused_naming_it(monkeypatch):
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "4(x2)")
    with pytest.raises(ValueError, match="SLURM_NTASKS must be an integer, got '4\\(x2\\)'"):
        distributed.maybe_initialize_distributed()


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
