"""Precision learning by noise injection (phase 1) and the fixed-palette quantizer (phase 2).

Phase 1 (SMOL, NeurIPS 2022 "Not All Bits have Equal Value"; SONIQ, arXiv 2311.14114): every
selected weight ``w`` (a dense or conv kernel, output channels last) gets a trainable bit width per
channel, ``b = b_min + (b_max - b_min) * sigmoid(theta)``, and in training the model sees

    w~ = clip(w, -R, R) + delta(b, R) * u,     u ~ U(-1/2, 1/2) i.i.d. from ctx.key,
    delta(b, R) = 2 R / (2**b - 1)                 (exactly the deployed quantizer's step at width b)

with ``R`` per output channel (max-abs of the column, stop-gradient; or a learned clip
``R = exp(r)``). Uniform rounding error on that grid is ``U(-delta/2, delta/2)`` (the classic
additive-noise model), so the noise is "calibrated to the hardware": the same step, the same range.
The gradient reaches ``theta`` through ``delta`` (reparameterization); the penalty charges size.

Granularity: ``"input"`` (default): one width per input channel (axis -2 of the kernel, the GEMM's
contraction axis; a conv's ``Cin``), so at export a channel's rows go to one K-segment;
``"output"``: one per output channel (axis -1).

Kernel layouts (``layouts``, :func:`kernel_layouts`): a kernel is a GEMM ``(K, N)``. A 2-D leaf is
``(K, N)`` (``nn.Dense``; also a lookup table such as ``nn.Embed``'s ``embedding``, a one-hot GEMM
with one row per token). An ``nn.Conv`` kernel ``(*window, Cin, N)`` has ``K = prod(window) * Cin``
and its input channel is ``Cin`` (``kh * kw`` rows each): the default for ``ndim >= 4``. An
``nn.DenseGeneral`` kernel ``(*contracted, *features)`` (attention's q/k/v ``(in, heads, head_dim)``,
out ``(heads, head_dim, out)``) has ``K = prod(contracted)`` and ``N = prod(features)``: its layout is
``k_axes = len(contracted)``, one "input channel" per K row, the range per (multi-axis) output column.
The kernel's shape cannot tell the two apart (a 3-D kernel may be a 1-D conv ``(w, Cin, N)`` or a
DenseGeneral), so the layout is explicit: ``layouts={path: k_axes}`` (or ``"conv"``), normally
``pae.quant.kernel_layouts(model, example)``, which reads it from the modules while tracing the model.
A selected 3-D kernel without a layout is a ValueError (never silently grouped as a conv);
``ndim >= 4`` kernels default to the conv layout and :func:`pae.quant.export` and
:func:`pae.quant.quantize_activations` raise if the module consuming one is a DenseGeneral.

Evaluation (``ctx.train`` false), ``eval_mode``: ``"quantize"`` (default): the deployed quantizer at
each channel's width rounded to the nearest integer, ``floor(b + 1/2)``, i.e. what the learned
widths would deliver if deployed now; ``"clean"``: the noise-free weights.

Penalty, on the average width over every selected weight (``n_c`` weights in channel ``c``):

    avg = sum_c n_c b_c / sum_c n_c
    penalty = lmbda * avg + budget_weight * |avg - target_bits|          (budget_form="two_sided")
    penalty = lmbda * avg + budget_weight * max(0, avg - target_bits)    (budget_form="hinge")

``lmbda * avg`` is the SMOL-style size charge (``lmbda / N`` per bit of the model's size, so ``lmbda``
does not scale with the model). The budget form pulls the average toward ``target_bits``: the
default two-sided form holds it there (a budget is met exactly: the task loss alone always wants
more bits, so an average below the budget only wastes accuracy, and Adam's momentum otherwise
carries the widths past the budget when the task loss barely resists); the hinge charges only an
average above the budget (a pure constraint ``avg <= target_bits``).

Phase 2 (:func:`palette_quantizer`): the deployed quantizer ``Q`` of :mod:`pae.quant.quantizer` with
each channel's fixed palette width (:class:`QuantWeight`), straight-through gradients, fine-tuning
the weights (and a learned clip, if any).
"""
from __future__ import annotations

import itertools
import numbers
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

