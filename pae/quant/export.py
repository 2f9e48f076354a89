"""Export a phase-2 model to ``pallas_kernels``'s packed format, with a pure forward function.

Every :class:`~pae.quant.QuantWeight` kernel becomes packed codes. Per input channel (default
granularity) the layer's input channels are permuted into a low-bit and a high-bit K-segment, so

    y = X[:, perm] @ concat(W_lo, W_hi) = X[:, lo] @ W_lo + X[:, hi] @ W_hi

is one ``pallas_kernels.pack_mixed`` object and one ``packed_matmul`` call (a layer whose channels
all took one level is a single ``pack``-ed segment, no permutation). Per output channel the columns
split instead: two packed weights, ``y = concat(X @ W_lo, X @ W_hi)[:, inverse_perm]``. The codes
and scales are exactly the phase-2 quantizer's (:func:`pae.quant.codes`; scale ``= delta = R / o``,
offset ``o = (2**b - 1) / 2``), so the logits equal the phase-2 model's to float tolerance.

Storage: ``pallas_kernels`` stores 1, 2, 3, 4 and 8-bit codes; a 5, 6 or 7-bit level is stored in
8-bit words (its codes use ``2**b`` of the 256 values, offset ``(2**b - 1)/2``), and
:func:`size_bytes` counts those 8 bits. Convolutions (``flax.linen.Conv``, zero padding, any
strides/dilations, ``feature_group_count=1``) are lowered to patches with
``lax.conv_general_dilated_patches``, whose features are ordered (Cin, kh, kw), so the kernel is
transposed to that row order and an input channel owns ``kh * kw`` consecutive rows. Where
``packed_matmul`` would only dequantize the weight for an XLA GEMM (the CPU reference path; large M
on a GPU), the conv instead runs XLA's convolution of the dequantized kernel
(:func:`conv_lowering`): the same values, without the patches matrix.

DenseGeneral kernels (attention's q/k/v ``(in, heads, head_dim)`` and out ``(heads, head_dim, out)``;
their layout ``k_axes``, the number of leading contracted axes, comes from
:func:`pae.quant.kernel_layouts` at phase 1 and is stored in the node and the :class:`PackedLayer`):
the GEMM is ``(K, N) = (prod(shape[:k_axes]), prod(shape[k_axes:]))``, the kernel is reshaped to it
in C order (per input channel: one width per K row), packed like a Dense kernel, and the forward
computes ``x.reshape(-1, K) @ W`` and reshapes the result to ``lead + features``. A DenseGeneral
whose kernel carries another layout (e.g. a 4-D kernel left at the conv default) is a ValueError at
the first call, never a silently mis-grouped product.

Lookup tables (a quantized leaf not named ``kernel``: ``nn.Embed``'s ``embedding``, a raw
``pos_embedding`` parameter; a 2-D table is a ``(rows, features)`` GEMM of a one-hot input, so per
input channel means one width per row, e.g. per token): packed the same way (``table=True``) and,
in the forward, dequantized from the codes (``pallas_kernels.dequantize``) and handed to the model
as that parameter, so the lookup reads the phase-2 values; :func:`size_bytes` counts their codes,
scales and permutations like any packed layer. They get no activation quantizer.

The forward function runs the model's own ``__call__`` under ``flax.linen.intercept_methods``: each
``nn.Dense``/``nn.DenseGeneral``/``nn.Conv`` whose kernel was quantized computes through ``packed_matmul`` instead
(its float kernel is not in the exported tree); everything else (biases, BatchNorm, unquantized
layers) runs as in the float model, in inference mode: the model is called with ``train=False``, so
its ``__call__`` must take that keyword (every ``pae.models`` model does). Integer inputs of a packed
layer are promoted to float32, as flax's ``nn.Dense``/``nn.Conv`` promote them.

Activations (a latent with :class:`~pae.quant.QuantAct` nodes, phase 2 of
``QuantConfig(activations=True)``; pass the phase-2 ``batch_stats``, which hold the running
ranges): each such layer's input is quantized per channel before its GEMM, with the frozen range,
grid and palette widths of the phase-2 model in evaluation, stored as ``tree["acts"][layer]`` =
``{"bits": uint8 (C,), "scale": float32 (C,), "offset": float32 (C,)}``:
``x_q = (clip(round(x / scale + offset), 0, 2**bits - 1) - offset) * scale``. The codes are
per channel and elementwise, so the quantized activations enter ``packed_matmul``, which applies
the layer's lo/hi input permutation to them together with the weight rows (a conv quantizes its
input before the patches, so padding stays exact zeros, as in the phase-2 model). The kernel takes
the activations dequantized (float): ``pallas_kernels`` has no per-channel integer-activation path.
The running statistics are not kept in the exported tree; :func:`size_bytes` counts the stored
quantizer as ``acts``.

After sharing (``pae.chain(quantization, pae.sharing.templates(...))``: the quantization is the
outer level, so it quantizes the combined kernels ``W_i = sum_j alpha_ij T_j`` the sharing builds,
not the templates; a :class:`~pae.quant.QuantWeight` holds a ``SharedKernel`` until the chain's
``apply`` combines it): :func:`export` combines the banks first and packs each ``Q(W_i)``, so the
exported model is the phase-2 model; the banks and coefficients are not stored (an inference model
needs the combined kernels; :func:`size_bytes` counts the packed ``W_i``). Quantizing the templates
instead (``pae.chain(templates, quantization)``) would leave ``sum_j alpha_ij Q(T_j)`` off any
grid, which no packed format stores exactly: export refuses it (the ``SharedParams`` node error).

After sparsity (``pae.chain(pae.sparsity.fixed_masks(), quantization)``: a
:class:`~pae.sparsity.FixedMask` over a :class:`~pae.quant.QuantWeight`), the phase-2 kernel is
``Q(w) * mask``, whose pruned entries are exactly 0, a value no mid-rise code holds. Such a layer is
packed with doubled codes ``2q`` for kept weights and the code ``2**b - 1`` for pruned ones, scale
``delta / 2`` and offset ``2**b - 1``: ``(2q - (2**b - 1)) * delta / 2 = (q - o) * delta`` and a
pruned weight dequantizes to exactly 0. It costs one stored bit per weight more (``b + 1``, so a
masked layer's levels must be <= 7); ``pallas_kernels`` has no sparse storage, so pruning does not
shrink the packed bytes.

Save and load: :func:`save_exported` / :func:`load_exported` (one ``.npz``). The file is tight: the
tile padding is an inference-time layout fully determined by the shapes, so each packed layer is
written as its true codes bit-packed at their own width, true-size scales and permutations in the
smallest integer dtype; loading re-packs the exact padded ``pallas_kernels`` arrays.
:func:`size_bytes` reports both (``memory``: padded; ``file``/``tight``: what is written).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Mapping, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import pallas_kernels as pk
from pallas_kernels.dispatch import plan
from pae.core import is_node
from pae.quant import activations as qa
from pae.quant import noise as qn
from pae.quant import quantizer as qz

#: widths ``pallas_kernels`` stores natively; the others go into 8-bit words
NATIVE_BITS = (1, 2, 3, 4, 8)


def container_bits(bits: int) -> int:
    """The stored width of a ``bits``-bit code: itself if native, else 8."""
    return int(bits) if int(bits) in NATIVE_BITS else 8


@dataclasses.dataclass(frozen=True)
class PackedLayer:
    """One exported kernel: ``packed`` (one ``PackedWeight``; two for output-channel widths, low
    then high), ``out_perm`` (int32 (N,) inverse column permutation, or None), static
    ``kernel_shape`` and ``bits`` (the stored levels, for reporting), ``k_axes`` (None: a Dense/Conv
    kernel; else a DenseGeneral kernel's contracted leading axes, its GEMM ``(prod(shape[:k_axes]),
    prod(shape[k_axes:]))``) and ``table`` (a lookup table, dequantized where the model reads it,
    not a GEMM; module doc)."""

    packed: tuple
    out_perm: Any
    kernel_shape: tuple
    bits: tuple
    k_axes: Any = None
    table: bool = False


jax.tree_util.register_dataclass(PackedLayer, data_fields=["packed", "out_perm"],
                                 meta_fields=["kernel_shape", "bits", "k_axes", "table"])


class Exported(NamedTuple):
    """``tree``: ``{"params": float leaves left, "batch_stats": ..., "layers": {path: PackedLayer},
    "acts": {layer path: {"bits", "scale", "offset"}}}`` (a pytree: jit over it, save it with
    :func:`save_exported`); ``apply(tree, x) -> logits``: the pure forward."""

    tree: dict
    apply: Callable


def _rows(w: np.ndarray, k_axes: int | None = None) -> np.ndarray:
    """The (K, N) GEMM matrix of a kernel: Dense as is, Conv ``(..., Cin, N)`` in (Cin, kh, kw) row
    order, a DenseGeneral kernel (``k_axes`` contracted leading axes) reshaped to
    ``(prod(shape[:k_axes]), prod(shape[k_axes:]))`` (C order)."""
    if k_axes is not None:
        return w.reshape(int(np.prod(w.shape[:k_axes])), -1)
    if w.ndim == 2:
        return w
    w = np.moveaxis(w, -2, 0)
    return w.reshape(-1, w.shape[-1])


def _unrows(w2, shape: tuple, k_axes: int | None = None):
    """Inverse of :func:`_rows`: the (K, N) matrix back in the kernel's shape (jnp or NumPy)."""
    if k_axes is not None or len(shape) == 2:
        return w2.reshape(shape)
    w = w2.reshape((shape[-2],) + tuple(shape[:-2]) + (shape[-1],))
    return jnp.moveaxis(w, 0, -2)


