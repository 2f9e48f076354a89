"""Selectors: which leaves of a parameter tree a transform touches, chosen by (path, leaf).

A path is a string such as ``"BasicBlock_0/Conv_0/kernel"``: dict keys and attribute names joined by
``/``, with NNX's trailing ``.value`` dropped (so Linen ``variables['params']`` and ``nnx.State``
give the same paths). Inside a latent node the field that carries the original weight keeps the
node's path; other fields append their name (``"Dense_0/kernel/logits"``), so a selector written for
plain parameters still finds the weights after an earlier transform.

Selectors compose with ``&``, ``|`` and ``~``; ``sel.exclude(other)`` is ``sel & ~other``.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Iterable

import jax
from jax.tree_util import DictKey, FlattenedIndexKey, GetAttrKey, SequenceKey

from pae.core import nodes as pnodes


class Selector:
    """A predicate ``(path: str, leaf) -> bool`` with a readable name for error messages."""

    def __init__(self, fn: Callable[[str, Any], bool], name: str):
        self._fn = fn
        self.name = name

    def __call__(self, path: str, leaf: Any) -> bool:
        return bool(self._fn(path, leaf))

    def __and__(self, other: "Selector") -> "Selector":
        _check_selector("other", other)
        return Selector(lambda p, x: self(p, x) and other(p, x), f"({self.name} & {other.name})")

    def __or__(self, other: "Selector") -> "Selector":
        _check_selector("other", other)
        return Selector(lambda p, x: self(p, x) or other(p, x), f"({self.name} | {other.name})")

    def __invert__(self) -> "Selector":
        return Selector(lambda p, x: not self(p, x), f"~{self.name}")

    def exclude(self, *others: "Selector") -> "Selector":
        return self & ~any_of(*others) if others else self

    def __repr__(self) -> str:
        return self.name


def _check_selector(name: str, value: Any) -> None:
    if not isinstance(value, Selector):
        raise TypeError(f"{name} must be a pae.select.Selector (e.g. pae.select.kernels()); wrap a "
                        f"function with Selector(fn, name), got {type(value).__name__}")


def _ndim(leaf) -> int:
    return len(getattr(leaf, "shape", ()))


def everything() -> Selector:
    """Every array leaf."""
    return Selector(lambda p, x: True, "everything()")


def kernels() -> Selector:
    """Dense and conv kernels: leaves named ``kernel`` with ``ndim >= 2`` (no biases, no BN)."""
    return Selector(lambda p, x: p.rsplit("/", 1)[-1] == "kernel" and _ndim(x) >= 2, "kernels()")


_ATTENTION = re.compile(r"(^|/)[^/]*Attention[^/]*/")


def conv_kernels(spatial: tuple[int, ...] | None = None) -> Selector:
    """Conv kernels, optionally only those of spatial size ``spatial`` (e.g. ``(3, 3)``: the 3x3
    convs of a ResNet, not its 1x1 shortcuts).

    Chosen by name and shape: leaves named ``kernel`` with ``ndim >= 3``, except those inside a
    module whose name contains ``Attention`` (flax's attention projections are 3-D DenseGeneral
    kernels). Another DenseGeneral with a 3-D kernel matches too: ``.exclude(path(...))`` it."""

    def pred(p, x):
        if p.rsplit("/", 1)[-1] != "kernel" or _ndim(x) < 3 or _ATTENTION.search(p):
            return False
        return spatial is None or tuple(x.shape[:-2]) == tuple(spatial)

    return Selector(pred, f"conv_kernels({spatial!r})" if spatial else "conv_kernels()")


def path(regex: str) -> Selector:
    """Leaves whose path matches ``regex`` anywhere (``re.search``)."""
    try:
        pattern = re.compile(regex)
    except re.error as err:
        raise ValueError(f"path regex {regex!r} is invalid: {err}") from err
    return Selector(lambda p, x: pattern.search(p) is not None, f"path({regex!r})")


def ndim(*values: int, min: int | None = None, max: int | None = None) -> Selector:  # noqa: A002
    """Leaves whose ``ndim`` is one of ``values`` and/or within ``[min, max]``."""
    if not values and min is None and max is None:
        raise ValueError("ndim needs values or min/max, got none")
    if min is not None and max is not None and min > max:
        raise ValueError(f"ndim needs min <= max, got min={min}, max={max}")

    def pred(p, x):
        n = _ndim(x)
        return ((not values or n in values) and (min is None or n >= min)
                and (max is None or n <= max))

    parts = [repr(v) for v in values] + [f"{k}={v}" for k, v in (("min", min), ("max", max))
                                          if v is not None]
    return Selector(pred, f"ndim({', '.join(parts)})")


def any_of(*selectors: Selector) -> Selector:
    """What any of ``selectors`` matches."""
    if not selectors:
        raise ValueError("any_of needs at least one selector, got none")
    for i, s in enumerate(selectors):
        _check_selector(f"selectors[{i}]", s)
    out = selectors[0]
    for s in selectors[1:]:
        out = out | s
    return out


def exclude(*selectors: Selector) -> Selector:
    """Everything except what any of ``selectors`` matches."""
    if not selectors:
        raise ValueError("exclude needs at least one selector")
    return ~any_of(*selectors)


def _key_str(k) -> str | None:
    if isinstance(k, DictKey):
        return str(k.key)
    if isinstance(k, GetAttrKey):
        return k.name
    if isinstance(k, SequenceKey):
        return str(k.idx)
    if isinstance(k, FlattenedIndexKey):
        return str(k.key)
    return str(k)


def path_str(keypath: Iterable) -> str:
    """``"a/b/kernel"`` from a jax key path, dropping NNX's ``GetAttrKey('value')``."""
    keys = list(keypath)
    if keys and isinstance(keys[-1], GetAttrKey) and keys[-1].name == "value":
        keys = keys[:-1]
    return "/".join(_key_str(k) for k in keys)


def leaf_paths(tree: Any) -> list[str]:
    """Paths of every leaf (inside latent nodes too, with the naming rule of this module)."""
    out = []
    _walk(tree, lambda p, x: out.append(p) or x)
    return out


def _walk(tree: Any, fn: Callable[[str, Any], Any], prefix: str = "") -> Any:
    """Map ``fn(path, leaf)`` over leaves; descends into latent nodes using the naming rule."""

    def visit(keypath, x):
        p = "/".join(s for s in (prefix, path_str(keypath)) if s)
        if pnodes.is_node(x):
            new = {}
            for name, role in pnodes.roles_of(x).items():
                sub = p if role == pnodes.WEIGHTS else f"{p}/{name}"
                new[name] = _walk(getattr(x, name), fn, sub)
            return x.replace(**new)
        return fn(p, x)

    return jax.tree_util.tree_map_with_path(visit, tree, is_leaf=pnodes.is_node)


def map_selected(tree: Any, selector: Selector, fn: Callable[[str, Any], Any], *,
                 what: str = "select") -> Any:
    """Replace every leaf the selector matches by ``fn(path, leaf)``; ValueError if none matches."""
    if not isinstance(selector, Selector):
        raise ValueError(f"{what} must be a pae.select selector, got {selector!r}")
    hits = []

    def visit(p, x):
        if selector(p, x):
            hits.append(p)
            return fn(p, x)
        return x

    out = _walk(tree, visit)
    if not hits:
        paths = leaf_paths(tree)
        shown = ", ".join(paths[:12]) + (f", ... ({len(paths)} in all)" if len(paths) > 12 else "")
        raise ValueError(f"{what}={selector!r} matches no leaf; available paths: {shown or 'none'}")
    return out
