"""Soft parameter sharing with template banks (Savarese & Maire, arXiv 1902.09701, ICLR 2019).

The layers of a *sharing group* G (kernels of one shape) are replaced by one bank of ``k``
templates ``T[k, ...]`` and one coefficient vector ``alpha_i`` in R^k per layer::

    W_i = sum_j alpha_ij T_j                    (rebuilt from T and alpha on every call, never cached)

Parameters per group: ``k |T| + |G| k`` instead of ``|G| |T|``. Initialization as in the official
code (lolemacs/soft-sharing): every template He-normal on its own (untruncated, std
``sqrt(2 / fan_in)`` with the fan-in of *one* template), each group's ``(|G|, k)`` coefficient
matrix orthogonal (gain 1; orthonormal rows when ``k >= |G|``, columns otherwise).

Latent layout: the root is a :class:`SharedParams` node ``(params, banks)``: ``params`` is the
original tree with every shared leaf replaced by a :class:`SharedKernel` node holding that layer's
coefficients (role ``"coefficients"``, so :func:`pae.core.role_optimizer` can give them their own
optimizer and no weight decay), ``banks`` maps a group name to its templates (role ``"weights"``).
Paths of unshared leaves are unchanged; a coefficient vector's path is ``"<leaf path>/coefficients"``
and a bank's is ``"<group>"``.
"""
from __future__ import annotations

import math
import numbers
import re
from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from pae.core import Transform, check_finite, check_min_int, latent_node, map_nodes, nodes, select as pselect

COEFFICIENTS = "coefficients"

#: ``kaiming_normal_`` per template: N(0, 2 / fan_in), untruncated; axis 0 (the template index) is a
#: batch axis, so the fan-in is that of one template
template_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal", batch_axis=(0,))


@latent_node({"coefficients": COEFFICIENTS})
class SharedKernel:
    """One shared layer: its coefficient vector ``alpha[k]`` over the bank of ``group``.

    ``group``, ``index`` (its row in the group's coefficient matrix) and ``path`` (the leaf it
    replaces) are static.
    """

    coefficients: Any
    group: str = flax.struct.field(pytree_node=False, default="")
    index: int = flax.struct.field(pytree_node=False, default=0)
    path: str = flax.struct.field(pytree_node=False, default="")


@latent_node({"params": "weights", "banks": "weights"})
class SharedParams:
    """The sharing latent: ``params`` (shared leaves are :class:`SharedKernel` nodes) and ``banks``
    (``{group: templates[k, *kernel_shape]}``)."""

    params: Any
    banks: Any


def combine(coefficients: jax.Array, bank: jax.Array) -> jax.Array:
    """``sum_j alpha_j T_j`` as a fixed-order sum of elementwise products (exact float32 on every
    backend: no matmul precision mode applies). ``coefficients [..., k]`` may carry leading axes only
    when ``bank`` does too."""
    coefficients, bank = jnp.asarray(coefficients), jnp.asarray(bank)
    lead = coefficients.ndim - 1
    if lead < 0 or bank.ndim <= lead or bank.shape[:lead + 1] != coefficients.shape:
        raise ValueError(f"combine: coefficients of shape {coefficients.shape} need a bank of shape "
                         f"{coefficients.shape} + kernel shape (leading axes, then the k templates), "
                         f"got bank of shape {bank.shape}")
    k = coefficients.shape[-1]
    bank = jnp.moveaxis(bank, lead, 0)                     # [k, *leading, *kernel]
    expand = (...,) + (None,) * (bank.ndim - 1 - lead)     # leading coefficient axes over the kernel
    w = coefficients[..., 0][expand] * bank[0]
    for j in range(1, k):
        w = w + coefficients[..., j][expand] * bank[j]
    return w


def _natural_key(path: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


Grouper = Callable[[str, Any], "str | None"]


def _as_grouper(groups) -> tuple[Grouper, list[str]]:
    """``(path, leaf) -> group name | None`` from a mapping of selectors or a function; the names
    declared up front (a mapping's keys, which must each match something)."""
    if isinstance(groups, pselect.Selector):
        groups = {"shared": groups}
    if isinstance(groups, Mapping):
        if not groups:
            raise ValueError("groups must name at least one group, got an empty mapping")
        for name, sel in groups.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"group names must be non-empty strings, got {name!r}")
            if not isinstance(sel, pselect.Selector):
                raise TypeError(f"groups[{name!r}] must be a pae.select selector, got {type(sel).__name__}")

        def grouper(path, leaf):
            hit = [name for name, sel in groups.items() if sel(path, leaf)]
            if len(hit) > 1:
                raise ValueError(f"leaf {path!r} is selected by several groups {hit}; a layer may "
                                 f"belong to one group only")
            return hit[0] if hit else None

        return grouper, list(groups)
    if callable(groups):
        return groups, []
    raise TypeError("groups must be a mapping {name: pae.select selector}, one selector, or a "
                    f"function (path, leaf) -> group name or None; got {type(groups).__name__}")