def _finite(path: str, value, what: str = "weights") -> None:
    if not np.all(np.isfinite(np.asarray(value, np.float64))):
        raise ValueError(f"export: leaf {path!r} has NaN or Inf {what}; refusing to export it")


@jax.jit
def _codes_and_scales(w, bits, r):
    o = qz.offset(bits)
    return qz.codes(w, bits, r), r / o


def _pack_layer(path: str, node: qn.QuantWeight, k_tile: int, n_tile: int, mask=None) -> PackedLayer:
    w = np.asarray(node.weight, np.float32)
    _finite(path, w)
    if node.log_range is not None:
        _finite(path + "/log_range", node.log_range, "clip ranges")
    bits = np.asarray(node.bits, np.float64)
    qz.check_bits(f"bits of {path!r}", bits)
    if w.ndim < 2:
        raise ValueError(f"export: leaf {path!r} has shape {w.shape}; kernels need ndim >= 2")
    r = np.asarray(qn.channel_range(node), np.float32)
    codes, scale = _codes_and_scales(w, qn.node_bits(node, bits), r)
    codes = np.asarray(codes).astype(np.int64)
    scale = np.broadcast_to(np.asarray(scale, np.float32), w.shape)
    stored = {int(b): int(b) for b in np.unique(bits)}      # level -> code width
    offset_of = {lv: (2.0 ** lv - 1) / 2 for lv in stored}
    if mask is not None:
        # a pruned weight must dequantize to exactly 0, which no mid-rise code does: codes double
        # (2q), the scale halves, the offset becomes 2**b - 1 (an integer, the pruned weights' code)
        if np.shape(mask) != w.shape:
            raise ValueError(f"export: mask of {path!r} has shape {np.shape(mask)}, its weight {w.shape}")
        if bits.max() >= qz.MAX_BITS:
            raise ValueError(f"export: {path!r} is masked (sparse) and has {qz.MAX_BITS}-bit channels; a "
                             f"masked layer stores b + 1 bits per weight (the exact zero is one more "
                             f"code), so its levels must be <= {qz.MAX_BITS - 1}")
        b_full = np.broadcast_to(np.asarray(qn.node_bits(node, bits)), w.shape)
        keep = np.asarray(mask) != 0
        codes = np.where(keep, 2 * codes, (2 ** b_full - 1).astype(np.int64))
        scale = scale / 2
        stored = {lv: lv + 1 for lv in stored}
        offset_of = {lv: 2.0 ** lv - 1 for lv in stored}
    kax = node.k_axes
    codes = _rows(codes.astype(np.uint8), kax)
    scale = _rows(np.ascontiguousarray(scale), kax)
    k, n = codes.shape
    levels = sorted(stored)
    table = path.rsplit("/", 1)[-1] != "kernel"
    if node.axis == -2:
        per = k // bits.size
        row_bits = np.repeat(bits, per)          # (Cin, kh, kw) row order: a channel's rows are consecutive
        segs = [np.flatnonzero(row_bits == lv) for lv in levels]
        parts = dict(codes=[codes[s] for s in segs], bits=[container_bits(stored[lv]) for lv in levels],
                     scales=[scale[s[0]] for s in segs], offsets=[offset_of[lv] for lv in levels])
        perm = None if len(segs) == 1 else np.concatenate(segs).astype(np.int32)
        packed = pk.pack_mixed(parts["codes"], parts["bits"], parts["scales"], offsets=parts["offsets"],
                               input_perm=perm, k_tile=k_tile, n_tile=n_tile)
        return PackedLayer((packed,), None, tuple(w.shape), tuple(levels), kax, table)
    cols = [np.flatnonzero(bits == lv) for lv in levels]
    packed = tuple(pk.pack(codes[:, c], container_bits(stored[lv]), scale[0, c], offset=offset_of[lv],
                           k_tile=k_tile, n_tile=n_tile) for c, lv in zip(cols, levels))
    out_perm = None if len(cols) == 1 else jnp.asarray(np.argsort(np.concatenate(cols)).astype(np.int32))
    return PackedLayer(packed, out_perm, tuple(w.shape), tuple(levels), kax, table)


