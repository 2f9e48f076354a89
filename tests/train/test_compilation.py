"""pae.train.compilation: the compile clock counts JAX's compilations and only those; the persistent
cache switch sets JAX's configuration and refuses bad input."""
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pae.train.compilation import compile_clock, enable_compilation_cache


def test_clock_counts_a_new_compilation_and_not_a_cached_call():
    clock = compile_clock()
    assert compile_clock() is clock                     # one listener per process

    @jax.jit
    def f(x):
        return jnp.tanh(x @ x.T).sum()

    x = np.random.default_rng(0).normal(size=(16, 16)).astype(np.float32)
    before = clock.seconds
    t0 = time.perf_counter()
    f(x).block_until_ready()
    wall = time.perf_counter() - t0
    first = clock.seconds - before
    assert 0 < first <= wall + 1e-3                    # compiled inside the call
    before = clock.seconds
    f(x + 1).block_until_ready()                       # same shapes: the in-memory cache, no compile
    assert clock.seconds == before
    f(np.ones((8, 16), np.float32)).block_until_ready()  # a new shape compiles anew
    assert clock.seconds > before


def test_cache_switch(tmp_path):
    old = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs,
           jax.config.jax_persistent_cache_min_entry_size_bytes)
    try:
        assert enable_compilation_cache("") is None and enable_compilation_cache(None) is None
        assert jax.config.jax_compilation_cache_dir == old[0]          # off: untouched
        path = enable_compilation_cache(str(tmp_path / "cache"))
        assert path == str(tmp_path / "cache")
        assert jax.config.jax_compilation_cache_dir == path
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
        assert jax.config.jax_persistent_cache_min_entry_size_bytes == 0
    finally:
        jax.config.update("jax_compilation_cache_dir", old[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", old[2])
    with pytest.raises(TypeError, match="directory"):
        enable_compilation_cache(3)
