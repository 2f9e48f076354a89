"""Extraction: the gated net's active channels and blocks as a smaller dense net (arXiv 2007.15353).

Every kept layer's kernel is sliced to the kept output channels of its group *and* the kept input
channels of the group it reads; biases, BatchNorm scale/bias and running mean/var are sliced with
their channels; gated-off blocks are dropped (they are their identity shortcut). In evaluation mode
the extracted net's logits equal the gated net's (``finalize``/``ctx.train=False``) up to float
summation order. A group with no active channel keeps one channel with its output multiplied by 0
(BatchNorm scale and bias, or kernel and bias), so every layer keeps a positive width and the
function is unchanged; the cost accounting counts such a group as empty.
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
import numpy as np
from flax import traverse_util

from pae.growth import structured as ps
from pae.models.slim import SlimBottleneckResNet, SlimResNet, SlimVGG
from pae.models.vgg import CONFIGS as VGG_CONFIGS, VGG


class Extracted(NamedTuple):
    """``model``: the slim net (:class:`~pae.models.slim.SlimResNet` / ``SlimBottleneckResNet`` /
    ``SlimVGG``); ``variables``:
    its ``{"params", "batch_stats"}``; ``kept``: ``{group: kept channel indices}`` (into the gated
    net's channels); ``blocks``: the kept gated blocks."""

    model: Any
    variables: dict
    kept: dict
    blocks: tuple


def _np(tree):
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def channel_sets(spec: ps.GateSpec, channel_masks: Mapping[str, Any],
                 block_masks: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``{group: bool mask}`` from per-layer output masks, checking that every layer writing a group
    (a residual stream: stem, conv2s of active blocks, shortcut) writes the same channel set.

    ``channel_masks``: ``{layer path: bool[out]}`` (layers not named keep every channel; the
    classifier may not be named). ValueError naming the group and the disagreeing layers otherwise.
    """
    layer_paths = {layer.path for layer in spec.layers}
    unknown = sorted(set(channel_masks) - layer_paths)
    if unknown:
        raise ValueError(f"channel_masks names unknown layer(s) {unknown}; layers: {sorted(layer_paths)}")
    fixed = sorted(layer.path for layer in spec.layers
                   if layer.out_group is None and layer.path in channel_masks)
    if fixed:
        raise ValueError(f"channel_masks names {fixed}, whose outputs (the classes) are never gated; "
                         f"mask only layers writing a channel group")
    out = {}
    for group, size in spec.groups:
        sets = []
        for layer in spec.writers(group):
            if layer.block is not None and not bool(block_masks.get(layer.block, True)):
                continue
            m = np.asarray(channel_masks.get(layer.path, np.ones(size, bool))).astype(bool)
            if m.shape != (size,):
                raise ValueError(f"channel mask of {layer.path!r} has shape {m.shape}, expected ({size},)")
            sets.append((layer.path, m))
        if not sets:
            out[group] = np.ones(size, bool)
            continue
        first_path, first = sets[0]
        for path, m in sets[1:]:
            if not np.array_equal(m, first):
                raise ValueError(
                    f"inconsistent residual channel sets in group {group!r}: {first_path!r} keeps "
                    f"channels {np.flatnonzero(first).tolist()} but {path!r} keeps "
                    f"{np.flatnonzero(m).tolist()}; every layer adding into one residual stream must "
                    f"keep the same channels (tie their masks, as structured_sparsification does)")
        out[group] = first
    return out


def _resnet_blocks(model):
    return ps._resnet_blocks(model)


def extract_masked(spec: ps.GateSpec, params: Any, batch_stats: Any, channel_masks: Mapping[str, Any],
                   block_masks: Mapping[str, Any] | None = None) -> Extracted:
    """Extract the net that keeps the channels of ``channel_masks`` (per layer, see
    :func:`channel_sets`) and the gated blocks whose ``block_masks`` entry is true (default all).
    ``params``/``batch_stats`` are the plain (ungated) model's."""
    block_masks = dict(block_masks or {})
    unknown = sorted(set(block_masks) - {b.name for b in spec.blocks})
    if unknown:
        raise ValueError(f"block_masks names unknown block(s) {unknown}; gated blocks: "
                         f"{[b.name for b in spec.blocks]}")
    sets = channel_sets(spec, channel_masks, block_masks)
    kept = {g: ps.kept_channels(m) for g, m in sets.items()}
    empty = {g for g, m in sets.items() if not m.any()}
    active = {b.name for b in spec.blocks if bool(block_masks.get(b.name, True))}
    slim, variables = _slice(spec, params, batch_stats, kept, active, empty)
    return Extracted(slim, variables, {g: kept[g] for g in kept if g not in empty}
                     | {g: np.zeros(0, np.int64) for g in empty}, tuple(b.name for b in spec.blocks
                                                                        if b.name in active))


def slim_model(spec: ps.GateSpec, widths: Mapping[str, int], active_blocks=None):
    """The slim model with ``widths[group]`` channels per group (groups not named: full) and the
    gated blocks in ``active_blocks`` (default all)."""
    sizes = spec.group_sizes | dict(widths)
    model = spec.model
    if spec.kind == "resnet":
        active = {b.name for b in spec.blocks} if active_blocks is None else set(active_blocks)
        gated = {b.name for b in spec.blocks}
        streams = tuple(int(sizes[f"stream{s}"]) for s in range(3))
        blocks = tuple((index, stage, int(sizes[f"BasicBlock_{index}/Conv_0"]))
                       for index, stage, _ in _resnet_blocks(model)
                       if f"BasicBlock_{index}" not in gated or f"BasicBlock_{index}" in active)
        return SlimResNet(streams, blocks, model.num_classes)
    if spec.kind == "bottleneck":
        active = {b.name for b in spec.blocks} if active_blocks is None else set(active_blocks)
        gated = {b.name for b in spec.blocks}
        described = ps._bottleneck_blocks(model)
        streams = tuple(int(sizes[f"stream{s}"]) for s in range(1 + max(b[1] for b in described)))
        blocks = tuple((index, stage, int(sizes[f"Bottleneck_{index}/Conv_0"]),
                        int(sizes[f"Bottleneck_{index}/Conv_1"]))
                       for index, stage, _, _ in described
                       if f"Bottleneck_{index}" not in gated or f"Bottleneck_{index}" in active)
        return SlimBottleneckResNet(int(sizes["stem"]), streams, blocks, model.num_classes)
    config = VGG_CONFIGS[model.depth] if isinstance(model, VGG) else model.config
    widths_out, i = [], 0
    for item in config:
        if item == "M":
            widths_out.append("M")
        else:
            widths_out.append(int(sizes[f"Conv_{i}"]))
            i += 1
    return SlimVGG(tuple(widths_out), model.num_classes)


def _slice(spec, params, batch_stats, kept, active, empty):
    """Slice every kept layer to the ``kept`` channel indices of its groups (zeroing groups in
    ``empty``); layers of gated blocks not in ``active`` are dropped."""
    flat_p, flat_s = _np(params), _np(batch_stats or {})
    new_p, new_s = {}, {}

    def take(flat, new, module, leaf, index, zero=False):
        key = tuple(module.split("/")) + (leaf,)
        if key not in flat:
            return
        value = np.take(flat[key], index, axis=-1) if index is not None else flat[key]
        new[key] = value * 0 if zero else value

    gated = {b.name for b in spec.blocks}
    for layer in spec.layers:
        if layer.block is not None and layer.block in gated and layer.block not in active:
            continue
        idx_in = kept.get(layer.in_group) if layer.in_group else None
        idx_out = kept.get(layer.out_group) if layer.out_group else None
        zero = layer.out_group in empty
        key = tuple(layer.path.split("/")) + ("kernel",)
        kernel = flat_p[key]
        if idx_in is not None:
            kernel = np.take(kernel, idx_in, axis=-2)
        if idx_out is not None:
            kernel = np.take(kernel, idx_out, axis=-1)
        new_p[key] = kernel * 0 if zero and layer.norm is None else kernel
        take(flat_p, new_p, layer.path, "bias", idx_out, zero=zero and layer.norm is None)
        if layer.norm is not None:
            for leaf in ("scale", "bias"):
                take(flat_p, new_p, layer.norm, leaf, idx_out, zero=zero)
            for leaf in ("mean", "var"):
                take(flat_s, new_s, layer.norm, leaf, idx_out)
    widths = {g: len(idx) for g, idx in kept.items()}
    variables = {"params": traverse_util.unflatten_dict(new_p)}
    if new_s:
        variables["batch_stats"] = traverse_util.unflatten_dict(new_s)
    return slim_model(spec, widths, active), variables


def compact(spec: ps.GateSpec, latent: ps.Gated, batch_stats: Any, widths: Mapping[str, int]
            ) -> tuple[Any, ps.Gated, Any]:
    """Compaction with a growth margin: keep, in every gated group named by ``widths``, the
    ``widths[group]`` channels of largest logit (ties: lower index; kept in index order), every
    block, and the other groups whole. Returns ``(slim model, latent, batch_stats)``: the latent
    keeps the kept channels' weights, logits and full-net ids, so the compacted net goes on
    searching (channels in the margin can still grow) and draws what the full net would.

    The widths are fixed in advance (the engine needs each phase's model before the run); which
    channels fill them is decided by the logits. Channels dropped while active change the function.
    """
    if not isinstance(latent, ps.Gated):
        raise TypeError(f"latent must be a pae.growth.structured.Gated, got {type(latent).__name__}")
    sizes = spec.group_sizes
    logits = {g: np.asarray(v) for g, v in latent.logits["channels"].items()}
    kept = _top_channels(spec, latent, widths)
    model, variables = _slice(spec, latent.weights, batch_stats, kept,
                              {b.name for b in spec.blocks}, set())
    ids = latent.ids or {g: np.arange(sizes[g], dtype=np.float32) for g in logits}
    new = ps.Gated(variables["params"],
                   {"channels": {g: logits[g][kept[g]] for g in logits},
                    "blocks": {b: np.asarray(v) for b, v in latent.logits["blocks"].items()}},
                   {g: np.asarray(ids[g])[kept[g]] for g in logits})
    return model, new, variables.get("batch_stats", {})


def extract(spec: ps.GateSpec, latent: ps.Gated, batch_stats: Any) -> Extracted:
    """Extract the architecture of a :class:`~pae.growth.structured.Gated` latent: channels and
    blocks with ``s > 0``. Its logits equal ``spec.model`` on ``finalize(latent)`` in evaluation."""
    if not isinstance(latent, ps.Gated):
        raise TypeError(f"latent must be a pae.growth.structured.Gated (the search state's params), "
                        f"got {type(latent).__name__}")
    ch = {g: np.asarray(s) > 0 for g, s in latent.logits["channels"].items()}
    bl = {b: bool(np.asarray(s) > 0) for b, s in latent.logits["blocks"].items()}
    masks = {layer.path: ch[layer.out_group] for layer in spec.layers if layer.out_group in ch}
    return extract_masked(spec, latent.weights, batch_stats, masks, bl)


# ----------------------------------------------------------------------------- state surgery

def _is_array(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _key(path: str, leaf: str) -> tuple:
    return tuple(path.split("/")) + (leaf,)


def _slice_weights(spec: ps.GateSpec, weights: Any, kept: Mapping[str, np.ndarray]) -> Any:
    """``weights`` (a params-shaped dict whose leaves may be optax ``MaskedNode``) sliced to the
    ``kept`` channels of every group, every block kept."""
    if not isinstance(weights, Mapping):
        return weights
    flat = dict(traverse_util.flatten_dict(weights))
    for layer in spec.layers:
        i_in, i_out = kept.get(layer.in_group), kept.get(layer.out_group)
        k = _key(layer.path, "kernel")
        if k in flat and _is_array(flat[k]):
            v = np.asarray(flat[k])
            if i_in is not None:
                v = np.take(v, i_in, axis=-2)
            if i_out is not None:
                v = np.take(v, i_out, axis=-1)
            flat[k] = v
        if i_out is None:
            continue
        keys = [_key(layer.path, "bias")]
        if layer.norm is not None:
            keys += [_key(layer.norm, leaf) for leaf in ("scale", "bias", "mean", "var")]
        for k in keys:
            if k in flat and _is_array(flat[k]):
                flat[k] = np.take(np.asarray(flat[k]), i_out, axis=-1)
    return traverse_util.unflatten_dict(flat)


def _scatter_weights(spec: ps.GateSpec, full: Any, small: Any, ids: Mapping[str, np.ndarray]) -> Any:
    """``full`` with ``small``'s values written at the full-net indices ``ids`` of every group (the
    inverse of :func:`_slice_weights` on the kept entries; the others keep ``full``'s values)."""
    if not isinstance(full, Mapping):
        return full
    flat = {k: (np.array(v) if _is_array(v) else v) for k, v in traverse_util.flatten_dict(full).items()}
    part = dict(traverse_util.flatten_dict(small))
    for layer in spec.layers:
        i_in = ids.get(layer.in_group, np.arange(layer.in_size)) if layer.in_group else np.arange(layer.in_size)
        i_out = ids.get(layer.out_group, np.arange(layer.out_size)) if layer.out_group else \
            np.arange(layer.out_size)
        k = _key(layer.path, "kernel")
        if k in flat and _is_array(flat[k]):
            flat[k][..., i_in[:, None], i_out[None, :]] = np.asarray(part[k])
        keys = [_key(layer.path, "bias")]
        if layer.norm is not None:
            keys += [_key(layer.norm, leaf) for leaf in ("scale", "bias", "mean", "var")]
        for k in keys:
            if k in flat and _is_array(flat[k]):
                flat[k][..., i_out] = np.asarray(part[k])
    return traverse_util.unflatten_dict(flat)


def _map_gated(fn, tree, *rest):
    """``fn`` on every :class:`~pae.growth.structured.Gated` node of ``tree`` (an optimizer state:
    its moments are Gated-shaped); other leaves are taken from the last tree (the counts)."""
    is_gated = lambda x: isinstance(x, ps.Gated)  # noqa: E731
    return jax.tree.map(lambda x, *r: fn(x, *r) if is_gated(x) else (r[-1] if r else x),
                        tree, *rest, is_leaf=is_gated)


def _slice_gated(spec: ps.GateSpec, node: ps.Gated, kept: Mapping[str, np.ndarray]) -> ps.Gated:
    take = lambda v, g: np.asarray(v)[kept[g]] if _is_array(v) else v  # noqa: E731
    ids = node.ids
    if isinstance(ids, Mapping):
        ids = {g: take(v, g) for g, v in ids.items()}
    return ps.Gated(_slice_weights(spec, node.weights, kept),
                    {"channels": {g: take(v, g) for g, v in node.logits["channels"].items()},
                     "blocks": {b: (np.asarray(v) if _is_array(v) else v)
                                for b, v in node.logits["blocks"].items()}},
                    ids)


def _scatter_gated(spec: ps.GateSpec, full: ps.Gated, small: ps.Gated, ids) -> ps.Gated:
    def put(f, s, g):
        if not _is_array(f):
            return f
        out = np.array(f)
        out[ids[g]] = np.asarray(s)
        return out
    new_ids = full.ids
    if isinstance(full.ids, Mapping):
        new_ids = {g: put(v, small.ids[g], g) for g, v in full.ids.items()}
    return ps.Gated(_scatter_weights(spec, full.weights, small.weights, ids),
                    {"channels": {g: put(v, small.logits["channels"][g], g)
                                  for g, v in full.logits["channels"].items()},
                     "blocks": {b: (np.asarray(small.logits["blocks"][b]) if _is_array(v) else v)
                                for b, v in full.logits["blocks"].items()}},
                    new_ids)


def _top_channels(spec: ps.GateSpec, latent: ps.Gated, widths: Mapping[str, int]) -> dict:
    sizes = spec.group_sizes
    logits = {g: np.asarray(v) for g, v in latent.logits["channels"].items()}
    ps.check_widths(spec, widths, set(logits))
    return {g: (np.sort(np.argsort(-logits[g], kind="stable")[:widths[g]]) if g in widths
                else np.arange(sizes[g])) for g in sizes}


def compact_state(spec: ps.GateSpec, state: Any, widths: Mapping[str, int], *,
                  carry_optimizer: bool = True) -> tuple[Any, Any]:
    """:func:`compact` of a whole :class:`~pae.train.TrainState` whose params are a ``Gated`` latent:
    returns ``(slim model, state)`` with the latent, the BatchNorm statistics and, with
    ``carry_optimizer``, every Gated-shaped moment of the optimizer state (SGD's momentum trace,
    Adam's moments; counts carried as they are) sliced to the same channels, so training continues
    as masked full-size training would (``carry_optimizer=False``: ``opt_state=None``, a fresh
    optimizer at the next phase)."""
    latent = state.params
    if not isinstance(latent, ps.Gated):
        raise TypeError(f"state.params must be a pae.growth.structured.Gated, got {type(latent).__name__}")
    kept = _top_channels(spec, latent, widths)
    model, new, stats = compact(spec, latent, state.batch_stats, widths)
    opt = None
    if carry_optimizer and state.opt_state is not None:
        opt = _map_gated(lambda node: _slice_gated(spec, node, kept), jax.device_get(state.opt_state))
    return model, state.replace(params=new, batch_stats=stats, opt_state=opt)


def expand_state(spec: ps.GateSpec, full: Any, state: Any) -> Any:
    """The full-size :class:`~pae.train.TrainState` ``full`` updated with a compacted ``state``
    (params a ``Gated`` latent whose ``ids`` are full-net channel indices): the latent, BatchNorm
    statistics and optimizer moments of the kept channels are written at their ids; the channels
    compaction dropped keep the values they had when dropped (logits <= 0: off); step, key and the
    optimizer's counts are ``state``'s. Where either optimizer state is None the result's is None."""
    latent = state.params
    if not isinstance(latent, ps.Gated) or not isinstance(full.params, ps.Gated):
        raise TypeError("full.params and state.params must be pae.growth.structured.Gated latents")
    ids = {g: np.asarray(v).astype(np.int64) for g, v in latent.ids.items()}
    host = jax.device_get
    params = _scatter_gated(spec, host(full.params), host(latent), ids)
    stats = _scatter_weights(spec, host(full.batch_stats), host(state.batch_stats), ids)
    opt = None
    if full.opt_state is not None and state.opt_state is not None:
        opt = _map_gated(lambda f, s: _scatter_gated(spec, f, s, ids), host(full.opt_state),
                         host(state.opt_state))
    return full.replace(step=state.step, params=params, batch_stats=stats, opt_state=opt, key=state.key)


def restructure(spec: ps.GateSpec, full: Any, state: Any, widths: Mapping[str, int]
                ) -> tuple[Any, Any, Any]:
    """Periodic restructuring with regrowth: write the compacted ``state`` back into the full-size
    ``full`` (:func:`expand_state`), then compact that to ``widths`` (:func:`compact_state`, the
    channels of largest logit, optimizer moments carried). A group may so get wider than it was (its
    new channels come back with the weights, logits and moments they had when dropped). Returns
    ``(slim model, compacted state, updated full state)``."""
    full = expand_state(spec, full, state)
    model, small = compact_state(spec, full, widths)
    return model, small, full