def group_by_shape(select: pselect.Selector | None = None, prefix: str = "") -> Grouper:
    """A grouper: every leaf ``select`` matches (default: conv kernels) joins the group of its
    shape, named ``"<prefix>3x3x64x64"``. Beyond the paper (e.g. all equal blocks of any net)."""
    select = pselect.conv_kernels() if select is None else select

    def grouper(path, leaf):
        if not select(path, leaf):
            return None
        return prefix + "x".join(str(d) for d in np.shape(leaf))

    return grouper


def find_groups(params: Any, groups) -> dict[str, list[tuple[str, Any]]]:
    """``{group: [(path, leaf), ...]}`` in natural path order (``Block_2`` before ``Block_10``),
    validated: every declared group matches >= 2 leaves of one shape and dtype."""
    grouper, declared = _as_grouper(groups)
    found: dict[str, list] = {}

    def visit(path, leaf):
        name = grouper(path, leaf)
        if name is not None:
            if not isinstance(name, str) or not name:
                raise ValueError(f"the grouper returned {name!r} for {path!r}; a group name must be a "
                                 f"non-empty string (None: not shared)")
            found.setdefault(name, []).append((path, leaf))
        return leaf

    pselect.map_selected(params, pselect.everything(), visit, what="params")
    paths = pselect.leaf_paths(params)
    for name in declared:
        if name not in found:
            shown = ", ".join(paths[:12]) + (f", ... ({len(paths)} in all)" if len(paths) > 12 else "")
            raise ValueError(f"sharing group {name!r} matches no leaf; available paths: {shown}")
    if not found:
        raise ValueError("the groups select no leaf: nothing to share")
    for name, members in found.items():
        members.sort(key=lambda m: _natural_key(m[0]))
        if len(members) < 2:
            raise ValueError(f"sharing group {name!r} has one layer ({members[0][0]!r}): a group of "
                             f"one layer shares nothing; select at least two layers or drop the group")
        shapes = {(p, tuple(np.shape(x)), str(jnp.result_type(x))) for p, x in members}
        if len({(s, d) for _, s, d in shapes}) > 1:
            listing = "; ".join(f"{p}: {s} {d}"
                                for p, s, d in sorted(shapes, key=lambda t: _natural_key(t[0])))
            raise ValueError(f"sharing group {name!r} mixes kernels of different shapes or dtypes "
                             f"({listing}); a group needs one kernel shape")
    return found


def _check_k(num_templates) -> int:
    if isinstance(num_templates, bool) or not isinstance(num_templates, numbers.Integral):
        raise TypeError(f"num_templates must be an int >= 1, got {num_templates!r}")
    if num_templates < 1:
        raise ValueError(f"num_templates must be >= 1, got {num_templates}")
    return int(num_templates)


def _check_named(per_group: Mapping, groups) -> None:
    """ValueError when a ``num_templates`` mapping names a group that is not among ``groups``."""
    unknown = sorted(set(per_group) - set(groups), key=str)
    if unknown:
        raise ValueError(f"num_templates names sharing groups {unknown} that match no group; "
                         f"groups found: {sorted(groups)}")


COEFFICIENT_INITS = ("orthogonal", "unit_rows")
TEMPLATE_SOURCES = ("he", "layers")