from pae.core import Transform, check_finite, latent_node, map_nodes, nodes, select as pselect
from pae.quant import quantizer as qz

GRANULARITIES = ("input", "output")
EVAL_MODES = ("quantize", "clean")
BUDGET_FORMS = ("two_sided", "hinge")
_AXIS = {"input": -2, "output": -1}


@latent_node({"weight": "weights", "logits": "bits", "log_range": "range"})
class NoisyWeight:
    """A kernel with trainable per-channel bit logits (phase 1).

    ``logits`` (C,) float32: ``b = b_min + (b_max - b_min) * sigmoid(logits)``; ``log_range``: (N,)
    float32 log of the learned clip, or None for the max-abs range; ``axis`` (static): -2 per input
    channel, -1 per output channel; ``b_min``, ``b_max`` (static) the bounds; ``k_axes`` (static):
    None for a Dense/Conv kernel (output channels last, input channel axis -2), or the number of
    leading contracted axes of a DenseGeneral kernel (module doc: ``C`` is then ``K`` or ``N`` and
    ``log_range`` has the feature shape).
    """

    weight: Any
    logits: Any
    log_range: Any = None
    axis: int = flax.struct.field(pytree_node=False, default=-2)
    b_min: float = flax.struct.field(pytree_node=False, default=1.0)
    b_max: float = flax.struct.field(pytree_node=False, default=8.0)
    k_axes: Any = flax.struct.field(pytree_node=False, default=None)
    wshape: Any = flax.struct.field(pytree_node=False, default=None)


@latent_node({"weight": "weights", "bits": "frozen", "levels": "frozen", "log_range": "range"})
class QuantWeight:
    """A kernel with a fixed per-channel palette width (phase 2).

    ``bits`` (C,) float32 holding integers, one palette level per channel; ``levels`` (L,) float32,
    the layer's levels in use, ascending (L = 2, or 1 for a uniform palette; a two-level palette
    whose channels all took one level repeats it);
    ``log_range``, ``axis`` and ``k_axes`` as in :class:`NoisyWeight`.
    """

    weight: Any
    bits: Any
    levels: Any
    log_range: Any = None
    axis: int = flax.struct.field(pytree_node=False, default=-2)
    k_axes: Any = flax.struct.field(pytree_node=False, default=None)
    wshape: Any = flax.struct.field(pytree_node=False, default=None)


def kernel_shape(node) -> tuple:
    """The kernel's shape: ``node.wshape`` (recorded at init: under ``pae.chain(quantization,
    inner)`` the ``weight`` field holds the inner transform's node, e.g. a sharing
    ``SharedKernel``, until the chain's ``apply`` builds the kernel), else ``weight``'s shape."""
    if node.wshape is not None:
        return tuple(node.wshape)
    return tuple(np.shape(node.weight))


def gemm_k_axes(node) -> int:
    """How many leading axes of ``node.weight`` form the GEMM's K: ``k_axes``, or ``ndim - 1``."""
    return len(kernel_shape(node)) - 1 if node.k_axes is None else int(node.k_axes)


def gemm_shape(node) -> tuple[int, int]:
    """``(K, N)`` of a node's kernel as a GEMM (module doc)."""
    shape = kernel_shape(node)
    k = gemm_k_axes(node)
    return int(np.prod(shape[:k])), int(np.prod(shape[k:]))


def node_bits(node, bits) -> jax.Array:
    """Per-channel ``bits`` (C,) shaped to broadcast against ``node.weight`` (any layout)."""
    if node.k_axes is None:
        return expand(bits, node.axis)
    bits = jnp.asarray(bits, jnp.float32)
    shape = kernel_shape(node)
    k = int(node.k_axes)
    if node.axis == -2:
        return bits.reshape(shape[:k] + (1,) * (len(shape) - k))
    return bits.reshape(shape[k:])


def expand(bits: jax.Array, axis: int) -> jax.Array:
    """Per-channel ``bits`` (C,) shaped to broadcast against a kernel (``(C, 1)`` for ``axis=-2``)."""
    bits = jnp.asarray(bits, jnp.float32)
    return bits[:, None] if axis == -2 else bits


