"""Latent nodes: small pytree dataclasses that replace selected leaves of a parameter tree.

A node type declares the *role* of each field (``weight -> "weights"``, ``logits -> "mask"`` ...).
:func:`label_roles` turns a latent tree into the same-structure tree of role strings, which is what
``optax.multi_transform`` takes to give each role its own optimizer; every leaf outside a node is a
``"weights"`` leaf. A field with role ``"weights"`` may itself hold a node (chained transforms): its
roles are resolved recursively.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax
import jax
import optax

WEIGHTS = "weights"
#: role of fields that are data, never trained (:func:`role_optimizer` gives them ``set_to_zero``)
FROZEN = "frozen"


def latent_node(roles: Mapping[str, str]):
    """Class decorator: make a ``flax.struct.dataclass`` whose fields have the given roles.

    Every field must have a role; ``"weights"`` marks the field that carries the original leaf.
    Static fields (``flax.struct.field(pytree_node=False)``) are not leaves and take no role.
    """

    def wrap(cls):
        cls = flax.struct.dataclass(cls)
        fields = [f.name for f in dataclasses.fields(cls) if f.metadata.get("pytree_node", True)]
        if sorted(fields) != sorted(roles):
            raise TypeError(f"{cls.__name__}: roles {sorted(roles)} must name every field {fields}")
        cls.__pae_roles__ = dict(roles)
        return cls

    return wrap


def is_node(x: Any) -> bool:
    """Whether ``x`` is a latent node (an instance of a :func:`latent_node` class)."""
    return hasattr(type(x), "__pae_roles__")


def roles_of(node: Any) -> dict[str, str]:
    return dict(type(node).__pae_roles__)


def label_roles(latent: Any) -> Any:
    """Same-structure tree of role strings: node fields get their declared role, other leaves "weights"."""

    def label(x):
        if not is_node(x):
            return WEIGHTS
        out = {}
        for name, role in roles_of(x).items():
            value = getattr(x, name)
            out[name] = label_roles(value) if role == WEIGHTS else jax.tree.map(lambda _: role, value)
        return x.replace(**out)

    return jax.tree.map(label, latent, is_leaf=is_node)


def role_optimizer(transforms: Mapping[str, optax.GradientTransformation]
                   ) -> optax.GradientTransformation:
    """``optax.multi_transform`` keyed by role; ``"frozen"`` defaults to ``set_to_zero``.

    A role present in the latent but missing from ``transforms`` raises ValueError at ``init``.
    """
    transforms = {FROZEN: optax.set_to_zero(), **transforms}

    def labels(latent):
        tree = label_roles(latent)
        missing = sorted(set(jax.tree.leaves(tree)) - set(transforms))
        if missing:
            raise ValueError(f"transforms has no optimizer for role(s) {missing}; "
                             f"given: {sorted(transforms)}")
        return tree

    return optax.multi_transform(transforms, labels)


def map_nodes(fn, tree: Any, node_type: type | tuple[type, ...] | None = None) -> Any:
    """Apply ``fn`` to every latent node (of ``node_type``, if given); other leaves pass through.

    Nodes of other types are searched recursively (a node nested in a field of another node, as
    chained transforms build, is found).
    """

    def visit(x):
        if not is_node(x):
            return x
        if node_type is None or isinstance(x, node_type):
            return fn(x)
        return x.replace(**{f: map_nodes(fn, getattr(x, f), node_type) for f in roles_of(x)})

    return jax.tree.map(visit, tree, is_leaf=is_node)


def nodes(tree: Any, node_type: type | tuple[type, ...] | None = None) -> list:
    """The latent nodes of ``tree`` (of ``node_type``, if given), in tree order."""
    out = []
    for x in jax.tree.leaves(tree, is_leaf=is_node):
        if not is_node(x):
            continue
        if node_type is None or isinstance(x, node_type):
            out.append(x)
        else:
            out.extend(n for f in roles_of(x) for n in nodes(getattr(x, f), node_type))
    return out
