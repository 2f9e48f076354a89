"""Growth with variance transfer (Yuan, Savarese & Maire, arXiv 2306.12700): :func:`grow`.

Every growable channel group ``g`` widens from ``n_g`` to ``m_g`` channels; the ``k_g = m_g - n_g``
new units (``k_g`` even) are appended as two halves A = ``[n, n + k/2)`` and B = ``[n + k/2, m)``,
unit ``n + j`` paired with ``n + k/2 + j``. A kernel ``W (..., in, out)`` becomes, with its input
group ``i`` and output group ``o`` (``h = k / 2``)::

             old out (n_o)    new out A (h_o)   new out B (h_o)
  old in     c * W            V                 V
  new in A   Z                U                 U
  new in B   -Z               -U                -U

Paired new outputs have identical incoming weights (columns A = B, over the full new input width,
the new-in x new-out corner included), so their activations are equal (BatchNorm of new channels
starts as gamma = 1, beta = 0, mean = 0, var = 1, identical within a pair); every reader weights a
pair with opposite signs (rows A = -B), so the pair's contribution ``z a - z a`` vanishes. In a
ResNet the residual stream's new channels stay pairwise equal because every writer (the stem, each
block's conv2, the shortcut) keeps columns A = B and the identity shortcut adds equal pairs. So with
``vt="none"`` the grown network computes the old function exactly (up to float rounding), in train
mode (batch statistics) and in eval mode (running statistics). New biases are zero.

Variance transfer: a layer whose input group grew gets ``c = sqrt(n_i / m_i)`` (``vt="sqrt"``,
default: the init std ``~ 1/sqrt(fan_in)`` of a He/LeCun parameterization, GroMo's default) or
``c = n_i / m_i`` (``vt="linear"``: std ``~ 1/fan_in``, the muP-style rule of the growing-net wiki)
on its old block and its old biases, and the BatchNorm on its output gets running mean ``* c`` and
running variance ``* c**2`` on the old channels. The function then

* stays preserved behind normalization: a conv followed by BatchNorm is scale invariant in train
  mode and, with the rescaled running statistics, in eval mode, up to BatchNorm's epsilon
  (``(c x - c mu) / sqrt(c^2 var + eps)`` vs ``(x - mu) / sqrt(var + eps)``);
* changes where no normalization follows a rescaled layer: in a VGG only the classifier, whose
  logits become exactly ``c * logits`` (a temperature: the argmax is kept; up to BN's epsilon
  upstream); in the ResNet also the 1x1 shortcut convs (no BN), which add ``c * shortcut(x)`` to
  the residual sum of the first block of stages 2 and 3 and so change every feature after it.
  (The stem's fan-in, the image channels, never grows: it is never rescaled.)

Depthwise convs (``GrowthLayer.depthwise``: MobileNetV1's ``(kh, kw, 1, C)`` kernels, channel
multiplier 1, input and output both the group ``g`` of the conv that writes the channels). Growing
``g`` by ``k = 2h`` channels adds one depthwise filter per new channel; the pairs go through it with
*tied* filters, the column rule above with a one-row input axis::

             old channels (n)   new A (h)   new B (h)
  filters    W (unchanged)      D           D

The writer's new columns are equal within a pair, so the pair's channels are equal; equal filters
and identical fresh BatchNorm keep them equal; the next pointwise conv reads them with rows A = -B,
so they cancel there (function preserved, train and eval mode, as above). Its sign flip lives on
the pointwise rows: a depthwise filter has no new-input x new-output corner, only its diagonal.
Variance transfer: a depthwise conv's fan-in is ``kh * kw``, not ``kh * kw * C``, so it does not
grow with ``g``: factor 1 on the old filters and on the depthwise BatchNorm's statistics. The next
pointwise conv's fan-in ``1 * 1 * n`` grows to ``m`` and gets ``c`` (its BatchNorm's statistics to
match), and the classifier reading the last group gets ``c`` with no normalization after it (logits
``* c``, as in a VGG; MobileNetV1 has no unnormalized shortcut). New filters ``D`` are drawn by the
same ``new_init`` law with ``fan_in' = kh * kw`` (``"he"``: ``N(0, 2 / (kh kw))``, the model's own
init; ``"mup"``: std ``1 / (kh kw)``; ``"empirical"``: the std of the old filters).

New weights ``V, Z, U`` are drawn i.i.d. on the host (NumPy, seeded by the key and the layer's
index: :func:`host_rng`; no program is compiled per new shape) with ``new_init``: ``"he"`` (default) ``N(0, 2 / fan_in')``
with the new fan-in ``fan_in' = receptive field * m_i`` (the growable models' own init, so new
units look freshly initialized at the new width); ``"mup"``: std ``1 / fan_in'`` (pairs with
``vt="linear"``); ``"empirical"``: the std of the layer's old (rescaled) weights (GroMo-like).

Optimizer state is grown to what ``tx.init`` gives the grown parameters: every leaf whose shape
changes (moments, and factored statistics such as Adafactor's) keeps its old entries in the leading
corner and gets the fresh state's values in the new ones (zeros for moments: GradMax's zero-padded
slots; Adagrad's ``initial_accumulator_value``, not 0, which would make its first step on a new
entry ``sign(g)`` times the learning rate); leaves whose shape does
not change (counts, masked-out nodes, Adafactor's unfactored placeholders) are carried. A state
with nothing parameter-shaped (plain SGD, no momentum) becomes ``tx.init`` of the grown parameters
with its counts and schedule state carried. Adafactor
factors the two largest axes of the grown leaf, which growth can change (in and out swap, a leaf
becomes factored): each of its statistics is the mean over the axes it factors *now*, taken from the
old statistic over the same axis (:func:`_grow_factored_leaf`). For states
with a second moment (``nu``: Adam, RMSProp; ``nu_max``; AvaGrad's ``sqrt_nu``),
``new_moments="warm"`` (default) seeds the new entries' ``nu`` (and ``nu_max``) with the mean of the
leaf's old ``nu``. With zero ``nu`` an RMSProp entry's first step is ``1 / sqrt(1 - decay)`` times
the learning rate (about 3x); an Adam entry's, at Adam's global step count ``n``, is
``(1 - b1) / sqrt(1 - b2) * sqrt(1 - b2^n) / (1 - b1^n)`` times the learning rate (about 2.5x at
``n = 1000`` with 0.9/0.999, up to 6.5x); with the seeded ``nu`` it is at most about
``(1 - b1) * |g| / sqrt(nu_old)``, a normal-sized step ramping up with the momentum (AvaGrad's
``sqrt_nu`` gets the root mean square of the old entries; AMSGrad/AMSBound's ``nu_max`` the mean).
``new_moments="zeros"``: plain zero padding. A :class:`~pae.growth.lra.BirthState` (from
:func:`~pae.growth.lra.scale_by_birth_stage`) gets the new stage on the new elements, ``stage + 1``,
and its scales marked stale (recomputed at the next update).
"""
from __future__ import annotations

