"""Quantization side by side: pae's learned two-level palettes vs FP, PTQ, uniform QAT and qwix QAT.

Every method trains the same model on the same data for the same number of epochs from the same
initial weights (``init_state(model, example, seed)``; the data order is a function of the seed),
through the one engine (:func:`pae.train.train_phases`). ``--pretrain-epochs P`` instead forks every
trained method from the FP model after ``P`` epochs (quantization-aware fine-tuning of a pretrained
net, the usual protocol for language models): FP trains ``P + noise + finetune`` epochs and keeps its
state at ``P``; QAT, learned and qwix start from that state (weights and BatchNorm statistics, fresh
optimizer) and train ``noise + finetune`` epochs on the data order of epochs ``P, P + 1, ...``, so
every method has seen the same data when it is scored:

``fp``       the float baseline, ``noise_epochs + finetune_epochs`` epochs of Adam (``--lr``).
``ptq``      round-to-nearest post-training quantization of the ``fp`` model: every kernel on pae's
             deployed grid (mid-rise, symmetric, per-output-channel max-abs scale) at one width
             (``--ptq-bits``), no training; evaluated and exported as it is.
``qat``      uniform quantization-aware training: pae's quantizer with a one-level palette
             (:func:`pae.quant.assign_palette` ``levels=1, fixed=(b,)``), straight-through gradients,
             the whole run (``--qat-bits``).
``learned``  pae's method (:func:`pae.quant.quant_phases`, ``QuantConfig(activations=True)``):
             ``noise_epochs`` of noise injection that learns per-input-channel widths of the weights
             at a target average (``--budgets``) and of the same layers' inputs (``--act-budget``),
             then palette assignment (two levels per layer, one in 1..4 bits and one in 4..8, for the
             weights and for the activations) and ``finetune_epochs`` of STE fine-tuning.
``learned_w`` the same with float activations (weights only): the like-for-like comparison with
             the weight-only peers.
``qwix``     the peer, google/qwix (``pip install -e '.[experiments]'``; qwix is never a
             dependency of the library): ``qwix.quantize_model(model, qwix.QtProvider(rules))``
             rewrites the Flax model and that model trains through the same engine (QAT: integer
             forward, straight-through backward). Rule sets (``--qwix-rules``): weight-only
             ``int8``/``int4``/``int3``/``int2`` on every Dense/Conv, ``w8a8`` (int8 weights and
             activations) and ``first_last_8_rest_4`` (the first and last layer, in call order, int8;
             the rest int4, weight-only). Without qwix installed these rows are skipped with one line.

Sizes (``bytes``) are :func:`pae.quant.size_bytes` of the real export (:func:`pae.quant.export`):
packed codes + scales + permutations + every float leaf left (biases, unquantized layers).
``pallas_kernels`` pads every K-segment to ``--k-tile`` rows and N to ``--n-tile`` columns and its
smallest tiles are 512 x 128, far larger than a small model's layers (LeNet-5's first conv is 25 x 6),
so two figures are given: ``bytes`` (stored: the packed format as it is laid out, padding included)
and ``bytes_tight`` (the same codes, scales, permutations and floats without tile padding, which is
:func:`pae.quant.size_bytes`'s ``total_unpadded``: what a format with tiles no larger than the layer
would store). Neither under-counts: permutations are int32 per K row, scales float32 per output
channel and segment, 5..7-bit levels are counted in 8-bit words. qwix rows are counted as qwix stores
them (``int4`` containers for <= 4 bits, ``int8`` otherwise, one float32 scale per output channel,
float leaves as they are); float rows count 4 bytes per parameter. The average weight bits are over
the quantized kernels (every Dense/Conv kernel by default; ``--select``), weighted by their size.

Activation bits: the plain mean over every quantized input channel (pae's ``act_bits``); 32 for
float activations; qwix W8A8: 8.

Models: the default LeNet-5 on the 4,000 + 1,000 embedded MNIST digits (4,000 train, 1,000 test;
about 1 s per epoch on 2 idle CPU cores); a character Transformer (``--model transformer_lm``;
preset: ``pydoc_topics``, 1,200 random training windows of 128 characters, width 64, 2 blocks,
6 + 4 epochs for every method, bits per character). pae quantizes every kernel of the Transformer
(``--select kernels_tables``): the ``nn.Dense`` kernels, the attention's ``nn.DenseGeneral`` q/k/v/out
kernels (their layouts read from the modules by :func:`pae.quant.kernel_layouts`: a GEMM with
K = the contracted axes, one width per K row) and both lookup tables (the token embedding and the
learned positions, one width per row, dequantized from their codes where the model reads them);
LayerNorm parameters and biases stay float and are counted. qwix quantizes every projection
(``nn.Dense``/``nn.DenseGeneral``), not the embeddings; ``--paper``: CIFAR-10 ResNet-20 (SMOL's
350 + 300 epochs; CSQ's reference point is 3-bit average weights with 4-bit activations).

    python experiments/quantize.py --seeds 0 1 2                                # LeNet-5, mnist_subset
    python experiments/quantize.py --model transformer_lm --seeds 0             # pydoc_topics, bpc
    python experiments/quantize.py --model transformer_lm --pretrain-epochs 10  # fine-tune a pretrained LM
    python experiments/quantize.py --paper --seeds 0 1 2                        # CIFAR-10 ResNet-20

Writes ``runs/quantize/quantize_<name>.{json,png}`` (``--out-dir`` elsewhere; each finished seed
also in ``quantize_<name>.seed<k>.json``, reused by ``--reuse`` when its configuration matches) and
prints the table (mean +- sd over seeds) and the targets.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from pae import quant as q
from pae.core import select as S
from pae.data import load_dataset
from pae.data.sources import ArraySource
from pae.models import get_model, model_kind
from pae.train import Distill, Phase, evaluate, init_state, make_task, train_phases
from pae.train.cli import fill_unset, run_seeds
from pae.train.metrics import atomic_write

METHODS = ("fp", "ptq", "qat", "learned", "learned_w", "qwix")
DEFAULT_METHODS = ("fp", "ptq", "qat", "learned", "qwix")
QWIX_RULES = ("int8", "int4", "int3", "int2", "w8a8", "first_last_8_rest_4")
SELECTORS = {"kernels": S.kernels, "dense2d": lambda: S.kernels() & S.ndim(2),
             "kernels_tables": lambda: S.kernels() | S.path(r"(^|/)(embedding|pos_embedding)$")}
FLOAT_BITS = 32

#: defaults of every flag a preset may change
DEFAULTS = dict(model="lenet5", dataset="mnist_subset", val_size=0, seq_len=128, pretrain_epochs=0,
                noise_epochs=6, finetune_epochs=3, batch_size=64, lr=1e-3, finetune_lr=None, bits_lr=0.05,
                learned_range=False, range_lr=1e-3, b_init=6.0,
                budgets=[2.0, 3.0], ptq_bits=[8, 4, 3, 2], qat_bits=[8, 4, 3, 2],
                qwix_rules=list(QWIX_RULES), methods=list(DEFAULT_METHODS), select="kernels", k_tile=512,
                n_tile=128, width=None, depth=None, heads=None, act_budget=3.5, train_size=None,
                test_size=None, distill=0.0, distill_temperature=1.0, granularity="input")

#: per-model changes to DEFAULTS. The Transformer: every kernel (Dense, the attention's
#: DenseGeneral, layouts read by ``pae.quant.kernel_layouts``) and both lookup tables (token and
#: position embeddings) are quantized; LayerNorm parameters and biases stay float.
PRESETS = {
    "transformer_lm": dict(dataset="pydoc_topics", select="kernels_tables", seq_len=128, width=64, depth=2,
                           heads=4, train_size=1200, noise_epochs=6, finetune_epochs=4, batch_size=32,
                           lr=2e-3, budgets=[2.5], ptq_bits=[8, 4], qat_bits=[4],
                           methods=["fp", "ptq", "learned", "learned_w", "qwix"], qwix_rules=["int4"]),
}

#: ``--paper``: CIFAR-10 ResNet-20, SMOL's schedule (350 epochs of precision learning + 300 of
#: fine-tuning, batch 256); CSQ's point for reference: 3-bit average weights (4-bit activations)
PAPER_FLAGS = dict(model="resnet20", dataset="cifar10", val_size=5000, noise_epochs=350,
                   finetune_epochs=300, batch_size=256, budgets=[2.0, 3.0, 4.0])


def build_parser() -> argparse.ArgumentParser:
    """Flags default to ``None`` and are filled by :func:`resolve` (model preset, then DEFAULTS)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help=f"default {DEFAULTS['model']}; presets for {sorted(PRESETS)}")
    p.add_argument("--dataset", help="default mnist_subset (pydoc_topics for transformer_lm)")
    p.add_argument("--val-size", type=int)
    p.add_argument("--seq-len", type=int, help="window length of a text data set (default 128)")
    p.add_argument("--width", type=int, help="transformer_lm width (preset 64)")
    p.add_argument("--depth", type=int, help="transformer_lm blocks (preset 2)")
    p.add_argument("--heads", type=int, help="transformer_lm heads (preset 4)")
    p.add_argument("--train-size", type=int, default=None,
                   help="use N training examples (windows), drawn by a fixed generator (default: all)")
    p.add_argument("--test-size", type=int, default=None,
                   help="evaluate on N test examples, drawn by a fixed generator (default: all)")
    p.add_argument("--pretrain-epochs", type=int,
                   help="start every trained method from the FP model after this many epochs "
                        "(quantization-aware fine-tuning of a pretrained net): FP trains pretrain + "
                        "noise + finetune epochs, QAT, learned and qwix train noise + finetune more "
                        "epochs from its snapshot, their data order continuing from there (default 0: "
                        "every method from the same initial weights)")
    p.add_argument("--noise-epochs", type=int, help="phase 1 of the learned method (default 6)")
    p.add_argument("--finetune-epochs", type=int,
                   help="phase 2 of the learned method (default 3); every other method trains "
                        "noise + finetune epochs")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="Adam learning rate of the weights, every method")
    p.add_argument("--finetune-lr", type=float,
                   help="Adam learning rate of the weights under the fixed quantizer: phase 2 of the "
                        "learned method and uniform QAT (default --lr)")
    p.add_argument("--learned-range", action=argparse.BooleanOptionalAction, default=None,
                   help="pae's methods (qat, learned, learned_w) learn each channel's clip range "
                        "R = exp(r), initialized at its max-abs, by Adam at --range-lr (default off: "
                        "R is the max-abs)")
    p.add_argument("--range-lr", type=float, help="Adam learning rate of a learned range (default 1e-3)")
    p.add_argument("--bits-lr", type=float,
                   help="Adam learning rate of the learned widths (default 0.05: SMOL's 1e-3 moves a "
                        "width by well under a bit in a short run)")
    p.add_argument("--distill", type=float,
                   help="with --pretrain-epochs: the trained quantized methods (qat, learned, qwix) "
                        "distill from the FP snapshot they start from, this weight on the distillation "
                        "term (pae.train.Distill; default 0: off)")
    p.add_argument("--distill-temperature", type=float, help="softmax temperature of --distill (default 1)")
    p.add_argument("--b-init", type=float, help="initial learned width (default 6)")
    p.add_argument("--budgets", type=float, nargs="*", help="target average weight bits of the learned method")
    p.add_argument("--act-budget", type=float,
                   help="phase-1 target average activation bits of the learned method (default 3.5: the "
                        "palette rounds widths up more often than down, and the issue asks <= 4 after "
                        "it); the inputs of every quantized layer, per input channel. learned_w: float "
                        "activations")
    p.add_argument("--ptq-bits", type=int, nargs="*")
    p.add_argument("--qat-bits", type=int, nargs="*")
    p.add_argument("--qwix-rules", nargs="*", help=f"subset of {list(QWIX_RULES)}")
    p.add_argument("--methods", nargs="+",
                   help=f"subset of {list(METHODS)} (default {list(DEFAULT_METHODS)}; learned_w: the "
                        f"learned palette with float activations)")
    p.add_argument("--select", choices=sorted(SELECTORS),
                   help="which kernels pae quantizes: kernels (every Dense/DenseGeneral/Conv kernel), "
                        "dense2d (2-D kernels only), kernels_tables (kernels and the embedding "
                        "tables; the Transformer's preset)")
    p.add_argument("--granularity", choices=q.GRANULARITIES,
                   help="the learned weight widths per input channel (default, the GEMM's K axis) or per "
                        "output channel (ranges are per output channel either way)")
    p.add_argument("--k-tile", type=int, help="pallas_kernels packing tile along K (512, 1024, 2048)")
    p.add_argument("--n-tile", type=int, help="pallas_kernels packing tile along N (128, 256, 512)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="one whole experiment per seed (init and data order); the table, plot and "
                        "targets use the mean and spread over seeds")
    p.add_argument("--name", default="")
    p.add_argument("--out-dir", default=os.path.join("runs", "quantize"),
                   help="where the results go (default runs/quantize; the recorded results were "
                        "written with --out-dir experiments/results)")
    p.add_argument("--reuse", action="store_true",
                   help="reuse the finished seeds saved in --out-dir by a run with the same "
                        "configuration (each reuse is reported)")
    p.add_argument("--paper", action="store_true",
                   help="CIFAR-10 ResNet-20: 350 + 300 epochs (SMOL), batch 256, 45k/5k split")
    return p


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill every flag not given (``--paper``, else the model's preset, else DEFAULTS) and check them."""
    model = args.model or (PAPER_FLAGS["model"] if args.paper else DEFAULTS["model"])
    out = fill_unset(args, DEFAULTS, PRESETS.get(model, {}), PAPER_FLAGS if args.paper else {}, {"model": model})
    model_kind(out.model)      # ValueError naming the known models
    for name in ("pretrain_epochs", "noise_epochs", "finetune_epochs"):
        if getattr(out, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(out, name)}")
    if out.noise_epochs + out.finetune_epochs < 1:
        raise ValueError("--noise-epochs + --finetune-epochs must be >= 1")
    for name in ("batch_size", "seq_len"):
        if getattr(out, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(out, name)}")
    for name in ("train_size", "test_size"):
        if getattr(out, name) is not None and getattr(out, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(out, name)}")
    if not (np.isfinite(out.lr) and out.lr > 0):
        raise ValueError(f"--lr must be a positive number, got {out.lr}")
    for name in ("finetune_lr", "range_lr"):
        v = getattr(out, name)
        if v is not None and not (np.isfinite(v) and v > 0):
            raise ValueError(f"--{name.replace('_', '-')} must be a positive number, got {v}")
    bad = sorted(set(out.methods) - set(METHODS))
    if bad:
        raise ValueError(f"--methods: unknown {bad}; known: {list(METHODS)}")
    bad = sorted(set(out.qwix_rules) - set(QWIX_RULES))
    if bad:
        raise ValueError(f"--qwix-rules: unknown {bad}; known: {list(QWIX_RULES)}")
    for name in ("ptq_bits", "qat_bits"):
        for b in getattr(out, name):
            if not q.MIN_BITS <= b <= q.MAX_BITS:
                raise ValueError(f"--{name.replace('_', '-')}: bits must lie in [1, 8], got {b}")
    for b in out.budgets:
        if not 1.0 < b < 8.0:
            raise ValueError(f"--budgets: a target average must lie strictly inside (1, 8) bits, got {b}")
    for name in ("methods", "qwix_rules", "ptq_bits", "qat_bits", "budgets"):
        values = getattr(out, name)
        if len(set(values)) != len(values):
            raise ValueError(f"--{name.replace('_', '-')} must be distinct values, got {values}")
    if "ptq" in out.methods and "fp" not in out.methods:
        raise ValueError("--methods: ptq quantizes the fp model; add fp")
    if out.pretrain_epochs and "fp" not in out.methods:
        raise ValueError("--pretrain-epochs: the methods start from the fp model's snapshot; add fp "
                         "to --methods")
    if not 0.0 <= out.distill <= 1.0:
        raise ValueError(f"--distill must lie in [0, 1], got {out.distill}")
    if not (np.isfinite(out.distill_temperature) and out.distill_temperature > 0):
        raise ValueError(f"--distill-temperature must be a positive number, got {out.distill_temperature}")
    if out.distill and not out.pretrain_epochs:
        raise ValueError("--distill: the teacher is the FP snapshot after --pretrain-epochs; set it")
    if {"learned", "learned_w"} & set(out.methods) and not out.budgets:
        raise ValueError("--methods learned/learned_w need at least one --budgets value")
    if not 1.0 < out.act_budget < 8.0:
        raise ValueError(f"--act-budget must lie strictly inside (1, 8) bits, got {out.act_budget}")
    import pallas_kernels as pk
    if out.k_tile not in pk.SUPPORTED_K_TILES:
        raise ValueError(f"--k-tile must be one of {pk.SUPPORTED_K_TILES}, got {out.k_tile}")
    if out.n_tile not in pk.SUPPORTED_N_TILES:
        raise ValueError(f"--n-tile must be one of {pk.SUPPORTED_N_TILES}, got {out.n_tile}")
    return out


#: bumped when what a saved seed means changes
RESULTS_VERSION = 1


def _config(args) -> dict:
    skip = {"seeds", "out_dir", "name", "reuse"}      # (seeds saved before --distill/--granularity match)
    skip |= {"distill", "distill_temperature"} if not args.distill else set()
    skip |= {"granularity"} if args.granularity == "input" else set()
    return {"version": RESULTS_VERSION, **{k: v for k, v in vars(args).items() if k not in skip}}


def qwix_available() -> bool:
    try:
        import qwix  # noqa: F401
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------------------- setup


@dataclasses.dataclass
class Setup:
    """What every method of a seed shares: the data set, the model, the task, the selector."""

    args: argparse.Namespace
    dataset: object
    model: nn.Module
    task: object
    select: S.Selector
    text: bool
    layouts: dict

    @property
    def epochs(self) -> int:
        return self.args.noise_epochs + self.args.finetune_epochs


def _subset(source, n):
    """``n`` examples of ``source`` drawn without replacement by a fixed generator (the embedded sets
    are sorted by class, so the first ``n`` would be one or two classes)."""
    if n is None or n >= len(source):
        return source
    return ArraySource(source.take(np.sort(np.random.default_rng(0).permutation(len(source))[:n])))


def build(args) -> Setup:
    dataset = load_dataset(args.dataset, val_size=args.val_size, seed=0, seq_len=args.seq_len)
    splits = dict(dataset.splits)
    splits["train"] = _subset(splits["train"], args.train_size)
    if "test" in splits:
        splits["test"] = _subset(splits["test"], args.test_size)
    dataset = dataclasses.replace(dataset, splits=splits)
    kwargs = {}
    if args.model == "transformer_lm":
        kwargs = dict(width=args.width, depth=args.depth, heads=args.heads, max_len=args.seq_len)
    model = get_model(args.model, dataset.num_classes, **kwargs)
    task = make_task(model, dataset, eval_splits=("test",))
    layouts = q.kernel_layouts(model, jnp.asarray(task.example))
    return Setup(args, dataset, model, task, SELECTORS[args.select](), dataset.kind == "text", layouts)


def _score(row: dict, text: bool) -> dict:
    out = {"test_acc": float(row["test_acc"])}
    if text:
        out["test_bpc"] = float(row["test_bpc"])
    return out


def _weights_metric(state, ctx):
    del ctx
    return {"weight_bits": q.average_bits(state.params)}


def layer_order(model: nn.Module, example) -> list[str]:
    """Module paths of every ``nn.Dense``/``nn.DenseGeneral``/``nn.Conv`` in the order they are
    called (the first and last layer of a rule set are the first and last of this list)."""
    order: list[str] = []

    def record(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name == "__call__" and isinstance(mod, (nn.Dense, nn.DenseGeneral, nn.Conv)):
            path = "/".join(mod.path)
            if path not in order:
                order.append(path)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), jnp.asarray(example))
    return order


