"""Folding a soft-shared WRN into a network with real loops (Savarese & Maire, arXiv 1902.09701).

If consecutive shared blocks of a stage have the same coefficients, they compute the same function
of their input up to their own BatchNorms: the stage is a loop. :func:`fold` turns every run of such
blocks into one :class:`pae.models.swrn.SharedLoop` (one kernel pair under ``nn.scan``, each repeat
keeping its own BatchNorm parameters and statistics), giving a :class:`LoopedWideResNet`.

Which blocks coincide (block b joins the run that starts at block a): for each conv c of the block,
``||alpha_bc - alpha_ac|| <= tol * ||alpha_ac||`` (relative, including scale and sign). Scale is not
free everywhere: conv2 feeds the residual sum with no normalization after it, so ``alpha`` and
``2 alpha`` are different layers there. conv1 is followed by a BatchNorm, which absorbs a factor
``c`` up to its epsilon: with ``absorb_scale=True`` conv1 is compared by direction
(``||alpha_b1 - c alpha_a1|| <= tol ||alpha_b1||``, ``c = <alpha_b1, alpha_a1> / ||alpha_a1||^2``)
and the factor moves into that repeat's BatchNorm (running mean / c, variance / c^2, scale *
sign(c)): exact in evaluation up to ``eps`` (``var + eps`` becomes ``var + c^2 eps``), and in
training up to the same ``eps`` term. The run's kernels use the merged coefficients (``merge``:
``"mean"`` of the run's, scale-normalized conv1 rows when absorbing, or ``"first"``, the run's first
block's). When the coefficients of a run are equal, ``merge="first"`` folds with no change at all:
the folded net computes the soft net's function (test: equal outputs).

Left open by the paper (folding procedure unverified): this is the library's rule; the accuracy
change after folding must be measured, not assumed.
"""
from __future__ import annotations

import dataclasses
import operator
import warnings
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from pae.models.swrn import LoopedWideResNet
from pae.sharing.bank import SharedParams, build, coefficient_matrices, combine
from pae.sharing.swrn import STAGES, SWRN

MERGES = ("mean", "first")


@dataclasses.dataclass(frozen=True)
class Folded:
    """``model`` (a :class:`LoopedWideResNet`) and its ``variables`` (``params``, ``batch_stats``);
    ``runs``: per stage, the shared blocks (0-based within the stage's blocks 2..N) of each loop;
    ``distances``: per stage, the relative distance of each shared block to its run's first block
    (max over its two convs; 0 for the first block of a run)."""

    model: LoopedWideResNet
    variables: dict
    runs: tuple
    distances: dict


def _check_tol(tol) -> None:
    if isinstance(tol, (bool, str, bytes)) or np.ndim(tol) != 0 or not np.isrealobj(tol):
        raise TypeError(f"tol must be a real number >= 0, got {type(tol).__name__} {tol!r}")
    try:
        tol = float(tol)
    except (TypeError, ValueError):
        raise TypeError(f"tol must be a real number >= 0, got {type(tol).__name__} {tol!r}") from None
    if not np.isfinite(tol) or tol < 0:
        raise ValueError(f"tol must be finite and >= 0, got {tol!r}")


def _check_batch_stats(cfg: SWRN, batch_stats) -> None:
    """TypeError unless ``batch_stats`` is a mapping; ValueError unless its paths and shapes are
    those of ``cfg.model``'s BatchNorm statistics (shapes from ``jax.eval_shape``: nothing runs)."""
    if not isinstance(batch_stats, Mapping):
        raise TypeError(f"batch_stats must be the soft net's BatchNorm statistics, a mapping "
                        f"(variables['batch_stats'] of {cfg.name}), got {type(batch_stats).__name__}")
    want = jax.eval_shape(lambda: cfg.model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3))))
    flat = traverse_util.flatten_dict
    want = {"/".join(k): tuple(v.shape) for k, v in flat(dict(want["batch_stats"])).items()}
    got = {"/".join(map(str, k)): tuple(np.shape(v)) for k, v in flat(dict(batch_stats)).items()}
    if got != want:
        missing = sorted(set(want) - set(got))
        extra = sorted(set(got) - set(want))
        shapes = [f"{k}: {got[k]} (want {want[k]})" for k in sorted(set(got) & set(want))
                  if got[k] != want[k]]
        parts = [f"{label} {v[:4]}{' ...' if len(v) > 4 else ''}"
                 for label, v in (("missing", missing), ("unexpected", extra), ("wrong shapes", shapes)) if v]
        raise ValueError(f"batch_stats does not match the BatchNorm statistics of {cfg.name} "
                         f"(one run, variables['batch_stats']): {'; '.join(parts)}")


