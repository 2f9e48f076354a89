"""Activation quantization: learned per-input-channel bit widths for the inputs of selected layers.

The inputs ``x`` of each selected ``nn.Dense``/``nn.Conv``/``nn.DenseGeneral`` (a layer is selected
when its kernel is: the activation channels are the kernel's input channels, axis -2, the GEMM's K
axis; a DenseGeneral's K rows, its contracted trailing input axes flattened, see ``layouts``) get

* phase 1 (:func:`act_noise_injection`, training): ``x~ = clip(x, lo, hi) + delta(b) * u``,
  ``u ~ U(-1/2, 1/2)`` i.i.d. from ``ctx.key``, with ``b`` a learned per-channel width
  (``b = b_min + (b_max - b_min) sigmoid(theta)``, role ``"bits"``) and ``delta(b) = (hi - lo) / (2**b - 1)``
  exactly the deployed quantizer's step on the channel's grid;
* phase 2 (:func:`pae.quant.palette_quantizer`) and evaluation: the deployed quantizer
  ``Q(x) = (q - o) * delta``, ``q = clip(round(clip(x, lo, hi) / delta + o), 0, 2**b - 1)``, with the
  channel's fixed palette width and a straight-through gradient (``dQ/dx = 1`` inside ``[lo, hi]``,
  0 outside: the clip's derivative).

Range (named ``"running-maxabs"``): ``R`` per channel is a bias-corrected exponential moving average
of the batch's per-channel max ``|x|`` (over every axis but the last), kept in ``batch_stats`` under
the layer's scope (``{"ema", "count", "min"}``), updated in training (``R`` used in that step includes
the current batch, as BatchNorm's batch statistics are), frozen in evaluation and at export::

    ema <- m ema + (1 - m) max|x|,   count <- count + 1,   R = ema / (1 - m**count)

``learned_range=True`` (option, ``"running-maxabs-learned-scale"``) multiplies ``R`` by a learned
``exp(s)`` per channel (role ``"range"``, ``s = 0`` at the start), trained through the quantizer with
the LSQ-style gradient (through ``delta`` and the clip). Gradients never flow into the statistic.

Grid (``grid``): ``"symmetric"``: the weights' mid-rise grid on ``[-R, R]`` (``o = (2**b - 1)/2``;
no level at 0); ``"unsigned"``: ``[0, R]`` with ``o = 0`` (0 is a level, negatives clip to 0);
``"auto"`` (default): per channel, unsigned while every value the channel has seen in training was
``>= 0`` (``min`` is the running minimum), else symmetric. The default is ``"auto"``, not the
symmetric grid, because most quantized inputs follow a ReLU (or are raw pixels): there the
symmetric grid wastes half its levels on negatives and maps every exact zero to ``+-delta/2``.
The grid is a per-channel ``(delta, o)`` pair, which is exactly ``pallas_kernels``'s
``(q - offset) * scale`` form, so the export reproduces it.

Size: the average activation width is the plain mean over every quantized activation channel of
every selected layer (``sum_c b_c / C``; one vote per channel, whatever the feature map's spatial
size: "activation size = bits per channel"); the penalty and budget have the weights' forms
(:func:`act_size_penalty`).

How the model sees it: the latent holds a :class:`NoisyAct` (phase 1) or :class:`QuantAct`
(phase 2) node at ``params[<layer>]["act"]`` beside the layer's ``kernel``; the transform's ``apply``
turns it into a small dict of arrays (the widths, the grid, the momentum, a noise key) that the
layer's scope carries; :func:`quantize_activations` wraps a Flax model so that, through
``flax.linen.intercept_methods``, every ``nn.Dense``/``nn.Conv``/``nn.DenseGeneral`` whose scope has an ``"act"`` entry
quantizes its input before computing. Layers called twice share their statistics and noise key.
"""
from __future__ import annotations

import dataclasses
import inspect
import itertools
import numbers
from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pae.core import WEIGHTS, Transform, is_node, latent_node, map_nodes, nodes, roles_of, select as pselect
from pae.quant import quantizer as qz

