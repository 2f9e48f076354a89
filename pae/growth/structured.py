"""Growing networks by structured continuous sparsification (Yuan, Savarese & Maire, arXiv 2007.15353).

Binary indicators switch output channels and residual blocks on and off. Each indicator has one mask
logit ``s`` and is relaxed as in Continuous Sparsification (:mod:`pae.sparsity.cs`)::

    p = sigmoid(beta * s)                       (beta annealed 1 -> beta_final per epoch, as in CS)
    training:   q ~ Bernoulli(p), one draw per indicator per step (shared by the minibatch)
    evaluation: q = 1[s > 0]                    (deterministic, strict >)

Where a gate acts (the *gate algebra*):

* a channel gate ``m_c`` of a layer followed by BatchNorm multiplies that BatchNorm's scale and bias
  of channel ``c``, so the channel's output is exactly ``m_c * BN(conv(x))_c``, and the BatchNorm
  statistics stay those of ``conv(x)`` whatever was sampled (multiplying the kernel slice as well
  would make the output equal ``m * BN(conv x)`` only up to BatchNorm's ``eps`` and mix zeros into
  the running variance on the steps where the channel is off). A layer with no BatchNorm after it
  (a ResNet's 1x1 shortcut) has its kernel's output slice and bias multiplied instead;
* a block gate ``g`` multiplies the residual branch: the scale and bias of the branch's last
  BatchNorm, so the block computes ``relu(x + g * BN2(...))`` and, off, is its identity shortcut
  (``x >= 0`` after the previous ReLU). Blocks with a 1x1 conv shortcut (the first of a
  downsampling stage) carry no block gate: they are always on (their channels are gated).
* a residual stream (the stem, every ``conv2`` and shortcut writing into one stage) shares ONE channel
  gate vector (``stream<k>``), so every residual add sees the same channel set and extraction can
  drop a stream channel everywhere at once. Internal block channels (``BasicBlock_<k>/Conv_0``) and
  VGG layers (``Conv_<i>``) have one gate vector each.

Bottleneck ResNets (ImageNet ResNet-50 layout: :class:`pae.models.ResNet` with ``bottleneck=True``,
:class:`pae.models.slim.SlimBottleneckResNet`; 1x1-reduce, 3x3 with the stride, 1x1-expand by 4,
projection shortcut with BatchNorm on the first block of every stage) get, as the paper does for
ResNets, channel gates on both inner widths of every bottleneck (``Bottleneck_<k>/Conv_0``: the
1x1-reduce output; ``Bottleneck_<k>/Conv_1``: the 3x3 output), one block gate per residual block
with an identity shortcut (on ``BatchNorm_2``, the branch's last BatchNorm; the first block of each
stage has a projection shortcut and is always on, as in the basic-block layout), one gate vector
for the stem's output (``stem``: read by the first block's 1x1 and its projection shortcut, so it
is independent of every residual add), and ONE gate vector per stage for the residual (expanded)
width (``stream<k>``: written by every ``Conv_2`` of the stage and by its projection shortcut's
BatchNorm ``shortcut_bn``). Choice (the paper's treatment of the expanded width of ResNet-50 is
unverified): the expanded width is gated but shared within a stage, the same rule as the
basic-block layout's streams, because every residual add of a stage must see one channel set for
the net to be extractable into a dense one; it stays learnable (a stage may narrow its stream).
To keep the residual widths fixed (gate only the inner widths and the blocks), pass
``channels=pae.select.path(r"Bottleneck_\\d+/Conv_[01]/kernel")``.

Gradient estimators (``estimator=``), both through ``sigmoid(beta * s)`` with the draw ``q`` held fixed:

* ``"straight_through"`` (default): forward ``m = q`` exactly, backward ``dm/ds = d sigmoid(beta s)/ds``
  (``m = q + (p - stop_gradient(p))``). Every indicator, sampled on or off, gets the gradient of
  the loss with respect to its gate, so an off channel learns whether it should grow.
* ``"scaled"``: ``m = q * p`` (the CS-consistent form ``q * sigmoid(beta*s)``); an indicator sampled
  off gets no gradient that step. The gap to evaluation's ``1[s > 0]`` closes as beta grows.

Budget-aware penalty (the form of CSQ's code, the closest code there is; whether the paper uses
exactly this is unverified)::

    u_t      = C(1[s > 0]) / C(full)               measured utilization (FLOPs, or parameters)
    lambda_t = stop_gradient(lambda_base * (u_t - budget))
    penalty  = lambda_t * sum sigmoid(beta * s) / N          penalize="count" (default)
    penalty  = lambda_t * C(sigmoid(beta * s)) / C(full)     penalize="cost"

``C`` is :func:`pae.growth.flops.cost`. ``"count"`` is CSQ's code's unweighted L1 of the indicators
(``N`` gated channels and blocks); ``"cost"`` weights each indicator by what it costs, so that
``C(sigmoid(beta s))`` is the expected cost of the sampled net (the "FLOPs-weighted" reading of the
paper's objective). Below budget ``lambda_t < 0`` rewards switching components on (growth from the
seed), above it the penalty prunes. The two grow different nets: with the cost-weighted reward the
channels that cost most (early, high-resolution layers) grow fastest, and since ``lambda_t`` is
near 0 once the budget is reached, the net keeps the shape its growth gave it; with the count every
indicator gets the same push and the task gradient decides which grow
(``experiments/grow_structured.py --penalize``; README, growth).

Training savings (a choice of this implementation; the paper's schedule is unverified): masked
full-size training (:func:`structured_phases`) costs what full training costs. Compaction trains the
smaller net instead: :func:`structured_phases` ``(compactions=...)`` at widths fixed in advance, or
:func:`structured_search`, which restructures at chosen epochs to the active channels plus a growth
margin (regrowth from the full-size state kept on the host). Both carry the optimizer state with
the channels (momentum sliced, step count continuing), so compaction then training equals masked
full-size training with the dropped channels held off (tested).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import zlib
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from pae.core import Context, Transform, check_finite, check_min_int, latent_node, role_optimizer, select as pselect
from pae.growth import flops as pflops
from pae.models.resnet_cifar import CifarResNet
from pae.models.resnet_imagenet import ResNet as ImageNetResNet
from pae.models.slim import SlimBottleneckResNet, SlimResNet, SlimVGG
from pae.models.vgg import CONFIGS as VGG_CONFIGS, VGG
from pae.sparsity.cs import temperature_schedule
from pae.train.engine import Phase

ESTIMATORS = ("straight_through", "scaled")
PENALTIES = ("cost", "count")
MEASURES = pflops.MEASURES
SUPPORTED = ("pae.models.CifarResNet (resnet20/32/56), pae.models.ResNet with bottleneck=True "
             "(resnet50), pae.models.VGG (vgg11/16), SlimResNet, SlimBottleneckResNet, SlimVGG")


# ----------------------------------------------------------------------------- structure

class GatedLayer(NamedTuple):
    """One conv or dense layer: its module ``path``, the channel groups of its input and output
    (None: fixed, the image or the classes) and their full sizes, the BatchNorm module that follows
    it (None: none), the block whose gate switches it off (None: outside gated blocks), ``taps``
    (output positions x kernel taps), ``kernel_size`` (kernel taps), whether it has a bias and
    ``kernel_shape`` (what a ``channels`` selector is shown)."""

    path: str
    in_group: str | None
    out_group: str | None
    in_size: int
    out_size: int
    norm: str | None
    block: str | None
    taps: int
    kernel_size: int
    bias: bool
    kernel_shape: tuple[int, ...] = ()


class BlockGate(NamedTuple):
    """A gated residual block: its module path, its stage and the BatchNorm closing its branch."""

    name: str
    stage: int
    branch_norm: str


@dataclasses.dataclass(frozen=True)
class GateSpec:
    """The gate structure of a model: layers, channel groups ``(name, size)``, gated blocks, and per
    stage the number of always-on (ungated) blocks. Build it with :func:`gate_spec`."""

    model: Any
    kind: str
    layers: tuple[GatedLayer, ...]
    groups: tuple[tuple[str, int], ...]
    blocks: tuple[BlockGate, ...]
    ungated_blocks: tuple[int, ...] = ()
    #: the shape of the example batch the spec was built on (spatial sizes fix the FLOPs)
    example_shape: tuple[int, ...] = ()

    @property
    def group_sizes(self) -> dict[str, int]:
        return dict(self.groups)

    def writers(self, group: str) -> list[GatedLayer]:
        """The layers whose output channels are ``group``."""
        return [layer for layer in self.layers if layer.out_group == group]


def _shapes(model, example):
    """Parameter shapes and per-module output shapes (``capture_intermediates``), abstractly."""
    x = jnp.asarray(example)

    def run():
        variables = model.init(jax.random.PRNGKey(0), x)
        _, inter = model.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
        return variables, inter["intermediates"]

    variables, inter = jax.eval_shape(run)
    out = {"/".join(k[:-1]): v[0].shape for k, v in traverse_util.flatten_dict(inter).items()
           if k[-1] == "__call__" and len(k) > 1}
    return variables, out


def _layer(params, outputs, path, in_group, out_group, norm, block) -> GatedLayer:
    kernel = traverse_util.flatten_dict(params)
    shape = kernel[tuple(path.split("/")) + ("kernel",)].shape
    has_bias = tuple(path.split("/")) + ("bias",) in kernel
    positions = int(np.prod(outputs[path][1:-1])) if len(outputs[path]) > 2 else 1
    taps = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
    return GatedLayer(path, in_group, out_group, int(shape[-2]), int(shape[-1]), norm, block,
                      positions * taps, taps, has_bias, tuple(int(d) for d in shape))


def _resnet_blocks(model):
    if isinstance(model, CifarResNet):
        if (model.depth - 2) % 6:
            raise ValueError(f"CifarResNet depth must be 6n+2, got {model.depth}")
        return SlimResNet.like(model).blocks
    return model.blocks


def _bottleneck_blocks(model):
    """``(index, stage, mid0, mid1)`` of every block of a bottleneck ResNet or its slim form."""
    if isinstance(model, ImageNetResNet):
        if not model.bottleneck:
            raise ValueError(f"structured sparsification supports pae.models.ResNet with bottleneck "
                             f"blocks only (ResNet-50 layout), got bottleneck=False (basic blocks, "
                             f"ResNet-18/34); supported models: {SUPPORTED}")
        return SlimBottleneckResNet.like(model).blocks
    return model.blocks


def _bottleneck_spec(model, example):
    """Layers, gated blocks and always-on blocks per stage of a bottleneck ResNet (module doc)."""
    variables, outputs = _shapes(model, example)
    params = variables["params"]
    blocks_desc = _bottleneck_blocks(model)
    stages = 1 + max(stage for _, stage, _, _ in blocks_desc)
    layers = [_layer(params, outputs, "Conv_0", None, "stem", "BatchNorm_0", None)]
    blocks, ungated, src = [], [0] * stages, "stem"
    for index, stage, _, _ in blocks_desc:
        name = f"Bottleneck_{index}"
        has_shortcut = "shortcut_conv" in params[name]
        gate = None if has_shortcut else name
        if has_shortcut:
            ungated[stage] += 1
        else:
            blocks.append(BlockGate(name, stage, f"{name}/BatchNorm_2"))
        layers.append(_layer(params, outputs, f"{name}/Conv_0", src, f"{name}/Conv_0",
                             f"{name}/BatchNorm_0", gate))
        layers.append(_layer(params, outputs, f"{name}/Conv_1", f"{name}/Conv_0", f"{name}/Conv_1",
                             f"{name}/BatchNorm_1", gate))
        layers.append(_layer(params, outputs, f"{name}/Conv_2", f"{name}/Conv_1", f"stream{stage}",
                             f"{name}/BatchNorm_2", gate))
        if has_shortcut:
            layers.append(_layer(params, outputs, f"{name}/shortcut_conv", src, f"stream{stage}",
                                 f"{name}/shortcut_bn", None))
        src = f"stream{stage}"
    layers.append(_layer(params, outputs, "Dense_0", src, None, None, None))
    return layers, blocks, ungated


def gate_spec(model, example) -> GateSpec:
    """The gate structure of ``model`` on inputs like ``example`` (one batch; for FLOPs).

    ResNets (:class:`~pae.models.CifarResNet`, :class:`~pae.models.slim.SlimResNet`): groups
    ``stream0..2`` (stem, every block's ``Conv_1`` and shortcut of a stage) and
    ``BasicBlock_<k>/Conv_0`` (a block's inner channels); block gates on every block with an
    identity shortcut. Bottleneck ResNets (:class:`~pae.models.ResNet` with ``bottleneck=True``,
    :class:`~pae.models.slim.SlimBottleneckResNet`; kind ``"bottleneck"``): groups ``stem``,
    ``stream<k>`` per stage (every ``Conv_2`` and the projection shortcut of the stage),
    ``Bottleneck_<k>/Conv_0`` and ``Bottleneck_<k>/Conv_1`` (the two inner widths); block gates on
    every block with an identity shortcut (module doc). VGGs (:class:`~pae.models.VGG`,
    :class:`~pae.models.slim.SlimVGG`): one group per conv, ``Conv_<i>``. The classifier's outputs
    are never gated. Other models: ValueError.
    """
    if isinstance(model, (ImageNetResNet, SlimBottleneckResNet)):
        layers, blocks, ungated = _bottleneck_spec(model, example)
        kind = "bottleneck"
    elif isinstance(model, (CifarResNet, SlimResNet)):
        variables, outputs = _shapes(model, example)
        params = variables["params"]
        layers = [_layer(params, outputs, "Conv_0", None, "stream0", "BatchNorm_0", None)]
        blocks, ungated, previous = [], [0, 0, 0], 0
        for index, stage, _ in _resnet_blocks(model):
            name = f"BasicBlock_{index}"
            has_shortcut = "shortcut" in params[name]
            src, previous = f"stream{previous}", stage
            gate = None if has_shortcut else name
            if has_shortcut:
                ungated[stage] += 1
            else:
                blocks.append(BlockGate(name, stage, f"{name}/BatchNorm_1"))
            layers.append(_layer(params, outputs, f"{name}/Conv_0", src, f"{name}/Conv_0",
                                 f"{name}/BatchNorm_0", gate))
            layers.append(_layer(params, outputs, f"{name}/Conv_1", f"{name}/Conv_0", f"stream{stage}",
                                 f"{name}/BatchNorm_1", gate))
            if has_shortcut:
                layers.append(_layer(params, outputs, f"{name}/shortcut", src, f"stream{stage}", None,
                                     None))
        layers.append(_layer(params, outputs, "Dense_0", "stream2", None, None, None))
        kind = "resnet"
    elif isinstance(model, (VGG, SlimVGG)):
        config = VGG_CONFIGS.get(model.depth) if isinstance(model, VGG) else model.config
        if config is None:
            raise ValueError(f"VGG depth must be one of {sorted(VGG_CONFIGS)}, got {model.depth}")
        variables, outputs = _shapes(model, example)
        params = variables["params"]
        layers, previous = [], None
        for i in range(sum(1 for item in config if item != "M")):
            layers.append(_layer(params, outputs, f"Conv_{i}", previous, f"Conv_{i}", f"BatchNorm_{i}",
                                 None))
            previous = f"Conv_{i}"
        layers.append(_layer(params, outputs, "Dense_0", previous, None, None, None))
        blocks, ungated, kind = [], [], "vgg"
    else:
        raise ValueError(f"structured sparsification does not know the layout of "
                         f"{type(model).__name__}; supported models: {SUPPORTED}")
    groups = {}
    for layer in layers:
        if layer.out_group is not None:
            groups.setdefault(layer.out_group, layer.out_size)
    return GateSpec(model, kind, tuple(layers), tuple(groups.items()), tuple(blocks), tuple(ungated),
                    tuple(np.shape(example)))


# ----------------------------------------------------------------------------- latent

@latent_node({"weights": "weights", "logits": "mask", "ids": "frozen"})
class Gated:
    """The latent: the model's ``weights``, the indicator logits ``{"channels": {group: f32[n]},
    "blocks": {block: f32[]}}`` (role ``"mask"``) and ``ids`` ``{group: f32[n]}``, each channel's
    index in the full net (role ``"frozen"``, data; float so that the latent stays differentiable):
    draws are keyed by them, so a compacted net samples what the full net samples for its channels."""

    weights: Any
    logits: Any
    ids: Any = None


def _check_ctx(ctx) -> None:
    for name in ("beta", "key", "train"):
        if not hasattr(ctx, name):
            raise TypeError(f"ctx must carry beta, key and train (build it with pae.Context.make(...)); "
                            f"got {type(ctx).__name__} without {name!r}")


def _stable(name: str) -> int:
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def uniforms(spec: GateSpec, key, ids: Mapping | None = None) -> tuple[dict, dict]:
    """The per-indicator uniforms of one step: channel ``c`` of group ``g`` uses
    ``fold_in(fold_in(key, crc32(g)), id_c)`` (``ids``: the channels' indices in the full net,
    default ``0..n-1``), block ``b`` ``fold_in(key, crc32(b))``; keyed by names and full-net ids,
    so a compacted net draws what the full one draws for its channels."""
    channels = {}
    for name, size in spec.groups:
        kg = jax.random.fold_in(key, _stable(name))
        if ids is not None and name in ids:
            idx = jax.lax.stop_gradient(jnp.asarray(ids[name])).astype(jnp.uint32)
        else:
            idx = jnp.arange(size, dtype=jnp.uint32)
        channels[name] = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(kg, i)))(idx)
    blocks = {b.name: jax.random.uniform(jax.random.fold_in(key, _stable(b.name))) for b in spec.blocks}
    return channels, blocks


def gates(spec: GateSpec, logits: Mapping, ctx, estimator: str = "straight_through",
          ids: Mapping | None = None) -> tuple[dict, dict]:
    """``(channel gates, block gates)`` of one step (see the module doc): ``q ~ Bernoulli(sigmoid(
    beta*s))`` with the chosen gradient estimator when ``ctx.train``, ``1[s > 0]`` otherwise."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    _check_ctx(ctx)
    beta = jnp.asarray(ctx.beta, jnp.float32)
    u_channels, u_blocks = uniforms(spec, ctx.key, ids)

    def one(s, u):
        s = jnp.asarray(s, jnp.float32)
        p = jax.nn.sigmoid(beta * s)
        q = (u < p).astype(jnp.float32)
        m = q + (p - jax.lax.stop_gradient(p)) if estimator == "straight_through" else q * p
        return jnp.where(ctx.train, m, (s > 0).astype(jnp.float32))

    ch = {g: one(s, u_channels[g]) for g, s in logits["channels"].items()}
    bl = {b: one(s, u_blocks[b]) for b, s in logits["blocks"].items()}
    return ch, bl


def hard_gates(logits: Mapping) -> tuple[dict, dict]:
    """``1[s > 0]`` of every indicator: the architecture evaluation uses and extraction keeps."""
    hard = lambda s: (jnp.asarray(s) > 0).astype(jnp.float32)  # noqa: E731
    return ({g: hard(s) for g, s in logits["channels"].items()},
            {b: hard(s) for b, s in logits["blocks"].items()})


def probabilities(logits: Mapping, beta) -> tuple[dict, dict]:
    """``sigmoid(beta * s)`` of every indicator (the sampling probabilities)."""
    p = lambda s: jax.nn.sigmoid(jnp.asarray(beta, jnp.float32) * jnp.asarray(s, jnp.float32))  # noqa: E731
    return ({g: p(s) for g, s in logits["channels"].items()},
            {b: p(s) for b, s in logits["blocks"].items()})


def gate_params(spec: GateSpec, params: Any, channel_gates: Mapping, block_gates: Mapping) -> Any:
    """The model's parameters with the gates applied (the gate algebra of the module doc)."""
    flat = traverse_util.flatten_dict(params)
    mult: dict[tuple, Any] = {}

    def scale(key, m):
        if key not in flat:
            raise ValueError(f"params have no leaf {'/'.join(key)!r}; the gate spec does not fit them")
        mult[key] = mult[key] * m if key in mult else m

    for layer in spec.layers:
        if layer.out_group not in channel_gates:
            continue
        m = channel_gates[layer.out_group]
        if layer.norm is not None:
            for leaf in ("scale", "bias"):
                scale(tuple(layer.norm.split("/")) + (leaf,), m)
        else:
            scale(tuple(layer.path.split("/")) + ("kernel",), m)
            if layer.bias:
                scale(tuple(layer.path.split("/")) + ("bias",), m)
    for block in spec.blocks:
        if block.name in block_gates:
            for leaf in ("scale", "bias"):
                scale(tuple(block.branch_norm.split("/")) + (leaf,), block_gates[block.name])
    out = {k: (v * mult[k].astype(v.dtype) if k in mult else v) for k, v in flat.items()}
    return traverse_util.unflatten_dict(out)


def _check_unit(name: str, value, low_open: bool = True) -> float:
    check_finite(name, value)
    v = float(value)
    if not (0 < v <= 1):
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return v


def _check_penalty(budget, lmbda, utilization) -> float:
    """The budget-aware penalty's arguments: ``budget`` in (0, 1], ``lmbda`` >= 0, ``utilization``
    one of :data:`MEASURES`; returns ``float(budget)``."""
    budget = _check_unit("budget", budget)
    check_finite("lmbda", lmbda)
    if float(lmbda) < 0:
        raise ValueError(f"lmbda must be >= 0, got {lmbda}")
    if utilization not in MEASURES:
        raise ValueError(f"utilization must be one of {MEASURES}, got {utilization!r}")
    return budget


def gated_groups(spec: GateSpec, channels: pselect.Selector | None = None) -> set[str]:
    """The channel groups ``channels`` gates: those with a writing layer whose kernel (its path and
    real shape) the selector matches (default: every group)."""
    select = pselect.everything() if channels is None else channels
    if not isinstance(select, pselect.Selector):
        raise TypeError(f"channels must be a pae.select selector, got {type(select).__name__}")
    return {layer.out_group for layer in spec.layers if layer.out_group is not None and select(
        f"{layer.path}/kernel", jax.ShapeDtypeStruct(layer.kernel_shape or (layer.in_size, layer.out_size),
                                                     jnp.float32))}


def check_widths(spec: GateSpec, widths: Mapping[str, Any], gated: set[str]) -> None:
    """ValueError unless every ``widths[group]`` names a gated group of ``spec`` with an int in
    ``[1, size]`` (a compaction can only narrow a group)."""
    sizes = spec.group_sizes
    for g, k in widths.items():
        if g not in gated:
            raise ValueError(f"widths names {g!r}, which is not a gated channel group; gated: "
                             f"{sorted(gated)}")
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= sizes[g]:
            raise ValueError(f"widths[{g!r}] must be an int in [1, {sizes[g]}], got {k!r}")


def _check_seed(seed_width, seed_blocks, s_on, s_off) -> float:
    """The seed's arguments (see :func:`seed_logits`); returns ``float(seed_width)``."""
    seed_width = _check_unit("seed_width", seed_width)
    check_finite("s_on", s_on)
    check_finite("s_off", s_off)
    if not (s_on > 0 > s_off):
        raise ValueError(f"need s_on > 0 > s_off (on and off at the start), got s_on={s_on}, "
                         f"s_off={s_off}")
    if seed_blocks is not None and (isinstance(seed_blocks, bool) or not isinstance(
            seed_blocks, numbers.Integral) or seed_blocks < 1):
        raise ValueError(f"seed_blocks must be an int >= 1 or None, got {seed_blocks!r}")
    return seed_width


def seed_logits(spec: GateSpec, gated: set[str], gated_blocks: bool, seed_width: float = 0.25,
                seed_blocks: int | None = 1, s_on: float = 1.0, s_off: float = -1.0) -> dict:
    """Logits of the seed architecture: the first ``ceil(seed_width * n)`` channels of every gated
    group at ``s_on`` (> 0), the rest at ``s_off`` (< 0); in each stage the first blocks at
    ``s_on`` so that ``seed_blocks`` blocks are active counting the always-on downsampling block
    (``None``: every block on), the rest at ``s_off``."""
    seed_width = _check_seed(seed_width, seed_blocks, s_on, s_off)
    channels = {}
    for name, size in spec.groups:
        if name in gated:
            k = max(1, math.ceil(seed_width * size - 1e-9))
            channels[name] = jnp.where(jnp.arange(size) < k, s_on, s_off).astype(jnp.float32)
    blocks = {}
    if gated_blocks:
        seen: dict[int, int] = {}
        for block in spec.blocks:
            fixed = spec.ungated_blocks[block.stage] if spec.ungated_blocks else 0
            rank = seen.get(block.stage, 0)
            seen[block.stage] = rank + 1
            on = seed_blocks is None or rank + fixed < seed_blocks
            blocks[block.name] = jnp.asarray(s_on if on else s_off, jnp.float32)
    return {"channels": channels, "blocks": blocks}


def structured_sparsification(spec: GateSpec, *, budget: float = 0.5, lmbda: float = 1.0,
                              utilization: str = "flops", estimator: str = "straight_through",
                              channels: pselect.Selector | None = None, blocks: bool = True,
                              seed_width: float = 0.25, seed_blocks: int | None = 1,
                              s_on: float = 1.0, s_off: float = -1.0,
                              reference: GateSpec | None = None, penalize: str = "count") -> Transform:
    """The structured-sparsification transform (module doc; arXiv 2007.15353).

    Args:
      spec: :func:`gate_spec` of the model.
      budget: target utilization in (0, 1] (fraction of the full net's FLOPs or parameters).
      lmbda: ``lambda_base`` of the budget-aware penalty (>= 0).
      utilization: ``"flops"`` (inference FLOPs fraction, default) or ``"params"``.
      estimator: ``"straight_through"`` (default) or ``"scaled"``.
      channels: selector over layer kernels (path ``"BasicBlock_1/Conv_0/kernel"`` and shape, so
        ``pae.select.conv_kernels((3, 3))`` works): a channel group is gated when any layer writing
        it is selected (default every conv; :func:`gated_groups`). ``blocks``: gate blocks.
      seed_width, seed_blocks, s_on, s_off: the seed architecture (:func:`seed_logits`).
      reference: the spec whose full cost the utilization is a fraction of (default ``spec``; a
        compacted net passes the full net's, so ``u_t`` and the penalty keep their meaning).
      penalize: what ``lambda_t`` multiplies (module doc): ``"count"`` (default), the unweighted L1
        of the indicators as in CSQ's code, ``sum sigmoid(beta s) / N`` over every gated channel
        and block (``N`` their number in ``reference``), or ``"cost"``, the expected utilization
        ``C(sigmoid(beta s)) / C(full)``.

    ``init(params, key)`` returns a :class:`Gated` latent; ``apply`` samples (``ctx.train``) or
    thresholds the gates; ``finalize`` applies ``1[s > 0]``.
    """
    if not isinstance(spec, GateSpec):
        raise TypeError(f"spec must be a GateSpec (pae.growth.structured.gate_spec(model, example)), "
                        f"got {type(spec).__name__}")
    budget = _check_penalty(budget, lmbda, utilization)
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if penalize not in PENALTIES:
        raise ValueError(f"penalize must be one of {PENALTIES}, got {penalize!r}")
    select = pselect.everything() if channels is None else channels
    gated = gated_groups(spec, select)
    if not gated and not (blocks and spec.blocks):
        raise ValueError(f"no gateable layer selected: channels={select!r} matches no conv writing a "
                         f"channel group ({[layer.path for layer in spec.layers if layer.out_group]}) "
                         f"and blocks={blocks} with {len(spec.blocks)} gateable blocks")
    seed = seed_logits(spec, gated, bool(blocks), seed_width, seed_blocks, s_on, s_off)
    full = pflops.full_cost(spec if reference is None else reference, utilization)
    ref = spec if reference is None else reference
    indicators = sum(n for g, n in ref.groups if g in gated) + (len(ref.blocks) if blocks else 0)

    def relaxed(latent, beta):
        ch, bl = probabilities(latent.logits, beta)
        if penalize == "cost":
            return pflops.cost(spec, ch, bl, utilization) / full
        total = sum((jnp.sum(p) for p in (*ch.values(), *bl.values())), jnp.zeros((), jnp.float32))
        return total / indicators

    def init(params, key):
        del key
        ids = {g: jnp.arange(v.shape[0], dtype=jnp.float32) for g, v in seed["channels"].items()}
        return Gated(params, jax.tree.map(jnp.asarray, seed), ids)

    def apply(latent, ctx):
        ch, bl = gates(spec, latent.logits, ctx, estimator, latent.ids)
        return gate_params(spec, latent.weights, ch, bl)

    def penalty(latent, ctx):
        _check_ctx(ctx)
        used = pflops.cost(spec, *hard_gates(latent.logits), utilization) / full
        lam = jax.lax.stop_gradient(jnp.float32(lmbda) * (used - jnp.float32(budget)))
        return lam * relaxed(latent, ctx.beta)

    def finalize(latent, ctx):
        del ctx
        return gate_params(spec, latent.weights, *hard_gates(latent.logits))

    return Transform(init, apply, penalty, finalize)


def structured_metrics(spec: GateSpec, budget: float = 0.5, lmbda: float = 1.0,
                       utilization: str = "flops", reference: GateSpec | None = None):
    """``(state, ctx) -> row``: ``flops`` and ``params`` (fractions of the full net's, hard gates),
    ``train_flops`` (expected FLOPs fraction of the net sampled at ``ctx.beta``), ``channels``
    (active gated channels), ``blocks`` (active gated blocks) and ``lambda`` (``lambda_t``).
    Fractions are of ``reference``'s full cost (default ``spec``; the full net for a compacted one).
    ``budget``, ``lmbda`` and ``utilization`` are checked as by :func:`structured_sparsification`."""
    for name, value in (("spec", spec), ("reference", reference)):
        if value is not None and not isinstance(value, GateSpec):
            raise TypeError(f"{name} must be a GateSpec (pae.growth.structured.gate_spec(model, "
                            f"example)), got {type(value).__name__}")
    budget = _check_penalty(budget, lmbda, utilization)
    ref = spec if reference is None else reference
    full_f, full_p = pflops.full_cost(ref, "flops"), pflops.full_cost(ref, "params")

    def metrics(state, ctx):
        latent = state.params
        ch, bl = hard_gates(latent.logits)
        f = pflops.cost(spec, ch, bl, "flops") / full_f
        p = pflops.cost(spec, ch, bl, "params") / full_p
        used = f if utilization == "flops" else p
        expected = pflops.cost(spec, *probabilities(latent.logits, ctx.beta), "flops") / full_f
        count = sum((jnp.sum(v) for v in ch.values()), jnp.zeros((), jnp.float32))
        nblocks = sum((v for v in bl.values()), jnp.zeros((), jnp.float32))
        return {"flops": f, "params": p, "train_flops": expected, "channels": count,
                "blocks": nblocks, "lambda": jnp.float32(lmbda) * (used - jnp.float32(budget))}

    return metrics


# ----------------------------------------------------------------------------- phases

@dataclasses.dataclass(frozen=True)
class StructuredConfig:
    """Hyperparameters of the structured search (the choices where the paper is unverified are named).

    Weights: coupled L2 (``weight_decay``) then Nesterov SGD; mask logits: SGD with ``mask_lr`` (no
    decay); both decay by ``lr_decay`` at 56/85 and 71/85 of the epochs (the CS protocol). beta
    follows :func:`pae.sparsity.cs.temperature_schedule` over the ``epochs`` (``beta_final > 0``).
    Numeric fields must be real numbers (TypeError naming the field otherwise).
    """

    epochs: int = 160
    lr: float = 0.1
    mask_lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_decay: float = 0.1
    beta_final: float = 200.0
    budget: float = 0.5
    lmbda: float = 1.0
    utilization: str = "flops"
    estimator: str = "straight_through"
    penalize: str = "count"
    seed_width: float = 0.25
    seed_blocks: int | None = 1
    s_on: float = 1.0
    s_off: float = -1.0
    seed: int = 0

    def __post_init__(self):
        check_min_int("epochs", self.epochs, 1)
        for name in ("lr", "mask_lr", "momentum", "weight_decay", "lr_decay", "beta_final", "budget",
                     "lmbda", "seed_width", "s_on", "s_off"):
            v = getattr(self, name)
            if not (name == "mask_lr" and v is None) and (
                    isinstance(v, bool) or not isinstance(v, numbers.Real)):
                raise TypeError(f"StructuredConfig.{name} must be a real number"
                                f"{' or None' if name == 'mask_lr' else ''}, got {type(v).__name__} {v!r}")
        _check_unit("budget", self.budget)
        for name in ("lr", "momentum", "weight_decay", "lmbda", "lr_decay"):
            v = getattr(self, name)
            if not np.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be finite and >= 0, got {v}")
        if self.mask_lr is not None and (not np.isfinite(self.mask_lr) or self.mask_lr < 0):
            raise ValueError(f"mask_lr must be finite and >= 0 or None, got {self.mask_lr}")
        if not (np.isfinite(self.beta_final) and self.beta_final > 0):
            raise ValueError(f"beta_final must be finite and > 0 (the temperature schedule is "
                             f"beta_final ** (e / (E - 1))), got {self.beta_final}")
        _check_seed(self.seed_width, self.seed_blocks, self.s_on, self.s_off)
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise TypeError(f"StructuredConfig.seed must be an int, got {type(self.seed).__name__} "
                            f"{self.seed!r}")
        if self.utilization not in MEASURES:
            raise ValueError(f"utilization must be one of {MEASURES}, got {self.utilization!r}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if self.penalize not in PENALTIES:
            raise ValueError(f"penalize must be one of {PENALTIES}, got {self.penalize!r}")

    def transform(self, spec: GateSpec, channels: pselect.Selector | None = None,
                  blocks: bool = True, reference: GateSpec | None = None) -> Transform:
        return structured_sparsification(
            spec, budget=self.budget, lmbda=self.lmbda, utilization=self.utilization,
            estimator=self.estimator, channels=channels, blocks=blocks, seed_width=self.seed_width,
            seed_blocks=self.seed_blocks, s_on=self.s_on, s_off=self.s_off, reference=reference,
            penalize=self.penalize)


def structured_optimizer(cfg: StructuredConfig, steps_per_epoch: int, start_epoch: int = 0
                         ) -> optax.GradientTransformation:
    """Weights: L2 then Nesterov SGD; logits: SGD (``mask_lr``), both step-decayed; the schedule
    starts at ``start_epoch`` of the search (a segment after a compaction)."""
    bounds = {round(cfg.epochs * f) * steps_per_epoch: cfg.lr_decay for f in (56 / 85, 71 / 85)
              if 0 < round(cfg.epochs * f) < cfg.epochs}
    offset = start_epoch * steps_per_epoch

    def sgd(lr):
        base = optax.piecewise_constant_schedule(lr, bounds)
        return optax.sgd(lambda count: base(count + offset), momentum=cfg.momentum or None,
                         nesterov=cfg.momentum > 0)

    weights = sgd(cfg.lr)
    if cfg.weight_decay:
        weights = optax.chain(optax.add_decayed_weights(cfg.weight_decay), weights)
    return role_optimizer({"weights": weights, "mask": sgd(cfg.lr if cfg.mask_lr is None else cfg.mask_lr)})


def structured_phases(cfg: StructuredConfig, spec: GateSpec, *, channels: pselect.Selector | None = None,
                      blocks: bool = True, name: str = "search",
                      compactions: Sequence[tuple[int, Mapping[str, int]]] = (),
                      carry_optimizer: bool = True) -> list[Phase]:
    """The search as engine phases: ``cfg.epochs`` with the transform, the temperature context (beta
    per epoch of the whole search, key from ``cfg.seed``), the role optimizer and the metrics of
    :func:`structured_metrics`; keeps ``"searched"`` at the end. Start from
    ``init_state(spec.model, example, seed, cfg.transform(spec).init)``; extract afterwards with
    :func:`pae.growth.extraction.extract`.

    ``compactions``: ``[(epoch, widths), ...]``: at each ``epoch`` the search continues on the net
    compacted by :func:`pae.growth.extraction.compact` to ``widths`` (``{group: channels}``, fixed in
    advance, filled with the channels of largest logit: the active ones plus a growth margin), as a
    phase ``f"{name}{j}"`` whose ``model`` is the slim net (one more compilation each). With
    ``carry_optimizer`` (default) the optimizer state is sliced with the same channel sets
    (:func:`pae.growth.extraction.compact_state`: momentum carried, step count continuing); without
    it the optimizer restarts at a compaction (momentum dropped; the lr schedule continues). Masked
    full-size training with the dropped channels held off (and the optimizer state kept, or
    restarted) is its correctness oracle (tested). For widths decided during the run (active
    channels plus a margin, regrowth included) see :func:`structured_search`.
    """
    from pae.growth import extraction as pextract   # extract imports this module

    key = jax.random.PRNGKey(cfg.seed)
    cuts = [check_min_int("compactions: an epoch", e, 0) for e, _ in compactions]
    if cuts != sorted(set(cuts)) or any(not 0 < e < cfg.epochs for e in cuts):
        raise ValueError(f"compaction epochs must be increasing and in (0, epochs={cfg.epochs}), "
                         f"got {cuts}")
    bounds = [0] + cuts + [cfg.epochs]
    phases, current = [], spec
    shared = lambda spe: structured_optimizer(cfg, spe, 0)  # noqa: E731  (carried: the count goes on)
    for j in range(len(bounds) - 1):
        start, stop = bounds[j], bounds[j + 1]
        enter, model = None, spec.model
        if j:
            widths = dict(compactions[j - 1][1])
            check_widths(current, widths, gated_groups(current, channels))
            model = pextract.slim_model(current, {**current.group_sizes, **widths})
            enter = _compaction(current, widths, carry_optimizer)
            current = gate_spec(model, np.zeros(spec.example_shape, np.float32))
        optimizer = shared if carry_optimizer else \
            (lambda spe, start=start: structured_optimizer(cfg, spe, start))
        phases.append(_segment(cfg, spec, current, start, stop, name if not j else f"{name}{j}",
                               key, channels, blocks, enter, model, optimizer,
                               "keep" if j and carry_optimizer else "fresh"))
    return phases


def _segment(cfg, spec, current, start, stop, name, key, channels, blocks, enter, model, optimizer,
             optimizer_state, data_epochs_from=None) -> Phase:
    """Epochs ``[start, stop)`` of the search on ``current`` (a compacted net's spec, or ``spec``)."""
    t = cfg.transform(current, channels, blocks, reference=spec)

    def context(epoch):
        return Context.make(beta=temperature_schedule(start + epoch, cfg.epochs, cfg.beta_final),
                            key=jax.random.fold_in(key, start + epoch))

    return Phase(name, stop - start, optimizer, t, context, enter,
                 keep={stop - start: "searched"} if stop == cfg.epochs else {}, eval_every=1,
                 model=model, optimizer_state=optimizer_state, data_epochs_from=data_epochs_from,
                 metrics=structured_metrics(current, cfg.budget, cfg.lmbda, cfg.utilization,
                                            reference=spec))


def _compaction(spec: GateSpec, widths: Mapping[str, int], carry_optimizer: bool = True):
    from pae.growth import extraction as pextract

    def enter(state, snapshots):
        del snapshots
        return pextract.compact_state(spec, state, widths, carry_optimizer=carry_optimizer)[1]

    return enter


# ----------------------------------------------------------------------------- search with regrowth

class SearchResult(NamedTuple):
    """``state``: the final (compacted) state; ``spec``: the gate spec of its model (extract with
    ``extract(result.spec, result.state.params, result.state.batch_stats)``); ``history``: one row
    per epoch of the whole search (``width_flops``: the FLOPs fraction of the net actually
    trained, the compacted shapes; ``segment``); ``widths``: ``[(epoch, {group: width})]`` of every
    restructuring; ``full``: the full-size state the compacted one was last written into."""

    state: Any
    spec: GateSpec
    history: list
    widths: list
    full: Any


def _check_margin(margin) -> None:
    if isinstance(margin, bool) or not isinstance(margin, (numbers.Real, np.ndarray, np.generic)) \
            or not np.issubdtype(np.asarray(margin).dtype, np.number):
        raise TypeError(f"margin must be a number in [0, 1], got {margin!r}")
    check_finite("margin", margin)
    if not 0 <= margin <= 1:
        raise ValueError(f"margin must be in [0, 1], got {margin!r}")


def margin_widths(spec: GateSpec, latent: Gated, margin: float, multiple: int = 1) -> dict:
    """``{group: min(size, active + ceil(margin * size))}`` for every gated group of the full-net
    ``spec``, rounded up to a multiple of ``multiple`` (fewer distinct shapes, fewer compilations)."""
    _check_margin(margin)
    multiple = check_min_int("multiple", multiple, 1)
    sizes = spec.group_sizes
    out = {}
    for g, s in latent.logits["channels"].items():
        active = int(np.sum(np.asarray(s) > 0))
        w = active + math.ceil(margin * sizes[g] - 1e-9)
        w = multiple * math.ceil(max(w, 1) / multiple)
        out[g] = int(min(sizes[g], w))
    return out


def kept_channels(on: Any) -> np.ndarray:
    """The channel indices extraction keeps of a group whose active channels are the true entries
    of ``on``: those, or channel 0 alone (a zeroed placeholder that keeps the net connected) when
    none is. Extraction and :func:`fit_budget` count a group through this one rule."""
    on = np.asarray(on, bool)
    return np.flatnonzero(on) if on.any() else np.zeros(1, np.int64)


def fit_budget(spec: GateSpec, latent: Gated, budget: float, utilization: str = "flops",
               reference: GateSpec | None = None) -> Gated:
    """``latent`` with the weakest active indicators switched off until the utilization of the net
    :func:`pae.growth.extraction.extract` would give is at most ``budget``: one at a time, the active
    channel of smallest logit ``s`` across every gated group (its logit set to 0, off), every group
    keeping at least one; only when no group has a channel to spare, the active gated block of
    smallest logit. A group with no active channel counts one (extraction keeps a zeroed placeholder
    channel for it). The budget-aware penalty holds the utilization *near* the budget, on either
    side; this makes it a bound (:func:`structured_search` applies it when it settles). Returned
    unchanged when already within the budget; a ValueError when the budget is below the smallest
    net (one channel per group, no gated block). ``reference``: the spec the fraction is of
    (default ``spec``)."""
    budget = _check_unit("budget", budget)
    if utilization not in MEASURES:
        raise ValueError(f"utilization must be one of {MEASURES}, got {utilization!r}")
    full = pflops.full_cost(spec if reference is None else reference, utilization)
    logits = {g: np.array(v, np.float32) for g, v in latent.logits["channels"].items()}
    block_logits = {b: np.array(v, np.float32) for b, v in latent.logits["blocks"].items()}

    def extracted(v):
        on = np.zeros(v.shape, np.float32)
        on[kept_channels(v > 0)] = 1.0
        return on

    def used():
        return float(pflops.cost(spec, {g: extracted(v) for g, v in logits.items()},
                                 {b: np.float32(v > 0) for b, v in block_logits.items()},
                                 utilization)) / full

    changed = False
    while used() > budget + 1e-9:
        candidates = [(v[i], g, i) for g, v in logits.items() if np.sum(v > 0) > 1
                      for i in np.flatnonzero(v > 0)]
        if candidates:
            _, g, i = min(candidates)
            logits[g][i] = 0.0
        else:
            on = [(v, b) for b, v in block_logits.items() if v > 0]
            if not on:
                raise ValueError(f"budget={budget} is below the smallest net the search can settle "
                                 f"on (one channel per group, no gated block): {used():.4g}")
            block_logits[min(on)[1]] = np.float32(0.0)
        changed = True
    if not changed:
        return latent
    return latent.replace(logits={"channels": {g: jnp.asarray(v) for g, v in logits.items()},
                                  "blocks": {b: jnp.asarray(v) for b, v in block_logits.items()}})


PINNED_OFF = -1e4
"""The logit a settled search gives an indicator that is off: ``sigmoid(beta * s)`` is exactly 0 in
float32 for any ``beta >= 0.01``, so it is never sampled and gets no gradient."""


def settle(spec: GateSpec, latent: Gated, budget: float, utilization: str = "flops",
           reference: GateSpec | None = None) -> Gated:
    """``latent`` fitted to the budget (:func:`fit_budget`) with every indicator that is off
    (``s <= 0``), channel or block, pinned off (``s = PINNED_OFF``). A compacted net keeps every
    block, and a group's placeholder channel or (with ``multiple > 1``) spare ones, so without the
    pin the penalty could switch them back on below the budget and end above it; with it the
    settled net can only narrow."""
    latent = fit_budget(spec, latent, budget, utilization, reference)
    pin = lambda v: np.where(np.asarray(v) > 0, np.asarray(v), PINNED_OFF).astype(np.asarray(v).dtype)  # noqa: E731
    return latent.replace(logits={"channels": {g: pin(v) for g, v in latent.logits["channels"].items()},
                                  "blocks": {b: pin(v) for b, v in latent.logits["blocks"].items()}})


def structured_search(task, cfg: StructuredConfig, spec: GateSpec, state, *, batch_size: int,
                      restructure_at: Sequence[int] = (0,), margin: float | Sequence[float] = 0.25,
                      multiple: int = 1,
                      channels: pselect.Selector | None = None, blocks: bool = True,
                      name: str = "search", seed: int | None = None, log=None) -> SearchResult:
    """The search with periodic restructuring decided during the run: at every epoch of
    ``restructure_at`` (0 allowed: start from the seed plus the margin) the net is rebuilt at the
    widths :func:`margin_widths` gives (active channels plus ``margin`` of each group, so a group can
    grow by up to the margin before the next restructuring, and regrow past its previous width) by
    :func:`pae.growth.extraction.restructure`; the optimizer state is carried with the channels.
    Between restructurings the search trains the compacted net: training cost falls with the active
    FLOPs. Each segment is one :func:`pae.train.train_phases` call of the phase
    :func:`structured_phases` builds for those epochs (the temperature, key, lr schedule and data
    order continue as in one run); a new width compiles anew. A group can never be wider than the
    last restructuring made it: with a seed of fraction ``f`` and restructurings at epochs
    ``e_1 < ... < e_k`` it ends at most ``f + k * margin`` of its size, so restructure often enough
    (or with a margin large enough) for the budget's widths to fit, or the widths are capped rather
    than learned (masked full-size training, ``restructure_at=()``, has no cap). ``margin`` may be
    one per restructuring (in the order of ``restructure_at``): growth margins while the net grows,
    then ``0`` to *settle* (:func:`settle`): the net is cut to its active channels (``multiple`` does
    not apply), first trimmed to the budget by :func:`fit_budget` (the penalty holds it near the
    budget, on either side), everything off pinned off, and can only narrow after that, so the
    extracted net is within the budget; no growth margin may follow a settling one.

    ``state``: ``init_state(spec.model, example, seed, cfg.transform(spec, channels, blocks).init)``.
    ``seed``: the data order (default ``cfg.seed``).
    """
    from pae.growth import extraction as pextract
    from pae.train import engine

    epochs = [check_min_int("restructure_at: an epoch", e, 0) for e in restructure_at]
    if any(not 0 <= e < cfg.epochs for e in epochs):
        raise ValueError(f"restructure_at epochs must be in [0, epochs={cfg.epochs}), got "
                         f"{list(restructure_at)}")
    if np.ndim(margin) == 0:
        margins = {e: margin for e in epochs}
    else:
        margin = list(margin)
        if len(margin) != len(epochs) or len(set(epochs)) != len(epochs):
            raise ValueError(f"margin must be a number or one per restructuring of distinct epochs: got "
                             f"{len(margin)} margins for restructure_at={list(restructure_at)}")
        margins = dict(zip(epochs, margin))
    for m in margins.values():          # all of them before any training
        _check_margin(m)
    margins = {e: float(m) for e, m in margins.items()}
    cuts = sorted(margins)
    settled = [e for e in cuts if margins[e] == 0]
    if settled and any(margins[e] > 0 for e in cuts if e > settled[0]):
        raise ValueError(f"margin: a growth margin after the settling restructuring (margin 0 at epoch "
                         f"{settled[0]}) would regrow the settled net; settle last, got "
                         f"{[(e, margins[e]) for e in cuts]} as (epoch, margin)")
    check_min_int("multiple", multiple, 1)
    if not isinstance(state.params, Gated):
        raise TypeError("state.params must be the Gated latent of cfg.transform(spec).init "
                        "(pae.train.init_state(model, example, seed, cfg.transform(spec).init))")
    key = jax.random.PRNGKey(cfg.seed)
    seed = cfg.seed if seed is None else seed
    bounds = sorted(set([0] + cuts + [cfg.epochs]))
    full_cost = pflops.full_cost(spec)
    full, current, model = state, spec, spec.model
    optimizer = lambda spe: structured_optimizer(cfg, spe, 0)  # noqa: E731
    history, widths = [], []
    for j in range(len(bounds) - 1):
        start, stop = bounds[j], bounds[j + 1]
        if start in cuts:
            if full.opt_state is None and state.opt_state is not None:
                shapes = jax.eval_shape(optimizer(1).init, jax.tree.map(
                    lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), full.params))
                full = full.replace(opt_state=jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), shapes))
            if current is not spec:
                full = pextract.expand_state(spec, full, state)
            else:
                full = state
            if margins[start] == 0:
                full = full.replace(params=settle(spec, full.params, cfg.budget, cfg.utilization))
            w = margin_widths(spec, full.params, margins[start], multiple if margins[start] else 1)
            model, state = pextract.compact_state(spec, full, w)
            current = gate_spec(model, np.zeros(spec.example_shape, np.float32))
            widths.append((start, w))
        phase = _segment(cfg, spec, current, start, stop, name, key, channels, blocks, None,
                         model, optimizer, "keep" if state.opt_state is not None else "fresh",
                         data_epochs_from=start)
        out = engine.train_phases(task, [phase], state, batch_size=batch_size, seed=seed, log=log)
        state = engine.host(out.state)
        share = pflops.full_cost(current) / full_cost
        for row in out.history:
            history.append({**row, "epoch": row["epoch"] + start, "segment": j, "width_flops": share})
    if current is not spec:
        full = pextract.expand_state(spec, full, state)
    else:
        full = state
    return SearchResult(state, current, history, widths, full)