def channel_range(node) -> jax.Array:
    """``R`` per output channel: ``exp(log_range)`` (learned) or the stop-gradient max-abs (over the
    K axes; a DenseGeneral kernel's ``R`` has its feature shape)."""
    if node.log_range is not None:
        return jnp.exp(jnp.asarray(node.log_range, jnp.float32))
    return jax.lax.stop_gradient(qz.max_abs_range(node.weight, gemm_k_axes(node)))


def learned_bits(node: NoisyWeight) -> jax.Array:
    """The channel widths ``b`` (C,) of a phase-1 node."""
    return qz.bits_from_logits(node.logits, node.b_min, node.b_max)


def rounded_bits(node: NoisyWeight) -> jax.Array:
    """``floor(b + 1/2)``: the nearest whole width (halves round up), within ``[b_min, b_max]``."""
    return jnp.clip(jnp.floor(learned_bits(node) + 0.5), np.ceil(node.b_min), np.floor(node.b_max))


def channel_sizes(node) -> tuple[int, int]:
    """``(C, n)``: channels and weights per channel of a node's kernel."""
    shape = kernel_shape(node)
    if node.k_axes is None:
        c = shape[node.axis]
    else:
        c = gemm_shape(node)[0 if node.axis == -2 else 1]
    return c, int(np.prod(shape)) // c


def _quantized(node, bits) -> jax.Array:
    return qz.quantize(node.weight, node_bits(node, bits), channel_range(node),
                       learned_range=node.log_range is not None)


def _size(latent) -> tuple[jax.Array, int]:
    """``(sum_c n_c b_c, sum_c n_c)`` over phase-1 (continuous b) and phase-2 (palette) nodes."""
    total, count = jnp.zeros((), jnp.float32), 0
    for n in nodes(latent, (NoisyWeight, QuantWeight)):
        _, per = channel_sizes(n)
        b = learned_bits(n) if isinstance(n, NoisyWeight) else jnp.asarray(n.bits, jnp.float32)
        total = total + per * jnp.sum(b)
        count += per * int(np.size(b))
    return total, count


def average_bits(latent: Any) -> jax.Array:
    """Average width over every quantized weight: ``sum_c n_c b_c / sum_c n_c`` (continuous ``b`` of
    :class:`NoisyWeight`, palette widths of :class:`QuantWeight`); ValueError if there are none."""
    total, count = _size(latent)
    if count == 0:
        raise ValueError("latent has no NoisyWeight or QuantWeight node: nothing is quantized")
    return total / jax.lax.optimization_barrier(jnp.float32(count))


def size_penalty(latent: Any, lmbda: Any = 0.0, target_bits: float | None = None,
                 budget_weight: Any = 1.0, budget_form: str = "two_sided") -> jax.Array:
    """``lmbda * avg + budget_weight * |avg - target_bits|`` (``"two_sided"``) or ``* max(0, avg -
    target_bits)`` (``"hinge"``) (module doc), ``avg`` over the phase-1 nodes."""
    if budget_form not in BUDGET_FORMS:
        raise ValueError(f"budget_form must be one of {BUDGET_FORMS}, got {budget_form!r}")
    total, count = jnp.zeros((), jnp.float32), 0
    for n in nodes(latent, NoisyWeight):
        _, per = channel_sizes(n)
        total = total + per * jnp.sum(learned_bits(n))
        count += per * int(np.size(n.logits))
    return budget_penalty(total, count, lmbda, target_bits, budget_weight, budget_form)


def budget_penalty(total, count: int, lmbda: Any, target_bits: float | None, budget_weight: Any,
                   budget_form: str) -> jax.Array:
    """The size penalty of an average width ``avg = total / count`` (0 when ``count`` is 0):
    ``lmbda * avg``, plus ``budget_weight * |avg - target_bits|`` (two-sided) or its hinge."""
    if count == 0:
        return jnp.zeros((), jnp.float32)
    avg = total / count
    out = lmbda * avg
    if target_bits is not None:
        excess = avg - target_bits
        out = out + budget_weight * (jnp.abs(excess) if budget_form == "two_sided"
                                     else jnp.maximum(excess, 0.0))
    return jnp.asarray(out, jnp.float32)