def _kernel_sizes(params) -> dict[str, tuple]:
    """``{module path: kernel shape}`` of every ``kernel`` leaf."""
    out = {}
    for path in S.leaf_paths(params):
        if path.endswith("/kernel"):
            leaf = params
            for part in path.split("/"):
                leaf = leaf[part]
            out[path[:-len("/kernel")]] = tuple(np.shape(leaf))
    return out


def _fp32_bytes(params, batch_stats) -> int:
    return 4 * sum(int(np.size(x)) for x in jax.tree.leaves((params, batch_stats)))


# --------------------------------------------------------------------------------------- methods


def _size_fields(setup: Setup, latent, batch_stats) -> dict:
    """Export the phase-2 latent and count its bytes (module doc)."""
    ex = q.export(setup.model, latent, batch_stats, k_tile=setup.args.k_tile, n_tile=setup.args.n_tile)
    size = q.size_bytes(ex)
    return {"bytes": int(size["total"]), "bytes_tight": int(size["total_unpadded"]),
            "fp32_bytes": int(size["fp32"]), "size": {k: int(v) for k, v in size.items()},
            "_exported": ex}


def export_accuracy(setup: Setup, ex) -> float | None:
    """Test accuracy of the exported (packed) model on the test split (images; None for text)."""
    if setup.text:
        return None
    test = setup.task.evals["test"]
    arrays = test.arrays
    tf = setup.task.eval_transform
    x = tf({"inputs": arrays["inputs"]}, np.random.default_rng(0))["inputs"] if tf else arrays["inputs"]
    fwd = jax.jit(ex.apply)
    correct = 0
    for i in range(0, len(x), 1000):
        logits = fwd(ex.tree, jnp.asarray(x[i:i + 1000]))
        correct += int((np.asarray(logits).argmax(-1) == arrays["targets"][i:i + 1000]).sum())
    return correct / len(x)