GRIDS = ("symmetric", "unsigned", "auto")
_GRID_CODE = {g: i for i, g in enumerate(GRIDS)}
ACT = "act"      # the key of a layer's activation quantizer in its params and batch_stats scopes


@latent_node({"logits": "bits", "log_scale": "range"})
class NoisyAct:
    """Per-input-channel learned activation widths of one layer (phase 1).

    ``logits`` (C,): ``b = b_min + (b_max - b_min) sigmoid(logits)``; ``log_scale`` (C,) the learned
    log multiplier of the running range, or None; static: ``b_min``, ``b_max``, ``grid``,
    ``momentum``, ``eval_mode`` (``"quantize"``: evaluation quantizes at ``floor(b + 1/2)``;
    ``"clean"``: evaluation leaves the inputs alone).
    """

    logits: Any
    log_scale: Any = None
    b_min: float = flax.struct.field(pytree_node=False, default=1.0)
    b_max: float = flax.struct.field(pytree_node=False, default=8.0)
    grid: str = flax.struct.field(pytree_node=False, default="auto")
    momentum: float = flax.struct.field(pytree_node=False, default=0.9)
    eval_mode: str = flax.struct.field(pytree_node=False, default="quantize")


@latent_node({"bits": "frozen", "levels": "frozen", "log_scale": "range"})
class QuantAct:
    """Fixed per-channel activation palette widths of one layer (phase 2): ``bits`` (C,) float32
    holding integers, ``levels`` (L,) the palette (as :class:`pae.quant.QuantWeight`),
    ``log_scale``, ``grid``, ``momentum`` as in :class:`NoisyAct`."""

    bits: Any
    levels: Any
    log_scale: Any = None
    grid: str = flax.struct.field(pytree_node=False, default="auto")
    momentum: float = flax.struct.field(pytree_node=False, default=0.9)


# ----------------------------------------------------------------------------------------------
# the math (pure functions of arrays; NumPy references in tests/quant/test_activations.py)

def act_bits(node) -> jax.Array:
    """The widths (C,): continuous learned (``NoisyAct``) or the palette's (``QuantAct``)."""
    if isinstance(node, NoisyAct):
        return qz.bits_from_logits(node.logits, node.b_min, node.b_max)
    return jnp.asarray(node.bits, jnp.float32)


def rounded_act_bits(node: NoisyAct) -> jax.Array:
    """``floor(b + 1/2)`` within ``[ceil(b_min), floor(b_max)]``."""
    return jnp.clip(jnp.floor(act_bits(node) + 0.5), np.ceil(node.b_min), np.floor(node.b_max))


def running_range(stats: dict, momentum: Any) -> jax.Array:
    """``R = ema / (1 - m**count)`` (0 before any training batch)."""
    count = jnp.asarray(stats["count"], jnp.float32)
    debias = 1.0 - jnp.power(jnp.asarray(momentum, jnp.float32), count)
    return jnp.where(count > 0, stats["ema"] / jnp.where(count > 0, debias, 1.0), 0.0)


def update_stats(stats: dict, x: jax.Array, momentum: Any) -> dict:
    """The statistics after one training batch ``x`` (..., C) (module doc)."""
    xf = jax.lax.stop_gradient(jnp.asarray(x, jnp.float32))
    axes = tuple(range(xf.ndim - 1))
    m = jnp.asarray(momentum, jnp.float32)
    return {"ema": m * stats["ema"] + (1.0 - m) * jnp.max(jnp.abs(xf), axis=axes),
            "count": stats["count"] + 1.0,
            "min": jnp.minimum(stats["min"], jnp.min(xf, axis=axes))}


def init_stats(channels: int) -> dict:
    """Fresh statistics of a layer with ``channels`` input channels."""
    return {"ema": jnp.zeros((channels,), jnp.float32), "count": jnp.zeros((), jnp.float32),
            "min": jnp.full((channels,), jnp.inf, jnp.float32)}