def check_width_args(prefix: str, b_min, b_max, b_init) -> float:
    """Check a learned-width range (``prefix`` names it in errors); the logit of ``b_init``."""
    qz.check_bits(f"{prefix}b_min", b_min, integer=False)
    qz.check_bits(f"{prefix}b_max", b_max, integer=False)
    if not b_min < b_max:
        raise ValueError(f"{prefix}b_min must be < {prefix}b_max, got b_min={b_min}, b_max={b_max}")
    try:
        return qz.logits_for_bits(float(b_init), float(b_min), float(b_max))
    except ValueError as err:
        raise ValueError(f"{prefix}{err}") from None


def check_penalty_args(prefix: str, b_min, b_max, lmbda, target_bits, budget_weight, budget_form,
                       eval_mode) -> None:
    """Check the size penalty's and evaluation's arguments (``prefix`` names the target in errors)."""
    if budget_form not in BUDGET_FORMS:
        raise ValueError(f"budget_form must be one of {BUDGET_FORMS}, got {budget_form!r}")
    if eval_mode not in EVAL_MODES:
        raise ValueError(f"eval_mode must be one of {EVAL_MODES}, got {eval_mode!r}")
    _check_nonneg(f"{prefix}lmbda", lmbda)
    _check_nonneg("budget_weight", budget_weight)
    if target_bits is not None:
        qz.check_bits(f"{prefix}target_bits", target_bits, integer=False, lo=b_min, hi=b_max)


def _check_context(ctx) -> None:
    if not (hasattr(ctx, "key") and hasattr(ctx, "train")):
        raise TypeError(f"ctx must carry a PRNG key and a train flag (pae.Context.make(...)), got "
                        f"{type(ctx).__name__}")


def _check_nonneg(name: str, value) -> None:
    check_finite(name, value)
    if not isinstance(value, jax.core.Tracer) and float(value) < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def check_layouts(layouts: Mapping[str, Any] | None) -> dict:
    """``layouts`` as a dict, each value a ``k_axes`` int >= 1 or ``"conv"`` (TypeError/ValueError)."""
    if layouts is None:
        return {}
    if not isinstance(layouts, Mapping):
        raise TypeError(f"layouts must be a mapping {{leaf path: k_axes or 'conv'}}, got "
                        f"{type(layouts).__name__}")
    out = {}
    for path, lay in layouts.items():
        if lay != "conv" and (isinstance(lay, bool) or not isinstance(lay, numbers.Integral) or lay < 1):
            raise ValueError(f"layouts[{path!r}] must be a number of contracted axes >= 1 or 'conv', "
                             f"got {lay!r}")
        out[str(path)] = lay if lay == "conv" else int(lay)
    return out


def check_layout_paths(params: Any, layouts: dict) -> None:
    """ValueError for a layout naming no leaf of ``params`` (a typo would silently do nothing)."""
    if not layouts:
        return
    known = set(pselect.leaf_paths(params))
    missing = sorted(p for p in layouts if p not in known)
    if missing:
        raise ValueError(f"layouts names {missing}, which are not leaves of the parameters "
                         f"(e.g. {sorted(known)[:3]})")


def layout_of(path: str, shape: tuple, layouts: dict) -> int | None:
    """The ``k_axes`` of a selected kernel (None: Dense/Conv layout); module doc."""
    nd = len(shape)
    lay = layouts.get(path)
    if lay is None:
        if nd == 3:
            raise ValueError(f"select matched the 3-D kernel {path!r} (shape {tuple(shape)}), whose "
                             f"layout is ambiguous: a 1-D conv (w, Cin, N) or a DenseGeneral "
                             f"(in, heads, head_dim) / (heads, head_dim, out); pass "
                             f"layouts=pae.quant.kernel_layouts(model, example) (or "
                             f"layouts={{{path!r}: k_axes or 'conv'}})")
        return None
    if lay == "conv":
        if nd < 3:
            raise ValueError(f"layouts[{path!r}] is 'conv', but the leaf has shape {tuple(shape)}")
        return None
    if not 1 <= lay < nd:
        raise ValueError(f"layouts[{path!r}] = {lay} contracted axes, but the leaf has shape "
                         f"{tuple(shape)} (needs 1 <= k_axes < ndim)")
    return None if nd == 2 else lay


