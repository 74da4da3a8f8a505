"""`rtn` and `gptq`: quantization alone, the baselines of docs/quantization.md. Every
matrix keeps its shape (the ratio is 0: the pipeline's "kept dense" path) and is stored
quantized (QuantLinear): round-to-nearest, or GPTQ on the block's Gram. They need
`--quant`; `check_quant` holds every rule about which runs take `--quant`."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..errors import CospadiError
from ..layers.quantized import QuantLinear
from ..solvers.options import SolverOptions
from ..solvers.quantize import QuantSpec
from .base import Method


class _DenseQuant(Method):
    """A method that only quantizes: every job is a ratio-0 (dense) job, quantized with
    `dense_quantizer` by the pipeline (pipeline/solve.py)."""

    module_kind = QuantLinear
    quantized_kind = QuantLinear
    ignores_ratio = True

    def budget(self, d1: int, d2: int, ratio: float, options: SolverOptions, members: int = 1) -> Any:
        raise CospadiError(f"method {self.name} keeps every matrix's shape and has no budget: it takes no ratio")

    def solve(self, weights: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], budget: Any,
              options: SolverOptions) -> list[Any]:
        raise CospadiError(f"method {self.name} factorizes nothing: its matrices are quantized as they are")

    def error_curve(self, weights: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], budgets: Sequence[Any],
                    options: SolverOptions) -> list[float]:
        raise CospadiError(f"method {self.name} takes no per-matrix allocation: use --allocation uniform")


class Rtn(_DenseQuant):
    name = "rtn"
    dense_quantizer = "rtn"


class Gptq(_DenseQuant):
    name = "gptq"
    dense_quantizer = "gptq"


def check_quant(method: Method, spec: QuantSpec | None, group_size: int = 1, coef_bits: int | None = None,
                lazy: bool = False) -> None:
    """CospadiError (one line) for a run that cannot take quantization `spec` (None: none):
    a ratio-free method without it, a method without a quantized kind, shared factors
    (group size > 1), 14-bit values (--coef-bits 14), block-by-block loading (--lazy)."""
    if spec is None:
        if method.ignores_ratio:
            raise CospadiError(f"method {method.name} only quantizes: give --quant int8, int4 or int3")
        return
    if method.quantized_kind is None:
        raise CospadiError(f"method {method.name} cannot quantize its factors; --quant works with cospadi, svd, "
                           "svd-llm, rtn and gptq")
    if group_size > 1:
        raise CospadiError(f"--quant quantizes per layer: leave out --group-size {group_size} (shared factors are not "
                           "quantized)")
    if coef_bits is not None:
        raise CospadiError(f"--coef-bits {coef_bits} packs bf16 values of S, and --quant {spec.name} makes them integer "
                           "codes: leave one out")
    if lazy:
        raise CospadiError("--quant does not work with block-by-block loading (--lazy) yet: leave one out")