def grid_params(bits: Any, r: Any, unsigned: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(delta, o, lo)`` per channel: unsigned ``[0, R]``: ``delta = R / (2**b - 1)``, ``o = 0``;
    symmetric ``[-R, R]``: ``delta = 2R / (2**b - 1)``, ``o = (2**b - 1) / 2``; ``lo = -o * delta``."""
    bits = jnp.asarray(bits, jnp.float32)
    levels = jnp.exp2(bits) - 1.0
    unsigned = jnp.asarray(unsigned, jnp.bool_)
    r = jnp.asarray(r, jnp.float32)
    delta = jnp.where(unsigned, r, 2.0 * r) / levels
    o = jnp.where(unsigned, 0.0, levels / 2.0)
    return delta, o, -o * delta


def is_unsigned(grid_code: Any, stats: dict) -> jax.Array:
    """Per channel: the grid is ``[0, R]`` (``"unsigned"``, or ``"auto"`` with a running min >= 0)."""
    g = jnp.asarray(grid_code, jnp.int32)
    return (g == _GRID_CODE["unsigned"]) | ((g == _GRID_CODE["auto"]) & (stats["min"] >= 0))


def act_codes(x: jax.Array, bits: Any, r: Any, unsigned: Any) -> jax.Array:
    """Integer codes (float32) of ``x`` (..., C) on each channel's grid (module doc)."""
    delta, o, _ = grid_params(bits, r, unsigned)
    safe = jnp.where(delta > 0, delta, 1.0)
    q = jnp.round(_clip(jnp.asarray(x, jnp.float32), r, unsigned) / safe + o)
    return jnp.clip(q, 0.0, jnp.exp2(jnp.asarray(bits, jnp.float32)) - 1.0)


def _clip(x, r, unsigned):
    return qz.clip_ste(x, jnp.where(unsigned, 0.0, -r), r)


def quantize_act(x: jax.Array, bits: Any, r: Any, unsigned: Any) -> jax.Array:
    """``Q(x)`` per channel with the straight-through gradient (``1`` inside the range, 0 outside;
    ``r`` gets the LSQ-style gradient through ``delta`` and the clip unless it is a constant)."""
    xf = jnp.asarray(x, jnp.float32)
    delta, o, _ = grid_params(bits, r, unsigned)
    safe = jnp.where(delta > 0, delta, 1.0)
    t = _clip(xf, r, unsigned) / safe + o
    q = t + jax.lax.stop_gradient(jnp.round(t) - t)     # round_ste; t lies in [0, 2**b - 1]
    return ((q - o) * delta).astype(jnp.asarray(x).dtype)


def noisy_act(x: jax.Array, bits: Any, r: Any, unsigned: Any, key: jax.Array) -> jax.Array:
    """``clip(x, lo, hi) + delta(b) * u``, ``u ~ U(-1/2, 1/2)`` from ``key`` (continuous ``b``)."""
    xf = jnp.asarray(x, jnp.float32)
    delta, o, _ = grid_params(bits, r, unsigned)
    u = jax.random.uniform(key, xf.shape, jnp.float32, -0.5, 0.5)
    return (_clip(xf, r, unsigned) + delta * u).astype(jnp.asarray(x).dtype)


# ----------------------------------------------------------------------------------------------
# the transform (phase 1) and the node -> model-visible dict conversion

def _visible(node, key=None, train=None) -> dict:
    """The dict a layer's scope carries for ``node`` (arrays only; the structure is static)."""
    out = {"grid": jnp.asarray(_GRID_CODE[node.grid], jnp.int32),
           "momentum": jnp.asarray(node.momentum, jnp.float32)}
    if node.log_scale is not None:
        out["log_scale"] = jnp.asarray(node.log_scale, jnp.float32)
    if isinstance(node, NoisyAct):
        out["noise_bits"] = act_bits(node)
        out["key"] = jnp.asarray(key)
        if node.eval_mode == "quantize":
            out["bits"] = rounded_act_bits(node)
    else:
        out["bits"] = jnp.asarray(node.bits, jnp.float32)
    return out


def visible_acts(latent: Any, key: Any = None) -> Any:
    """``latent`` with every :class:`NoisyAct`/:class:`QuantAct` replaced by the dict the wrapped
    model reads (phase 1 needs ``key``: each node gets ``fold_in(key, i)``)."""
    counter = itertools.count()
    base = jax.random.PRNGKey(0) if key is None else key

    def one(n):
        return _visible(n, jax.random.fold_in(base, next(counter)) if isinstance(n, NoisyAct) else None)

    return map_nodes(one, latent, (NoisyAct, QuantAct))


def _act_size(latent: Any, node_types) -> tuple[jax.Array, int]:
    total, count = jnp.zeros((), jnp.float32), 0
    for n in nodes(latent, node_types):
        b = act_bits(n)
        total = total + jnp.sum(b)
        count += int(np.size(b))
    return total, count


def average_act_bits(latent: Any) -> jax.Array:
    """Plain mean width over every quantized activation channel (module doc); ValueError if none."""
    total, count = _act_size(latent, (NoisyAct, QuantAct))
    if count == 0:
        raise ValueError("latent has no NoisyAct or QuantAct node: no activation is quantized")
    return total / jax.lax.optimization_barrier(jnp.float32(count))


def has_acts(latent: Any) -> bool:
    """Whether ``latent`` quantizes any activation."""
    return bool(nodes(latent, (NoisyAct, QuantAct)))


def act_size_penalty(latent: Any, lmbda: Any = 0.0, target_bits: float | None = None,
                     budget_weight: Any = 1.0, budget_form: str = "two_sided") -> jax.Array:
    """``lmbda * avg + budget_weight * |avg - target|`` (or the hinge), ``avg`` the mean learned
    activation width over the phase-1 nodes (the weights' forms, :func:`pae.quant.size_penalty`)."""
    from pae.quant.noise import BUDGET_FORMS, budget_penalty
    if budget_form not in BUDGET_FORMS:
        raise ValueError(f"budget_form must be one of {BUDGET_FORMS}, got {budget_form!r}")
    total, count = _act_size(latent, NoisyAct)
    return budget_penalty(total, count, lmbda, target_bits, budget_weight, budget_form)


def _parent(tree: dict, path: str):
    keys = path.split("/")[:-1]
    node = tree
    for k in keys:
        if not isinstance(node, dict) or k not in node:
            return None
        node = node[k]
    return node if isinstance(node, dict) else None


def _copy_dicts(tree):
    """Plain nested dicts from any nest of mappings (a Flax ``FrozenDict`` included)."""
    if isinstance(tree, Mapping):
        return {k: _copy_dicts(v) for k, v in tree.items()}
    return tree


def act_noise_injection(select: pselect.Selector | None = None, *, b_min: float = 1.0,
                        b_max: float = 8.0, b_init: float = 6.0, grid: str = "auto",
                        momentum: float = 0.9, learned_range: bool = False, lmbda: float = 0.0,
                        target_bits: float | None = None, budget_weight: float = 1.0,
                        budget_form: str = "two_sided", eval_mode: str = "quantize",
                        layouts: Any = None) -> Transform:
    """The phase-1 transform for activations (module doc); run the model through
    :func:`quantize_activations`, and give it running statistics with :func:`with_act_stats`
    (:func:`pae.quant.quant_phases` does both).

    Args:
      select: the layers, by their kernels (default ``pae.select.kernels()``); a selected kernel's
        parent scope gets ``"act"``: ``C = kernel.shape[-2]`` input channels.
      b_min, b_max, b_init: bounds and start of the learned widths (as the weights').
      grid: ``"auto"`` (default), ``"symmetric"`` or ``"unsigned"`` (module doc).
      momentum: of the running max-abs, in ``[0, 1)``.
      learned_range: learn a per-channel log multiplier of the running range (role ``"range"``).
      lmbda, target_bits, budget_weight, budget_form: :func:`act_size_penalty`.
      eval_mode: ``"quantize"`` (evaluate at the rounded widths) or ``"clean"``.
      layouts: kernel layouts as :func:`pae.quant.noise_injection`'s: a DenseGeneral kernel with
        ``k_axes`` contracted axes quantizes its input's trailing ``k_axes`` axes flattened
        (``C = K``, one channel per K row, e.g. ``heads * head_dim`` for attention's output
        projection). Only leaves named ``kernel`` get an input quantizer: a selected lookup table
        (``nn.Embed``'s ``embedding``, a raw ``pos_embedding``) has integer indices or no input, so
        it is skipped here (its weights are still quantized by ``noise_injection``).
    """
    from pae.quant.noise import (_check_context, check_layout_paths, check_layouts,
                                 check_penalty_args, check_width_args, layout_of)
    layouts = check_layouts(layouts)
    select = pselect.kernels() if select is None else select
    theta0 = check_width_args("act ", b_min, b_max, b_init)
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}")
    if isinstance(momentum, bool) or not (isinstance(momentum, numbers.Real) and 0.0 <= momentum < 1.0):
        raise ValueError(f"momentum must be a number in [0, 1), got {momentum!r}")
    check_penalty_args("act ", b_min, b_max, lmbda, target_bits, budget_weight, budget_form, eval_mode)
    b_min, b_max, momentum = float(b_min), float(b_max), float(momentum)

    def init(params, key):
        del key
        if nodes(params, (NoisyAct, QuantAct)):
            raise ValueError("params already hold activation quantizers (NoisyAct/QuantAct nodes, e.g. "
                             "from another act_noise_injection in the chain); each acts on every such "
                             "node, so use one act_noise_injection per model and widen its select")
        hits = []

        check_layout_paths(params, layouts)

        def record(path, w):
            if np.ndim(w) < 2:
                raise ValueError(f"select matched {path!r} (shape {np.shape(w)}), but activations are "
                                 f"quantized per input channel of a kernel (ndim >= 2); narrow the "
                                 f"selector (e.g. pae.select.kernels())")
            if path.rsplit("/", 1)[-1] != "kernel":
                return w                 # a lookup table: no input to quantize (docstring)
            k = layout_of(path, np.shape(w), layouts)
            hits.append((path, int(np.shape(w)[-2]) if k is None
                         else int(np.prod(np.shape(w)[:k]))))
            return w

        pselect.map_selected(params, select, record, what="select")
        out = _copy_dicts(params)
        for path, channels in hits:
            parent = _parent(out, path)
            if parent is None:
                raise ValueError(f"select matched {path!r}, which is not inside a layer's dict of "
                                 f"parameters; activation quantization needs the kernel of an "
                                 f"nn.Dense/nn.Conv scope")
            if ACT in parent:
                raise ValueError(f"{path.rsplit('/', 1)[0]!r} already has an {ACT!r} entry "
                                 f"(activations quantized twice?)")
            log_scale = jnp.zeros((channels,), jnp.float32) if learned_range else None
            parent[ACT] = NoisyAct(jnp.full((channels,), theta0, jnp.float32), log_scale, b_min,
                                   b_max, grid, momentum, eval_mode)
        return out

    def apply(latent, ctx):
        _check_context(ctx)
        return visible_acts(latent, ctx.key)

    def penalty(latent, ctx):
        del ctx
        return act_size_penalty(latent, lmbda, target_bits, budget_weight, budget_form)

    def finalize(latent, ctx):
        del ctx
        return map_nodes(lambda n: _visible(QuantAct(rounded_act_bits(n), jnp.zeros((1,)), n.log_scale,
                                                     n.grid, n.momentum)), latent, NoisyAct)

    return Transform(init, apply, penalty, finalize)


