"""Compilation bookkeeping for timed experiments: JAX's persistent compilation cache and a clock of
the seconds JAX spends tracing, lowering and compiling.

A run that changes shapes (growth, restructuring) compiles a new program per shape; on small data
those compilations can dominate the wall-clock. Experiments therefore report ``wall`` (everything)
and ``train = wall - compile`` where ``compile`` is the sum of JAX's ``jax.monitoring`` duration
events for tracing (``jaxpr_trace_duration``), lowering (``jaxpr_to_mlir_module_duration``) and
XLA compilation (``backend_compile_duration``) inside the timed interval. With the persistent cache
a program compiled before (an earlier seed, an earlier process) is loaded instead of compiled: its
backend compilation event does not fire, tracing and lowering still do, and the load time counts
in ``train``.
"""
from __future__ import annotations

import os
import threading

import jax

AHEAD_THREAD = "pae-compile-ahead"   # the name prefix of train_phases' compile-ahead thread
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


def enable_compilation_cache(directory: str | None) -> str | None:
    """Turn on JAX's persistent compilation cache in ``directory`` (made absolute), caching every
    program whatever its compile time or size; ``None`` or ``''`` leaves the cache off. Returns the
    absolute directory or ``None``. The setting is process-wide (``jax.config``)."""
    if directory is not None and not isinstance(directory, str):
        raise TypeError(f"directory must be a str or None, got {type(directory).__name__}")
    if not directory:
        return None
    path = os.path.abspath(directory)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


class CompileClock:
    """Cumulative seconds of JAX's tracing, lowering and compilation events since construction
    (read ``seconds`` before and after a timed interval; the difference is that interval's
    compilation time). ``seconds`` counts the compilations a run waits for; ``ahead_seconds`` those
    of :func:`pae.train.train_phases`' compile-ahead thread, which overlap training (waiting for
    one to finish at a transition counts in neither, so in ``train``). Listeners cannot be removed
    in every supported JAX version, so make one per process (:func:`compile_clock`)."""

    def __init__(self):
        self.seconds = 0.0
        self.ahead_seconds = 0.0
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event, duration, **_):
        if event in COMPILE_EVENTS:
            if threading.current_thread().name.startswith(AHEAD_THREAD):
                self.ahead_seconds += float(duration)
            else:
                self.seconds += float(duration)


_CLOCK: CompileClock | None = None


def compile_clock() -> CompileClock:
    """The process's one :class:`CompileClock` (registered on first use)."""
    global _CLOCK
    if _CLOCK is None:
        _CLOCK = CompileClock()
    return _CLOCK
