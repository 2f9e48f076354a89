"""Adaptive optimizers as optax gradient transformations: AvaGrad, AdaBound/AMSBound, CSGD.

Each follows its official PyTorch implementation step for step by default; where the paper
differs, the paper's form is a named option. See each function's docstring for the math and every
choice made.

* AvaGrad / AvaGradW: Savarese et al., arXiv 1912.01823 (github.com/lolemacs/avagrad).
* AdaBound / AMSBound / AdaBoundW: Luo et al., arXiv 1902.09843 (github.com/Luolc/AdaBound).
* CSGD: Savarese, arXiv 1908.04457 (github.com/lolemacs/adabound-and-csgd).
"""
from pae.optim._adabound import (
    ScaleByAdaBoundState,
    adabound,
    adabound_bounds,
    adaboundw,
    amsbound,
    scale_by_adabound,
)
from pae.optim._avagrad import AVAGRAD_FORMS, ScaleByAvaGradState, avagrad, avagradw, scale_by_avagrad
from pae.optim._csgd import csgd

__all__ = [
    "AVAGRAD_FORMS",
    "ScaleByAdaBoundState",
    "ScaleByAvaGradState",
    "adabound",
    "adabound_bounds",
    "adaboundw",
    "amsbound",
    "avagrad",
    "avagradw",
    "csgd",
    "scale_by_adabound",
    "scale_by_avagrad",
]