def _palettes(latent) -> dict:
    """``{layer: {bits: channels}}`` of every QuantWeight node."""
    out = {}

    def visit(path, leaf):
        if isinstance(leaf, q.QuantWeight):
            levels, counts = np.unique(np.asarray(leaf.bits).astype(int), return_counts=True)
            out[path] = {int(b): int(c) for b, c in zip(levels, counts)}
        return leaf

    _walk_nodes(latent, visit)
    return out


def _walk_nodes(tree, fn, prefix=""):
    if isinstance(tree, (q.QuantWeight, q.NoisyWeight)):
        fn(prefix, tree)
        return
    if isinstance(tree, dict):
        for k, v in tree.items():
            _walk_nodes(v, fn, f"{prefix}/{k}" if prefix else str(k))


def _learned_bits(latent) -> dict:
    out = {}

    def visit(path, leaf):
        if isinstance(leaf, q.NoisyWeight):
            out[path] = np.round(np.asarray(q.learned_bits(leaf)), 4).tolist()

    _walk_nodes(latent, visit)
    return out


def uniform_latent(setup: Setup, params, bits: int, learned_range: bool = False):
    """``params`` with every selected kernel a one-level :class:`~pae.quant.QuantWeight` at ``bits``
    (``learned_range``: with a trainable clip range, initialized at the max-abs)."""
    cfg = q.QuantConfig(b_init=4.5, layouts=setup.layouts, learned_range=learned_range,
                        granularity=setup.args.granularity)
    lat = q.noise_transform(cfg, setup.select).init(params, jax.random.PRNGKey(0))
    return q.assign_palette(lat, levels=1, fixed=(int(bits),))