def _rel(x, ref):
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), np.finfo(np.float64).tiny))


def _direction(x, ref):
    """(relative residual of x against the line of ref, the factor c with x ~ c ref)."""
    nref = float(ref @ ref)
    c = float(x @ ref) / nref if nref > 0 else 0.0
    return float(np.linalg.norm(x - c * ref) / max(np.linalg.norm(x), np.finfo(np.float64).tiny)), c


def fold(cfg: SWRN, latent: SharedParams, batch_stats: Any, *, tol: float = 1e-3, merge: str = "mean",
         absorb_scale: bool = False) -> Folded:
    """The looped network of a trained SWRN (see the module doc for the rule and the scale issue).

    Args:
      cfg: the :class:`pae.sharing.SWRN` the latent belongs to.
      latent: its template-bank latent (one run: no leading run axis).
      batch_stats: the soft net's BatchNorm statistics (``variables['batch_stats']``, one run:
        paths and shapes those of ``cfg.model``).
      tol: relative tolerance under which two blocks' coefficients coincide (>= 0).
      merge: ``"mean"`` or ``"first"``: the coefficients of a loop's kernels.
      absorb_scale: compare conv1 by direction and move its factor into the repeat's BatchNorm.

    A stage whose shared blocks all stay apart triggers a ``UserWarning`` naming the stage and its
    closest pair; nothing is merged silently.
    """
    if not isinstance(cfg, SWRN):
        raise TypeError(f"cfg must be a pae.sharing.SWRN (pae.sharing.swrn('SWRN-28-10-2')), got "
                        f"{type(cfg).__name__}")
    if merge not in MERGES:
        raise ValueError(f"merge must be one of {MERGES}, got {merge!r}")
    _check_tol(tol)
    _check_batch_stats(cfg, batch_stats)
    n = cfg.blocks
    params = build(latent)
    mats = coefficient_matrices(latent)
    if sorted(mats) != list(STAGES):
        raise ValueError(f"latent has sharing groups {sorted(mats)}, not the SWRN stages {list(STAGES)}")
    banks = latent.banks
    out_p = {k: params[k] for k in ("Conv_0", "BatchNorm_0", "Dense_0")}
    out_s = {"BatchNorm_0": batch_stats["BatchNorm_0"]}
    all_runs, distances = [], {}
    for s, stage in enumerate(STAGES):
        first = f"WideBlock_{s * n}"
        out_p[first], out_s[first] = params[first], batch_stats[first]
        alpha = np.asarray(mats[stage][1], np.float64)
        if alpha.ndim != 2 or alpha.shape[0] != 2 * (n - 1):
            raise ValueError(f"{stage}: coefficients of shape {alpha.shape}; expected "
                             f"({2 * (n - 1)}, k) for one run of {cfg.name}")
        alpha = alpha.reshape(n - 1, 2, -1)
        runs, dist, scales = [], [], []
        for b in range(n - 1):
            if runs:
                a = runs[-1][0]
                if absorb_scale:
                    d1, c = _direction(alpha[b, 0], alpha[a, 0])
                else:
                    d1, c = _rel(alpha[b, 0], alpha[a, 0]), 1.0
                d = max(d1, _rel(alpha[b, 1], alpha[a, 1]))
                if d <= tol and c != 0:
                    runs[-1].append(b)
                    dist.append(d)
                    scales.append(c)
                    continue
                dist.append(d)
            else:
                dist.append(0.0)
            runs.append([b])
            scales.append(1.0)
        if n - 1 >= 2 and len(runs) == n - 1:
            closest = min(dist[1:])
            warnings.warn(f"fold: {stage} merges nothing at tol={tol} (the closest consecutive blocks "
                          f"are {closest:.3g} apart, relative); its {n - 1} shared blocks stay "
                          f"separate loops of one repeat", UserWarning, stacklevel=2)
        distances[stage] = dist
        all_runs.append(tuple(tuple(r) for r in runs))
        for j, run in enumerate(runs):
            rows = alpha[run]                                        # [R, 2, k]
            c = np.asarray([scales[b] for b in run])
            if merge == "first":
                merged1, merged2 = mats[stage][1][2 * run[0]], mats[stage][1][2 * run[0] + 1]
            else:
                merged1 = jnp.asarray((rows[:, 0] / c[:, None]).mean(0), banks[stage].dtype)
                merged2 = jnp.asarray(rows[:, 1].mean(0), banks[stage].dtype)
            blocks = [f"WideBlock_{s * n + 1 + b}" for b in run]
            body_p = {bn: jax.tree.map(lambda *x: jnp.stack(x), *[params[blk][bn] for blk in blocks])
                      for bn in ("BatchNorm_0", "BatchNorm_1")}
            body_s = {bn: jax.tree.map(lambda *x: jnp.stack(x), *[batch_stats[blk][bn] for blk in blocks])
                      for bn in ("BatchNorm_0", "BatchNorm_1")}
            if absorb_scale and np.any(c != 1.0):
                cc = jnp.asarray(c, body_s["BatchNorm_1"]["mean"].dtype)[:, None]
                body_s["BatchNorm_1"] = {"mean": body_s["BatchNorm_1"]["mean"] / cc,
                                         "var": body_s["BatchNorm_1"]["var"] / (cc * cc)}
                body_p["BatchNorm_1"] = {**body_p["BatchNorm_1"],
                                         "scale": body_p["BatchNorm_1"]["scale"] * jnp.sign(cc)}
            name = f"Loop_{s}_{j}"
            out_p[name] = {"kernel1": combine(merged1, banks[stage]),
                           "kernel2": combine(merged2, banks[stage]), "body": body_p}
            out_s[name] = {"body": body_s}
    loops = tuple(tuple(len(r) for r in runs) for runs in all_runs)
    model = LoopedWideResNet(cfg.depth, cfg.widen, cfg.num_classes, loops)
    return Folded(model, {"params": out_p, "batch_stats": out_s}, tuple(all_runs), distances)


