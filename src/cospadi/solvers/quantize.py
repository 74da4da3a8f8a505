"""Quantized factors (docs/quantization.md): pure functions (weight, Gram, bits, group) ->
integer codes with per-group scales. No model code here.

Quantizer: symmetric, per group, round to nearest. A tensor A (d, n) is cut along its
first dimension (the input dimension of the product it feeds: rows of W, D, left, right,
or the stored values of each column of S) into groups of `group` rows, the last group
shorter when `group` does not divide d; every column has one scale per group,
`scale = bf16(max |A[group, j]| / (2^(b-1) - 1))` (1 for an all-zero group), and codes are
`clamp(round(A / scale), -2^(b-1), 2^(b-1) - 1)`. The value is `code * scale`, formed in
float32 (exact: at most 8 + 8 significant bits) and then cast to the run dtype.

GPTQ (`gptq`): the rows of A are quantized in order, each row's rounding error spread
over the rows not yet quantized through the inverse Hessian (Frantar et al., 2022),
minimising trace((A - Q)^T H (A - Q)) greedily; H is the Gram of the product's input
(G for W, D and the left factor; L_q^T G L_q for the right factor), damped by
`damp * mean(diag H)`. A group's scales are set from its (already updated) rows when the
group starts, as GPTQ does without static groups."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import CospadiError
from .factors import LowRankFactors, SparseDictFactors

QUANT_BITS = {"int8": 8, "int4": 4, "int3": 3}
DEFAULT_GROUP = 128
DAMP = 0.01  # GPTQ's relative dampening of the Hessian's diagonal
RIDGE = 1e-10  # relative ridge of the least-squares refits (docs/method.md's convention)


@dataclass(frozen=True)
class QuantSpec:
    """How factors are quantized: `bits` per code (8, 4 or 3), `group` rows per scale."""

    bits: int
    group: int = DEFAULT_GROUP

    @property
    def name(self) -> str:
        return f"int{self.bits}"


def parse_quant(name: str | None, group: int = DEFAULT_GROUP) -> QuantSpec | None:
    """'none' (or None) -> None; 'int8' | 'int4' | 'int3' -> QuantSpec; CospadiError for an
    unknown name or a group size that is not a positive integer."""
    if name is None or name == "none":
        return None
    if name not in QUANT_BITS:
        raise CospadiError(f"unknown quantization {name!r}; choose one of none, {', '.join(QUANT_BITS)}")
    if not isinstance(group, int) or isinstance(group, bool) or group < 1:
        raise CospadiError(f"quantization group size {group!r} must be a positive integer (default {DEFAULT_GROUP})")
    return QuantSpec(QUANT_BITS[name], group)


def code_range(bits: int) -> tuple[int, int]:
    """The smallest and largest code of `bits`-bit two's complement: (-2^(b-1), 2^(b-1) - 1)."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