import numbers
from typing import Any, Mapping

import jax
import numpy as np
import optax
from flax import traverse_util

from pae.growth.lra import BirthState
from pae.train.state import TrainState

VT_RULES = ("sqrt", "linear", "none")
NEW_INITS = ("he", "mup", "empirical")
NEW_MOMENTS = ("warm", "zeros")
GRADMAX_DEPTHWISE = ("identity", "fan_in")


def vt_factor(old: int, new: int, rule: str = "sqrt") -> float:
    """The variance-transfer factor for a fan-in growing ``old -> new`` channels (ints,
    ``1 <= old <= new``): ``sqrt(old / new)`` ("sqrt"), ``old / new`` ("linear") or 1 ("none")."""
    if rule not in VT_RULES:
        raise ValueError(f"vt must be one of {VT_RULES}, got {rule!r}")
    for name, value in (("old", old), ("new", new)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int (a channel count), got {type(value).__name__} "
                            f"{value!r}")
    if not 1 <= old <= new:
        raise ValueError(f"vt_factor needs ints with 1 <= old <= new (a fan-in only grows), got "
                         f"old={old!r}, new={new!r}")
    if rule == "none" or old == new:
        return 1.0
    return float(np.sqrt(old / new)) if rule == "sqrt" else old / new


def _check_model(model, name: str) -> None:
    for attr in ("groups", "at_widths", "growth_spec"):
        if not callable(getattr(model, attr, None)):
            raise TypeError(f"{name} must be a growable model (groups(), at_widths(), growth_spec(); "
                            f"see pae.models.growable), got {type(model).__name__}")


def resolve_widths(model_from, model_to, *, pairs: bool = True) -> tuple[Any, dict, dict]:
    """``(model_to, old widths, new widths)``; ``model_to`` a model or a ``{group: width}`` mapping.

    Raises ValueError when a width shrinks or (``pairs``: new units come in pairs) grows by an odd
    number.
    """
    _check_model(model_from, "model_from")
    old = model_from.groups()
    if isinstance(model_to, Mapping):
        arg = "new_widths"
        unknown = sorted(set(model_to) - set(old))
        if unknown:
            raise ValueError(f"new_widths names groups {unknown} that model_from does not have "
                             f"(groups: {sorted(old)})")
        bad = {g: w for g, w in model_to.items()
               if isinstance(w, bool) or not isinstance(w, (int, np.integer))}
        if bad:
            raise ValueError(f"new_widths must be ints, got {bad}")
        model_to = model_from.at_widths({**old, **{g: int(w) for g, w in model_to.items()}})
    else:
        arg = "model_to"
        _check_model(model_to, "model_to")
        if type(model_to) is not type(model_from):
            raise TypeError(f"model_to must be a {type(model_from).__name__} like model_from, got "
                            f"{type(model_to).__name__}")
    new = model_to.groups()
    if set(new) != set(old):
        raise ValueError(f"{arg}: groups {sorted(new)} differ from model_from's {sorted(old)}")
    if model_from.at_widths(new) != model_to:
        raise ValueError(f"{arg} differs from model_from in more than its widths")
    smaller = {g: (old[g], new[g]) for g in old if new[g] < old[g]}
    if smaller:
        raise ValueError(f"{arg}: widths may only grow, got smaller widths (old, new) {smaller}")
    odd = {g: (old[g], new[g]) for g in old if (new[g] - old[g]) % 2}
    if pairs and odd:
        raise ValueError(f"{arg}: every width must grow by an even number (new units come in pairs), "
                         f"got odd increments (old, new) {odd}")
    return model_to, old, new