def with_repeats(folded: Folded, loops) -> Folded:
    """The folded net with other loop counts (``loops``: per stage, one count per loop, as
    ``folded.model.loops``), e.g. more iterations at test time. A longer loop reuses its last
    repeat's BatchNorm parameters and statistics for the extra repeats; a shorter one keeps the
    first ones."""
    old = folded.model.stage_loops()
    try:
        loops = tuple(tuple(operator.index(r) for r in stage) for stage in loops)
    except TypeError:
        raise TypeError(f"loops must be per stage a tuple of int repeat counts, as "
                        f"folded.model.loops {old}; got {loops!r}") from None
    if len(loops) != 3 or any(len(a) != len(b) for a, b in zip(loops, old)):
        raise ValueError(f"loops must have the folded net's structure {old} (one count per loop), "
                         f"got {loops}")
    if any(r < 1 for stage in loops for r in stage):
        raise ValueError(f"every loop needs >= 1 repeat, got {loops}")
    variables = jax.tree.map(lambda x: x, folded.variables)
    for s, stage in enumerate(loops):
        for j, r in enumerate(stage):
            name = f"Loop_{s}_{j}"

            def resize(x, r=r):
                x = jnp.asarray(x)
                if r <= x.shape[0]:
                    return x[:r]
                return jnp.concatenate([x, jnp.repeat(x[-1:], r - x.shape[0], axis=0)])

            for col in ("params", "batch_stats"):
                entry = dict(variables[col][name])
                entry["body"] = jax.tree.map(resize, entry["body"])
                variables[col] = {**variables[col], name: entry}
    model = LoopedWideResNet(folded.model.depth, folded.model.widen, folded.model.num_classes, loops)
    return dataclasses.replace(folded, model=model, variables=variables)


