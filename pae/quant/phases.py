"""Noise-injected mixed-precision quantization as a list of phases on the one engine.

``quant_phases(cfg, select)`` is ``[noise, finetune]``: ``noise`` trains the weights and the
per-channel widths under quantization-matched noise (:func:`pae.quant.noise_injection`, widths with
their own Adam and no weight decay, as SMOL's Algorithm 1); entering ``finetune`` snaps every layer
to its palette (:func:`pae.quant.assign_palette`, host-side) and the weights are fine-tuned under the
real quantizer (:func:`pae.quant.palette_quantizer`) with a fresh optimizer. SMOL's CIFAR schedule
is 350 + 300 epochs; the defaults here are short. Start from
``init_state(model, example, seed, noise_transform(cfg, select).init)``.

Activations (``cfg.activations=True``): the same selected layers also learn per-input-channel
activation widths (:func:`pae.quant.act_noise_injection`, chained after the weights' transform);
the caller passes ``model=`` and every phase carries ``pae.quant.quantize_activations(model)``;
the noise phase's ``enter`` adds the running range statistics to ``batch_stats``
(:func:`pae.quant.with_act_stats`), so the state still starts from the plain model::

    cfg = QuantConfig(activations=True, target_bits=3.0, act_target_bits=4.0)
    state = init_state(model, example, seed, noise_transform(cfg, select).init)
    result = train_phases(task, quant_phases(cfg, select, model=model), state, batch_size=...)
    ex = export(model, result.state.params, result.state.batch_stats)
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Mapping

import jax
import numpy as np
import optax

from pae.core import Context, chain, nodes, role_optimizer, select as pselect
from pae.quant import activations as qa
from pae.quant import noise as qn
from pae.quant import palette as qp


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Hyperparameters of the two phases (see :func:`pae.quant.noise_injection` and
    :func:`pae.quant.assign_palette` for the meaning of the quantization fields).

    Weights: Adam (``lr``; ``finetune_lr`` in phase 2, default ``lr``), decoupled ``weight_decay``
    on the weights only; widths: Adam ``bits_lr`` (SMOL: 1e-3), no decay; a learned clip: Adam
    ``range_lr``, no decay.

    Activations (``activations=True``; :func:`pae.quant.act_noise_injection`): ``act_b_min``,
    ``act_b_max``, ``act_b_init`` the learned widths' bounds and start; ``act_lmbda``,
    ``act_target_bits`` their penalty and budget (same ``budget_weight`` and ``budget_form`` as the
    weights'); ``act_grid`` (``"auto"``, ``"symmetric"``, ``"unsigned"``), ``act_momentum`` of the
    running range, ``act_learned_range`` a learned multiplier of it; ``act_palette`` a fixed
    activation palette (else chosen like the weights', same ``levels``/``low``/``high``).

    ``layouts``: ``{kernel path: k_axes or "conv"}`` for DenseGeneral (and 1-D conv) kernels, as
    :func:`pae.quant.noise_injection` takes it (normally ``pae.quant.kernel_layouts(model,
    example)``), used by the weights' and the activations' transforms; kept as sorted pairs.
    """

    noise_epochs: int = 10
    finetune_epochs: int = 5
    lr: float = 1e-3
    finetune_lr: float | None = None
    weight_decay: float = 0.0
    bits_lr: float = 1e-3
    range_lr: float = 1e-3
    b_min: float = 1.0
    b_max: float = 8.0
    b_init: float = 6.0
    granularity: str = "input"
    learned_range: bool = False
    lmbda: float = 0.0
    target_bits: float | None = None
    budget_weight: float = 1.0
    budget_form: str = "two_sided"
    eval_mode: str = "quantize"
    levels: int = 2
    low: tuple[int, int] = (1, 4)
    high: tuple[int, int] = (4, 8)
    distortion_weight: float = 1.0
    count_overhead: bool = True
    palette: tuple[int, ...] | None = None
    seed: int = 0
    activations: bool = False
    act_b_min: float = 1.0
    act_b_max: float = 8.0
    act_b_init: float = 6.0
    act_lmbda: float = 0.0
    act_target_bits: float | None = None
    act_grid: str = "auto"
    act_momentum: float = 0.9
    act_learned_range: bool = False
    act_palette: tuple[int, ...] | None = None
    layouts: Any = None

    def __post_init__(self):
        for name in ("noise_epochs", "finetune_epochs", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        for name in ("lr", "weight_decay", "bits_lr", "range_lr", "distortion_weight"):
            v = getattr(self, name)
            if not np.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be finite and >= 0, got {v!r}")
        if self.finetune_lr is not None and (not np.isfinite(self.finetune_lr) or self.finetune_lr < 0):
            raise ValueError(f"finetune_lr must be finite and >= 0 or None, got {self.finetune_lr!r}")
        object.__setattr__(self, "low", tuple(self.low))
        object.__setattr__(self, "high", tuple(self.high))
        if self.palette is not None:
            object.__setattr__(self, "palette", tuple(self.palette))
        if self.act_palette is not None:
            object.__setattr__(self, "act_palette", tuple(self.act_palette))
        if self.layouts is not None:     # stored as sorted (path, layout) pairs: the config stays hashable
            items = self.layouts.items() if isinstance(self.layouts, Mapping) else self.layouts
            try:
                pairs = tuple(sorted((str(k), v) for k, v in items))
            except (TypeError, ValueError):
                raise TypeError(f"layouts must be a mapping {{leaf path: k_axes or 'conv'}}, got "
                                f"{self.layouts!r}") from None
            qn.check_layouts(dict(pairs))
            object.__setattr__(self, "layouts", pairs)
        for name in ("activations", "act_learned_range", "learned_range", "count_overhead"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.act_target_bits is not None and not self.activations:
            raise ValueError("act_target_bits needs activations=True (activations are not quantized)")
        # the transforms and the palette validate the rest; fail here, at construction
        qn.noise_injection(pselect.everything(), **_weight_kwargs(self))
        try:
            qa.act_noise_injection(pselect.everything(), **_act_kwargs(self))
        except ValueError as err:     # name the QuantConfig field (act_momentum, act_grid, ...)
            msg = str(err)
            raise ValueError(msg if msg.startswith("act") else f"act_{msg}") from None
        try:
            qp.choose_palette(np.array([4.0]), 1, levels=self.levels, low=self.low, high=self.high,
                              distortion_weight=self.distortion_weight, fixed=self.palette)
        except ValueError as err:
            raise ValueError(f"palette: {err}" if self.palette is not None else str(err)) from None
        if self.act_palette is not None:
            try:
                qp.choose_palette(np.array([4.0]), 1, levels=self.levels, low=self.low,
                                  high=self.high, fixed=self.act_palette)
            except ValueError as err:
                raise ValueError(f"act_palette: {err}") from None


def _weight_kwargs(cfg: QuantConfig) -> dict:
    return dict(b_min=cfg.b_min, b_max=cfg.b_max, b_init=cfg.b_init, granularity=cfg.granularity,
                learned_range=cfg.learned_range, lmbda=cfg.lmbda, target_bits=cfg.target_bits,
                budget_weight=cfg.budget_weight, budget_form=cfg.budget_form,
                eval_mode=cfg.eval_mode, layouts=_layouts(cfg))


def _layouts(cfg: QuantConfig):
    return None if cfg.layouts is None else dict(cfg.layouts)


def _act_kwargs(cfg: QuantConfig) -> dict:
    return dict(b_min=cfg.act_b_min, b_max=cfg.act_b_max, b_init=cfg.act_b_init, grid=cfg.act_grid,
                momentum=cfg.act_momentum, learned_range=cfg.act_learned_range,
                lmbda=cfg.act_lmbda, target_bits=cfg.act_target_bits,
                budget_weight=cfg.budget_weight, budget_form=cfg.budget_form,
                eval_mode=cfg.eval_mode, layouts=_layouts(cfg))


def noise_transform(cfg: QuantConfig, select: pselect.Selector | None = None):
    """The phase-1 transform of ``cfg`` (its ``init`` builds the starting latent): the weights'
    :func:`pae.quant.noise_injection`, chained with :func:`pae.quant.act_noise_injection` on the
    same layers when ``cfg.activations``."""
    weights = qn.noise_injection(select, **_weight_kwargs(cfg))
    if not cfg.activations:
        return weights
    return chain(weights, qa.act_noise_injection(select, **_act_kwargs(cfg)))


def _weights_tx(lr: float, weight_decay: float):
    return optax.adamw(lr, weight_decay=weight_decay) if weight_decay else optax.adam(lr)


def quant_optimizer(cfg: QuantConfig, phase: str = "noise") -> optax.GradientTransformation:
    """Role optimizer of a phase: weights Adam(W), widths Adam (phase 1 only; frozen in phase 2),
    learned clip Adam, an inner sharing transform's coefficients Adam at the weights' rate; no decay
    on anything but the weights."""
    if phase not in ("noise", "finetune"):
        raise ValueError(f"phase must be 'noise' or 'finetune', got {phase!r}")
    lr = cfg.lr if phase == "noise" or cfg.finetune_lr is None else cfg.finetune_lr
    roles = {"weights": _weights_tx(lr, cfg.weight_decay), "range": optax.adam(cfg.range_lr),
             "coefficients": optax.adam(lr)}    # an inner sharing transform's (no decay)
    if phase == "noise":
        roles["bits"] = optax.adam(cfg.bits_lr)
    return role_optimizer(roles)


def _bits_metric(state, ctx) -> dict:
    out = {"weight_bits": qn.average_bits(state.params)}
    if qa.has_acts(state.params):
        out["act_bits"] = qa.average_act_bits(state.params)
    return out


def add_act_stats(state, snapshots=None):
    """The noise phase's transition with activations: running statistics for every activation
    node that has none (:func:`pae.quant.with_act_stats`); pure."""
    del snapshots
    return state.replace(batch_stats=qa.with_act_stats(state.batch_stats, state.params))


#: the widest level of a masked layer: export stores it with one more bit per weight (pae.quant.export)
MASKED_MAX_BITS = 7


def _masked_nodes(tree) -> list:
    """The phase-1 nodes under a sparsity mask (``pae.chain(pae.sparsity.fixed_masks(), ...)``)."""
    try:
        from pae.sparsity.masks import FixedMask
    except ImportError:     # pragma: no cover
        return []
    return [m for m in nodes(tree, FixedMask) if isinstance(m.weight, qn.NoisyWeight)]


def check_masked_levels(cfg: QuantConfig):
    """The noise phase's check at its start: a masked layer's palette levels must be <= 7 bits
    (:data:`MASKED_MAX_BITS`), so a config allowing 8 is refused before training, not at export."""
    widest = max((cfg.high[1],) + tuple(cfg.palette or ()))

    def enter(state, snapshots=None):
        del snapshots
        if widest > MASKED_MAX_BITS and _masked_nodes(state.params):
            raise ValueError(
                f"quant_phases: the latent quantizes masked (sparse) kernels, which export stores with "
                f"one more bit per weight, so their levels must be <= {MASKED_MAX_BITS}; this config "
                f"allows {widest} (high={cfg.high}, palette={cfg.palette}): set QuantConfig(high=("
                f"{cfg.high[0]}, {MASKED_MAX_BITS}))")
        return state
    return enter


def assign(cfg: QuantConfig):
    """The transition into phase 2: ``state.params`` snapped to palettes (fresh optimizer follows)."""
    def enter(state, snapshots):
        del snapshots
        params = jax.tree.map(np.asarray, jax.device_get(state.params))
        return state.replace(params=qp.assign_palette(
            params, levels=cfg.levels, low=cfg.low, high=cfg.high,
            distortion_weight=cfg.distortion_weight, count_overhead=cfg.count_overhead,
            fixed=cfg.palette, act_fixed=cfg.act_palette))
    return enter


def quant_phases(cfg: QuantConfig, select: pselect.Selector | None = None, model=None,
                 base=None, inner=None, distill=None) -> list:
    """``[noise, finetune]`` (module doc). Keeps the snapshot ``"noise"`` (the end of phase 1).

    Rows carry ``weight_bits``: the average learned width (phase 1) or palette width (phase 2),
    and with ``cfg.activations`` ``act_bits``, the same for the activation widths (plain mean over
    channels). ``model``: the task's model; required with ``cfg.activations`` (the phases then run
    ``quantize_activations(model)``), optional otherwise (the phases then carry it as is).

    ``base``: a transform the quantization reparameterizes (``pae.chain(base, quantization)``),
    e.g. ``pae.sparsity.fixed_masks()`` to quantize the kept weights of a sparsity ticket: start
    from ``noise_transform(cfg, select).init(ticket_latent, key)`` (the masks stay outermost, so
    pruned weights stay exactly zero; :func:`pae.quant.export` packs them with an exact zero code).
    Zero the pruned weights first if the max-abs ranges should cover the kept weights only.

    ``inner``: a transform whose built kernels are quantized (``pae.chain(quantization, inner)``),
    e.g. ``pae.sharing.templates(...)``: the widths and the quantizer act on the combined kernels
    ``sum_j alpha_ij T_j``. Start from ``pae.chain(noise_transform(cfg, select), inner).init(params,
    key)`` (the quantization's ``init`` sees the plain kernels and records their shapes; the
    sharing's then replaces each selected kernel inside its node); :func:`pae.quant.export` combines
    the banks and packs the combined kernels.

    ``distill``: a :class:`pae.train.Distill` both phases train with, e.g. ``Distill(pretrained)``
    to let the float model a quantization-aware fine-tuning starts from guide it (its teacher runs
    the task's float model, not the activation-quantized one)."""
    from pae.train.engine import Phase   # imported here: the quantizer pieces need no engine
    if cfg.activations and model is None:
        raise ValueError("quant_phases: cfg.activations=True needs model= (the task's Flax model; the "
                         "phases run it wrapped by pae.quant.quantize_activations)")
    if cfg.activations:
        model = qa.quantize_activations(model)
    t = noise_transform(cfg, select)
    fine = qn.palette_quantizer()
    if base is not None:
        t, fine = chain(base, t), chain(base, fine)
    if inner is not None:
        t, fine = chain(t, inner), chain(fine, inner)

    def context(epoch):
        return Context.make(key=jax.random.PRNGKey(cfg.seed))

    check = check_masked_levels(cfg)

    def start(state, snapshots=None):
        state = check(state)
        return add_act_stats(state) if cfg.activations else state

    noise = Phase("noise", cfg.noise_epochs, lambda spe: quant_optimizer(cfg, "noise"), t, context,
                  start, keep={cfg.noise_epochs: "noise"},
                  metrics=_bits_metric, model=model, distill=distill)
    finetune = Phase("finetune", cfg.finetune_epochs, lambda spe: quant_optimizer(cfg, "finetune"),
                     fine, context, assign(cfg), metrics=_bits_metric, model=model, distill=distill)
    return [noise, finetune]


__all__ = ["QuantConfig", "add_act_stats", "assign", "noise_transform", "quant_optimizer", "quant_phases"]