def _quant_cfg(setup: Setup, seed: int, **kw) -> q.QuantConfig:
    a = setup.args
    return q.QuantConfig(noise_epochs=a.noise_epochs, finetune_epochs=a.finetune_epochs, lr=a.lr,
                         finetune_lr=a.finetune_lr, bits_lr=a.bits_lr, b_init=a.b_init,
                         learned_range=a.learned_range, range_lr=a.range_lr, seed=seed,
                         granularity=a.granularity, layouts=setup.layouts, **kw)


def initial_state(setup: Setup, seed: int, pretrained=None, init_latent=None, model=None):
    """The state a trained method starts from: the seed's initial weights, or (``--pretrain-epochs``)
    the FP model's ``pretrained`` snapshot (its parameters and BatchNorm statistics; a fresh
    optimizer), then ``init_latent(params, key)`` if given."""
    model = setup.model if model is None else model
    if pretrained is None:
        return init_state(model, setup.task.example, seed, init_latent)
    state = init_state(model, setup.task.example, seed)
    if jax.tree.structure(state.params) != jax.tree.structure(pretrained.params):
        raise ValueError(f"the pretrained FP parameters do not fit {type(model).__name__}'s: "
                         f"{jax.tree.structure(pretrained.params)} vs {jax.tree.structure(state.params)}")
    params = jax.tree.map(jnp.asarray, pretrained.params)
    if init_latent is not None:
        params = init_latent(params, jax.random.split(jax.random.PRNGKey(seed), 3)[1])
    return state.replace(params=params, batch_stats=jax.tree.map(jnp.asarray, pretrained.batch_stats))


def continuing(phases, setup: Setup, pretrained=None):
    """``phases`` with their data order continuing after the pretraining epochs (the FP run's), and
    with ``--distill`` learning from the ``pretrained`` FP snapshot (the float model)."""
    a = setup.args
    distill = Distill(pretrained, weight=a.distill, temperature=a.distill_temperature,
                      model=setup.model) if a.distill and pretrained is not None else None
    out, start = [], a.pretrain_epochs
    for ph in phases:
        out.append(dataclasses.replace(ph, data_epochs_from=start if start else ph.data_epochs_from,
                                       distill=distill))
        start += ph.epochs
    return out


def run_fp(setup: Setup, seed: int):
    """The float baseline: ``pretrain + noise + finetune`` epochs of Adam; returns its row, its
    final state (PTQ quantizes it) and its state after ``--pretrain-epochs`` (None without)."""
    a = setup.args
    state = init_state(setup.model, setup.task.example, seed)
    keep = {a.pretrain_epochs: "pretrained"} if a.pretrain_epochs else {}
    phase = Phase("fp", a.pretrain_epochs + setup.epochs, lambda spe: optax.adam(a.lr), keep=keep)
    res = train_phases(setup.task, [phase], state, batch_size=a.batch_size, seed=seed)
    last = res.history[-1]
    row = {"method": "fp", "setting": "fp32", "label": "FP32", "weight_bits": FLOAT_BITS,
           "act_bits": FLOAT_BITS, **_score(last, setup.text)}
    key = _score_key(setup.text)
    if a.pretrain_epochs:
        row["pretrained_" + key] = res.history[a.pretrain_epochs - 1][key]
    scores = [h[key] for h in res.history]
    best = int(np.argmin(scores) if setup.text else np.argmax(scores))
    row.update({"best_" + key: float(scores[best]), "best_epoch": best + 1})
    fp32 = _fp32_bytes(res.state.params, res.state.batch_stats)
    row.update(bytes=fp32, bytes_tight=fp32, fp32_bytes=fp32)
    return row, res.state, res.snapshots.get("pretrained")


def run_ptq(setup: Setup, fp_state, bits: int) -> dict:
    """Round-to-nearest of the trained float model at ``bits`` (range per output channel), no training."""
    a = setup.args
    latent = uniform_latent(setup, fp_state.params, bits)
    state = fp_state.replace(params=latent)
    phase = Phase("ptq", 0, lambda spe: optax.identity(), q.palette_quantizer())
    ev = evaluate(setup.task, state, batch_size=max(a.batch_size, 256), phase=phase)
    row = {"method": "ptq", "setting": str(bits), "label": f"PTQ {bits}-bit",
           "weight_bits": float(q.average_bits(latent)), "act_bits": FLOAT_BITS, **_score(ev, setup.text)}
    return _with_size(setup, row, latent, fp_state.batch_stats)


