"""The transform protocol, composition, leaf selection and context (knows nothing of any method).

A transform turns ordinary parameters into a trained *latent* pytree and back; see
:class:`Transform`, :func:`chain`, :class:`Context`, the selectors in :mod:`pae.core.select` and the
latent-node roles (:func:`label_roles`, :func:`role_optimizer`) that give each role its optimizer.
"""
from pae.core import select
from pae.core.context import Context, check_finite, check_min_int, check_positive
from pae.core.nodes import (FROZEN, WEIGHTS, is_node, label_roles, latent_node, map_nodes, nodes,
                            role_optimizer, roles_of)
from pae.core.select import Selector, leaf_paths, map_selected, path_str
from pae.core.transform import Transform, chain, identity

__all__ = ["Context", "FROZEN", "Selector", "Transform", "WEIGHTS", "chain", "check_finite", "check_min_int", "check_positive",
           "identity", "is_node", "label_roles", "latent_node", "leaf_paths", "map_nodes",
           "map_selected", "nodes", "path_str", "role_optimizer", "roles_of", "select"]