def _key_words(key) -> list[int]:
    """The PRNG key's bits as ints (a typed ``jax.random.key`` or a raw uint32 ``PRNGKey``)."""
    if isinstance(key, jax.core.Tracer):
        raise TypeError("key must be a concrete PRNG key (grow runs on the host, outside jit)")
    if jax.dtypes.issubdtype(getattr(key, "dtype", None), jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    words = np.asarray(key)
    if words.dtype.kind not in "ui" or words.size == 0:
        raise TypeError(f"key must be a jax PRNG key, got an array of dtype {words.dtype} and shape "
                        f"{words.shape}")
    return [int(w) for w in words.astype(np.uint64).ravel()]


def host_rng(key, index: int) -> np.random.Generator:
    """A NumPy generator for layer ``index``, a pure function of ``(key, index)``.

    New weights are drawn on the host: a ``jax.random.normal`` per new shape compiled one small
    program per layer shape (seconds per growth step on a CPU); NumPy's PCG64 seeded by
    ``SeedSequence(entropy=key bits, spawn_key=(index,))`` is as deterministic and costs nothing
    to set up. The draws differ from ``jax.random``'s for the same key (both are i.i.d. normal).
    """
    return np.random.default_rng(np.random.SeedSequence(_key_words(key), spawn_key=(int(index),)))


def _pad(x: np.ndarray, shape, fill=0.0) -> np.ndarray:
    """``x`` in the leading corner of an array of ``shape`` filled with ``fill``."""
    out = np.full(shape, fill, dtype=x.dtype)
    out[tuple(slice(0, s) for s in x.shape)] = x
    return out


def _old_region(old_shape, new_shape) -> np.ndarray:
    return _pad(np.ones(old_shape, bool), new_shape, False)


def _grow_kernel(w, n_i, m_i, n_o, m_o, c, draw):
    """The paired kernel of the module doc (``w``: ``(..., n_i, n_o)``)."""
    hi, ho = (m_i - n_i) // 2, (m_o - n_o) // 2
    g = draw(w.shape[:-2] + (m_i, m_o))
    out = np.zeros(w.shape[:-2] + (m_i, m_o), w.dtype)
    out[..., :n_i, :n_o] = c * w
    v, z, u = g[..., :n_i, n_o:n_o + ho], g[..., n_i:n_i + hi, :n_o], g[..., n_i:n_i + hi, n_o:n_o + ho]
    out[..., :n_i, n_o:n_o + ho] = out[..., :n_i, n_o + ho:] = v
    out[..., n_i:n_i + hi, :n_o], out[..., n_i + hi:, :n_o] = z, -z
    out[..., n_i:n_i + hi, n_o:n_o + ho] = out[..., n_i:n_i + hi, n_o + ho:] = u
    out[..., n_i + hi:, n_o:n_o + ho] = out[..., n_i + hi:, n_o + ho:] = -u
    return out


def _std(rule: str, w: np.ndarray, c: float, fan_in: int) -> float:
    if rule == "he":
        return float(np.sqrt(2.0 / fan_in))
    if rule == "mup":
        return 1.0 / fan_in
    return float(np.std(c * w))


def _grow_params(params, batch_stats, spec, old, new, key, vt, new_init):
    flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}
    stats = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(batch_stats or {}).items()}
    out, out_stats, covered = {}, {}, set()
    for idx, layer, kpath, w, n_i, m_i, n_o, m_o in _layers(flat, spec, old, new):
        # a depthwise conv's fan-in (kh * kw) does not grow: factor 1 (n_i = m_i = 1 from _layers)
        c = vt_factor(n_i, m_i, vt) if layer.in_group is not None and not layer.depthwise else 1.0
        std = _std(new_init, w, c, int(np.prod(w.shape[:-2], dtype=np.int64)) * m_i)
        rng = host_rng(key, idx)

        def draw(shape, r=rng, s=std, dtype=w.dtype):
            return (r.standard_normal(shape, dtype=np.float32) * s).astype(dtype)

        out[kpath] = _grow_kernel(w, n_i, m_i, n_o, m_o, c, draw)
        covered.add(kpath)
        bpath = tuple(layer.kernel) + ("bias",)
        if bpath in flat:
            out[bpath] = _pad(c * flat[bpath], (m_o,)).astype(flat[bpath].dtype)
            covered.add(bpath)
        if layer.norm is not None:
            norm = tuple(layer.norm)
            for name, fill in (("scale", 1.0), ("bias", 0.0)):
                p = norm + (name,)
                if p in flat:
                    out[p] = _pad(flat[p], (m_o,), fill)
                    covered.add(p)
            for name, fill, f in (("mean", 0.0, c), ("var", 1.0, c * c)):
                p = norm + (name,)
                if p in stats:
                    out_stats[p] = _pad((f * stats[p]).astype(stats[p].dtype), (m_o,), fill)
    missed = sorted("/".join(k) for k in set(flat) - covered)
    if missed:
        raise ValueError(f"model_from's growth_spec does not cover the parameters {missed}")
    missed = sorted("/".join(k) for k in set(stats) - set(out_stats))
    if missed:
        raise ValueError(f"model_from's growth_spec does not cover the batch statistics {missed}")
    unflat = traverse_util.unflatten_dict
    return unflat(out), (unflat(out_stats) if out_stats else batch_stats)


