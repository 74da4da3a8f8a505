"""ReplaceMe (arXiv 2505.02819) as pure functions on tensors and modules (docs/pruning.md):
choose the run of blocks to cut by cosine distance, estimate the linear map that replaces
it, merge the map into the down projection before the cut, and remove the blocks.

Notation: h_j (tokens, d) is the hidden state entering block j (h_N leaves the last of N
blocks). Cutting blocks s .. s+n-1 makes block s-1's output feed block s+n. Block s-1
computes h_s = a + x, where x is its MLP output (mlp.down_proj's output, the only thing
the map acts on) and a = h_s - x the residual stream before the MLP. The map T (d, d) is
fitted so that a + x T ~ h_{s+n}, i.e. x T ~ z with z = h_{s+n} - h_s + x, and merged as
down_proj(u) T = u (W_down^T T) + b T, so no parameter is added."""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import CospadiError

MAX_COND = 1e10  # lstsq_map adds a ridge when the Gram's condition number exceeds this
PER_LAYER_CONFIG = ("layer_types",)  # config lists with one entry per block (Gemma3, Qwen2, Qwen3)


def cosine_distance_sum(a: torch.Tensor, b: torch.Tensor) -> tuple[float, int]:
    """(sum over tokens of 1 - cos(a_t, b_t), number of tokens) for hidden states a, b of
    equal shape (..., d), in float64; a zero vector counts as orthogonal."""
    a64, b64 = a.reshape(-1, a.shape[-1]).double(), b.reshape(-1, b.shape[-1]).double()
    cos = (a64 * b64).sum(-1) / (a64.norm(dim=-1) * b64.norm(dim=-1)).clamp_min(1e-300)
    return float((1.0 - cos).sum()), int(cos.numel())