def act_paths(latent: Any) -> dict:
    """``{layer scope path: channels}`` of every activation node (``"Dense_0"`` for
    ``latent["Dense_0"]["act"]``), in any mapping (FrozenDict too) and inside latent nodes by
    :mod:`pae.core.select`'s naming rule (a sharing latent's ``params`` keep their paths)."""
    out = {}

    def walk(tree, prefix):
        if is_node(tree) and not isinstance(tree, (NoisyAct, QuantAct)):
            for name, role in roles_of(tree).items():
                walk(getattr(tree, name), prefix if role == WEIGHTS else f"{prefix}/{name}".lstrip("/"))
        elif isinstance(tree, Mapping):
            for k, v in tree.items():
                if k == ACT and isinstance(v, (NoisyAct, QuantAct)):
                    out[prefix] = int(np.size(v.logits if isinstance(v, NoisyAct) else v.bits))
                else:
                    walk(v, f"{prefix}/{k}" if prefix else str(k))
    walk(latent, "")
    return out


def with_act_stats(batch_stats: Any, latent: Any) -> dict:
    """``batch_stats`` plus fresh running statistics (``{"ema", "count", "min"}``) for every
    activation node of ``latent`` that has none yet (existing ones are kept). Pure, host-side."""
    out = _copy_dicts(batch_stats or {})
    for path, channels in act_paths(latent).items():
        scope = out
        for k in path.split("/"):
            scope = scope.setdefault(k, {})
        if ACT not in scope:
            scope[ACT] = jax.tree.map(np.asarray, init_stats(channels))
    return out