_SECOND_MOMENTS = ("nu", "nu_max", "sqrt_nu")


def _has_second_moment(x) -> bool:
    """A state NamedTuple with a second moment (``nu``: Adam, RMSProp; AvaGrad's ``sqrt_nu``)."""
    fields = getattr(x, "_fields", ())
    return any(f in fields for f in ("nu", "sqrt_nu"))


def _grow_opt_state(opt_state, tx, params, grown, new_moments):
    """Grow every parameter-shaped subtree of ``opt_state`` to the shapes of ``grown``."""
    if not (hasattr(tx, "init") and hasattr(tx, "update")):
        raise TypeError(f"tx must be the optax.GradientTransformation that made state.opt_state, got "
                        f"{type(tx).__name__}")
    def init_shapes(tree):
        return jax.eval_shape(tx.init, jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), tree))
    wanted = init_shapes(params)
    if jax.tree.structure(wanted) != jax.tree.structure(opt_state) or any(
            np.shape(a) != b.shape for a, b in zip(jax.tree.leaves(opt_state), jax.tree.leaves(wanted))):
        raise ValueError("state.opt_state does not match tx.init(state.params): pass the optimizer "
                         "that made it as tx")
    found = []

    def count(x, *_):
        found.append(1)
        return x
    optax.tree_map_params(tx, count, opt_state)
    # new entries start as a fresh state's; jitted, init compiles once per growth step, where
    # eager init compiles a small op for every new leaf shape
    target = jax.tree.map(np.asarray, jax.jit(tx.init)(grown))
    if not found:      # nothing parameter-shaped (plain SGD): a fresh state, counts carried
        return jax.tree.map(lambda x, t: np.asarray(x) if np.shape(x) == np.shape(t) else t,
                            opt_state, target)

    def grow_leaf(x, t):
        if isinstance(x, optax.FactoredState):
            return _grow_factored(x, t, params, grown)
        x = np.asarray(x)
        if x.shape == t.shape:
            return x
        out = t.astype(x.dtype)
        out[tuple(slice(0, s) for s in x.shape)] = x
        return out
    out = jax.tree.map(grow_leaf, opt_state, target, is_leaf=lambda x: isinstance(x, optax.FactoredState))

    def fix(old, new):
        if isinstance(old, BirthState):
            stage = np.asarray(old.stage) + 1
            if stage >= old.max_stages:
                raise ValueError(f"scale_by_birth_stage(max_stages={old.max_stages}) tracks stages "
                                 f"0..{old.max_stages - 1}; growth step {int(stage)} needs a larger "
                                 f"max_stages")
            # shapes from the grown state (not from grown params: inside optax.masked or
            # multi_transform the maps hold MaskedNodes where the params hold arrays)
            birth = jax.tree.map(lambda b, g: _pad(np.asarray(b), np.shape(g), stage).astype(np.int32),
                                 old.birth, new.birth)
            scale = jax.tree.map(lambda s, g: _pad(np.asarray(s, np.float32), np.shape(g), 1.0),
                                 old.scale, new.scale)
            return old.replace(stage=stage.astype(np.int32), stale=np.ones((), np.bool_), birth=birth,
                               scale=scale)
        if _has_second_moment(old) and new_moments == "warm":
            seeded = {}
            for field in _SECOND_MOMENTS:
                if field in old._fields:
                    seed = _seed_sqrt if field == "sqrt_nu" else _seed
                    seeded[field] = jax.tree.map(seed, getattr(old, field), getattr(new, field))
            return new._replace(**seeded)
        return new

    return jax.tree.map(fix, opt_state, out,
                        is_leaf=lambda x: isinstance(x, BirthState) or _has_second_moment(x))