def _with_size(setup, row, latent, batch_stats) -> dict:
    size = _size_fields(setup, latent, batch_stats)
    ex = size.pop("_exported")
    row.update(size)
    acc = export_accuracy(setup, ex)
    if acc is not None:
        row["export_test_acc"] = acc
    return row


def run_qat(setup: Setup, seed: int, bits: int, pretrained=None) -> dict:
    """Uniform QAT: one-level palette at ``bits`` from the initial (or pretrained) weights, STE, the
    whole run."""
    a = setup.args
    cfg = _quant_cfg(setup, seed)
    state = initial_state(setup, seed, pretrained,
                          lambda params, key: uniform_latent(setup, params, bits, a.learned_range))
    phase = Phase("qat", setup.epochs, lambda spe: q.quant_optimizer(cfg, "finetune"),
                  q.palette_quantizer(), metrics=_weights_metric)
    res = train_phases(setup.task, continuing([phase], setup, pretrained), state, batch_size=a.batch_size,
                       seed=seed)
    last = res.history[-1]
    row = {"method": "qat", "setting": str(bits), "label": f"uniform QAT {bits}-bit",
           "weight_bits": float(last["weight_bits"]), "act_bits": FLOAT_BITS, **_score(last, setup.text)}
    return _with_size(setup, row, res.state.params, res.state.batch_stats)


def run_learned(setup: Setup, seed: int, budget: float, activations: bool = True,
                pretrained=None) -> dict:
    """pae's two phases at a target average weight width ``budget``; with ``activations`` the inputs
    of the same layers also learn per-channel widths at ``--act-budget`` average bits
    (``QuantConfig(activations=True)``); else they stay float (method ``learned_w``)."""
    a = setup.args
    acts = dict(activations=True, act_target_bits=float(a.act_budget), act_b_init=a.b_init) \
        if activations else {}
    cfg = _quant_cfg(setup, seed, target_bits=float(budget), **acts)
    state = initial_state(setup, seed, pretrained, q.noise_transform(cfg, setup.select).init)
    res = train_phases(setup.task, continuing(q.quant_phases(cfg, setup.select, model=setup.model), setup,
                                              pretrained), state, batch_size=a.batch_size, seed=seed)
    last = res.history[-1]
    noise_last = res.last("noise") if a.noise_epochs else None
    method = "learned" if activations else "learned_w"
    what = f"W {budget:g}, A {a.act_budget:g}" if activations else f"W {budget:g}, A float"
    row = {"method": method, "setting": f"{budget:g}", "label": f"learned palette ({what})",
           "target_bits": float(budget), "weight_bits": float(last["weight_bits"]),
           "act_bits": float(last.get("act_bits", FLOAT_BITS)), **_score(last, setup.text),
           "learned_weight_bits": None if noise_last is None else float(noise_last["weight_bits"]),
           "learned_act_bits": None if noise_last is None or "act_bits" not in noise_last
           else float(noise_last["act_bits"]),
           "palettes": _palettes(res.state.params),
           "learned_bits": _learned_bits(res.snapshots["noise"].params) if "noise" in res.snapshots else {}}
    if activations:
        row["act_target_bits"] = float(a.act_budget)
    return _with_size(setup, row, res.state.params, res.state.batch_stats)


def qwix_rules(name: str, order: list[str]):
    """The qwix rule list of a named rule set (module doc); ``order``: layer paths in call order."""
    import qwix

    if name in ("int8", "int4", "int3", "int2"):
        return [qwix.QuantizationRule(module_path=".*", weight_qtype=name)]
    if name == "w8a8":
        return [qwix.QuantizationRule(module_path=".*", weight_qtype="int8", act_qtype="int8")]
    if name == "first_last_8_rest_4":
        ends = sorted({order[0], order[-1]})
        return ([qwix.QuantizationRule(module_path=re.escape(p), weight_qtype="int8") for p in ends]
                + [qwix.QuantizationRule(module_path=".*", weight_qtype="int4")])
    raise ValueError(f"unknown qwix rule set {name!r}; known: {list(QWIX_RULES)}")


def _qtype_bits(qtype: str | None) -> int | None:
    return None if qtype is None else int(qtype.replace("int", ""))


def qwix_accounting(rules, params, batch_stats, order: list[str]) -> dict:
    """Average weight and activation bits and bytes of a qwix rule set, counted as qwix stores it:
    codes in ``int4`` containers (<= 4 bits) or ``int8``, one float32 scale per output channel, every
    other leaf float32. Only the Dense/Conv kernels of ``order`` are matched (first rule wins)."""
    shapes = _kernel_sizes(params)
    total_bits = n_quant = act_bits_sum = act_n = 0
    quant_bytes = 0
    float_count = sum(int(np.size(x)) for x in jax.tree.leaves((params, batch_stats)))
    for path in order:
        if path not in shapes:
            continue
        rule = next((r for r in rules if re.fullmatch(r.module_path, path)), None)
        wb = _qtype_bits(rule.weight_qtype) if rule is not None else None
        if wb is None:
            continue
        n = int(np.prod(shapes[path]))
        total_bits += wb * n
        n_quant += n
        container = 4 if wb <= 4 else 8
        quant_bytes += -(-n * container // 8) + 4 * int(shapes[path][-1])
        float_count -= n
        act = _qtype_bits(rule.act_qtype)
        act_bits_sum += (act if act is not None else FLOAT_BITS) * n
        act_n += n
    if n_quant == 0:
        raise ValueError("qwix rule set matched no Dense/Conv kernel of the model")
    return {"weight_bits": total_bits / n_quant, "act_bits": act_bits_sum / act_n,
            "bytes": quant_bytes + 4 * float_count}


def run_qwix(setup: Setup, seed: int, name: str, order: list[str], pretrained=None) -> dict:
    """qwix QAT (``QtProvider``) through the same engine, optimizer, epochs and seed as the rest
    (from the initial or the pretrained weights: qwix's QAT model holds the float model's
    parameters)."""
    import qwix

    a = setup.args
    rules = qwix_rules(name, order)
    qmodel = qwix.quantize_model(setup.model, qwix.QtProvider(rules))
    task = dataclasses.replace(setup.task, model=qmodel)
    state = initial_state(setup, seed, pretrained, model=qmodel)
    phase = Phase("qwix", setup.epochs, lambda spe: optax.adam(a.lr))
    res = train_phases(task, continuing([phase], setup, pretrained), state, batch_size=a.batch_size,
                       seed=seed)
    acct = qwix_accounting(rules, res.state.params, res.state.batch_stats, order)
    fp32 = _fp32_bytes(res.state.params, res.state.batch_stats)
    labels = {"w8a8": "qwix W8A8", "first_last_8_rest_4": "qwix first/last 8, rest 4"}
    return {"method": "qwix", "setting": name, "label": labels.get(name, f"qwix {name} (weights)"),
            "weight_bits": acct["weight_bits"], "act_bits": acct["act_bits"], "bytes": acct["bytes"],
            "bytes_tight": acct["bytes"], "fp32_bytes": fp32, **_score(res.history[-1], setup.text)}


# ------------------------------------------------------------------------------------ one seed


def run_seed(args, seed: int) -> dict:
    setup = build(args)
    log = lambda msg: print(f"[seed {seed}] {msg}", flush=True)  # noqa: E731
    rows, timings = [], {}

    def timed(key, fn, *a):
        t0 = time.perf_counter()
        out = fn(*a)
        timings[key] = round(time.perf_counter() - t0, 2)
        return out

    def report(row):
        score = f"bpc {row['test_bpc']:.4f}" if setup.text else f"test acc {row['test_acc']:.4f}"
        log(f"{row['label']}: {score}, weight bits {row['weight_bits']:.3f}, "
            f"{row['fp32_bytes'] / row['bytes_tight']:.2f}x smaller than fp32 "
            f"({row['fp32_bytes'] / row['bytes']:.2f}x stored)")
        rows.append(row)

    fp_state = pre = None
    if "fp" in args.methods:
        row, fp_state, pre = timed("fp", run_fp, setup, seed)
        report(row)
    if "ptq" in args.methods:
        for b in args.ptq_bits:
            report(timed(f"ptq{b}", run_ptq, setup, fp_state, b))
    if "qat" in args.methods:
        for b in args.qat_bits:
            report(timed(f"qat{b}", run_qat, setup, seed, b, pre))
    for method in ("learned", "learned_w"):
        if method in args.methods:
            for budget in args.budgets:
                report(timed(f"{method}{budget:g}", run_learned, setup, seed, budget,
                             method == "learned", pre))
    if "qwix" in args.methods and args.qwix_rules:
        if qwix_available():
            order = layer_order(setup.model, setup.task.example)
            for name in args.qwix_rules:
                report(timed(f"qwix_{name}", run_qwix, setup, seed, name, order, pre))
        else:
            log("qwix is not installed: the qwix rows are skipped (pip install -e '.[experiments]')")
    rows = [{"seed": seed, **r} for r in rows]
    return {"seed": seed, "config": _config(args), "rows": rows, "timings_s": timings,
            "loadavg": list(os.getloadavg())}


def _write_json(path: str, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=2, default=float))