# ----------------------------------------------------------------------------------------------
# the model wrapper

#: the modules whose inputs can be quantized (and whose kernels export packs as GEMMs)
GEMM_MODULES = (nn.Dense, nn.DenseGeneral, nn.Conv)


def general_k_axes(mod: nn.DenseGeneral, ndim: int) -> int:
    """How many trailing input axes an ``nn.DenseGeneral`` contracts (its kernel's ``k_axes``).
    NotImplementedError unless they are the input's trailing axes in order and ``batch_dims`` is
    empty (then the GEMM is ``x.reshape(-1, K) @ kernel.reshape(K, N)``)."""
    axis = mod.axis if isinstance(mod.axis, (tuple, list)) else (mod.axis,)
    norm = tuple(int(a) % ndim for a in axis)
    k = len(norm)
    if tuple(mod.batch_dims) or norm != tuple(range(ndim - k, ndim)):
        raise NotImplementedError(f"{'/'.join(mod.path)!r}: DenseGeneral with axis={mod.axis!r}, "
                                  f"batch_dims={mod.batch_dims!r}; only the trailing input axes in "
                                  f"order and no batch_dims are supported")
    return k


def quantize_input(mod: nn.Module, x: jax.Array, train: bool) -> jax.Array:
    """The input of layer ``mod`` as the model sees it (inside a Flax interceptor): unchanged if its
    scope has no ``"act"`` entry; else noisy (phase-1 training), quantized, or clean (module doc).
    Updates the layer's running statistics when training with ``batch_stats`` mutable. An
    ``nn.DenseGeneral`` contracting ``k`` axes has its trailing ``k`` axes flattened into channels."""
    if not mod.has_variable("params", ACT):
        return x
    if isinstance(mod, nn.Conv) and mod.feature_group_count != 1:
        raise ValueError(f"layer {'/'.join(mod.path)!r} is a grouped conv (feature_group_count="
                         f"{mod.feature_group_count}, e.g. depthwise): its activations cannot be "
                         f"quantized per input channel (and export packs no grouped conv); leave it out "
                         f"of the selection, e.g. select=pae.select.kernels().exclude(pae.select.path(...))")
    if isinstance(mod, nn.DenseGeneral):
        x = jnp.asarray(x)
        k = general_k_axes(mod, x.ndim)
        flat = x.reshape(x.shape[:x.ndim - k] + (-1,))
        return _quantize_channels(mod, flat, train).reshape(x.shape)
    return _quantize_channels(mod, x, train)


