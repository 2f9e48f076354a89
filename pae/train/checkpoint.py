"""orbax checkpoints of the whole train state: periodic, atomic, keep-last-N, exactly resumable.

Each checkpoint is a step directory holding two items: ``state`` (the :class:`TrainState` arrays) and
``meta`` (JSON: run identity, a signature of every array's path/shape/dtype, the metric history, and a
checksum of every array and of the history, computed from the values being saved). Restoring
verifies them: bytes damaged on disk raise :class:`DamagedCheckpointError` naming the step and the
item, instead of loading.
orbax writes a step into a temporary directory and renames it when complete, so an interrupted save
leaves no step behind that looks finished. Every write is read back and checked against those
checksums before older steps are deleted: a step written wrong (a failing disk, a full quota that
truncates silently) is moved aside and written again, and if it still does not read back whole
:class:`DamagedCheckpointError` stops the run with the last good steps kept. Restoring first
checks ``meta`` against the run asking for it, so a checkpoint of a different model is refused with
a message naming the difference, and a damaged checkpoint raises :class:`CheckpointError` instead of
loading.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(ValueError):
    """A checkpoint that does not belong to this run, or that cannot be read back whole."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint whose files are damaged: unreadable, or not matching the checksums saved with it."""


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def tree_checksums(tree: Any) -> dict[str, str]:
    """``{path: checksum}`` of every array leaf (its bytes, dtype and shape)."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        x = np.asarray(jax.device_get(leaf))
        out[jax.tree_util.keystr(path)] = _digest(f"{x.dtype}{x.shape}".encode() + x.tobytes())
    return out


def tree_checksum(tree: Any) -> str:
    """One checksum of every array leaf of ``tree`` (see :func:`tree_checksums`)."""
    return _digest(json.dumps(tree_checksums(tree), sort_keys=True).encode())


def history_checksum(history: list) -> str:
    return _digest(json.dumps(history, sort_keys=True, default=str).encode())


def meta_checksum(meta: dict) -> str:
    """Checksum of every metadata value (identity, signature, checksums, position, phases, ...) but
    itself and the history (which has its own)."""
    return history_checksum({k: v for k, v in meta.items() if k not in ("meta_checksum", "history")})


def _first_line(err: Exception, limit: int = 200) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


_LEAF_TYPES = (jax.Array, jax.ShapeDtypeStruct, np.ndarray, np.generic, bool, int, float, complex)


def _leaf_dtype(path, leaf) -> np.dtype:
    """The dtype ``leaf`` is checkpointed with: JAX's canonical one (float64 -> float32, int64 ->
    int32 without x64), as the run would hold it. TypeError naming a leaf that is not a number."""
    if isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)):
        return leaf.dtype   # already JAX's (and may be an extended dtype: typed PRNG keys)
    dtype = None
    if isinstance(leaf, _LEAF_TYPES):
        dtype = np.dtype(leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype)
    if dtype is None or dtype.kind in "OSU":
        what = type(leaf).__name__ if dtype is None else f"{type(leaf).__name__} of dtype {dtype}"
        raise TypeError(f"checkpoint leaf {jax.tree_util.keystr(path)} is a {what}; a checkpoint "
                        f"holds arrays and numbers only")
    return np.dtype(jax.dtypes.canonicalize_dtype(dtype))


def _canonical_leaf(path, leaf):
    """A host leaf (NumPy array or scalar, Python number) cast to its canonical dtype; device arrays
    unchanged. ValueError when an integer does not fit it (it would wrap)."""
    dtype = _leaf_dtype(path, leaf)
    if isinstance(leaf, jax.Array):
        return leaf
    host = np.asarray(leaf)
    cast = host.astype(dtype)
    if host.dtype.kind in "iu" and not np.array_equal(cast, host):
        raise ValueError(f"checkpoint leaf {jax.tree_util.keystr(path)} holds integers beyond {dtype} "
                         f"(enable jax_enable_x64 to keep {host.dtype})")
    return cast


def _canonical_tree(tree: Any) -> Any:
    """``tree`` with every host leaf in the dtype JAX gives it (see :func:`_canonical_leaf`)."""
    return jax.tree_util.tree_map_with_path(_canonical_leaf, tree)


def tree_signature(tree: Any) -> dict[str, str]:
    """``{path: "dtype[shape]"}`` for every array leaf (canonical dtypes): what a compatible
    checkpoint must match."""
    return {jax.tree_util.keystr(path): f"{_leaf_dtype(path, leaf)}{list(np.shape(leaf))}"
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _describe_mismatch(saved: dict, wanted: dict) -> str:
    missing = sorted(set(wanted) - set(saved))
    extra = sorted(set(saved) - set(wanted))
    changed = sorted(k for k in set(saved) & set(wanted) if saved[k] != wanted[k])
    parts = []
    if missing:
        parts.append(f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    if extra:
        parts.append(f"unexpected {extra[:3]}{' ...' if len(extra) > 3 else ''}")
    for k in changed[:3]:
        parts.append(f"{k}: saved {saved[k]}, expected {wanted[k]}")
    return "; ".join(parts)


def _abstract(tree: Any) -> Any:
    """Shape, dtype and sharding of every leaf (arrays or ``jax.ShapeDtypeStruct``; host arrays and
    leaves without a sharding: this process's first device)."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def spec(path, x):
        return jax.ShapeDtypeStruct(np.shape(x), _leaf_dtype(path, x),
                                    sharding=getattr(x, "sharding", None) or device)

    return jax.tree_util.tree_map_with_path(spec, tree)


def _plain_identity(identity: Any) -> dict:
    """``identity`` as it reads back from JSON (tuples -> lists, keys -> str, NumPy scalars -> str),
    so that a checkpoint's saved identity equals its writer's."""
    if not isinstance(identity, Mapping):
        raise TypeError(f"identity must be a mapping of JSON-like values, got {type(identity).__name__}")
    try:
        return json.loads(json.dumps(dict(identity), default=str, allow_nan=False))
    except TypeError as err:
        raise TypeError(f"identity must be a mapping of JSON-like values: {err}") from None
    except ValueError:
        raise ValueError(f"identity must hold finite numbers (NaN never equals itself), got "
                         f"{identity!r}") from None


class Checkpointer:
    """Saves and restores :class:`TrainState` under ``directory`` with orbax, keeping the last N.

    ``identity`` (e.g. ``{"model": "resnet20", "dataset": "cifar10"}``) is stored with every step and
    must match on restore; it is kept as it reads back from JSON (tuples as lists, keys as strings).
    ``verify``: read every write back and check it before deleting older steps (one extra read of
    each checkpoint; ``False`` trusts the file system).
    """

    def __init__(self, directory: str | os.PathLike, identity: dict[str, Any], max_to_keep: int = 3,
                 verify: bool = True):
        if isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep < 1:
            raise ValueError(f"max_to_keep must be an int >= 1, got {max_to_keep!r}")
        if not isinstance(verify, bool):
            raise TypeError(f"verify must be a bool, got {type(verify).__name__}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.identity = _plain_identity(identity)
        self.max_to_keep = max_to_keep
        self.verify = verify
        self._manager = self._make_manager()

    def _make_manager(self):
        # Old steps are deleted by ``_prune`` once a new one is verified, not by orbax on save.
        return ocp.CheckpointManager(
            self.directory, item_names=("state", "meta"),
            options=ocp.CheckpointManagerOptions(max_to_keep=None, create=True,
                                                 enable_async_checkpointing=False))

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, history: list[dict] | None = None, **extra: Any) -> None:
        """Write ``state`` (and the metric ``history``, and JSON ``extra`` values such as the
        engine's position) as checkpoint ``step``; blocks until on disk. Host leaves (NumPy arrays,
        Python numbers) are saved in JAX's dtypes (float32, int32 without x64), as restored."""
        state = _canonical_tree(state)
        history = history or []
        meta = {"identity": self.identity, "signature": tree_signature(state), "history": history,
                "checksums": tree_checksums(state), "history_checksum": history_checksum(history),
                **extra}
        meta = json.loads(json.dumps(meta, default=str))   # as it reads back (lists, str keys)
        meta["meta_checksum"] = meta_checksum(meta)
        for attempt in range(2):
            self._manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
            self._manager.wait_until_finished()
            if not self.verify:
                break
            try:
                self.restore(step, state)
                break
            except DamagedCheckpointError as err:
                moved = self.quarantine(step)
                if attempt:
                    raise DamagedCheckpointError(
                        f"checkpoint step {step} did not read back whole after writing it twice "
                        f"(kept as {moved}): {_first_line(err, 300)}. The earlier steps in "
                        f"{self.directory} are intact; check the disk before resuming.") from None
        self._prune()

    def _prune(self) -> None:
        """Delete all but the newest ``max_to_keep`` steps."""
        for old in sorted(self.all_steps())[:-self.max_to_keep]:
            self._manager.delete(old)

    def read_meta(self, step: int) -> dict:
        """The JSON metadata of checkpoint ``step`` (identity, signature, history, extras)."""
        where = os.path.join(self.directory, str(step))
        try:
            meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            meta = meta["meta"]
        except Exception as err:
            raise DamagedCheckpointError(f"checkpoint {where} (step {step}) has no readable metadata: "
                                         f"{_first_line(err)}") from None
        if not isinstance(meta, dict) or ("meta_checksum" in meta
                                          and meta["meta_checksum"] != meta_checksum(meta)):
            raise DamagedCheckpointError(f"checkpoint {where} (step {step}) is damaged: its metadata "
                                         f"(position, identity, checksums) does not match the checksum "
                                         f"written with it")
        return meta

    def restore(self, step: int, target: Any) -> tuple[Any, list[dict]]:
        """Restore checkpoint ``step`` into the structure, shapes and shardings of ``target`` (arrays
        or ``jax.ShapeDtypeStruct``; host arrays restore onto this process's first device).

        Returns ``(state, history)``. Raises :class:`CheckpointError` when the checkpoint belongs to a
        different run (identity or array signature differ) or cannot be read whole.
        """
        where = os.path.join(self.directory, str(step))
        meta = self.read_meta(step)
        if meta.get("identity") != self.identity:
            raise CheckpointError(
                f"checkpoint {where} belongs to a different run: saved {meta.get('identity')}, "
                f"this run is {self.identity}. Use another run directory.")
        mismatch = _describe_mismatch(meta.get("signature", {}), tree_signature(target))
        if mismatch:
            raise CheckpointError(f"checkpoint {where} does not fit this model/state: {mismatch}")
        abstract = _abstract(target)
        others = [s for s in self.all_steps() if s < step]
        advice = (f"Delete {where} to resume from the previous checkpoint (step {max(others)}), or resume "
                  f"with on_damaged_checkpoint='previous' (--resume-intact), which does that and says "
                  f"so." if others else f"No other checkpoint is here; delete {where} to start over.")
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract)))["state"]
        except Exception as err:
            raise DamagedCheckpointError(
                f"checkpoint {where} (step {step}) is damaged or incomplete and was not loaded: "
                f"{_first_line(err)}. {advice}") from None
        history = meta.get("history", [])
        saved = meta.get("checksums")
        if saved is not None:
            now = tree_checksums(restored)
            bad = [k for k in saved if now.get(k) != saved[k]]
            if bad:
                raise DamagedCheckpointError(
                    f"checkpoint {where} (step {step}) is damaged: {len(bad)} array(s) do not match "
                    f"the checksums written with them, first {bad[0]}. {advice}")
            if meta.get("history_checksum") != history_checksum(history):
                raise DamagedCheckpointError(
                    f"checkpoint {where} (step {step}) is damaged: its metric history does not match "
                    f"the checksum written with it. {advice}")
        return restored, history

    def quarantine(self, step: int) -> str:
        """Move a damaged step aside (``<step>.damaged``: kept, no longer a checkpoint); its new path."""
        where = os.path.join(self.directory, str(step))
        target = where + ".damaged"
        n = 1
        while os.path.exists(target):
            target, n = f"{where}.damaged{n}", n + 1
        os.rename(where, target)
        self._manager.close()
        self._manager = self._make_manager()
        return target

    def close(self) -> None:
        self._manager.close()