def run(args, base: str | None = None) -> dict:
    """Every seed (saved as it finishes; reused with ``--reuse`` when the configuration matches),
    then the summary and the targets over seeds."""
    per_seed = run_seeds(args.seeds, lambda seed: run_seed(args, seed), config=_config(args), base=base,
                         reuse=args.reuse)
    rows = [r for one in per_seed for r in one["rows"]]
    text = model_kind(args.model) == "text"
    summary = summarize(rows)
    return {"config": _config(args), "seeds": list(args.seeds), "rows": rows, "summary": summary,
            "targets": check_targets(rows, text), "timings_s": [one["timings_s"] for one in per_seed],
            "loadavg": [one.get("loadavg") for one in per_seed],
            "qwix": _qwix_version()}


def _qwix_version():
    if not qwix_available():
        return None
    import qwix
    return qwix.__version__


# -------------------------------------------------------------------------------- summary, targets


def _mean_sd(values) -> tuple[float, float]:
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def summarize(rows) -> list[dict]:
    """Mean and standard deviation over seeds per (method, setting), in the rows' order."""
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["method"], r["setting"]), []).append(r)
    out = []
    for (method, setting), rs in groups.items():
        row = {"method": method, "setting": setting, "label": rs[0]["label"], "n": len(rs)}
        for key in ("weight_bits", "act_bits", "bytes", "bytes_tight", "fp32_bytes", "test_acc",
                    "test_bpc", "best_test_acc", "best_test_bpc", "export_test_acc"):
            if all(key in r and r[key] is not None for r in rs):
                row[key], row[key + "_std"] = _mean_sd([r[key] for r in rs])
        row["ratio"] = row["fp32_bytes"] / row["bytes"]
        row["ratio_tight"] = row["fp32_bytes"] / row["bytes_tight"]
        if all("size" in r for r in rs):
            # the quantized kernels alone (the issue's "weights ... counting scales and perms"):
            # fp32 kernel bytes / (codes + scales + permutations); no activation quantizers or biases
            row["weights_ratio"], _ = _mean_sd([(r["size"]["fp32"] - r["size"]["float"]) / (
                r["size"]["codes"] + r["size"]["scales"] + r["size"]["perms"]) for r in rs])
            row["weights_ratio_tight"], _ = _mean_sd([(r["size"]["fp32"] - r["size"]["float"]) / (
                r["size"]["codes_unpadded"] + r["size"]["scales_unpadded"] + r["size"]["perms"]) for r in rs])
        if "target_bits" in rs[0]:
            row["target_bits"] = rs[0]["target_bits"]
        if "palettes" in rs[0]:
            row["palettes"] = rs[0]["palettes"]      # the first seed's, for the table
        out.append(row)
    return out


def _score_key(text: bool) -> str:
    return "test_bpc" if text else "test_acc"


def _curve_at(rows, bits: float, key: str):
    """A method's score at ``bits`` by linear interpolation between its settings (None outside)."""
    pts = sorted((r["weight_bits"], r[key]) for r in rows)
    xs = np.array([p[0] for p in pts])
    if len(xs) == 0 or bits < xs.min() - 1e-6 or bits > xs.max() + 1e-6:
        return None
    return float(np.interp(bits, xs, [p[1] for p in pts]))


def _paired(rows, method, learned_setting, peer_rows_of, key, better):
    """Seed-paired differences learned - peer (in "better" direction: positive = learned better)."""
    diffs = []
    for seed in sorted({r["seed"] for r in rows}):
        mine = [r for r in rows if r["seed"] == seed]
        lr = next((r for r in mine if r["method"] == method and r["setting"] == learned_setting), None)
        if lr is None:
            continue
        peer = peer_rows_of(mine, lr["weight_bits"])
        if peer is None:
            continue
        diffs.append(better * (lr[key] - peer))
    if not diffs:
        return None
    d = np.asarray(diffs)
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0
    return {"diff": float(d.mean()), "se": se, "n": len(d)}


