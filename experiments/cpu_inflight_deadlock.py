"""The XLA:CPU deadlock that ``pae.train.engine.STEPS_IN_FLIGHT`` guards against, reproduced.

    python experiments/cpu_inflight_deadlock.py [--in-flight 2 31 33] [--devices 8] [--steps 300]
        [--timeout 90]

With several host devices (``--xla_force_host_platform_device_count``), a jitted step whose loss
is a mean over a batch sharded across the devices (an all-reduce) is dispatched ``--steps`` times;
the host waits whenever more than N steps are unfinished, for each N of ``--in-flight``. Each N runs
in its own process (a deadlocked one is aborted by XLA after its 40 s rendezvous timeout, or killed
after ``--timeout`` seconds). With jax 0.10.2, 8 devices on 2 cores: 2 and 31 complete, 33 hangs.
Prints one line per N; writes nothing.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def run_child(in_flight: int, steps: int) -> None:
    """The loop itself (in a process whose XLA_FLAGS force the devices)."""
    from collections import deque

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(jax.devices()), ("data",))
    x = jax.device_put(jnp.ones((4 * len(jax.devices()), 64)), NamedSharding(mesh, PartitionSpec("data")))
    w = jax.device_put(jnp.eye(64), NamedSharding(mesh, PartitionSpec()))

    @jax.jit
    def step(x, w):
        g = jnp.mean(jnp.tanh(x @ w), axis=0)        # a mean over the sharded batch: an all-reduce
        return w - 1e-3 * jnp.outer(g, g), jnp.sum(g)

    pending = deque()
    for _ in range(steps):
        w, loss = step(x, w)
        pending.append(loss)
        if len(pending) > in_flight:
            jax.block_until_ready(pending.popleft())
    jax.block_until_ready(w)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--in-flight", type=int, nargs="+", default=[2, 31, 33],
                        help="steps the host may leave unfinished, one run each")
    parser.add_argument("--devices", type=int, default=8, help="forced host devices (>= 2)")
    parser.add_argument("--steps", type=int, default=300, help="steps per run")
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds before a run is killed")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        run_child(args.child, args.steps)
        return {}
    if args.devices < 2:
        parser.error(f"--devices must be >= 2 (an all-reduce needs several devices), got {args.devices}")
    if min(args.in_flight) < 0:
        parser.error(f"--in-flight takes ints >= 0, got {args.in_flight}")
    if args.steps < 1 or args.timeout <= 0:
        parser.error("--steps must be >= 1 and --timeout > 0")
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} "
                                     f"--xla_force_host_platform_device_count={args.devices}".strip())
    outcomes = {}
    for n in args.in_flight:
        began = time.perf_counter()
        try:
            done = subprocess.run([sys.executable, __file__, "--child", str(n), "--steps", str(args.steps)],
                                  env=env, capture_output=True, text=True, timeout=args.timeout)
            outcome = "completed" if done.returncode == 0 else (
                "deadlocked (XLA aborted it)" if "Termination timeout" in done.stderr
                else f"failed (exit {done.returncode})")
        except subprocess.TimeoutExpired:
            outcome = "hung (killed)"
        outcomes[n] = outcome
        print(f"{args.devices} devices, at most {n} steps unfinished: {outcome} after "
              f"{time.perf_counter() - began:.1f} s (load {os.getloadavg()[0]:.1f})", flush=True)
    return outcomes


if __name__ == "__main__":
    main()
