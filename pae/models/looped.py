"""Per-position nets for the algorithmic extrapolation tasks: looped (DeepThinking) and unrolled.

All nets here map an input ``x [B, *spatial, C]`` (prefix sums: ``[B, L, 1]``; mazes:
``[B, H, W, 3]``) to per-position logits ``[B, *spatial, classes]`` with 3-wide (or 3x3),
stride-1, "same"-padded, bias-free convolutions, so one set of weights runs on inputs of any size.
They share three pieces:

* ``Projection``: ``relu(conv(x))`` to ``width`` channels;
* ``RecurBlock``: one iteration ``h <- B(h, x)``: with ``recall`` the input is concatenated to the
  features first (Bansal et al. 2022, "End-to-end algorithm synthesis with recurrent networks",
  arXiv 2202.05826), then ``relu(conv)`` back to ``width`` and ``blocks`` residual basic blocks
  ``relu(h + conv(relu(conv(h))))``;
* ``Head``: ``conv(relu(conv(relu(conv(h)))))`` to ``width``, ``width / 2``, ``classes``.

This is DeepThinking's ``dt_net_recall_1d``/``_2d`` (aks2203/deep-thinking; recipe in the pae
research notes): convs without biases, PyTorch's default ``kaiming_uniform(a=sqrt(5))`` init.

* :class:`LoopedNet`: one :class:`RecurBlock` applied ``iters`` times (``nn.scan`` with the weights
  broadcast). In training it implements DeepThinking's *progressive loss* (``progressive=True``,
  the paper's ``alpha = 1``): per batch it draws ``n ~ U{0..iters-1}`` and ``k ~ U{1..iters-n}``
  (from the ``"dropout"`` rng stream the engine passes), runs ``n`` iterations whose result is cut
  from the gradient (``stop_gradient``; for ``n = 0`` the projection keeps its gradient), then
  ``k`` more with gradients, and the logits are the head's output after ``n + k`` iterations. The
  scan always runs ``iters`` steps (steps past ``n + k`` leave the state as it is), so the program is
  static. ``alpha < 1`` (mixing in the loss after ``iters`` iterations) is not offered: the
  engine's loss takes one output. In evaluation it runs exactly ``iters`` iterations; use
  :func:`iterate` to read the head after many iteration counts in one pass.
* :class:`UnrolledNet`: ``depth`` distinct :class:`RecurBlock` modules (``Block_0 ..``): the
  feed-forward net of the same depth, and the net a template bank (:func:`pae.sharing.templates`
  over :func:`block_groups`) shares; :func:`pae.sharing.fold_unrolled` turns such a bank into a
  :class:`LoopedNet`. Its ``progressive=True`` is the same progressive loss over its distinct blocks
  (pae's extension, not in DeepThinking, whose feed-forward nets train at full depth): blocks
  ``0..n-1`` run cut from the gradient, blocks ``n..n+k-1`` with it, the head reads after block
  ``n+k-1``; with every block's weights equal it is exactly :class:`LoopedNet`'s progressive
  training (same draws of ``n, k``; tested). Off by default.
"""
from __future__ import annotations

import itertools
import numbers
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from pae.core import select as pselect
from pae.models import init


class ShiftConv(nn.Module):
    """A bias-free 3-wide (3x3) stride-1 "same" convolution computed as one matrix product of the
    shifted inputs (``nn.Conv``'s result and kernel layout ``[3, (3,) C_in, C_out]``; far faster
    than XLA's CPU convolution at these few channels)."""

    features: int
    kernel_init: Callable = init.torch_default

    @nn.compact
    def __call__(self, x):
        spatial = x.ndim - 2
        kernel = self.param("kernel", self.kernel_init, (3,) * spatial + (x.shape[-1], self.features))
        pad = [(0, 0)] + [(1, 1)] * spatial + [(0, 0)]
        xp = jnp.pad(x, pad)
        patches = []
        for offs in itertools.product(range(3), repeat=spatial):
            idx = (slice(None),) + tuple(slice(o, o + n) for o, n in zip(offs, x.shape[1:-1]))
            patches.append(xp[idx])
        p = jnp.concatenate(patches, axis=-1)
        return p @ kernel.reshape(-1, self.features).astype(p.dtype)