def check_targets(rows, text: bool) -> dict:
    """The issue's targets, on the means over seeds (image: accuracy; text: bits per character).

    ``compression``: per learned budget, the size ratios (whole model: stored and tight; the
    quantized kernels alone, ``weights_ratio*``: fp32 kernel bytes over codes + scales +
    permutations) and whether the score is within 0.5 points of FP accuracy (text: within 2 % of
    FP bpc). The FP reference is the better of FP's final score and its best epoch's (the mean
    over seeds of each seed's best test score): a float model that overfits in its last epochs
    (the character LM does) would otherwise make the target easier. ``met_*``: some budget is
    >= 10x (text: 7x) smaller (whole model, tight / stored; or
    ``met_weights_tight_with_activations``: the kernels alone, tight) and within that tolerance
    (``*_with_activations``: and activations <= 4 average bits).
    ``vs_qat`` / ``vs_qwix``: the learned score minus the peer's at the learned row's average weight
    bits, paired by seed: uniform QAT interpolated linearly in bits between its settings; qwix: the
    best of its weight-only curve interpolated there and every rule set using no more bits
    (+0.05). ``beyond_spread``: the mean difference exceeds two standard errors.
    """
    key = _score_key(text)
    better = -1.0 if text else 1.0
    summary = summarize(rows)
    fp = next((r for r in summary if r["method"] == "fp"), None)
    learned = [r for r in summary if r["method"] in ("learned", "learned_w")]
    ratio_goal = 7.0 if text else 10.0
    out = {"score": key, "ratio_goal": ratio_goal, "compression": []}
    fp_ref = None
    if fp is not None:
        pick = min if text else max
        fp_ref = pick(fp[key], fp.get("best_" + key, fp[key]))
    for r in learned:
        if fp is None:
            ok = None
        elif text:
            ok = r[key] <= fp_ref * 1.02
        else:
            ok = r[key] >= fp_ref - 0.005
        acts = r.get("act_bits", FLOAT_BITS)
        out["compression"].append({
            "method": r["method"], "budget": r["setting"], "weight_bits": r["weight_bits"], "act_bits": acts,
            "ratio": r["ratio"], "ratio_tight": r["ratio_tight"], "weights_ratio": r.get("weights_ratio"),
            "weights_ratio_tight": r.get("weights_ratio_tight"), "score": r[key],
            "fp_score": None if fp is None else fp[key], "fp_reference": fp_ref, "within_tolerance": ok,
            "acts_at_most_4": acts <= 4.0})
    comp = out["compression"]
    out["met_tight"] = any(c["within_tolerance"] and c["ratio_tight"] >= ratio_goal for c in comp)
    out["met_stored"] = any(c["within_tolerance"] and c["ratio"] >= ratio_goal for c in comp)
    out["met_with_activations"] = any(c["within_tolerance"] and c["ratio_tight"] >= ratio_goal
                                      and c["acts_at_most_4"] for c in comp)
    out["met_weights_tight_with_activations"] = any(
        c["within_tolerance"] and (c["weights_ratio_tight"] or 0) >= ratio_goal and c["acts_at_most_4"]
        for c in comp)

    def qat_at(mine, bits):
        return _curve_at([r for r in mine if r["method"] == "qat"], bits, key)

    def qwix_at(mine, bits):
        qw = [r for r in mine if r["method"] == "qwix"]
        cands = []
        uniform = [r for r in qw if r["setting"] in ("int8", "int4", "int3", "int2")]
        at = _curve_at(uniform, bits, key)
        if at is not None:
            cands.append(at)
        cands += [r[key] for r in qw if r["weight_bits"] <= bits + 0.05]
        if not cands:
            return None
        return min(cands) if text else max(cands)

    for name, fn in (("vs_qat", qat_at), ("vs_qwix", qwix_at)):
        comps = []
        for r in learned:
            c = _paired(rows, r["method"], r["setting"], fn, key, better)
            if c is not None:
                comps.append({"method": r["method"], "budget": r["setting"],
                              "weight_bits": r["weight_bits"], "act_bits": r["act_bits"], **c,
                              "above": c["diff"] > 0, "beyond_spread": c["diff"] > 2 * c["se"]})
        out[name] = comps
        out[f"learned_above_{name[3:]}"] = bool(comps) and all(c["above"] for c in comps)
        out[f"learned_above_{name[3:]}_beyond_spread"] = bool(comps) and all(c["beyond_spread"] for c in comps)
    return out


def table(summary, text: bool) -> str:
    key = _score_key(text)
    name = "test bpc" if text else "test acc (%)"
    lines = [f"{'method':<30}{'W bits':>8}{'A bits':>8}{'bytes':>10}{'x fp32':>8}{'tight':>10}"
             f"{'x fp32':>8}{name:>20}{'n':>3}"]
    for r in summary:
        scale = 1.0 if text else 100.0
        score = f"{scale * r[key]:.2f}" + (f" ± {scale * r[key + '_std']:.2f}" if r["n"] > 1 else "")
        if text:
            score = f"{r[key]:.4f}" + (f" ± {r[key + '_std']:.4f}" if r["n"] > 1 else "")
        lines.append(f"{r['label']:<30}{r['weight_bits']:>8.2f}{r['act_bits']:>8.1f}{int(r['bytes']):>10,d}"
                     f"{r['ratio']:>8.2f}{int(r['bytes_tight']):>10,d}{r['ratio_tight']:>8.2f}{score:>20}"
                     f"{r['n']:>3}")
    return "\n".join(lines)


def palette_table(summary) -> str:
    lines = []
    for r in summary:
        if "palettes" not in r:
            continue
        parts = []
        for layer, counts in r["palettes"].items():
            short = layer[:-len("/kernel")] if layer.endswith("/kernel") else layer
            parts.append(f"{short} " + "+".join(f"{c}x{b}b" for b, c in sorted(
                (int(b), c) for b, c in counts.items())))
        lines.append(f"{r['label']} (seed 0) channels per level: " + "; ".join(parts))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- plot

_STYLES = {"ptq": ("s--", "C1"), "qat": ("^-", "C2"), "learned": ("o-", "C3"), "learned_w": ("o--", "C4"),
           "qwix": ("D:", "C0")}


def short_layer(path: str) -> str:
    """A layer path short enough for a panel title: ``DecoderBlock_0/MultiHeadDotProductAttention_0/
    query/kernel`` -> ``DB0/MHDPA0/query`` (a module name ``Name_k`` becomes its capitals and ``k``)."""
    parts = [p for p in path.split("/") if p != "kernel"]
    return "/".join(re.sub(r"^([A-Za-z]+)_(\d+)$",
                           lambda m: "".join(c for c in m.group(1) if c.isupper()) + m.group(2), p)
                    for p in parts)


def plot_title(args) -> str:
    seeds = f"{len(args.seeds)} seed{'s' if len(args.seeds) > 1 else ''}"
    each = f"{args.noise_epochs + args.finetune_epochs} epochs each"
    if args.pretrain_epochs:
        each += f" from FP after {args.pretrain_epochs}"
    return f"{args.model} on {args.dataset}: quantization methods ({seeds}, {each})"


