"""Network growth: train small, grow wide (Yuan, Savarese & Maire, arXiv 2306.12700), and grow from a
seed under a budget by structured continuous sparsification (Yuan, Savarese & Maire, arXiv 2007.15353).

* :func:`grow` (``pae.growth.vt``): a pure host-side function over the whole TrainState that widens
  every channel group with function-preserving pairs of new units, variance transfer of the old
  weights and BatchNorm statistics, and the optimizer state grown with ``optax.tree_map_params``.
* :func:`scale_by_birth_stage` (``pae.growth.lra``): learning-rate adaptation, element-wise, as an
  optax transformation holding the per-element birth stage.
* :func:`width_schedule`, :func:`stage_epochs` (``pae.growth.schedule``): the paper's schedules.
* :func:`vt_phases` (``pae.growth.phases``): the method as a list of engine phases.

* :func:`structured_sparsification` (``pae.growth.structured``): channel and block gates sampled from
  ``sigmoid(beta*s)``, a budget-aware penalty, a seed architecture; :func:`structured_phases`;
  :func:`structured_search` (training the compacted net, restructured to active channels + margin).
* :func:`cost`, :func:`training_flops` (``pae.growth.flops``): FLOPs of the active channels and blocks.
* :func:`extract`, :func:`compact` (``pae.growth.extraction``): the smaller dense net, equal logits;
  :func:`compact_state`, :func:`restructure`: the whole train state, optimizer momentum carried.

Growable models: ``pae.models.growable`` (``GrowableResNet``, ``GrowableVGG``,
``GrowableMobileNetV1``); extracted ones: ``pae.models.slim`` (``SlimResNet``, ``SlimBottleneckResNet``, ``SlimVGG``).
"""
from pae.growth.extraction import (Extracted, channel_sets, compact, compact_state, expand_state, extract,
                                   extract_masked, restructure, slim_model)
from pae.growth.flops import cost, full_cost, layer_costs, training_flops
from pae.growth.structured import (BlockGate, Gated, GatedLayer, GateSpec, SearchResult, StructuredConfig,
                                   gate_params, gate_spec, gates, hard_gates, margin_widths,
                                   probabilities, seed_logits, structured_metrics, structured_optimizer,
                                   structured_phases, structured_search, structured_sparsification,
                                   uniforms)
from pae.growth.lra import BirthState, birth_scales, scale_by_birth_stage
from pae.growth.phases import VTConfig, stage_models, vt_phases
from pae.growth.schedule import round_even, stage_epochs, width_schedule
from pae.growth.vt import grow, grow_gradmax, grow_net2net, resolve_widths, vt_factor

__all__ = ["BirthState", "BlockGate", "Extracted", "GateSpec", "Gated", "GatedLayer", "SearchResult",
           "StructuredConfig", "compact_state", "expand_state", "margin_widths", "restructure",
           "structured_search",
           "VTConfig", "birth_scales", "channel_sets", "compact", "cost", "extract", "extract_masked",
           "full_cost", "gate_params", "gate_spec", "gates", "grow", "grow_gradmax", "grow_net2net", "hard_gates", "layer_costs",
           "probabilities", "resolve_widths", "round_even", "scale_by_birth_stage", "seed_logits",
           "slim_model", "stage_epochs", "stage_models", "structured_metrics", "structured_optimizer",
           "structured_phases", "structured_sparsification", "training_flops", "uniforms",
           "vt_factor", "vt_phases", "width_schedule"]
