"""Continuous Sparsification (arXiv 1912.04427): soft masks, ticket search, and the IMP baseline.

``continuous_sparsification(select, s_init, lmbda, scaled)`` is a :class:`pae.Transform`; the pure
pieces (:func:`temperature_schedule`, :func:`reset_logits`, :func:`to_ticket`, :func:`rewind`,
:func:`density`, :func:`magnitude_prune`) compose into the phase lists of :mod:`pae.sparsity.search`
(:func:`cs_phases`, :func:`ticket_phase`, :func:`imp_phases`, :func:`dense_phases`), which run on the
one engine, :func:`pae.train.train_phases`.
"""
from pae.sparsity.cs import (RESET_RULES, continuous_sparsification, hard_mask, reset_logits, rewind,
                             soft_mask, temperature_schedule, to_ticket, with_s_init)
from pae.sparsity.imp import SCOPES, magnitude_prune, rounds_for_density, with_unit_masks
from pae.sparsity.masks import (FixedMask, SoftMask, attach_masks, check_shapes, density, fixed_masks,
                                layer_densities, mask_tree, masked_count, masked_params)
from pae.sparsity.search import (PAPER_CIFAR, TICKET_MASKS, SearchConfig, SearchResult, cs_optimizer,
                                 cs_phases, cs_search, cs_ticket, dense_phases, imp_phases, imp_search,
                                 make_task, random_reinit, round_schedule, ticket_optimizer,
                                 ticket_phase, train_dense, train_ticket)

#: alias: the CS ticket search driver
ticket_search = cs_search

__all__ = [
    "FixedMask", "PAPER_CIFAR", "RESET_RULES", "SCOPES", "SearchConfig", "SearchResult", "SoftMask",
    "TICKET_MASKS", "attach_masks", "check_shapes", "continuous_sparsification", "cs_optimizer",
    "cs_phases", "cs_search", "cs_ticket", "dense_phases", "density", "fixed_masks", "hard_mask",
    "imp_phases", "imp_search", "layer_densities", "magnitude_prune", "make_task", "mask_tree",
    "masked_count", "masked_params", "random_reinit", "reset_logits", "rewind", "round_schedule",
    "rounds_for_density", "soft_mask", "temperature_schedule", "ticket_optimizer", "ticket_phase",
    "ticket_search", "to_ticket", "train_dense", "train_ticket", "with_s_init", "with_unit_masks",
]