def _conv(features: int, spatial: int, name: str | None = None) -> ShiftConv:
    del spatial
    return ShiftConv(features, name=name)


class Projection(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x):
        return nn.relu(_conv(self.width, x.ndim - 2, "Conv_0")(x))


class RecurBlock(nn.Module):
    """One iteration ``h <- B(h, x)`` (see the module doc); ``x`` is read only with ``recall``."""

    width: int
    blocks: int = 2
    recall: bool = True

    @nn.compact
    def __call__(self, h, x):
        spatial = h.ndim - 2
        if self.recall:
            h = jnp.concatenate([h, x.astype(h.dtype)], axis=-1)
        h = nn.relu(_conv(self.width, spatial, "Recall")(h))
        for b in range(self.blocks):
            y = nn.relu(_conv(self.width, spatial, f"Res_{b}_0")(h))
            h = nn.relu(h + _conv(self.width, spatial, f"Res_{b}_1")(y))
        return h


class Head(nn.Module):
    width: int
    classes: int = 2

    @nn.compact
    def __call__(self, h):
        spatial = h.ndim - 2
        h = nn.relu(_conv(self.width, spatial, "Conv_0")(h))
        h = nn.relu(_conv(max(self.width // 2, 1), spatial, "Conv_1")(h))
        return _conv(self.classes, spatial, "Conv_2")(h)


def _check(name, value, low=1):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


class _Step(nn.Module):
    """A scan step of :class:`LoopedNet`: ``(h, i) -> (h', i + 1)`` with the progressive cut."""

    width: int
    blocks: int
    recall: bool

    @nn.compact
    def __call__(self, carry, _, x, n, k):
        h, i = carry
        return (_progressive_step(RecurBlock(self.width, self.blocks, self.recall, name="Block"),
                                  h, x, i, n, k), i + 1), None


def _progressive_step(block, h, x, i, n, k):
    """Iteration ``i`` under the progressive cut: the state entering iteration ``n`` (``n > 0``) is
    cut from the gradient; iterations at or past ``n + k`` leave it unchanged."""
    cut = jnp.logical_and(i == n, n > 0)
    h_in = jnp.where(cut, jax.lax.stop_gradient(h), h)
    return jnp.where(i < n + k, block(h_in, x), h_in)


def _draw_progressive(module: nn.Module, iters: int):
    """DeepThinking's draw ``n ~ U{0..iters-1}``, ``k ~ U{1..iters-n}`` from the ``"dropout"`` rng,
    sown as ``intermediates/progressive`` for inspection."""
    kn, kk = jax.random.split(module.make_rng("dropout"))
    n = jax.random.randint(kn, (), 0, iters)
    k = jax.random.randint(kk, (), 1, iters - n + 1)
    module.sow("intermediates", "progressive", jnp.stack([n, k]))
    return n, k


class LoopedNet(nn.Module):
    """DeepThinking-style recurrent net: ``Projection``, ``RecurBlock`` x ``iters`` (one set of
    weights), ``Head`` (see the module doc; ``progressive``: DeepThinking's progressive loss in
    training). Parameter names: ``Projection``, ``Block``, ``Head``."""

    width: int = 32
    iters: int = 20
    blocks: int = 2
    recall: bool = True
    progressive: bool = True
    classes: int = 2

    @nn.compact
    def __call__(self, x, train: bool = False, *, mask=None):
        del mask   # no BatchNorm
        _check("width", self.width)
        _check("iters", self.iters)
        _check("blocks", self.blocks, 0)
        h = Projection(self.width, name="Projection")(x)
        if train and self.progressive:
            n, k = _draw_progressive(self, self.iters)
        else:
            n, k = jnp.zeros((), jnp.int32), jnp.asarray(self.iters, jnp.int32)
        scan = nn.scan(_Step, variable_broadcast="params", split_rngs={"params": False},
                       in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=self.iters)
        (h, _), _ = scan(self.width, self.blocks, self.recall, name="Loop")(
            (h, jnp.zeros((), jnp.int32)), None, x, n, k)
        return Head(self.width, self.classes, name="Head")(h)


class UnrolledNet(nn.Module):
    """``Projection``, ``depth`` distinct ``RecurBlock`` s (``Block_0 .. Block_{depth-1}``), ``Head``:
    the feed-forward net of the same depth as a :class:`LoopedNet` of ``iters = depth``
    (``progressive``: the progressive loss over the distinct blocks in training; see the module doc)."""

    width: int = 32
    depth: int = 20
    blocks: int = 2
    recall: bool = True
    classes: int = 2
    progressive: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False, *, mask=None):
        del mask
        _check("width", self.width)
        _check("depth", self.depth)
        _check("blocks", self.blocks, 0)
        h = Projection(self.width, name="Projection")(x)
        progressive = train and self.progressive
        if progressive:
            n, k = _draw_progressive(self, self.depth)
        for d in range(self.depth):
            block = RecurBlock(self.width, self.blocks, self.recall, name=f"Block_{d}")
            h = _progressive_step(block, h, x, d, n, k) if progressive else block(h, x)
        return Head(self.width, self.classes, name="Head")(h)


def block_conv_names(blocks: int) -> tuple[str, ...]:
    """The convs of one :class:`RecurBlock`: ``("Recall", "Res_0_0", "Res_0_1", ...)``."""
    return ("Recall",) + tuple(f"Res_{b}_{j}" for b in range(blocks) for j in (0, 1))


def block_groups(blocks: int = 2) -> dict[str, pselect.Selector]:
    """Sharing groups of an :class:`UnrolledNet`: one group per conv of the block, holding that conv
    of every ``Block_d`` (so row ``d`` of each group's coefficient matrix is iteration ``d``)."""
    _check("blocks", blocks, 0)
    return {name: pselect.path(rf"^Block_\d+/{name}/kernel$") for name in block_conv_names(blocks)}


def iterate(model: LoopedNet, params, x, iterations: Sequence[int]) -> dict[int, jax.Array]:
    """``{n: logits after n iterations}`` for every ``n`` in ``iterations`` (one pass, increasing
    ``n``, the loop a ``lax.fori_loop``), evaluation mode. ``params``: a :class:`LoopedNet`'s."""
    if not isinstance(model, LoopedNet):
        raise TypeError(f"model must be a LoopedNet, got {type(model).__name__}")
    its = sorted({int(n) for n in iterations})
    if not its or its[0] < 1:
        raise ValueError(f"iterations must be ints >= 1, got {list(iterations)}")
    return dict(zip(its, _iterate(model, tuple(its), params, jnp.asarray(x))))


def _iterate_impl(model, its, params, x):
    proj = Projection(model.width)
    block = RecurBlock(model.width, model.blocks, model.recall)
    head = Head(model.width, model.classes)
    bp = params["Loop"]["Block"]
    h = proj.apply({"params": params["Projection"]}, x)
    outs, done = [], 0
    for n in its:
        h = jax.lax.fori_loop(done, n, lambda i, h: block.apply({"params": bp}, h, x), h)
        outs.append(head.apply({"params": params["Head"]}, h))
        done = n
    return outs


_iterate = jax.jit(_iterate_impl, static_argnums=(0, 1))


__all__ = ["Head", "LoopedNet", "Projection", "RecurBlock", "UnrolledNet", "block_conv_names",
           "block_groups", "iterate"]
