"""Noise-injected mixed-precision quantization (SMOL, NeurIPS 2022 "Not All Bits have Equal Value";
SONIQ, arXiv 2311.14114): learned per-channel bit widths, two-level palettes, packed export.

Pieces: the deployed quantizer (:mod:`pae.quant.quantizer`: mid-rise, symmetric, per-channel, 1..8
bits, STE); phase 1 :func:`noise_injection` (a :class:`pae.Transform`; :class:`NoisyWeight` nodes
with a ``"bits"`` role); the transition :func:`assign_palette`; phase 2 :func:`palette_quantizer`
(:class:`QuantWeight` nodes); the phase list :func:`quant_phases` for :func:`pae.train.train_phases`;
and :func:`export` to ``pallas_kernels``'s packed format with a pure forward function.
Activations (:mod:`pae.quant.activations`): :func:`act_noise_injection` learns per-input-channel
activation widths of the same layers (:class:`NoisyAct`, then :class:`QuantAct`), a model wrapped by
:func:`quantize_activations` quantizes the inputs of those layers (running max-abs ranges in
``batch_stats``), and :func:`export` reproduces it; ``QuantConfig(activations=True)`` does it all.
Kernels are GEMMs: ``nn.Dense``, ``nn.Conv`` and ``nn.DenseGeneral`` (attention's projections; their
layouts from :func:`kernel_layouts`, ``QuantConfig(layouts=...)``), and lookup tables
(``nn.Embed``'s ``embedding``) are packed and dequantized where read. Chains: after sparsity
(``quant_phases(base=pae.sparsity.fixed_masks())``) and after sharing
(``quant_phases(inner=pae.sharing.templates(...))``, the combined kernels are quantized and exported).
"""
from pae.quant.activations import (GRIDS, ActQuantized, NoisyAct, QuantAct, act_noise_injection,
                                   act_size_penalty, average_act_bits, quantize_activations,
                                   with_act_stats)
from pae.quant.noise import (BUDGET_FORMS, EVAL_MODES, GRANULARITIES, NoisyWeight, QuantWeight, average_bits,
                             channel_range, kernel_layouts, learned_bits, noise_injection, palette_quantizer,
                             quantize_params, rounded_bits, size_penalty)
from pae.quant.export import Exported, PackedLayer, export, load_exported, save_exported, size_bytes
from pae.quant.palette import assign_palette, choose_palette, level_cost
from pae.quant.phases import QuantConfig, add_act_stats, assign, noise_transform, quant_optimizer, quant_phases
from pae.quant.quantizer import (MAX_BITS, MIN_BITS, bits_from_logits, codes, max_abs_range, offset,
                                 quantize, step_size)

__all__ = [
    "ActQuantized", "GRIDS", "NoisyAct", "QuantAct", "act_noise_injection", "act_size_penalty",
    "add_act_stats", "average_act_bits", "load_exported", "save_exported", "quantize_activations", "with_act_stats",
    "BUDGET_FORMS", "EVAL_MODES", "Exported", "GRANULARITIES", "PackedLayer", "MAX_BITS", "MIN_BITS", "NoisyWeight", "QuantConfig", "QuantWeight",
    "assign", "assign_palette", "average_bits", "bits_from_logits", "channel_range",
    "choose_palette", "codes", "export", "kernel_layouts", "learned_bits", "level_cost", "max_abs_range", "noise_injection",
    "noise_transform", "offset", "palette_quantizer", "quant_optimizer", "quant_phases",
    "quantize", "quantize_params", "rounded_bits", "size_bytes", "size_penalty", "step_size",
]