def templates(groups, num_templates: int | Mapping[str, int], *, pull: float = 0.0,
              pull_period: int = 1, coefficient_init: str = "orthogonal",
              templates_from: str = "he") -> Transform:
    """The soft-sharing transform: template banks + per-layer coefficients (arXiv 1902.09701).

    Args:
      groups: ``{name: selector}`` (each selector picks the layers of one group; e.g.
        :func:`pae.sharing.wrn_groups`), one selector (one group named ``"shared"``), or a function
        ``(path, leaf) -> group name | None`` (e.g. :func:`group_by_shape`). Layers are ordered by
        natural path order; row ``i`` of a group's coefficient matrix is its ``i``-th layer.
      num_templates: ``k`` >= 1 templates per bank (an int, or ``{group: k}`` naming only groups
        that exist).
      pull: weight of the optional recurrence regularizer :func:`pull_penalty` (0: off, the
        official code).
      pull_period: layers ``pull_period`` apart in a group are pulled together (2 for WRN groups,
        whose rows alternate conv1, conv2).
      coefficient_init: ``"orthogonal"`` (the official code): the ``L x k`` coefficient matrix has
        orthonormal columns, so a layer's coefficients have norm about ``sqrt(k / L)``; harmless when
        BatchNorm follows every shared conv (WRN), but without normalization (e.g. the looped nets
        of :mod:`pae.models.looped`) each layer starts ``sqrt(L / k)`` times smaller than its
        template's He init and the signal fades with depth. ``"unit_rows"`` (pae's option): the
        same matrix with each row scaled to norm 1 and signed so its first entry is positive, so
        every layer starts at its template's variance; with ``k = 1`` every layer starts equal to
        the template (the net is a loop at initialization).
      templates_from: ``"he"`` (the official code): templates drawn He-normal for one template's
        fan-in (:data:`template_init`). ``"layers"`` (pae's option): template ``j`` starts as the
        ``j``-th layer's own initial kernel, so the bank keeps the model's init scheme (e.g.
        PyTorch's default in :mod:`pae.models.looped`, whose unnormalized 16-iteration nets do not
        train from He-scale weights); needs ``k`` <= the group's layers. With ``"unit_rows"`` and
        ``k = 1`` the net starts as the loop of its first layer.

    ``apply``/``finalize``: the ordinary params with ``W_i = sum_j alpha_ij T_j``. ``init`` keeps the
    unshared leaves and draws templates and coefficients from ``key`` (the shared layers' own
    initial weights are dropped).
    """
    per_group = dict(num_templates) if isinstance(num_templates, Mapping) else None
    if per_group is None:
        _check_k(num_templates)
    else:
        for name, k in per_group.items():
            try:
                _check_k(k)
            except (TypeError, ValueError) as err:
                raise type(err)(f"num_templates[{name!r}]: {err}") from None
    _, declared = _as_grouper(groups)   # type errors at construction
    if per_group is not None and declared:
        _check_named(per_group, declared)
    check_finite("pull", pull)
    if float(pull) < 0:
        raise ValueError(f"pull must be >= 0, got {pull}")
    check_min_int("pull_period", pull_period, 1)
    if coefficient_init not in COEFFICIENT_INITS:
        raise ValueError(f"coefficient_init must be one of {COEFFICIENT_INITS}, got {coefficient_init!r}")
    if templates_from not in TEMPLATE_SOURCES:
        raise ValueError(f"templates_from must be one of {TEMPLATE_SOURCES}, got {templates_from!r}")

    def k_of(name):
        if per_group is None:
            return int(num_templates)
        if name not in per_group:
            raise ValueError(f"num_templates has no entry for sharing group {name!r}; given: "
                             f"{sorted(per_group)}")
        return int(per_group[name])

    def init(params, key):
        if key is None:
            raise ValueError("templates.init needs a PRNG key (templates and coefficients are random)")
        found = find_groups(params, groups)
        if per_group is not None:
            _check_named(per_group, found)
        banks, slots = {}, {}
        for g, (name, members) in enumerate(sorted(found.items())):
            k = k_of(name)
            shape, dtype = np.shape(members[0][1]), jnp.result_type(members[0][1])
            kt, kc = jax.random.split(jax.random.fold_in(key, g))
            if templates_from == "he":
                banks[name] = template_init(kt, (k,) + tuple(shape), dtype)
            elif k > len(members):
                raise ValueError(f"templates_from='layers' starts each template from a layer of the group, "
                                 f"but group {name!r} has {len(members)} layers for k={k} templates")
            else:
                banks[name] = jnp.stack([jnp.asarray(w, dtype) for _, w in members[:k]])
            alpha = nn.initializers.orthogonal()(kc, (len(members), k), jnp.float32)
            if coefficient_init == "unit_rows":
                sign = jnp.where(alpha[:, :1] < 0, -1.0, 1.0)
                alpha = sign * alpha / jnp.linalg.norm(alpha, axis=1, keepdims=True)
            alpha = alpha.astype(dtype)
            for i, (path, _) in enumerate(members):
                slots[path] = SharedKernel(alpha[i], name, i, path)
        shared = pselect.map_selected(params, pselect.Selector(lambda p, x: p in slots, "sharing groups"),
                                      lambda p, x: slots[p], what="groups")
        return SharedParams(shared, banks)

    def apply(latent, ctx):
        del ctx
        return build(latent)

    def penalty(latent, ctx):
        del ctx
        if not pull:
            return jnp.zeros((), jnp.float32)
        return jnp.asarray(pull, jnp.float32) * pull_penalty(latent, pull_period)

    return Transform(init, apply, penalty, lambda latent, ctx: build(latent))