def fold_unrolled(model, latent: SharedParams, *, tol: float = 1e-2, merge: str = "mean",
                  progressive: bool = False):
    """Fold a template-bank :class:`pae.models.looped.UnrolledNet` into one
    :class:`pae.models.looped.LoopedNet` (all its blocks become one block run ``depth`` times).

    ``latent``: the net's params under ``templates(block_groups(blocks), k)`` (one group per conv
    of the block; row ``d`` is ``Block_d``). Every group's rows are compared with their merged row
    (``merge="mean"``: the mean over the iterations; ``"first"``: ``Block_0``'s), with scale (no
    normalization follows these convs): ``distance = max_{group, d} ||alpha_d - alpha_m|| /
    ||alpha_m||``. When ``distance > tol`` the iterations do not coincide: the fold still returns
    the loop of the merged coefficients (a different function from the soft net) and warns with the
    distance, so nothing is merged silently. When every row is equal the folded net computes the soft
    net's function exactly (test).

    Returns ``(looped_model, params, distance)``; ``looped_model.iters == depth``, raise it (or use
    :func:`pae.models.looped.iterate`) to run more iterations at test time.
    """
    from pae.models.looped import LoopedNet, UnrolledNet, block_conv_names

    if not isinstance(model, UnrolledNet):
        raise TypeError(f"model must be a pae.models.looped.UnrolledNet, got {type(model).__name__}")
    if merge not in MERGES:
        raise ValueError(f"merge must be one of {MERGES}, got {merge!r}")
    _check_tol(tol)
    latent_root = latent
    if not isinstance(latent_root, SharedParams):
        raise TypeError(f"latent must be a sharing latent (pae.sharing.SharedParams), got "
                        f"{type(latent).__name__}")
    mats = coefficient_matrices(latent)
    names = block_conv_names(model.blocks)
    if sorted(mats) != sorted(names):
        raise ValueError(f"latent has sharing groups {sorted(mats)}; an UnrolledNet with blocks="
                         f"{model.blocks} folds from the groups {sorted(names)} (block_groups)")
    params = build(latent)
    block, distance = {}, 0.0
    for name in names:
        paths, alpha = mats[name]
        want = [f"Block_{d}/{name}/kernel" for d in range(model.depth)]
        if list(paths) != want:
            raise ValueError(f"group {name!r} holds {list(paths)}; expected one row per block, {want}")
        a = np.asarray(alpha, np.float64)
        if a.ndim != 2:
            raise ValueError(f"group {name!r}: coefficients of shape {a.shape}; fold one run at a time")
        merged = a.mean(0) if merge == "mean" else a[0]
        distance = max(distance, max(_rel(row, merged) for row in a))
        use = jnp.asarray(merged, latent.banks[name].dtype) if merge == "mean" else alpha[0]
        block[name] = {"kernel": combine(use, latent.banks[name])}
    if distance > tol:
        warnings.warn(f"fold_unrolled: the {model.depth} iterations do not coincide at tol={tol} "
                      f"(largest relative distance of a layer's coefficients to the merged ones: "
                      f"{distance:.3g}); the loop uses the merged coefficients and computes a "
                      f"different function from the soft net", UserWarning, stacklevel=2)
    looped = LoopedNet(model.width, model.depth, model.blocks, model.recall, progressive, model.classes)
    out = {"Projection": params["Projection"], "Loop": {"Block": block}, "Head": params["Head"]}
    return looped, out, distance


__all__ = ["Folded", "MERGES", "fold", "fold_unrolled", "with_repeats"]