def _masked_quant(tree) -> bool:
    """A sparsity mask over a quantized kernel (``chain(fixed_masks(), quantization)``)."""
    try:
        from pae.sparsity.masks import FixedMask
    except ImportError:     # pragma: no cover
        return False
    return isinstance(tree, FixedMask) and isinstance(tree.weight, qn.QuantWeight)


def _split(tree: Any, prefix: str, layers: dict, k_tile: int, n_tile: int, acts=None) -> Any:
    if isinstance(tree, qa.QuantAct):
        acts[prefix.rsplit("/", 1)[0] if "/" in prefix else ""] = tree
        return None
    if isinstance(tree, qn.QuantWeight):
        layers[prefix] = _pack_layer(prefix, tree, k_tile, n_tile)
        return None
    if _masked_quant(tree):
        _finite(prefix + "/mask", tree.mask, "mask values")
        layers[prefix] = _pack_layer(prefix, tree.weight, k_tile, n_tile, mask=tree.mask)
        return None
    if is_node(tree):
        raise ValueError(f"export: leaf {prefix!r} is a {type(tree).__name__} node; export takes the "
                         f"phase-2 latent (QuantWeight and QuantAct nodes, see "
                         f"pae.quant.assign_palette) and plain parameters")
    if isinstance(tree, Mapping):
        out = {}
        for key, value in tree.items():
            sub = _split(value, f"{prefix}/{key}" if prefix else str(key), layers, k_tile, n_tile,
                         acts)
            if sub is not None:
                out[key] = sub
        return out
    _finite(prefix, tree, "values")
    return jnp.asarray(tree)


def matmul(x: jax.Array, layer: PackedLayer, backend: str = "auto") -> jax.Array:
    """``x (M, K) @ W`` of an exported layer through ``pallas_kernels.packed_matmul``."""
    ys = [pk.packed_matmul(x, p, backend=backend) for p in layer.packed]
    if layer.out_perm is None:
        return ys[0]
    return jnp.take(jnp.concatenate(ys, axis=-1), layer.out_perm, axis=-1)


def _dense(x, layer: PackedLayer, backend: str):
    lead = x.shape[:-1]
    return matmul(x.reshape(-1, x.shape[-1]), layer, backend).reshape(lead + (layer.kernel_shape[-1],))


def dequantize_layer(layer: PackedLayer) -> jax.Array:
    """The float kernel (its own shape) an exported layer holds: ``pallas_kernels.dequantize`` of
    each packed piece, columns un-permuted, the (K, N) matrix reshaped back (:func:`_rows`)."""
    w2 = jnp.concatenate([pk.dequantize(p) for p in layer.packed], axis=1)
    if layer.out_perm is not None:
        w2 = jnp.take(w2, layer.out_perm, axis=1)
    return _unrows(w2, layer.kernel_shape, layer.k_axes)


