"""Noise-injected mixed-precision quantization (SMOL, NeurIPS 2022 "Not All Bits have Equal Value";
SONIQ, arXiv 2311.14114): learned per-channel bit widths, two-level palettes, packed export.

Pieces: the deployed quantizer (:mod:`pae.quant.quantizer`: mid-rise, symmetric, per-channel, 1..8
bits, STE); phase 1 :func:`noise_injection` (a :class:`pae.Transform`; :class:`NoisyWeight` nodes
with a ``"bits"`` role); the transition :func:`assign_palette`; phase 2 :func:`palette_quantizer`
(:class:`QuantWeight` nodes); the phase list :func:`quant_phases` for :func:`pae.train.train_phases`;
and :func:`export` to ``pallas_kernels``'s packed format with a pure forward function.
Activations are not quantized yet (weights only; see ``docs`` of :func:`noise_injection`).
"""
from pae.quant.noise import (BUDGET_FORMS, EVAL_MODES, GRANULARITIES, NoisyWeight, QuantWeight, average_bits,
                             channel_range, learned_bits, noise_injection, palette_quantizer,
                             quantize_params, rounded_bits, size_penalty)
from pae.quant.export import Exported, PackedLayer, export, size_bytes
from pae.quant.palette import assign_palette, choose_palette, level_cost
from pae.quant.phases import QuantConfig, assign, noise_transform, quant_optimizer, quant_phases
from pae.quant.quantizer import (MAX_BITS, MIN_BITS, bits_from_logits, codes, max_abs_range, offset,
                                 quantize, step_size)

__all__ = [
    "BUDGET_FORMS", "EVAL_MODES", "Exported", "GRANULARITIES", "PackedLayer", "MAX_BITS", "MIN_BITS", "NoisyWeight", "QuantConfig", "QuantWeight",
    "assign", "assign_palette", "average_bits", "bits_from_logits", "channel_range",
    "choose_palette", "codes", "export", "learned_bits", "level_cost", "max_abs_range", "noise_injection",
    "noise_transform", "offset", "palette_quantizer", "quant_optimizer", "quant_phases",
    "quantize", "quantize_params", "rounded_bits", "size_bytes", "size_penalty", "step_size",
]