@dataclass
class QuantTensor:
    """A (d, n) tensor as `codes` (d, n) int8 in code_range(bits) and `scales`
    (ceil(d / group), n) bf16: entry (i, j) is codes[i, j] * scales[i // group, j]."""

    codes: torch.Tensor
    scales: torch.Tensor
    bits: int
    group: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (d, n) values, formed in float32 (exact) and cast to `dtype`."""
        scales = self.scales.float().repeat_interleave(self.group, dim=0)[: self.codes.shape[0]]
        return (self.codes.float() * scales).to(dtype)


def group_scales(rows: torch.Tensor, bits: int) -> torch.Tensor:
    """The bf16 scales (n,) of one group of rows (g, n): max |value| / (2^(b-1) - 1) per
    column, 1 where the column is all zero."""
    peak = rows.abs().amax(dim=0) / code_range(bits)[1]
    return torch.where(peak > 0, peak, torch.ones_like(peak)).to(torch.bfloat16)


def _round(values: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    low, high = code_range(bits)
    return torch.clamp(torch.round(values / scales.to(values.dtype)), low, high)


def rtn(weight: torch.Tensor, bits: int, group: int = DEFAULT_GROUP) -> QuantTensor:
    """Round-to-nearest: weight (d, n) -> QuantTensor (d, n), groups of `group` rows."""
    w = weight.detach().to(torch.float64)
    d, n = w.shape
    codes = torch.empty(d, n, dtype=torch.int8, device=w.device)
    scales = torch.empty(math.ceil(d / group), n, dtype=torch.bfloat16, device=w.device)
    for g, start in enumerate(range(0, d, group)):
        rows = w[start:start + group]
        scales[g] = group_scales(rows, bits)
        codes[start:start + group] = _round(rows, scales[g], bits).to(torch.int8)
    return QuantTensor(codes, scales, bits, group)


def inverse_hessian_factor(hessian: torch.Tensor, damp: float = DAMP, tries: int = 6) -> torch.Tensor:
    """Upper Cholesky factor U of H^{-1} (d, d) for GPTQ, H = hessian + damp * mean(diag) I
    in float64 (rows with a zero diagonal get 1 there); damp grows tenfold on up to `tries`
    failures. CospadiError for a non-finite or all-zero Hessian."""
    h = hessian.detach().to(torch.float64)
    h = (h + h.T) / 2
    diag = torch.diagonal(h)
    if not torch.isfinite(h).all() or not bool((diag > 0).any()):
        raise CospadiError("the Gram matrix for GPTQ is non-finite or zero: the calibration text reached no input")
    h = h.clone()
    dead = diag <= 0
    h[dead, dead] = 1.0
    scale = float(torch.diagonal(h).mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt in range(tries + 1):
        factor, info = torch.linalg.cholesky_ex(h + max(damp, 0.0) * 10 ** attempt * scale * eye)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper
        damp = damp if damp > 0 else 1e-8
    raise CospadiError("the Gram matrix for GPTQ stays singular after dampening: use more calibration text")


def gptq_rows(weight: torch.Tensor, upper: torch.Tensor, bits: int, group: int,
              scales: torch.Tensor | None = None) -> QuantTensor:
    """GPTQ's loop: weight (d, n), upper (d, d) the upper Cholesky factor of H^{-1}.
    `scales` (ceil(d / group), n) fixes the scales (tests); None sets each group's from its
    updated rows when it starts. Returns the QuantTensor."""
    w = weight.detach().to(torch.float64).clone()
    u = upper.to(torch.float64)
    d, n = w.shape
    codes = torch.empty(d, n, dtype=torch.int8, device=w.device)
    out = torch.empty(math.ceil(d / group), n, dtype=torch.bfloat16, device=w.device) if scales is None else scales
    for g, start in enumerate(range(0, d, group)):
        end = min(start + group, d)
        if scales is None:
            out[g] = group_scales(w[start:end], bits)
        step = out[g].to(torch.float64)
        errors = torch.empty(end - start, n, dtype=torch.float64, device=w.device)
        for i in range(start, end):
            q = _round(w[i], step, bits)
            codes[i] = q.to(torch.int8)
            err = (w[i] - q * step) / u[i, i]
            w[i + 1:end] -= u[i, i + 1:end, None] * err[None, :]
            errors[i - start] = err
        w[end:] -= u[start:end, end:].T @ errors
    return QuantTensor(codes, out, bits, group)


def gptq(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group: int = DEFAULT_GROUP,
         damp: float = DAMP) -> QuantTensor:
    """GPTQ of weight (d, n) under the Hessian (d, d) of its input (a Gram): minimises
    trace((W - Q)^T H (W - Q)) greedily, row by row (see the module doc). Rows whose input
    never fires (zero diagonal) are set to zero. Returns the QuantTensor (d, n)."""
    w = weight.detach().to(torch.float64).clone()
    w[torch.diagonal(hessian) <= 0] = 0.0
    return gptq_rows(w, inverse_hessian_factor(hessian, damp), bits, group)


def refit_values(dictionary: torch.Tensor, gram: torch.Tensor, weight: torch.Tensor,
                 indices: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """The least-squares values of S on its fixed support for dictionary D (d1, k):
    per column j, min ||X (W_j - D[:, supp_j] v)||, i.e.
    (D^T G D)[supp, supp] v = (D^T G W_j)[supp] (relative ridge RIDGE), batched over
    `chunk` columns at a time (None: about 64 MB of systems). gram (d1, d1), weight
    (d1, d2), indices (s, d2). Returns values (s, d2) float64."""
    d = dictionary.to(torch.float64)
    g = gram.to(torch.float64)
    gd = g @ d
    h = d.T @ gd  # (k, k)
    b = gd.T @ weight.to(torch.float64)  # (k, d2)
    s, d2 = indices.shape
    idx = indices.long()
    out = torch.empty(s, d2, dtype=torch.float64, device=d.device)
    chunk = chunk or max(1, (1 << 23) // max(1, s * s))
    eye = torch.eye(s, dtype=torch.float64, device=d.device)
    for start in range(0, d2, chunk):
        cols = idx[:, start:start + chunk].T  # (c, s)
        hs = h[cols[:, :, None], cols[:, None, :]]  # (c, s, s)
        rhs = b[:, start:start + chunk].gather(0, idx[:, start:start + chunk]).T.unsqueeze(-1)  # (c, s, 1)
        ridge = RIDGE * torch.diagonal(hs, dim1=1, dim2=2).mean(-1).clamp_min(1e-300)
        hs = hs + ridge[:, None, None] * eye
        factor, info = torch.linalg.cholesky_ex(hs)
        solution = torch.cholesky_solve(rhs, factor)
        bad = info != 0
        if bool(bad.any()):
            solution[bad] = torch.linalg.lstsq(hs[bad], rhs[bad]).solution
        out[:, start:start + chunk] = solution.squeeze(-1).T
    return out


@dataclass
class QuantDictFactors:
    """W ~ D_q S_q: dictionary (d1, k) and values (s, d2) quantized; indices (s, d2) as in
    SparseDictFactors (ascending rows per column)."""

    dictionary: QuantTensor
    indices: torch.Tensor
    values: QuantTensor

    def dense(self) -> SparseDictFactors:
        """The dequantized factors (float64)."""
        return SparseDictFactors(self.dictionary.dequantize().double(), self.indices,
                                 self.values.dequantize().double())

    def weight(self) -> torch.Tensor:
        """The (d1, d2) product of the dequantized factors."""
        return self.dense().weight()


@dataclass
class QuantLowRankFactors:
    """W ~ left_q right_q, left (d1, r), right (r, d2), both quantized."""

    left: QuantTensor
    right: QuantTensor

    def weight(self) -> torch.Tensor:
        return self.left.dequantize().double() @ self.right.dequantize().double()


@dataclass
class QuantDenseFactors:
    """W ~ W_q (d1, d2), quantized as it is (the rtn / gptq baselines)."""

    matrix: QuantTensor

    def weight(self) -> torch.Tensor:
        return self.matrix.dequantize().double()


def coefficient_rms(indices: torch.Tensor, values: torch.Tensor, atoms: int) -> torch.Tensor:
    """The RMS of each row of S (k = `atoms` rows) over its stored values (indices and
    values (s, d2)), (k,) float64; 1 for an unused or all-zero row."""
    rows = indices.reshape(-1).long()
    sums = torch.zeros(atoms, dtype=torch.float64, device=rows.device).index_add_(
        0, rows, values.reshape(-1).to(torch.float64) ** 2)
    counts = torch.bincount(rows, minlength=atoms).to(torch.float64)
    rms = (sums / counts.clamp_min(1)).sqrt()
    return torch.where(rms > 0, rms, torch.ones_like(rms))


def _values_error(dictionary: torch.Tensor, gram: torch.Tensor, indices: torch.Tensor,
                  delta: torch.Tensor) -> float:
    """||X D (S - S')||_F^2 for the change `delta` (s, d2) of S's stored values."""
    change = torch.zeros(dictionary.shape[1], delta.shape[1], dtype=torch.float64, device=delta.device)
    error = dictionary.to(torch.float64) @ change.scatter_(0, indices.long(), delta.to(torch.float64))
    return float(((gram.to(torch.float64) @ error) * error).sum())


def quantize_dict(weight: torch.Tensor, gram: torch.Tensor, factors: SparseDictFactors, spec: QuantSpec,
                  damp: float = DAMP) -> QuantDictFactors:
    """cospadi's factors quantized: GPTQ on D (d1, k) with the Gram G (d1, d1) as Hessian
    (y = (x D) S: G is the Hessian of the rows of D); the values of S refit by least squares
    against D_q on the kept support (refit_values); then those values rounded to nearest
    in groups along each column's stored values (their Hessians differ per column, see
    docs/quantization.md), either as they are or with the rows of S balanced (row i
    divided by p_i, the power of two nearest its RMS, D_q's column i multiplied by it
    through its scales: exact, D_q S unchanged), whichever leaves the smaller calibration
    error. weight (d1, d2)."""
    dq = gptq(factors.dictionary, gram, spec.bits, spec.group, damp)
    dense_q = dq.dequantize(torch.float64)
    values = refit_values(dense_q, gram, weight, factors.indices)
    plain = rtn(values, spec.bits, spec.group)
    powers = torch.exp2(torch.round(torch.log2(coefficient_rms(factors.indices, values, dq.shape[1]))))
    balanced_d = QuantTensor(dq.codes, (dq.scales.to(torch.float64) * powers).to(torch.bfloat16), dq.bits, dq.group)
    balanced_values = values / powers[factors.indices.long()]
    balanced = rtn(balanced_values, spec.bits, spec.group)
    plain_error = _values_error(dense_q, gram, factors.indices, values - plain.dequantize(torch.float64))
    balanced_error = _values_error(balanced_d.dequantize(torch.float64), gram, factors.indices,
                                   balanced_values - balanced.dequantize(torch.float64))
    if balanced_error < plain_error:
        return QuantDictFactors(balanced_d, factors.indices, balanced)
    return QuantDictFactors(dq, factors.indices, plain)


def quantize_lowrank(weight: torch.Tensor, gram: torch.Tensor, factors: LowRankFactors, spec: QuantSpec,
                     damp: float = DAMP) -> QuantLowRankFactors:
    """Low-rank factors quantized: GPTQ on left (d1, r) with G; right refit by least squares
    against left_q, (L_q^T G L_q) R = L_q^T G W (relative ridge RIDGE); then GPTQ on right
    (r, d2) with Hessian L_q^T G L_q (the Gram of its input x L_q). weight (d1, d2)."""
    lq = gptq(factors.left, gram, spec.bits, spec.group, damp)
    left = lq.dequantize(torch.float64)
    g = gram.to(torch.float64)
    hessian = left.T @ g @ left
    ridge = RIDGE * float(torch.diagonal(hessian).mean().clamp_min(1e-300))
    eye = torch.eye(hessian.shape[0], dtype=torch.float64, device=hessian.device)
    right = torch.linalg.solve(hessian + ridge * eye, left.T @ g @ weight.to(torch.float64))
    return QuantLowRankFactors(lq, gptq(right, hessian, spec.bits, spec.group, damp))


def quantize_dense(weight: torch.Tensor, gram: torch.Tensor, spec: QuantSpec, how: str = "gptq",
                   damp: float = DAMP) -> QuantDenseFactors:
    """The dense weight (d1, d2) quantized as it is: `how` "gptq" (Hessian G (d1, d1)) or
    "rtn" (G unused)."""
    if how == "rtn":
        return QuantDenseFactors(rtn(weight, spec.bits, spec.group))
    return QuantDenseFactors(gptq(weight, gram, spec.bits, spec.group, damp))