def kernel_layouts(model: Any, *args, **kwargs) -> dict:
    """``{kernel path: k_axes or "conv"}`` of a Flax Linen model, read from its modules while
    tracing ``model.init(PRNGKey(0), *args, **kwargs)`` under ``jax.eval_shape`` (nothing is
    computed): every ``nn.DenseGeneral`` kernel gets the number of input axes it contracts (its
    kernel's leading axes, module doc), every ``nn.Conv`` kernel ``"conv"``. Pass it as ``layouts=``
    (or ``QuantConfig(layouts=...)``). A DenseGeneral with ``batch_dims`` or non-trailing contracted
    axes is left out (export cannot run it packed; selecting its 3-D kernel then raises)."""
    import flax.linen as nn
    from pae.quant import activations as qa
    if isinstance(model, qa.ActQuantized):
        model = model.model
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a flax.linen Module, got {type(model).__name__}")
    out: dict = {}

    def record(next_fun, a, kw, context):
        mod = context.module
        if context.method_name == "__call__" and a:
            path = "/".join(mod.path) + "/kernel"
            if isinstance(mod, nn.DenseGeneral):
                try:
                    out[path] = qa.general_k_axes(mod, np.ndim(a[0]))
                except NotImplementedError:
                    pass
            elif isinstance(mod, nn.Conv):
                out[path] = "conv"
        return next_fun(*a, **kw)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args, **kwargs))
    return out


def noise_injection(select: pselect.Selector | None = None, *, b_min: float = 1.0,
                    b_max: float = 8.0, b_init: float = 6.0, granularity: str = "input",
                    learned_range: bool = False, lmbda: float = 0.0,
                    target_bits: float | None = None, budget_weight: float = 1.0,
                    budget_form: str = "two_sided", eval_mode: str = "quantize",
                    layouts: Mapping[str, Any] | None = None) -> Transform:
    """The phase-1 transform: per-channel learned bit widths under quantization-matched noise.

    Args:
      select: which leaves (default ``pae.select.kernels()``); each must be a float array with
        ``ndim >= 2`` whose last axis is the output channels (Dense ``(K, N)``, Conv ``(..., Cin, N)``).
      b_min, b_max: the bounds of the learned width, ``1 <= b_min < b_max <= 8`` (continuous).
      b_init: the initial width of every channel, strictly inside ``(b_min, b_max)``.
      granularity: ``"input"`` (per input channel, default) or ``"output"``.
      learned_range: learn a clip ``R = exp(r)`` per output channel (role ``"range"``; initialized
        at the max-abs) instead of the max-abs range.
      lmbda, target_bits, budget_weight, budget_form: the penalty (module doc); ``target_bits`` in
        ``[b_min, b_max]``; ``budget_form`` ``"two_sided"`` (default) or ``"hinge"``.
      eval_mode: ``"quantize"`` or ``"clean"`` (module doc).
      layouts: ``{leaf path: k_axes or "conv"}`` (module doc, "Kernel layouts"), normally
        :func:`pae.quant.kernel_layouts`; required for every selected 3-D kernel.

    One per model: ``apply`` and ``penalty`` act on every :class:`NoisyWeight` of the latent, so a
    second ``noise_injection`` in a chain is refused (widen ``select`` instead).

    Roles: ``weight`` "weights", ``logits`` "bits", ``log_range`` "range", so
    ``pae.core.role_optimizer({"weights": ..., "bits": optax.adam(1e-3)})`` gives the widths their
    own optimizer and no weight decay (SMOL: Adam, lr 1e-3, no decay).
    """
    select = pselect.kernels() if select is None else select
    theta0 = check_width_args("", b_min, b_max, b_init)
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    check_penalty_args("", b_min, b_max, lmbda, target_bits, budget_weight, budget_form, eval_mode)
    axis = _AXIS[granularity]
    b_min, b_max = float(b_min), float(b_max)

    layouts = check_layouts(layouts)

    def init(params, key):
        del key
        if nodes(params, (NoisyWeight, QuantWeight)):
            raise ValueError("params already hold quantized weights (NoisyWeight/QuantWeight nodes, e.g. "
                             "from another noise_injection in the chain); each quantization transform "
                             "acts on every such node, so use one noise_injection per model and widen "
                             "its select")
        check_layout_paths(params, layouts)

        def wrap(path, w):
            if not hasattr(w, "shape") or np.ndim(w) < 2 or not jnp.issubdtype(jnp.asarray(w).dtype,
                                                                                  jnp.floating):
                raise ValueError(f"select matched {path!r} (shape {np.shape(w)}), but only float "
                                 f"kernels with ndim >= 2 (output channels last) can be quantized; "
                                 f"narrow the selector (e.g. pae.select.kernels())")
            w = jnp.asarray(w)
            if not isinstance(w, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(w))):
                raise ValueError(f"{path!r} has NaN or Inf values; noise injection needs a finite "
                                 f"kernel (its range is the channel's max |w|)")
            node = NoisyWeight(w, None, None, axis, b_min, b_max, layout_of(path, w.shape, layouts),
                               tuple(w.shape))
            c, _ = channel_sizes(node)
            log_range = None
            if learned_range:
                log_range = jnp.log(jnp.maximum(channel_range(node), 1e-8))
            return node.replace(logits=jnp.full((c,), theta0, jnp.float32), log_range=log_range)

        return pselect.map_selected(params, select, wrap, what="select")

    def apply(latent, ctx):
        _check_context(ctx)
        counter = itertools.count()

        def one(n: NoisyWeight):
            key = jax.random.fold_in(ctx.key, next(counter))
            w = jnp.asarray(n.weight)
            wf = w.astype(jnp.float32)
            r = channel_range(n)
            learned = n.log_range is not None
            delta = qz.step_size(node_bits(n, learned_bits(n)), r)
            u = jax.random.uniform(key, w.shape, jnp.float32, -0.5, 0.5)
            noisy = (qz.clip_ste(wf, -r, r) if learned else wf) + delta * u
            held = wf if eval_mode == "clean" else _quantized(n, rounded_bits(n)).astype(jnp.float32)
            return jnp.where(jnp.asarray(ctx.train), noisy, held).astype(qz.quantized_dtype(w.dtype))

        return map_nodes(one, latent, NoisyWeight)

    def penalty(latent, ctx):
        del ctx
        return size_penalty(latent, lmbda, target_bits, budget_weight, budget_form)

    def finalize(latent, ctx):
        del ctx
        return map_nodes(lambda n: _quantized(n, rounded_bits(n)), latent, NoisyWeight)

    return Transform(init, apply, penalty, finalize)