def _root(latent) -> SharedParams:
    if not isinstance(latent, SharedParams):
        raise TypeError(f"expected a sharing latent (pae.sharing.SharedParams, from "
                        f"pae.sharing.templates(...).init), got {type(latent).__name__}")
    return latent


def build(latent: SharedParams) -> Any:
    """The ordinary params: every :class:`SharedKernel` replaced by ``sum_j alpha_j T_j`` of its bank."""
    latent = _root(latent)
    banks = latent.banks

    def weight(n: SharedKernel):
        if n.group not in banks:
            raise ValueError(f"layer {n.path!r} refers to bank {n.group!r}, which the latent lacks "
                             f"(banks: {sorted(banks)})")
        bank = banks[n.group]
        lead = n.coefficients.ndim - 1
        if bank.ndim <= lead or n.coefficients.shape[-1] != bank.shape[lead]:
            raise ValueError(f"layer {n.path!r} has {n.coefficients.shape[-1]} coefficients but bank "
                             f"{n.group!r} (shape {bank.shape}) has "
                             f"{bank.shape[lead] if bank.ndim > lead else 0} templates")
        return combine(n.coefficients.astype(bank.dtype), bank)

    return map_nodes(weight, latent.params, SharedKernel)


def _rows(latent: Any) -> dict[str, list[SharedKernel]]:
    rows: dict[str, list[SharedKernel]] = {}
    for n in nodes(latent, SharedKernel):
        rows.setdefault(n.group, []).append(n)
    return {name: sorted(members, key=lambda n: n.index) for name, members in sorted(rows.items())}


def layer_paths(latent: Any) -> dict[str, list[str]]:
    """``{group: [path of row 0, row 1, ...]}`` (works on abstract latents from ``jax.eval_shape``)."""
    return {name: [n.path for n in members] for name, members in _rows(latent).items()}


def coefficient_matrices(latent: Any) -> dict[str, tuple[list[str], jax.Array]]:
    """``{group: (layer paths, alpha [..., L, k])}``: each group's coefficient vectors stacked in
    row order (leading run axes of a parallel run are kept)."""
    return {name: ([n.path for n in members], jnp.stack([n.coefficients for n in members], axis=-2))
            for name, members in _rows(latent).items()}


def pull_penalty(latent: Any, period: int = 1) -> jax.Array:
    """Recurrence pull: ``sum_groups sum_i ||alpha_{i+p} - alpha_i||^2`` (``p = period``).

    A choice of this library (the paper's regularizer is unverified): squared distances with
    scale, because folding needs coefficients equal including scale (a conv feeding a residual sum
    with no normalization after it is not scale-free); zero exactly when every layer equals the
    layer ``p`` before it, i.e. when the group is a loop of period ``p`` (an int >= 1).
    """
    period = check_min_int("period", period, 1)
    total = jnp.zeros((), jnp.float32)
    for _, alpha in coefficient_matrices(latent).values():
        if alpha.shape[-2] > period:
            d = alpha[..., period:, :].astype(jnp.float32) - alpha[..., :-period, :].astype(jnp.float32)
            total = total + jnp.sum(d * d)
    return total


def num_parameters(tree: Any) -> int:
    """Number of scalars in the array leaves of ``tree`` (a latent counts banks and coefficients)."""
    return int(sum(math.prod(np.shape(x)) for x in jax.tree.leaves(tree)))


__all__ = ["COEFFICIENTS", "COEFFICIENT_INITS", "SharedKernel", "SharedParams", "TEMPLATE_SOURCES", "build",
           "coefficient_matrices", "combine", "find_groups", "group_by_shape", "layer_paths", "num_parameters", "pull_penalty",
           "template_init", "templates"]
