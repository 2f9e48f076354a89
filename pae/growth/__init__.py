"""Network growth: train small, grow wide (Yuan, Savarese & Maire, arXiv 2306.12700).

* :func:`grow` (``pae.growth.vt``): a pure host-side function over the whole TrainState that widens
  every channel group with function-preserving pairs of new units, variance transfer of the old
  weights and BatchNorm statistics, and the optimizer state grown with ``optax.tree_map_params``.
* :func:`scale_by_birth_stage` (``pae.growth.lra``): learning-rate adaptation, element-wise, as an
  optax transformation holding the per-element birth stage.
* :func:`width_schedule`, :func:`stage_epochs` (``pae.growth.schedule``): the paper's schedules.
* :func:`vt_phases` (``pae.growth.phases``): the method as a list of engine phases.

Growable models: ``pae.models.growable`` (``GrowableResNet``, ``GrowableVGG``).
"""
from pae.growth.lra import BirthState, birth_scales, scale_by_birth_stage
from pae.growth.phases import VTConfig, stage_models, vt_phases
from pae.growth.schedule import round_even, stage_epochs, width_schedule
from pae.growth.vt import grow, resolve_widths, vt_factor

__all__ = ["BirthState", "VTConfig", "birth_scales", "grow", "resolve_widths", "round_even",
           "scale_by_birth_stage", "stage_epochs", "stage_models", "vt_factor", "vt_phases",
           "width_schedule"]