def quantize_params(latent: Any) -> Any:
    """Ordinary params: every :class:`QuantWeight` replaced by ``Q(weight)`` at its palette widths,
    every :class:`pae.quant.QuantAct` by the dict the activation-quantizing model reads."""
    from pae.quant import activations as qa
    return qa.visible_acts(map_nodes(lambda n: _quantized(n, n.bits), latent, QuantWeight))


def palette_quantizer() -> Transform:
    """The phase-2 transform: the deployed quantizer with each channel's fixed palette width, STE
    gradients (train and evaluation alike). ``init`` expects a latent that already holds
    :class:`QuantWeight` nodes (:func:`pae.quant.assign_palette` makes them)."""
    def init(latent, key):
        del key
        if not nodes(latent, QuantWeight):
            raise ValueError("palette_quantizer: the latent holds no QuantWeight node; phase 2 starts "
                             "from pae.quant.assign_palette(phase-1 latent) (or a hand-made "
                             "QuantWeight per quantized kernel)")
        return latent

    return Transform(init=init,
                     apply=lambda latent, ctx: quantize_params(latent),
                     penalty=lambda latent, ctx: jnp.zeros((), jnp.float32),
                     finalize=lambda latent, ctx: quantize_params(latent))


__all__ = ["BUDGET_FORMS", "EVAL_MODES", "GRANULARITIES", "NoisyWeight", "QuantWeight", "average_bits",
           "channel_range", "channel_sizes", "check_layouts", "expand", "gemm_shape", "kernel_layouts", "kernel_shape", "layout_of", "node_bits", "learned_bits", "noise_injection",
           "palette_quantizer", "quantize_params", "rounded_bits", "size_penalty"]