def _factored_dims(shape, v_shape):
    """Adafactor's ``(d1, d0)`` (the axes its ``v_col`` / ``v_row`` average over) for a leaf of
    ``shape`` whose ``v`` has ``v_shape``; None when unfactored (``v`` is then the full leaf)."""
    if len(shape) < 2 or tuple(v_shape) == tuple(shape):
        return None
    d1, d0 = np.argsort(shape)[-2:]          # as optax's _factored_dims: the two largest axes
    return int(d1), int(d0)


def _grow_factored_leaf(p_old, p_new, row, col, v, t_row, t_col, t_v):
    """One leaf of an Adafactor state: ``(v_row, v_col, v)`` for ``p_new``'s shape.

    Growth can change which axes Adafactor factors (in and out swap when the input axis outgrows
    the output axis; a leaf becomes factored when its second-largest axis reaches
    ``min_dim_size_to_factor``), so each new statistic (the mean of ``g ** 2`` over one axis) is
    taken from the old statistic over the same axis (or from the full or reconstructed ``v``),
    old entries in the leading corner, zeros elsewhere."""
    if not hasattr(row, "shape"):            # a masked-out leaf (optax.MaskedNode)
        return row, col, v
    row, col, v = np.asarray(row), np.asarray(col), np.asarray(v)
    old = _factored_dims(np.shape(p_old), v.shape)
    new = _factored_dims(np.shape(p_new), t_v.shape)
    dtype = v.dtype

    def mean_over(axis):
        if old is not None and axis in old:
            return row if axis == old[1] else col
        if old is None:
            return v.mean(axis)
        d1, d0 = old                          # Adafactor's estimate of v, then its mean
        m = row.mean(d1 - 1 if d1 > d0 else d1, keepdims=True)
        full = np.expand_dims(row, d0) * np.expand_dims(col, d1) / np.expand_dims(np.where(m > 0, m, 1), d0)
        return full.mean(axis)

    if new is None:                           # unfactored before too: growth never shrinks an axis
        return np.zeros(t_row.shape, dtype), np.zeros(t_col.shape, dtype), _pad(v, t_v.shape).astype(dtype)
    d1, d0 = new
    return (_pad(mean_over(d0), t_row.shape).astype(dtype), _pad(mean_over(d1), t_col.shape).astype(dtype),
            np.zeros(t_v.shape, dtype))


def _grow_factored(state, target, params, grown):
    """An ``optax.FactoredState`` (Adafactor) for ``grown``: :func:`_grow_factored_leaf` per leaf."""
    res = jax.tree.map(_grow_factored_leaf, params, grown, state.v_row, state.v_col, state.v,
                       target.v_row, target.v_col, target.v)
    pick = [jax.tree.map(lambda r, i=i: r[i], res, is_leaf=lambda r: type(r) is tuple) for i in range(3)]
    return state._replace(count=np.asarray(state.count), v_row=pick[0], v_col=pick[1], v=pick[2])


def _seed(old, new):
    """New entries of a second moment set to the mean of the leaf's old entries."""
    old, new = np.asarray(old), np.array(new)
    if old.size:
        new[~_old_region(old.shape, new.shape)] = old.mean()
    return new


def _seed_sqrt(old, new):
    """As :func:`_seed` for a stored square root: new entries ``sqrt(mean(old ** 2))``."""
    return np.sqrt(_seed(np.square(np.asarray(old)), np.square(np.asarray(new)))).astype(np.asarray(new).dtype)


def grow(state: TrainState, model_from, model_to, key, *, tx: optax.GradientTransformation | None = None,
         vt: str = "sqrt", new_init: str = "he", new_moments: str = "warm") -> TrainState:
    """Grow a whole TrainState from ``model_from``'s widths to ``model_to``'s (see the module doc).

    Pure and host-side (NumPy; run it between jitted phases, e.g. in a Phase's ``enter``): the same
    inputs give the same state, so a resumed run replays it.

    Args:
      state: a state of ``model_from`` (params, batch_stats, opt_state; ``step`` and ``key`` kept).
      model_from: a growable model (``pae.models.growable``) at the state's widths.
      model_to: the same model at the new widths, or a mapping ``{group: new width}``.
      key: PRNG key of the new weights.
      tx: the optimizer that made ``state.opt_state`` (any ``steps_per_epoch`` gives the same
        structure); required unless ``state.opt_state`` is None.
      vt: variance-transfer rule, ``"sqrt"`` (default), ``"linear"`` or ``"none"``.
      new_init: std of new weights, ``"he"`` (default), ``"mup"`` or ``"empirical"``.
      new_moments: Adam-family ``nu`` of new entries, ``"warm"`` (default) or ``"zeros"``.

    Returns the grown state (host NumPy leaves) for ``model_to``.

    Reference: Yuan, Savarese, Maire, "Accelerated Training via Incrementally Growing Neural Networks
    using Variance Transfer and Learning Rate Adaptation", arXiv 2306.12700 (NeurIPS 2023).
    """
    if not isinstance(state, TrainState):
        raise TypeError(f"state must be a pae.train.TrainState, got {type(state).__name__}")
    for name, value, allowed in (("vt", vt, VT_RULES), ("new_init", new_init, NEW_INITS),
                                 ("new_moments", new_moments, NEW_MOMENTS)):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    _, old, new = resolve_widths(model_from, model_to)
    spec = model_from.growth_spec()
    params = jax.tree.map(np.asarray, state.params)   # a tracer fails here (the engine replays on zeros)
    grown, batch_stats = _grow_params(params, state.batch_stats, spec, old, new, key, vt, new_init)
    opt_state = state.opt_state
    if opt_state is not None:
        if tx is None:
            raise ValueError("tx is required to grow state.opt_state: pass the optimizer that made it "
                             "(or set opt_state=None to start a fresh one)")
        opt_state = _grow_opt_state(opt_state, tx, params, grown, new_moments)
    return state.replace(params=grown, batch_stats=batch_stats, opt_state=opt_state)