def plot(result, path, title):
    """Score vs average weight bits for every method (mean, error bars one sd over seeds); size vs
    bits; the learned widths per layer (histogram, first seed); the palette chosen per layer."""
    import matplotlib
    import matplotlib.ticker
    from matplotlib.figure import Figure      # no pyplot: the caller's backend is left alone

    text = result["targets"]["score"] == "test_bpc"
    key = _score_key(text)
    scale = 1.0 if text else 100.0
    summary = result["summary"]
    first = [r for r in result["rows"] if r["seed"] == result["seeds"][0]]
    learned_rows = ([r for r in first if r["method"] == "learned"]
                    or [r for r in first if r["method"] == "learned_w"])
    layers = list(learned_rows[0]["learned_bits"]) if learned_rows and learned_rows[0]["learned_bits"] else []
    fig = Figure(figsize=(14, 9 if layers else 4.5))
    grid = fig.add_gridspec(3 if layers else 1, max(len(layers), 2))
    ax = fig.add_subplot(grid[0, : max(len(layers), 2) // 2 + (max(len(layers), 2) % 2)])
    ax2 = fig.add_subplot(grid[0, max(len(layers), 2) // 2 + (max(len(layers), 2) % 2):])
    fp = next((r for r in summary if r["method"] == "fp"), None)
    if fp:
        ax.axhline(scale * fp[key], color="k", ls=":", label="FP32")
        ax.axhspan(scale * (fp[key] - fp[key + "_std"]), scale * (fp[key] + fp[key + "_std"]),
                   color="k", alpha=0.08)
        best = fp.get("best_" + key)
        if best is not None and abs(best - fp[key]) > 1e-9:
            ax.axhline(scale * best, color="k", ls="--", lw=1, label="FP32, best epoch")
    for method, (style, color) in _STYLES.items():
        rs = [r for r in summary if r["method"] == method]
        if method == "qwix":
            uniform = sorted((r for r in rs if r["setting"].startswith("int")), key=lambda r: r["weight_bits"])
            other = [r for r in rs if not r["setting"].startswith("int")]
            if uniform:
                ax.errorbar([r["weight_bits"] for r in uniform], [scale * r[key] for r in uniform],
                            yerr=[scale * r[key + "_std"] for r in uniform], fmt=style, color=color,
                            capsize=3, label="qwix QAT (weight-only)")
            for r, m in zip(other, ("P", "X", "*")):
                ax.errorbar([r["weight_bits"]], [scale * r[key]], yerr=[scale * r[key + "_std"]], fmt=m,
                            color=color, ms=9, capsize=3, label=r["label"])
            rs = uniform + other
        else:
            rs = sorted(rs, key=lambda r: r["weight_bits"])
            if rs:
                ax.errorbar([r["weight_bits"] for r in rs], [scale * r[key] for r in rs],
                            yerr=[scale * r[key + "_std"] for r in rs], fmt=style, color=color, capsize=3,
                            label={"ptq": "RTN PTQ (float acts)", "qat": "uniform QAT, STE (float acts)",
                                   "learned": "pae learned 2-level palette (learned acts)",
                                   "learned_w": "pae learned 2-level palette (float acts)"}[method])
        if rs and method != "qwix":
            ax2.plot([r["weight_bits"] for r in rs], [r["ratio_tight"] for r in rs], style, color=color,
                     label=f"{method} (tight)")
            ax2.plot([r["weight_bits"] for r in rs], [r["ratio"] for r in rs], style, color=color,
                     alpha=0.35, label=f"{method} (stored, tile-padded)")
        elif rs:
            ax2.plot([r["weight_bits"] for r in rs], [r["ratio"] for r in rs], "D", color=color,
                     label="qwix (its containers)")
    ax.set_xlabel("average weight bits")
    ax.set_ylabel("test bits per character" if text else "test accuracy (%)")
    for a_ in (ax, ax2):
        a_.set_xscale("log", base=2)
        a_.set_xticks([1, 2, 3, 4, 5, 6, 8])
        a_.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        a_.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    ax2.set_xlabel("average weight bits")
    ax2.set_ylabel("size: fp32 bytes / bytes")
    ax2.axhline(result["targets"]["ratio_goal"], color="k", ls=":", lw=1)
    ax2.grid(alpha=0.3, which="both")
    ax2.legend(fontsize=6)
    if layers:
        bins = np.linspace(1, 8, 29)
        for j, layer in enumerate(layers):
            a = fig.add_subplot(grid[1, j])
            for i, r in enumerate(learned_rows):
                a.hist(r["learned_bits"][layer], bins=bins, alpha=0.6, color=f"C{i + 3}",
                       label=f"budget {r['setting']}")
            a.set_title(short_layer(layer), fontsize=7)
            a.set_xticks([2, 4, 6, 8])
            a.tick_params(labelsize=6)
            a.set_xlabel("bits", fontsize=7)
            if j == 0:
                a.set_ylabel("channels (learned bits)")
                a.legend(fontsize=6)
            b = fig.add_subplot(grid[2, j])
            for i, r in enumerate(learned_rows):
                counts = r["palettes"].get(layer, {})
                total = sum(counts.values()) or 1
                bottom = 0.0
                for bits, c in sorted((int(k), v) for k, v in counts.items()):
                    b.bar(i, c / total, bottom=bottom, color=matplotlib.colormaps["viridis"]((bits - 1) / 7), edgecolor="k")
                    b.text(i, bottom + c / total / 2, f"{bits}b", ha="center", va="center", fontsize=7,
                           color="w")
                    bottom += c / total
            b.set_xticks(range(len(learned_rows)))
            b.set_xticklabels([r["setting"] for r in learned_rows], fontsize=6)
            b.tick_params(labelsize=6)
            b.set_xlabel("budget", fontsize=7)
            b.set_title("palette", fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    from pae.train.cli import one_line_errors

    args = resolve(one_line_errors(build_parser()).parse_args(argv))
    name = args.name or f"{args.model}_{args.dataset}"
    os.makedirs(args.out_dir, exist_ok=True)
    base = os.path.join(args.out_dir, f"quantize_{name}")
    result = run(args, base)
    _write_json(base + ".json", result)
    plot(result, base + ".png", plot_title(args))
    text = model_kind(args.model) == "text"
    print(table(result["summary"], text))
    print(palette_table(result["summary"]))
    t = result["targets"]
    for c in t["compression"]:
        print(f"{c['method']} budget {c['budget']}: {c['weight_bits']:.2f} weight bits, "
              f"{c['act_bits']:.2f} act bits, kernels alone {c['weights_ratio_tight'] or 0:.2f}x smaller "
              f"(tight), whole model {c['ratio_tight']:.2f}x "
              f"smaller (tight; {c['ratio']:.2f}x stored), score {c['score']:.4f} vs FP "
              f"{c['fp_reference'] if c['fp_reference'] is None else round(c['fp_reference'], 4)} "
              f"(the better of its final and best epochs): within tolerance {c['within_tolerance']}")
    for name_ in ("vs_qat", "vs_qwix"):
        for c in t[name_]:
            unit = "bpc" if text else "points"
            scale = 1.0 if text else 100.0
            print(f"{c['method']} {c['budget']} ({c['weight_bits']:.2f} W bits) {name_}: "
                  f"{scale * c['diff']:+.3f} ± {scale * c['se']:.3f} {unit} "
                  f"(better = positive, n={c['n']})")
    print(json.dumps({k: v for k, v in t.items() if k not in ("compression", "vs_qat", "vs_qwix")}))
    print(f"load average {os.getloadavg()}")
    print(f"wrote {base}.json and {base}.png")
    return result


if __name__ == "__main__":
    from pae.train.cli import run_script

    run_script(main, sys.argv[1:])  # a user error: one "error: ..." line, exit 2 (--traceback: the trace)