def _quantize_channels(mod: nn.Module, x: jax.Array, train: bool) -> jax.Array:
    a = mod.get_variable("params", ACT)
    if not mod.has_variable("batch_stats", ACT):
        raise ValueError(f"layer {'/'.join(mod.path)!r} quantizes its inputs but has no running "
                         f"statistics in batch_stats; add them with pae.quant.with_act_stats(batch_stats, "
                         f"latent) (pae.quant.quant_phases does)")
    stats = mod.get_variable("batch_stats", ACT)
    if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating):
        x = jnp.asarray(x, jnp.float32)
    if x.shape[-1] != np.shape(stats["ema"])[0]:
        raise ValueError(f"layer {'/'.join(mod.path)!r}: input has {x.shape[-1]} channels, its "
                         f"activation quantizer {np.shape(stats['ema'])[0]} (a DenseGeneral kernel "
                         f"needs its layout: layouts=pae.quant.kernel_layouts(model, example))")
    if train and mod.is_mutable_collection("batch_stats"):
        stats = update_stats(stats, x, a["momentum"])
        mod.put_variable("batch_stats", ACT, stats)
    r = running_range(stats, a["momentum"])
    if "log_scale" in a:
        r = r * jnp.exp(a["log_scale"])
    unsigned = is_unsigned(a["grid"], stats)
    if train and "noise_bits" in a:
        return noisy_act(x, a["noise_bits"], r, unsigned, a["key"])
    if "bits" in a:
        return quantize_act(x, a["bits"], r, unsigned)
    return x