# --------------------------------------------------------------------------------------------------
# Peers for the ablation (experiments/grow_vt.py): Net2Net-style copying and GradMax-style growth.


def _peer_prelude(state, model_from, model_to, tx, new_moments):
    if not isinstance(state, TrainState):
        raise TypeError(f"state must be a pae.train.TrainState, got {type(state).__name__}")
    if new_moments not in NEW_MOMENTS:
        raise ValueError(f"new_moments must be one of {NEW_MOMENTS}, got {new_moments!r}")
    _, old, new = resolve_widths(model_from, model_to, pairs=False)
    if state.opt_state is not None and tx is None:
        raise ValueError("tx is required to grow state.opt_state: pass the optimizer that made it "
                         "(or set opt_state=None to start a fresh one)")
    return old, new, jax.tree.map(np.asarray, state.params)


def _layers(flat, spec, old, new):
    """``(index, layer, kernel path, kernel, n_i, m_i, n_o, m_o)`` for every layer of ``spec``."""
    for idx, layer in enumerate(spec):
        kpath = tuple(layer.kernel) + ("kernel",)
        if kpath not in flat:
            raise ValueError(f"model_from's growth_spec names {'/'.join(kpath)}, which state.params "
                             f"does not hold (is state from model_from?)")
        w = flat[kpath]
        n_i = m_i = w.shape[-2]
        n_o = m_o = w.shape[-1]
        if layer.depthwise:
            if layer.in_group != layer.out_group or layer.out_group is None or w.shape[-2] != 1:
                raise ValueError(f"model_from's growth_spec marks {'/'.join(kpath)} depthwise, which "
                                 f"needs in_group == out_group (not None) and a (kh, kw, 1, C) kernel; "
                                 f"got groups {layer.in_group!r} -> {layer.out_group!r}, kernel {w.shape}")
            # channel multiplier 1: the kernel's input axis is 1 whatever the group's width
        elif layer.in_group is not None:
            n_i, m_i = old[layer.in_group], new[layer.in_group]
        if layer.out_group is not None:
            n_o, m_o = old[layer.out_group], new[layer.out_group]
        if w.shape[-2:] != (n_i, n_o):
            raise ValueError(f"state.params {'/'.join(kpath)} has shape {w.shape}, but model_from's "
                             f"widths give (..., {n_i}, {n_o}) (is state from model_from?)")
        yield idx, layer, kpath, w, n_i, m_i, n_o, m_o


def _finish(state, tx, params, flat_out, stats_out, flat, stats, new_moments):
    missed = sorted("/".join(k) for k in set(flat) - set(flat_out))
    if missed:
        raise ValueError(f"model_from's growth_spec does not cover the parameters {missed}")
    missed = sorted("/".join(k) for k in set(stats) - set(stats_out))
    if missed:
        raise ValueError(f"model_from's growth_spec does not cover the batch statistics {missed}")
    unflat = traverse_util.unflatten_dict
    grown = unflat(flat_out)
    opt_state = state.opt_state
    if opt_state is not None:
        opt_state = _grow_opt_state(opt_state, tx, params, grown, new_moments)
    return state.replace(params=grown, batch_stats=unflat(stats_out) if stats_out else state.batch_stats,
                         opt_state=opt_state)


