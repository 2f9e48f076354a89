"""Cost accounting for structured gates: inference FLOPs and parameters of the active sub-network.

Every gated layer ``L`` (conv or dense, see :class:`pae.growth.structured.GatedLayer`) costs::

    FLOPs_L  = taps_L * a_in(L) * a_out(L) * g_block(L)
    params_L = (kernel_L * a_in(L) + bias_L + 2 * norm_L) * a_out(L) * g_block(L)

``taps_L`` is (output positions) x (kernel taps), so ``taps_L * C_in * C_out`` is the layer's
multiply-accumulates per example; ``a_in``/``a_out`` are the sums of the gates of the layer's input
and output channel groups (the full channel count for a fixed side: the image, the classes);
``g_block`` is the gate of the residual block the layer belongs to (1 outside blocks). FLOPs here
count multiply-accumulates of convs and dense layers only (BatchNorm, ReLU, pooling and the residual
adds are left out, as is usual for the CIFAR/ImageNet FLOPs tables). With hard gates (0/1) this is
the cost of the extracted net: a dropped channel removes its output slice *and* the next layer's
input slice. With probabilities ``p`` in place of gates it is the *expected* cost of the sampled
sub-network, exactly: every term is a product of distinct independent Bernoulli gates
(Yuan, Savarese & Maire, arXiv 2007.15353; the relaxed budget penalty uses it).

The accounting is per layer, so it holds for every layout :func:`pae.growth.structured.gate_spec`
knows, bottleneck ResNets included (a 1x1 conv has one tap; the stride of a bottleneck's 3x3 and of
its projection shortcut shows in their output positions; the projection's BatchNorm counts in the
parameters). ResNet-50 at 224x224: 4,089,184,256 multiply-accumulates and 25,557,032 parameters
with every gate on (torchvision's count; tested).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp

MEASURES = ("flops", "params")


def _sum(gates: Mapping[str, Any], group: str | None, size: int):
    if group is None or group not in gates:
        return jnp.float32(size)
    return jnp.sum(jnp.asarray(gates[group], jnp.float32))


def layer_costs(spec, channel_gates: Mapping[str, Any], block_gates: Mapping[str, Any],
                measure: str = "flops") -> dict[str, Any]:
    """``{layer path: cost}`` of every layer of ``spec`` under the given gates (groups or blocks
    missing from the mappings count as fully on)."""
    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {MEASURES}, got {measure!r}")
    out = {}
    for layer in spec.layers:
        a_in = _sum(channel_gates, layer.in_group, layer.in_size)
        a_out = _sum(channel_gates, layer.out_group, layer.out_size)
        g = jnp.float32(1.0) if layer.block is None or layer.block not in block_gates else \
            jnp.asarray(block_gates[layer.block], jnp.float32)
        if measure == "flops":
            out[layer.path] = jnp.float32(layer.taps) * a_in * a_out * g
        else:
            per_out = jnp.float32(layer.kernel_size) * a_in + int(layer.bias) + 2 * int(
                layer.norm is not None)
            out[layer.path] = per_out * a_out * g
    return out


def cost(spec, channel_gates: Mapping[str, Any], block_gates: Mapping[str, Any],
         measure: str = "flops"):
    """Total FLOPs (multiply-accumulates per example) or parameters of the gated layers."""
    total = jnp.zeros((), jnp.float32)
    for value in layer_costs(spec, channel_gates, block_gates, measure).values():
        total = total + value
    return total


def full_cost(spec, measure: str = "flops") -> float:
    """The cost with every gate on (the full net), as a host float."""
    return float(cost(spec, {}, {}, measure))


def training_flops(inference_flops, batch_size: int, steps: int, factor: float = 3.0):
    """Training FLOPs of ``steps`` steps: ``factor * batch_size * steps * inference_flops`` (forward
    plus backward ~ 3 forwards, the usual convention); ``inference_flops`` of the sampled net."""
    return factor * batch_size * steps * inference_flops