def _general(path: str, mod: nn.DenseGeneral, x, layer: PackedLayer, backend: str):
    """A DenseGeneral through the packed GEMM: ``x.reshape(-1, K) @ W(K, N)``, reshaped back."""
    k = qa.general_k_axes(mod, x.ndim)
    shape = layer.kernel_shape
    if (layer.k_axes if layer.k_axes is not None else (1 if len(shape) == 2 else None)) != k:
        raise ValueError(f"export: {path!r} is an nn.DenseGeneral contracting {k} axes, but its kernel "
                         f"{shape} was quantized with the "
                         f"{'Dense/Conv' if layer.k_axes is None else f'k_axes={layer.k_axes}'} layout "
                         f"(its channels grouped wrongly); quantize it with "
                         f"layouts=pae.quant.kernel_layouts(model, example)")
    lead = x.shape[:x.ndim - k]
    y = matmul(x.reshape(-1, int(np.prod(shape[:k]))), layer, backend)
    return y.reshape(lead + tuple(shape[k:]))


def _conv(path: str, mod: nn.Conv, x, layer: PackedLayer, backend: str):
    ks = tuple(layer.kernel_shape[:-2])
    nd = len(ks)
    if mod.feature_group_count != 1:
        raise NotImplementedError(f"export: {path!r} has feature_group_count="
                                  f"{mod.feature_group_count}; only 1 is supported")
    if mod.mask is not None:
        raise NotImplementedError(f"export: {path!r} has a kernel mask (nn.Conv(mask=...)); masked "
                                  f"convolutions are not supported (mask the kernel with a sparsity "
                                  f"transform instead: its zeros are packed)")
    padding = nn.linear.canonicalize_padding(mod.padding, nd)
    if isinstance(padding, str):
        padding = padding.upper()           # lax reads "same" as "SAME"
        if padding not in ("SAME", "SAME_LOWER", "VALID"):
            raise NotImplementedError(f"export: {path!r} uses padding {mod.padding!r}; only zero "
                                      f"padding (SAME, SAME_LOWER, VALID or explicit) is supported")

    def tup(v):
        return (1,) * nd if v is None else ((v,) * nd if isinstance(v, int) else tuple(v))

    batch = x.shape[:x.ndim - nd - 1]
    x = x.reshape((-1,) + x.shape[len(batch):])
    spatial = "DHW"[-nd:] if nd <= 3 else None
    if spatial is None:
        raise NotImplementedError(f"export: {path!r} has {nd} spatial dims; at most 3 are supported")
    dn = lax.conv_dimension_numbers(x.shape, layer.kernel_shape,
                                    (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"))
    geometry = dict(window_strides=tup(mod.strides), padding=padding,
                    lhs_dilation=tup(mod.input_dilation), rhs_dilation=tup(mod.kernel_dilation),
                    dimension_numbers=dn)
    out = jax.eval_shape(lambda v: lax.conv_general_dilated(
        v, jnp.zeros(layer.kernel_shape, v.dtype), **geometry), x).shape
    if conv_lowering(backend, int(np.prod(out[:-1])), layer, x.dtype) == "dequantized":
        y = lax.conv_general_dilated(x, dequantize_layer(layer).astype(x.dtype), **geometry,
                                     precision=mod.precision)
    else:
        patches = lax.conv_general_dilated_patches(x, ks, **geometry, precision=lax.Precision.HIGHEST)
        y = matmul(patches.reshape(-1, patches.shape[-1]), layer, backend).reshape(out)
    return y.reshape(batch + out[1:])


def conv_lowering(backend: str, m: int, layer: PackedLayer, x_dtype) -> str:
    """How an exported conv with ``m`` output positions runs: ``"dequantized"`` when
    ``packed_matmul`` would dequantize every piece of the layer for an XLA GEMM anyway (the
    ``"reference"`` path on CPU, ``"xla_dequant"`` at large M on a GPU): then XLA's own convolution
    of the dequantized kernel (the same values, without a patches matrix ``kh * kw`` times the
    input, which costs more than the conv at few output channels); else ``"patches"``: the patches
    through the packed kernel."""
    paths = {plan(backend, m, p, x_dtype).path for p in layer.packed}
    return "dequantized" if paths <= {"reference", "xla_dequant"} else "patches"


@jax.jit
def _act_quantizer(bits, r, log_scale, unsigned):
    delta, o, _ = qa.grid_params(bits, r * jnp.exp(log_scale), unsigned)
    return delta, o


def _pop_stats(stats: Any, path: str):
    """``stats`` without the activation statistics of layer ``path``, and those statistics."""
    keys = path.split("/") if path else []
    def go(tree, keys):
        if not isinstance(tree, Mapping):
            return tree, None
        if not keys:
            found = tree.get(qa.ACT)
            return {k: v for k, v in tree.items() if k != qa.ACT}, found
        if keys[0] not in tree:
            return tree, None
        sub, found = go(tree[keys[0]], keys[1:])
        out = dict(tree)
        if sub:
            out[keys[0]] = sub
        else:
            del out[keys[0]]
        return out, found
    return go(stats, keys)


def _act_layer(path: str, node: qa.QuantAct, stats: Any) -> dict:
    bits = np.asarray(node.bits, np.float64)
    qz.check_bits(f"activation bits of {path!r}", bits)
    if stats is None:
        raise ValueError(f"export: layer {path!r} quantizes its inputs, but batch_stats holds no "
                         f"running statistics for it; pass the phase-2 state's batch_stats")
    for name in ("ema", "count"):
        _finite(f"{path}/{qa.ACT}/{name}", stats[name], "activation statistics")
    if np.isnan(np.asarray(stats["min"])).any():        # +inf (never seen) is allowed, NaN is not
        raise ValueError(f"export: {path}/{qa.ACT}/min holds NaN; the activation statistics are damaged")
    if not np.all(np.asarray(stats["count"]) > 0):
        raise ValueError(f"export: the activation statistics of {path!r} were never updated (count 0), "
                         f"so its range is 0 and every input would quantize to 0; train (phase 2) first")
    if node.log_scale is not None:
        _finite(f"{path}/{qa.ACT}/log_scale", node.log_scale, "activation range scales")
    r = np.asarray(qa.running_range(stats, node.momentum), np.float32)
    unsigned = np.asarray(qa.is_unsigned(qa._GRID_CODE[node.grid], stats))
    log_scale = np.zeros_like(r) if node.log_scale is None else np.asarray(node.log_scale, np.float32)
    delta, o = _act_quantizer(jnp.asarray(bits, jnp.float32), jnp.asarray(r), jnp.asarray(log_scale),
                              jnp.asarray(unsigned))
    return {"bits": jnp.asarray(bits.astype(np.uint8)), "scale": jnp.asarray(delta, jnp.float32),
            "offset": jnp.asarray(o, jnp.float32)}


def quantize_exported_input(x: jax.Array, act: Mapping) -> jax.Array:
    """An exported layer's input quantized per channel (module doc)."""
    x = jnp.asarray(x, jnp.float32)
    scale, o = act["scale"], act["offset"]
    top = jnp.exp2(act["bits"].astype(jnp.float32)) - 1.0
    safe = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(jnp.clip(x / safe + o, 0.0, top)), 0.0, top)
    return (q - o) * scale


def export(model: nn.Module, latent: Any, batch_stats: Any = None, *, k_tile: int = 512,
           n_tile: int = 128, backend: str = "auto") -> Exported:
    """Pack every :class:`~pae.quant.QuantWeight` of a phase-2 ``latent`` and return the inference
    model (module doc). ``backend`` goes to ``packed_matmul`` (CPU: its jnp reference path).

    ``model``: the task's Flax model (or its :func:`pae.quant.quantize_activations` wrapper);
    ``batch_stats``: the phase-2 state's (BatchNorm statistics and, with quantized activations,
    their running ranges). With activations: ``export(model, result.state.params,
    result.state.batch_stats)``.

    Raises ValueError naming the leaf for NaN/Inf weights, nodes other than QuantWeight/QuantAct,
    quantized activations without statistics, and at the first call of ``apply`` for a quantized
    kernel that no ``nn.Dense``/``nn.Conv`` consumed."""
    if isinstance(model, qa.ActQuantized):
        model = model.model
    check_tiles(k_tile, n_tile)
    latent = _build_shared(latent)
    layers: dict = {}
    act_nodes: dict = {}
    params = _split(latent, "", layers, k_tile, n_tile, act_nodes)
    if not layers:
        raise ValueError("export: latent has no QuantWeight node: nothing to pack (run the phase-2 "
                         "transition pae.quant.assign_palette first)")
    stats = {} if batch_stats is None else jax.tree.map(jnp.asarray, batch_stats)
    acts = {}
    for path, node in act_nodes.items():
        stats, found = _pop_stats(stats, path)
        acts[path] = _act_layer(path, node, found)
    _finite_tree("batch_stats", stats)
    tree = {"params": params, "batch_stats": stats, "layers": layers, "acts": acts}
    return Exported(tree, _forward(model, backend))


def _build_shared(latent: Any) -> Any:
    """A sharing latent (``pae.chain(quantization, pae.sharing.templates(...))``) with its template
    banks combined: every ``SharedKernel`` inside a :class:`~pae.quant.QuantWeight` becomes
    ``sum_j alpha_ij T_j`` (``pae.sharing.build``), so the packed kernels are the combined ones."""
    try:
        from pae.sharing.bank import SharedParams, build
    except ImportError:     # pragma: no cover
        return latent
    if isinstance(latent, SharedParams):
        return build(latent)
    return latent


def _finite_tree(prefix: str, tree: Any) -> None:
    for keypath, leaf in jax.tree_util.tree_leaves_with_path(tree):
        _finite(prefix + "/" + "/".join(str(getattr(k, "key", k)) for k in keypath), leaf, "values")


def check_tiles(k_tile: int, n_tile: int) -> bool:
    """ValueError unless ``k_tile``/``n_tile`` are tiles ``pallas_kernels`` supports."""
    if k_tile not in pk.SUPPORTED_K_TILES:
        raise ValueError(f"k_tile must be one of {pk.SUPPORTED_K_TILES}, got {k_tile!r}")
    if n_tile not in pk.SUPPORTED_N_TILES:
        raise ValueError(f"n_tile must be one of {pk.SUPPORTED_N_TILES}, got {n_tile!r}")
    return True


def _set_leaf(tree: Mapping, path: str, value) -> dict:
    """A copy of the nested dict ``tree`` with ``value`` at ``path`` ("a/b/leaf")."""
    head, _, rest = path.partition("/")
    out = dict(tree)
    out[head] = _set_leaf(tree.get(head, {}), rest, value) if rest else value
    return out


def _forward(model: nn.Module, backend: str) -> Callable:
    """The pure forward ``apply(tree, x)`` of an exported ``model`` (module doc)."""

    def apply(tree, x):
        layers = tree["layers"]
        acts = tree.get("acts", {})
        used = set()
        params = tree["params"]
        for path, layer in layers.items():       # lookup tables: codes dequantized where read
            if layer.table:
                params = _set_leaf(params, path, dequantize_layer(layer))
                used.add(path)

        def intercept(next_fun, args, kwargs, context):
            mod = context.module
            if context.method_name != "__call__" or not isinstance(mod, qa.GEMM_MODULES):
                return next_fun(*args, **kwargs)
            scope = "/".join(mod.path)
            path = scope + "/kernel"
            if path not in layers and scope not in acts:
                return next_fun(*args, **kwargs)
            args, kwargs = qa.positional_inputs(args, kwargs)
            x = jnp.asarray(args[0])
            if not jnp.issubdtype(x.dtype, jnp.floating):   # as flax promotes int inputs
                x = x.astype(jnp.float32)
            general = isinstance(mod, nn.DenseGeneral)
            if scope in acts:
                used.add(scope)
                if general:
                    k = qa.general_k_axes(mod, x.ndim)
                    flat = x.reshape(x.shape[:x.ndim - k] + (-1,))
                    x = quantize_exported_input(flat, acts[scope]).astype(x.dtype).reshape(x.shape)
                else:
                    x = quantize_exported_input(x, acts[scope]).astype(x.dtype)
            if path not in layers:
                return next_fun(x, *args[1:], **kwargs)
            used.add(path)
            layer = layers[path]
            # as flax's promote_dtype in phase 2: the module's dtype, else the inputs promoted with
            # the params, whose quantized kernel is at least float32 (quantized_dtype)
            dtype = mod.dtype or jnp.result_type(x.dtype, qz.quantized_dtype(mod.param_dtype))
            x = x.astype(dtype)
            if isinstance(mod, nn.Conv) and layer.k_axes is not None:
                raise ValueError(f"export: {path!r} is an nn.Conv, but its kernel was quantized with "
                                 f"the DenseGeneral layout k_axes={layer.k_axes}; fix layouts")
            if general:
                y = _general(path, mod, x, layer, backend)
            elif isinstance(mod, nn.Dense):
                y = _dense(x, layer, backend)
            else:
                y = _conv(path, mod, x, layer, backend)
            if mod.use_bias:
                y = y + jnp.asarray(mod.get_variable("params", "bias"), dtype)
            return y

        variables = {"params": params}
        if tree["batch_stats"]:
            variables["batch_stats"] = tree["batch_stats"]
        def unconsumed(err=None):
            missing = sorted((set(layers) | set(acts)) - used)
            if missing:
                raise ValueError(f"export: quantized leaves {missing} were not consumed by an nn.Dense, "
                                 f"nn.DenseGeneral or nn.Conv of the model; only those layers can run "
                                 f"packed (other quantized leaves must not be named 'kernel': they are "
                                 f"lookup tables, dequantized where read)") from err

        try:
            with nn.intercept_methods(intercept):
                out = model.apply(variables, x, train=False)
        except flax.errors.FlaxError as err:   # a module asked for a kernel that was packed away
            unconsumed(err)
            raise
        unconsumed()
        return out

    return apply


SAVE_VERSION = 2     # 2: tight packed layers (no tile padding, bit-packed codes)


def _flat(tree: Any, prefix: tuple = ()) -> list:
    """``[(key tuple, array)]`` of a nested dict of arrays, in insertion order."""
    if isinstance(tree, Mapping):
        if not tree and prefix:
            return [(prefix, None)]          # an empty scope (e.g. a layer whose kernel was packed)
        out = []
        for k, v in tree.items():
            out.extend(_flat(v, prefix + (str(k),)))
        return out
    return [(prefix, np.asarray(tree))]


def _unflat(items: list) -> dict:
    out: dict = {}
    for keys, value in items:
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = {} if value is None else jnp.asarray(value)
    return out


def _storable(arrays: dict, meta: dict) -> dict:
    """``arrays`` with every array of a dtype ``.npz`` cannot hold (bfloat16 and the other
    ``ml_dtypes``, written as raw void bytes that load back unreadable) stored as its unsigned
    integer view; ``meta["views"]`` names the dtype to view it back as."""
    out, views = {}, {}
    for key, a in arrays.items():
        a = np.asarray(a)
        if a.dtype.kind == "V" or type(a.dtype).__module__.startswith("ml_dtypes"):
            views[key] = a.dtype.name
            a = a.view(np.dtype(f"uint{8 * a.dtype.itemsize}"))
        out[key] = a
    meta["views"] = views
    return out


def _perm_dtype(size: int) -> np.dtype:
    """The smallest integer dtype holding indices ``0 .. size - 1`` (uint8, uint16, else int32)."""
    return np.dtype(np.uint8 if size <= 2 ** 8 else np.uint16 if size <= 2 ** 16 else np.int32)


def _code_width(codes: np.ndarray, bits: int) -> int:
    """Bits per code in the file: the fewest that hold the largest code (<= the segment's width)."""
    return min(int(bits), max(1, int(codes.max()).bit_length()))


def _packbits(codes: np.ndarray, width: int) -> np.ndarray:
    """(K, N) codes < 2**width -> ``ceil(K * N * width / 8)`` uint8, ``width`` bits per code,
    row-major, least significant bit first."""
    c = np.asarray(codes, np.uint8).reshape(-1, 1)
    planes = (c >> np.arange(width, dtype=np.uint8)) & 1
    return np.packbits(planes.reshape(-1), bitorder="little")


def _unpackbits(buf: np.ndarray, shape: tuple, width: int) -> np.ndarray:
    """Inverse of :func:`_packbits`: the (K, N) uint8 codes."""
    count = int(np.prod(shape)) * width
    planes = np.unpackbits(np.asarray(buf, np.uint8), count=count, bitorder="little")
    planes = planes.reshape(-1, width).astype(np.uint8)
    return (planes << np.arange(width, dtype=np.uint8)).sum(axis=1, dtype=np.uint8).reshape(shape)


def _tight_packed(p) -> tuple[dict, dict]:
    """A ``PackedWeight`` without its tile padding: ``(meta, arrays)``. Per segment the true
    (K_s, N) codes bit-packed at their width (:func:`_code_width`) and the true-size float32 scales;
    the input permutation in the smallest integer dtype. :func:`_untight_packed` re-packs it."""
    segs, arrays = [], {}
    for i, (seg, un) in enumerate(zip(p.segments, pk.unpack(p))):
        codes = np.asarray(un.codes)
        width = _code_width(codes, seg.bits)
        segs.append({"bits": seg.bits, "k": seg.k, "offset": seg.offset, "width": width})
        arrays[f"seg{i}/codes"] = _packbits(codes, width)
        arrays[f"seg{i}/scales"] = np.asarray(un.scales, np.float32)
    if p.input_perm is not None:
        arrays["input_perm"] = np.asarray(p.input_perm).astype(_perm_dtype(p.k))
    meta = {"version": p.version, "n": p.n, "k_tile": p.k_tile, "n_tile": p.n_tile,
            "group_size": p.group_size, "has_perm": p.input_perm is not None, "segments": segs}
    return meta, arrays


def _untight_packed(meta: dict, arrays: Mapping):
    """The exact padded ``PackedWeight`` of :func:`_tight_packed`'s output (``pallas_kernels.pack_mixed``
    with the stored, already folded, rows: ``fold_perm=False``)."""
    if meta.get("version") != pk.FORMAT_VERSION:
        raise ValueError(f"packed layer has pallas_kernels format version {meta.get('version')!r}; "
                         f"this pallas_kernels reads version {pk.FORMAT_VERSION}")
    codes, bits, scales, offsets = [], [], [], []
    for i, sm in enumerate(meta["segments"]):
        codes.append(_unpackbits(arrays[f"seg{i}/codes"], (sm["k"], meta["n"]), sm["width"]))
        bits.append(sm["bits"])
        scales.append(np.asarray(arrays[f"seg{i}/scales"], np.float32))
        offsets.append(sm["offset"])
    perm = np.asarray(arrays["input_perm"]).astype(np.int32) if meta["has_perm"] else None
    return pk.pack_mixed(codes, bits, scales, offsets=offsets, group_size=meta["group_size"],
                         input_perm=perm, k_tile=meta["k_tile"], n_tile=meta["n_tile"], fold_perm=False)


def save_exported(path: str, exported: Exported) -> None:
    """Write an exported model to one ``.npz`` file, tight: the tile padding of ``pallas_kernels``'s
    layout is fully determined by the shapes, so it is not written. Per packed layer and segment
    the true (K_s, N) codes bit-packed at their own width (the fewest bits holding the segment's
    largest code, at most its stored width) into ``ceil(K_s * N * width / 8)`` bytes, the true-size
    float32 scales, and the permutations in the smallest integer dtype holding them (uint8, uint16
    or int32); then the float leaves, the activation quantizers, and a JSON ``meta`` entry (tree
    structure, shapes, tiles, widths, a format version). :func:`load_exported` re-packs the exact
    padded layout. ``size_bytes(exported)["file"]`` is the bytes of the arrays written (the ``.npz``
    container and ``meta`` add a little). The model class is not stored: :func:`load_exported` takes it."""
    tree = exported.tree
    arrays: dict = {}
    meta: dict = {"version": SAVE_VERSION, "layers": [], "acts": []}
    for part in ("params", "batch_stats"):
        items = _flat(tree[part])
        meta[part] = [[list(k), a is None] for k, a in items]
        for i, (_, a) in enumerate(items):
            if a is not None:
                arrays[f"{part}/{i}"] = a
    for j, (lpath, layer) in enumerate(tree["layers"].items()):
        packed_meta = []
        for m, p in enumerate(layer.packed):
            pm, pa = _tight_packed(p)
            packed_meta.append(pm)
            for key, a in pa.items():
                arrays[f"layers/{j}/{m}/{key}"] = a
        meta["layers"].append({"path": lpath, "kernel_shape": list(layer.kernel_shape),
                               "bits": list(layer.bits), "packed": packed_meta,
                               "out_perm": layer.out_perm is not None, "k_axes": layer.k_axes,
                               "table": layer.table})
        if layer.out_perm is not None:
            op = np.asarray(layer.out_perm)
            arrays[f"layers/{j}/out_perm"] = op.astype(_perm_dtype(op.size))
    for j, (apath, act) in enumerate(tree.get("acts", {}).items()):
        meta["acts"].append(apath)
        for key, a in act.items():
            arrays[f"acts/{j}/{key}"] = np.asarray(a)
    arrays = _storable(arrays, meta)
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with open(path, "wb") as f:      # np.savez(path) would append ".npz" to a path without it
        np.savez(f, **arrays)


def load_exported(path: str, model: nn.Module, *, backend: str = "auto") -> Exported:
    """Read a model written by :func:`save_exported` and re-pack its layers into
    ``pallas_kernels``'s padded layout (the same arrays as the exported model's, bit for bit);
    ``model`` is the Flax model it was exported from (its class and hyperparameters; the wrapper
    is accepted). ValueError for another format version or a file that is not one."""
    if isinstance(model, qa.ActQuantized):
        model = model.model
    with np.load(path, allow_pickle=False) as f:
        data = {k: f[k] for k in f.files}
    if "meta" not in data:
        raise ValueError(f"path {path!r} holds no 'meta' entry: not a file written by save_exported")
    meta = json.loads(data["meta"].tobytes().decode())
    if meta.get("version") != SAVE_VERSION:
        raise ValueError(f"path {path!r} has format version {meta.get('version')!r}; this pae reads "
                         f"version {SAVE_VERSION}: export the model again")
    for key, name in meta.get("views", {}).items():
        data[key] = data[key].view(jnp.dtype(name))
    tree: dict = {}
    for part in ("params", "batch_stats"):
        tree[part] = _unflat([(tuple(k), None if empty else data[f"{part}/{i}"])
                              for i, (k, empty) in enumerate(meta[part])])
    layers = {}
    for j, lm in enumerate(meta["layers"]):
        packed = []
        for m, pm in enumerate(lm["packed"]):
            pre = f"layers/{j}/{m}/"
            packed.append(_untight_packed(pm, {k[len(pre):]: v for k, v in data.items()
                                               if k.startswith(pre)}))
        out_perm = (jnp.asarray(data[f"layers/{j}/out_perm"].astype(np.int32)) if lm["out_perm"]
                    else None)
        layers[lm["path"]] = PackedLayer(tuple(packed), out_perm, tuple(lm["kernel_shape"]),
                                         tuple(lm["bits"]), lm.get("k_axes"), bool(lm.get("table", False)))
    tree["layers"] = layers
    acts = {}
    for j, apath in enumerate(meta["acts"]):
        pre = f"acts/{j}/"
        acts[apath] = {k[len(pre):]: jnp.asarray(v) for k, v in data.items() if k.startswith(pre)}
    tree["acts"] = acts
    return Exported(tree, _forward(model, backend))


def size_bytes(exported: Exported) -> dict:
    """Bytes of the exported model, counted honestly (host integers).

    In memory (``pallas_kernels``'s padded inference layout, what the kernels read):
    ``codes``: the packed int32 words (K padded to ``k_tile``, N to ``n_tile``); ``scales``: the
    float32 scales, padded likewise; ``perms``: input and output permutations (int32); ``acts``:
    the activation quantizers (per channel a uint8 width, a float32 scale and a float32 offset);
    ``float``: every float leaf left (biases, BatchNorm parameters and statistics, unquantized
    layers); ``total``: their sum, also reported as ``memory``.

    Without tile padding at the stored widths: ``codes_unpadded`` (``ceil(K_s * N * bits / 8)`` per
    segment, ``bits`` its stored width, 8 for a 5-7-bit level), ``scales_unpadded`` (4 bytes per
    true scale), ``total_unpadded`` (those, ``perms``, ``acts`` and ``float``).

    In the file (:func:`save_exported`, tight): ``codes_file`` (per segment
    ``ceil(K_s * N * width / 8)``, ``width`` the fewest bits holding its largest code, <= its stored
    width), ``scales_file`` (= ``scales_unpadded``), ``perms_file`` (permutations in uint8, uint16 or
    int32, the smallest that holds them), and ``file`` (alias ``tight``): those plus ``acts`` and
    ``float``, the bytes of the arrays :func:`save_exported` writes (the ``.npz`` container and its
    JSON metadata add a small overhead on top).

    ``fp32``: the same model with every parameter and statistic in float32.
    """
    out = dict.fromkeys(("codes", "scales", "perms", "acts", "float", "codes_unpadded",
                         "scales_unpadded", "codes_file", "scales_file", "perms_file", "fp32"), 0)
    for leaf in jax.tree.leaves(exported.tree.get("acts", {})):
        out["acts"] += int(np.asarray(leaf).nbytes)
    for layer in exported.tree["layers"].values():
        out["fp32"] += 4 * int(np.prod(layer.kernel_shape))
        if layer.out_perm is not None:
            op = np.asarray(layer.out_perm)
            out["perms"] += int(op.nbytes)
            out["perms_file"] += op.size * _perm_dtype(op.size).itemsize
        for p in layer.packed:
            for seg, un in zip(p.segments, pk.unpack(p)):
                out["codes"] += sum(int(np.asarray(w).nbytes) for w in seg.words)
                out["scales"] += int(np.asarray(seg.scales).nbytes)
                out["codes_unpadded"] += -(-seg.k * p.n * seg.bits // 8)
                out["codes_file"] += -(-seg.k * p.n * _code_width(np.asarray(un.codes), seg.bits) // 8)
                out["scales_unpadded"] += int(np.asarray(un.scales).nbytes)
            if p.input_perm is not None:
                out["perms"] += int(np.asarray(p.input_perm).nbytes)
                out["perms_file"] += p.k * _perm_dtype(p.k).itemsize
    out["scales_file"] = out["scales_unpadded"]
    for leaf in jax.tree.leaves((exported.tree["params"], exported.tree["batch_stats"])):
        leaf = np.asarray(leaf)
        out["float"] += int(leaf.nbytes)
        out["fp32"] += 4 * int(leaf.size)
    out["total"] = out["codes"] + out["scales"] + out["perms"] + out["acts"] + out["float"]
    out["memory"] = out["total"]
    out["total_unpadded"] = (out["codes_unpadded"] + out["scales_unpadded"] + out["perms"]
                             + out["acts"] + out["float"])
    out["file"] = out["tight"] = (out["codes_file"] + out["scales_file"] + out["perms_file"]
                                  + out["acts"] + out["float"])
    return out


__all__ = ["Exported", "NATIVE_BITS", "PackedLayer", "SAVE_VERSION", "check_tiles", "container_bits",
           "dequantize_layer", "export", "load_exported", "matmul", "quantize_exported_input", "save_exported", "size_bytes"]