def grow_net2net(state: TrainState, model_from, model_to, key, *, tx=None, noise: float = 0.01,
                 new_moments: str = "zeros") -> TrainState:
    """Net2WiderNet-style growth (Chen, Goodfellow, Shlens, arXiv 1511.05641): copy units, split
    their fan-out.

    Every group draws, for each new unit ``j``, a source unit ``src[j]`` uniformly from the old ones
    (one map per group, so a ResNet's residual stream stays consistent); ``cnt[c]`` counts unit ``c``
    and its copies. A kernel becomes ``W'[..., a, b] = W[..., src_i[a], src_o[b]] / cnt_i[src_i[a]]``
    (an ungrown axis maps to itself), biases and BatchNorm parameters and statistics are copied from
    the source unit: the function is preserved exactly before the noise. Copies of a unit would stay
    identical forever (same activations, same gradients), so the copies' incoming weights get
    ``noise * std(W)`` Gaussian noise (Net2Net's symmetry breaking; ``noise=0``: exact copies).
    A depthwise conv (``GrowthLayer.depthwise``, MobileNetV1) copies the source channel's filter
    whole (each channel has its own filter, nothing to split); the next pointwise conv splits the
    fan-out as above. No variance transfer. Optimizer state: old entries carried, new entries zero
    (``new_moments="warm"``: Adam's ``nu`` seeded as in :func:`grow`). Any increment (no pairs).
    """
    if not noise >= 0:
        raise ValueError(f"noise must be >= 0, got {noise!r}")
    old, new, params = _peer_prelude(state, model_from, model_to, tx, new_moments)
    rng = host_rng(key, 0)
    maps = {}
    for g in sorted(old):
        n, m = old[g], new[g]
        src = np.concatenate([np.arange(n), rng.integers(0, n, m - n)]) if m > n else np.arange(n)
        maps[g] = (src, np.bincount(src, minlength=n))
    flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}
    stats = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(state.batch_stats or {}).items()}
    out, out_stats = {}, {}
    for idx, layer, kpath, w, n_i, m_i, n_o, m_o in _layers(flat, model_from.growth_spec(), old, new):
        if layer.in_group is None or layer.depthwise:    # a depthwise filter is copied, not split
            src_i, cnt_i = np.arange(n_i), np.ones(n_i, int)
        else:
            src_i, cnt_i = maps[layer.in_group]
        src_o = maps[layer.out_group][0] if layer.out_group is not None else np.arange(n_o)
        k = w[..., src_i, :][..., src_o] / cnt_i[src_i][:, None].astype(w.dtype)
        if noise and m_o > n_o:
            sd = noise * float(np.std(w))
            k[..., n_o:] += (host_rng(key, idx + 1).standard_normal(k[..., n_o:].shape) * sd).astype(w.dtype)
        out[kpath] = k.astype(w.dtype)
        bpath = tuple(layer.kernel) + ("bias",)
        if bpath in flat:
            out[bpath] = flat[bpath][src_o]
        if layer.norm is not None:
            for name in ("scale", "bias"):
                p = tuple(layer.norm) + (name,)
                if p in flat:
                    out[p] = flat[p][src_o]
            for name in ("mean", "var"):
                p = tuple(layer.norm) + (name,)
                if p in stats:
                    out_stats[p] = stats[p][src_o]
    return _finish(state, tx, params, out, out_stats, flat, stats, new_moments)


