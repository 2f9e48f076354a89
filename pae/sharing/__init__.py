"""Soft parameter sharing (Savarese & Maire, arXiv 1902.09701): template banks, recurrence, folding.

* ``templates(groups, k)``: a :class:`pae.Transform`; each group of same-shape layers becomes one
  bank ``T[k, ...]`` and one coefficient vector per layer, ``W_i = sum_j alpha_ij T_j``
  (coefficients have the role ``"coefficients"``: their own optimizer, no weight decay).
* ``swrn("SWRN-28-10-2")``: the official SWRN-L-w-k (a :class:`pae.models.WideResNet` and its
  transform with one bank per stage over blocks 2..N); ``wrn_groups(depth)``.
* ``layer_similarity(latent)`` / ``plot_similarity``: the per-group |cos| matrices (LSM).
* ``fold(cfg, latent, batch_stats, tol=...)``: coinciding blocks become real loops
  (:class:`pae.models.swrn.LoopedWideResNet`, ``nn.scan`` with per-repeat BatchNorm);
  ``with_repeats`` runs more iterations at test time. ``fold_unrolled``: a template-bank
  :class:`pae.models.looped.UnrolledNet` (algorithmic tasks) into one :class:`~pae.models.looped.LoopedNet`.
* ``pull_penalty`` (``templates(..., pull=)``): an optional regularizer pulling layers together.
* ``sharing_phases(cfg, transform)``: the official training recipe as a phase on the engine.
"""
from pae.sharing.bank import (COEFFICIENT_INITS, COEFFICIENTS, SharedKernel, SharedParams, build, coefficient_matrices,
                              combine, find_groups, group_by_shape, layer_paths, num_parameters,
                              pull_penalty, TEMPLATE_SOURCES, template_init, templates)
from pae.sharing.fold import MERGES, Folded, fold, fold_unrolled, with_repeats
from pae.sharing.phases import SharingConfig, sharing_optimizer, sharing_phases
from pae.sharing.similarity import layer_similarity, plot_similarity, similarity_matrix
from pae.sharing.swrn import STAGES, SWRN, swrn, wrn_groups

__all__ = ["COEFFICIENT_INITS", "COEFFICIENTS", "Folded", "MERGES", "STAGES", "SWRN", "SharedKernel", "SharedParams",
           "SharingConfig", "TEMPLATE_SOURCES", "build", "coefficient_matrices", "combine", "find_groups", "fold", "fold_unrolled",
           "group_by_shape", "layer_paths", "layer_similarity", "num_parameters", "plot_similarity",
           "pull_penalty", "sharing_optimizer", "sharing_phases", "similarity_matrix", "swrn",
           "template_init", "templates", "with_repeats", "wrn_groups"]
