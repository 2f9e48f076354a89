"""Layer similarity matrices (LSM) of a template-bank latent (Savarese & Maire, arXiv 1902.09701).

For layers i, j of one group, ``S_ij = |<alpha_i, alpha_j>| / (||alpha_i|| ||alpha_j||)`` in [0, 1]:
1 when two layers are the same combination of templates up to scale and sign (a candidate loop),
0 when orthogonal (the official orthogonal init gives ``S = I`` when ``k >= layers``). With ``k = 1``
every entry is 1 (only informative for ``k >= 2``). A zero coefficient vector has similarity 0 to
every layer, itself included. Whether the paper takes the absolute value is unverified; this
library does (a sign is absorbed by the BatchNorm after a conv1, see :func:`pae.sharing.fold`).
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from pae.sharing.bank import coefficient_matrices


def similarity_matrix(alpha: Any) -> jnp.ndarray:
    """``|cos|`` between the rows of ``alpha [..., L, k]``: ``[..., L, L]`` (float32, zero rows give 0)."""
    if np.ndim(alpha) < 2:
        raise ValueError(f"alpha must be a coefficient matrix [..., L, k] (layers x templates, at "
                         f"least 2-D), got shape {np.shape(alpha)}")
    a = jnp.asarray(alpha, jnp.float32)
    norms = jnp.linalg.norm(a, axis=-1)
    inner = jnp.abs(jnp.einsum("...ik,...jk->...ij", a, a, precision="highest"))
    denom = norms[..., :, None] * norms[..., None, :]
    return jnp.where(denom > 0, inner / jnp.where(denom > 0, denom, 1.0), 0.0)


def layer_similarity(latent: Any) -> dict[str, jnp.ndarray]:
    """``{group: S [..., L, L]}``, one LSM per sharing group, rows in the group's layer order
    (:func:`pae.sharing.layer_paths`); a parallel run's leading axes are kept. ValueError when
    ``latent`` holds no sharing layer (it is not a :func:`pae.sharing.templates` latent)."""
    mats = coefficient_matrices(latent)
    if not mats:
        raise ValueError(f"latent holds no sharing layer (pae.sharing.SharedKernel node): pass the "
                         f"latent of pae.sharing.templates(...).init, got a {type(latent).__name__}")
    return {name: similarity_matrix(alpha) for name, (_, alpha) in mats.items()}


def plot_similarity(lsm: dict[str, Any], path=None, *, labels: dict[str, list[str]] | None = None,
                    title: str = ""):
    """One heatmap per group (``[L, L]`` each, values in [0, 1]); saved to ``path`` if given.

    Returns the matplotlib figure. ``labels``: ``{group: tick labels}`` (e.g. shortened layer paths).
    """
    import matplotlib.pyplot as plt   # the caller's backend: the figure is returned for display

    if not lsm:
        raise ValueError("lsm is empty: the latent has no sharing group")
    names = sorted(lsm)
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        s = np.asarray(lsm[name], np.float64)
        if s.ndim != 2 or s.shape[0] != s.shape[1]:
            raise ValueError(f"lsm[{name!r}] must be a square [L, L] matrix (one run), got shape {s.shape}")
        im = ax.imshow(s, vmin=0.0, vmax=1.0, cmap="viridis")
        ax.set_title(name)
        ticks = range(s.shape[0])
        ax.set_xticks(ticks)
        ax.set_yticks(ticks)
        if labels and name in labels:
            ax.set_xticklabels(labels[name], rotation=90, fontsize=6)
            ax.set_yticklabels(labels[name], fontsize=6)
        fig.colorbar(im, ax=ax, fraction=0.046)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


__all__ = ["layer_similarity", "plot_similarity", "similarity_matrix"]
