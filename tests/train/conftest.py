"""A log of the process's XLA compilations, shared by the tests that count them."""
import threading

import jax
import pytest


class CompileLog:
    """Every XLA compilation of the process as ``(thread name, tag)``, ``tag`` whatever the test set
    last (e.g. the epochs a run has finished). One ``jax.monitoring`` listener for the session:
    listeners cannot be removed in every supported jax."""

    def __init__(self):
        self.events, self.tag = [], None
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event, duration, **_):
        if event.endswith("backend_compile_duration"):
            self.events.append((threading.current_thread().name, self.tag))

    def compilations(self, fn, *args):
        """``fn(*args)`` and how many XLA compilations it ran in this thread."""
        start, me = len(self.events), threading.current_thread().name
        out = fn(*args)
        return out, sum(thread == me for thread, _ in self.events[start:])


_LOG = CompileLog()


@pytest.fixture
def compile_log():
    return _LOG
