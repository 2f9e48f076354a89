"""Soft parameter sharing (Savarese & Maire, arXiv 1902.09701): template banks, SWRNs.

``templates(groups, k)`` is a :class:`pae.Transform` (``W_i = sum_j alpha_ij T_j``, one bank per
group, one coefficient vector per layer); ``swrn("SWRN-28-10-2")`` names the official SWRN-L-w-k
configurations (a :class:`pae.models.WideResNet` and its transform with the official groups).
"""
from pae.sharing.bank import (COEFFICIENTS, SharedKernel, SharedParams, build, coefficient_matrices,
                              combine, find_groups, group_by_shape, layer_paths, num_parameters,
                              pull_penalty, template_init, templates)
from pae.sharing.fold import MERGES, Folded, fold, with_repeats
from pae.sharing.similarity import layer_similarity, plot_similarity, similarity_matrix
from pae.sharing.swrn import STAGES, SWRN, swrn, wrn_groups

__all__ = ["COEFFICIENTS", "Folded", "MERGES", "STAGES", "SWRN", "SharedKernel", "SharedParams", "build",
           "coefficient_matrices", "combine", "find_groups", "group_by_shape", "layer_paths",
           "layer_similarity", "num_parameters", "plot_similarity", "pull_penalty",
           "similarity_matrix", "swrn", "template_init", "templates", "with_repeats", "wrn_groups",
           "fold"]