def _delta(shape, dtype) -> np.ndarray:
    """Identity depthwise filters ``(kh, kw, 1, k)``: 1 at the centre tap (``kh // 2, kw // 2``), 0
    elsewhere (with the symmetric padding of pae's convs the centre tap reads the same pixel)."""
    out = np.zeros(shape, dtype)
    out[shape[0] // 2, shape[1] // 2] = 1
    return out


def _rank(s: np.ndarray, shape, dtype) -> int:
    """The numerical rank from singular values ``s`` (as ``np.linalg.matrix_rank``: those above
    ``s.max() * max(shape) * eps`` of ``dtype``; a zero matrix has rank 0)."""
    try:
        eps = float(jax.numpy.finfo(dtype).eps)        # bfloat16 too
    except ValueError:
        eps = float(np.finfo(np.float64).eps)
    if s.size == 0:
        return 0
    return int(np.sum(s > s.max() * max(shape) * eps))


def grow_gradmax(state: TrainState, model_from, model_to, key, grads, *, tx=None, scale: float = 0.5,
                 fan_in: float = 0.01, depthwise: str = "identity",
                 new_moments: str = "zeros") -> TrainState:
    """GradMax-style growth (Evci et al., ICLR 2022, arXiv 2201.05125), adapted to pae's BN nets.

    New units get (near-)zero fan-in and a fan-out chosen from the loss gradient, so the function is
    (nearly) preserved while the new units' fan-in gradients are large; the optimizer state is
    zero-padded (GradMax's ``carry_optimizer``).

    * Fan-out: for every layer whose input group grew from ``n_i`` to ``m_i``, the ``k = m_i - n_i``
      new input channels read with the top-``k`` right singular vectors of that layer's kernel
      gradient ``grads`` (at ``model_from``'s widths) reshaped to ``(n_i, kh * kw * n_o)``, each
      scaled to ``scale`` times the mean fan-out norm of the old input channels (GradMax's ``scale``
      0.5); vectors beyond the gradient's numerical rank (singular values above
      ``s_max * max(shape) * eps`` of its dtype, as ``np.linalg.matrix_rank``; a zero gradient has
      rank 0) are zero. This is a proxy: GradMax's matrix
      correlates the next layer's output gradient with the grown layer's *input* (through an
      auxiliary direct layer), ours with the existing channels of the reader's input, which needs no
      extra layer and works for every reader of a ResNet's residual stream.
    * Fan-in: exactly zero makes a unit dead in a conv -> BatchNorm -> ReLU net (BN of a constant
      zero channel outputs its beta = 0 and ReLU's derivative at 0 is 0), so new fan-in weights are
      ``fan_in`` times He-normal draws (GradMax's epsilon; ``fan_in=0``: exactly zero, dead units).
      In eval mode the function changes by O(fan_in); in train mode BatchNorm renormalizes the new
      channels, so it changes more.

    * Depthwise convs (``GrowthLayer.depthwise``, MobileNetV1): a new channel's fan-in is the
      writer's (pointwise or stem) ``fan_in`` columns; its depthwise filter only passes it on. With
      ``depthwise="identity"`` (default, as GradMax's reference code grows depthwise layers) the new
      filters are identity (1 at the centre tap), so the new channel reaches the next pointwise conv
      unchanged and scaled by ``fan_in`` once (in eval mode); ``depthwise="fan_in"``: ``fan_in``
      times He-normal draws (fan-in ``kh * kw``), like every other new fan-in (the channel is then
      scaled by ``fan_in`` twice). The depthwise conv has no fan-out rows to choose (its input axis
      is 1); the next pointwise conv's new rows come from its gradient as above.

    New biases zero, new BatchNorm units ``gamma = 1, beta = 0, mean = 0, var = 1``; no variance
    transfer. ``grads``: a params-shaped tree of the loss gradient at ``state.params``. Any increment.
    """
    if not scale >= 0 or not fan_in >= 0:
        raise ValueError(f"scale and fan_in must be >= 0, got scale={scale!r}, fan_in={fan_in!r}")
    if depthwise not in GRADMAX_DEPTHWISE:
        raise ValueError(f"depthwise must be one of {GRADMAX_DEPTHWISE}, got {depthwise!r}")
    old, new, params = _peer_prelude(state, model_from, model_to, tx, new_moments)
    flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}
    if not isinstance(grads, Mapping):
        raise TypeError(f"grads must be a params-shaped tree of gradients, got {type(grads).__name__}")
    flat_g = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(dict(grads)).items()}
    stats = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(state.batch_stats or {}).items()}
    out, out_stats = {}, {}
    for idx, layer, kpath, w, n_i, m_i, n_o, m_o in _layers(flat, model_from.growth_spec(), old, new):
        if kpath not in flat_g or np.shape(flat_g[kpath]) != w.shape:
            raise ValueError(f"grads must be shaped like state.params; {'/'.join(kpath)} is "
                             f"{np.shape(flat_g.get(kpath))}, the kernel {w.shape}")
        rng = host_rng(key, idx)
        k = np.zeros(w.shape[:-2] + (m_i, m_o), w.dtype)
        k[..., :n_i, :n_o] = w
        if m_o > n_o and layer.depthwise and depthwise == "identity":
            k[..., n_o:] = _delta(w.shape[:-2] + (1, m_o - n_o), w.dtype)
        elif m_o > n_o:
            std = fan_in * float(np.sqrt(2.0 / (int(np.prod(w.shape[:-2], dtype=np.int64)) * m_i)))
            k[..., n_o:] = (rng.standard_normal(k[..., n_o:].shape) * std).astype(w.dtype)
        if m_i > n_i:
            g = np.moveaxis(flat_g[kpath].astype(np.float64), -2, 0).reshape(n_i, -1)
            _, s, vt = np.linalg.svd(g, full_matrices=False)
            norms = np.sqrt((np.moveaxis(w.astype(np.float64), -2, 0).reshape(n_i, -1) ** 2).sum(1))
            r = min(m_i - n_i, _rank(s, g.shape, flat_g[kpath].dtype))
            fan_out = np.zeros((m_i - n_i, vt.shape[1]))
            fan_out[:r] = vt[:r] * scale * norms.mean()
            k[..., n_i:, :n_o] = np.moveaxis(fan_out.reshape((m_i - n_i,) + w.shape[:-2] + (n_o,)), 0, -2)
        out[kpath] = k
        bpath = tuple(layer.kernel) + ("bias",)
        if bpath in flat:
            out[bpath] = _pad(flat[bpath], (m_o,))
        if layer.norm is not None:
            for name, fill in (("scale", 1.0), ("bias", 0.0)):
                p = tuple(layer.norm) + (name,)
                if p in flat:
                    out[p] = _pad(flat[p], (m_o,), fill)
            for name, fill in (("mean", 0.0), ("var", 1.0)):
                p = tuple(layer.norm) + (name,)
                if p in stats:
                    out_stats[p] = _pad(stats[p], (m_o,), fill)
    return _finish(state, tx, params, out, out_stats, flat, stats, new_moments)


__all__ = ["GRADMAX_DEPTHWISE", "NEW_INITS", "NEW_MOMENTS", "VT_RULES", "grow", "grow_gradmax", "grow_net2net", "host_rng", "resolve_widths", "vt_factor"]