def mean_cosine_distance(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """The mean over all tokens of 1 - cos between the batches `a` and `b` ((B, L, d) each)."""
    total, count = 0.0, 0
    for x, y in zip(a, b):
        s, c = cosine_distance_sum(x, y)
        total, count = total + s, count + c
    return total / count


def select_run(distances: Mapping[int, float]) -> int:
    """The first block of the run to cut: the start with the smallest distance (the
    earliest on a tie). `distances` maps each candidate start to its mean distance."""
    if not distances:
        raise CospadiError("no run of blocks to choose from: the model has too few blocks for this cut")
    return min(distances, key=lambda start: (distances[start], start))


@dataclass
class Normal:
    """Normal-equation sums over tokens: gram = X^T X, cross = X^T Z (d, d, float64) and
    z_sq = ||Z||_F^2, for rows x_t, z_t (possibly weighted)."""

    gram: torch.Tensor
    cross: torch.Tensor
    z_sq: float = 0.0

    def add(self, x: torch.Tensor, z: torch.Tensor) -> None:
        """Add rows x (T, d) with targets z (T, d), both float64."""
        self.gram += x.T @ x
        self.cross += x.T @ z
        self.z_sq += float((z * z).sum())

    def squared_error(self, transform: torch.Tensor) -> float:
        """||X T - Z||_F^2 from the sums (T (d, d))."""
        t = transform.double().cpu()
        return max(float((t * (self.gram @ t)).sum() - 2.0 * (t * self.cross).sum()) + self.z_sq, 0.0)


class MapData:
    """The sums the maps need over all calibration tokens: `plain` (the paper's least
    squares, sum_t ||x_t T - z_t||^2) and `normalized` (each token's squared error divided
    by ||z_t||^2, every token weighing alike; a token with z_t = 0 is left out)."""

    def __init__(self, dim: int) -> None:
        self.dim, self.tokens = dim, 0
        zeros = lambda: torch.zeros(dim, dim, dtype=torch.float64)
        self.plain, self.normalized = Normal(zeros(), zeros()), Normal(zeros(), zeros())

    def add(self, x: torch.Tensor, z: torch.Tensor) -> None:
        """Add tokens x (..., d) with targets z (..., d)."""
        x64, z64 = x.reshape(-1, self.dim).double().cpu(), z.reshape(-1, self.dim).double().cpu()
        norms = z64.norm(dim=1, keepdim=True)
        weights = torch.where(norms > 0, 1.0 / norms.clamp_min(1e-300), torch.zeros_like(norms))
        self.plain.add(x64, z64)
        self.normalized.add(x64 * weights, z64 * weights)
        self.tokens += x64.shape[0]

    def relative_error(self, transform: torch.Tensor) -> float:
        """||X T - Z||_F / ||Z||_F (dominated by the tokens with the largest z)."""
        return (self.plain.squared_error(transform) / max(self.plain.z_sq, 1e-300)) ** 0.5

    def token_error(self, transform: torch.Tensor) -> float:
        """The root mean over tokens of ||x_t T - z_t||^2 / ||z_t||^2."""
        return (self.normalized.squared_error(transform) / max(self.normalized.z_sq, 1e-300)) ** 0.5


def lstsq_map(gram: torch.Tensor, cross: torch.Tensor, max_cond: float = MAX_COND) -> tuple[torch.Tensor, float]:
    """(T, ridge): T = (G + ridge I)^{-1} C (d, d, float64), the minimiser of
    ||X T - Z||_F^2 + ridge ||T||_F^2 for G = X^T X and C = X^T Z. ridge is 0 unless G's
    condition number exceeds `max_cond`; then ridge = lambda_max(G) / max_cond."""
    g = (gram.double() + gram.double().T) / 2
    eigenvalues = torch.linalg.eigvalsh(g)
    top = float(eigenvalues[-1])
    if not top > 0 or not torch.isfinite(eigenvalues).all():
        raise CospadiError("the MLP outputs before the cut are all zero or non-finite on the calibration data; no map "
                           "can be fitted: check the model's weights")
    ridge = top / max_cond if float(eigenvalues[0]) < top / max_cond else 0.0
    factor = torch.linalg.cholesky(g + ridge * torch.eye(g.shape[0], dtype=g.dtype))
    return torch.cholesky_solve(cross.double(), factor), ridge


def cosine_map(xs: Sequence[torch.Tensor], zs: Sequence[torch.Tensor], init: torch.Tensor, *, epochs: int = 10,
               lr: float = 1e-4, batch: int = 1024, seed: int = 0) -> torch.Tensor:
    """ReplaceMe's cosine variant: T (d, d) minimising the mean over tokens of
    1 - cos(x_t T, z_t), by Adam from `init` (the least-squares map) over shuffled
    minibatches of `batch` tokens for `epochs` passes. xs, zs: (..., d) batches."""
    d = init.shape[0]
    x = torch.cat([t.reshape(-1, d) for t in xs]).float()
    z = torch.cat([t.reshape(-1, d) for t in zs]).float()
    z = z / z.norm(dim=1, keepdim=True).clamp_min(1e-30)
    transform = init.float().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([transform], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        for _ in range(epochs):
            for rows in torch.randperm(x.shape[0], generator=generator).split(batch):
                y = x[rows] @ transform
                loss = 1.0 - ((y * z[rows]).sum(1) / y.norm(dim=1).clamp_min(1e-30)).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    return transform.detach().double()


@torch.no_grad()
def merge_map(linear: nn.Linear, transform: torch.Tensor) -> None:
    """Make `linear` compute its old output times `transform` (out, out): in torch's
    (out, in) layout W <- T^T W and b <- b T, formed in float64, stored at W's dtype."""
    weight = linear.weight
    if transform.shape != (weight.shape[0], weight.shape[0]):
        raise CospadiError(f"a {tuple(transform.shape)} map cannot follow a linear with {weight.shape[0]} outputs")
    t = transform.double().to(weight.device)
    weight.copy_((t.T @ weight.double()).to(weight.dtype))
    if linear.bias is not None:
        linear.bias.copy_((linear.bias.double() @ t).to(linear.bias.dtype))


def remove_blocks(model: nn.Module, layers: nn.ModuleList, blocks: Iterable[int]) -> list[int]:
    """Delete `blocks` (indices into `layers`, the model's decoder blocks) in place and keep
    the model self-consistent: config.num_hidden_layers, per-block config lists
    (PER_LAYER_CONFIG, e.g. Gemma3's layer_types) and every submodule's `layer_idx` (the
    attention's cache slot) renumbered. Returns the sorted blocks removed."""
    n = len(layers)
    cut = sorted(set(blocks))
    if not cut or cut[0] < 0 or cut[-1] >= n or len(cut) >= n:
        raise CospadiError(f"cannot remove blocks {cut} of a model with {n} blocks: at least one must stay")
    keep = [i for i in range(n) if i not in set(cut)]
    config: Any = getattr(model, "config", None)
    configs = {id(c): c for c in (config, getattr(config, "get_text_config", lambda: None)()) if c is not None}
    for each in configs.values():
        for name in PER_LAYER_CONFIG:
            value = getattr(each, name, None)
            if isinstance(value, list) and len(value) == n:
                setattr(each, name, [value[i] for i in keep])
        if getattr(each, "num_hidden_layers", None) == n:
            each.num_hidden_layers = len(keep)
    for i in reversed(cut):
        del layers[i]
    for index, layer in enumerate(layers):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                setattr(module, "layer_idx", index)  # noqa: B010
    return cut