def _takes(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


@dataclasses.dataclass(frozen=True)
class ActQuantized:
    """A Flax model whose ``nn.Dense``/``nn.Conv`` layers quantize their inputs where the params
    say so (module doc). Duck-types a Linen module for :mod:`pae.train` (``init``, ``apply``);
    the parameter tree is the inner model's (plus the ``"act"`` entries), so it chains with other
    transforms and exports like the inner model. ``mask`` is passed on only if the inner model's
    ``__call__`` takes it."""

    model: Any

    def __call__(self, x, train: bool = False, mask=None, **kwargs):   # signature for the engine
        raise TypeError("ActQuantized is not bound; call .apply(variables, x, train=...)")

    def _kw(self, kwargs):
        mask = kwargs.pop("mask", None)
        if mask is not None and _takes(type(self.model).__call__, "mask"):
            kwargs["mask"] = mask
        return kwargs

    def init(self, rngs, *args, **kwargs):
        return self.model.init(rngs, *args, **self._kw(dict(kwargs)))

    def apply(self, variables, *args, train: bool = False, **kwargs):
        kwargs = self._kw(dict(kwargs))

        def intercept(next_fun, a, kw, context):
            mod = context.module
            if context.method_name != "__call__" or not isinstance(mod, GEMM_MODULES):
                return next_fun(*a, **kw)
            a, kw = positional_inputs(a, kw)
            return next_fun(quantize_input(mod, a[0], train), *a[1:], **kw)

        with nn.intercept_methods(intercept):
            return self.model.apply(variables, *args, train=train, **kwargs)


def positional_inputs(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A Dense/DenseGeneral/Conv call's ``(inputs, ...)`` with ``inputs`` first, also when the
    caller passed it by keyword (``nn.Dense(3)(inputs=x)``)."""
    if args or "inputs" not in kwargs:
        return args, kwargs
    kwargs = dict(kwargs)
    return (kwargs.pop("inputs"),), kwargs


def quantize_activations(model: Any) -> ActQuantized:
    """Wrap a Flax Linen model so the inputs of its layers are quantized as the latent's
    ``"act"`` entries say (:func:`act_noise_injection`, :func:`pae.quant.assign_palette`).
    The model's ``__call__`` must take ``train``. Wrapping twice returns the same wrapper."""
    if isinstance(model, ActQuantized):
        return model
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a flax.linen Module, got {type(model).__name__}")
    return ActQuantized(model)


__all__ = ["ACT", "ActQuantized", "GEMM_MODULES", "GRIDS", "general_k_axes", "NoisyAct", "QuantAct", "act_bits", "act_codes",
           "act_noise_injection", "act_paths", "act_size_penalty", "average_act_bits", "grid_params",
           "has_acts", "init_stats", "is_unsigned", "noisy_act", "quantize_act", "quantize_activations",
           "quantize_input", "rounded_act_bits", "running_range", "update_stats", "visible_acts",
           "with_act_stats"]
