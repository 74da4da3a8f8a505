"""Depth-pruning method names and budgets (docs/pruning.md): which names are depth methods,
how a ratio becomes whole blocks, how a combination splits one total ratio, and the checks
the command line runs before loading anything slow.

Names: `replaceme` cuts round(ratio x blocks) consecutive blocks; `replaceme+M` cuts
DEFAULT_SPLIT's blocks and compresses the rest with the registered method M (e.g.
cospadi); `replacemeK+M` cuts exactly K blocks, then M.

Ratios count the compressed-linear accounting of the rest of the project (report.py
`linear_ratios`): the fraction of the q/k/v/o/gate/up/down weights removed. Cutting n of
N equal blocks removes n / N of them."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import cast

from torch import nn
from transformers import PreTrainedModel

from ..adapters import adapter_for, decoder_layers
from ..budget import check_ratio
from ..errors import CospadiError
from ..groups import resolve_group_size
from ..methods import get_method
from ..pipeline.run import Recipe, check_recipe
from ..solvers import SolverOptions

PREFIX = "replaceme"
_NAME = re.compile(rf"{PREFIX}(?P<blocks>\d+)?(?:\+(?P<rest>.+))?")


@dataclass(frozen=True)
class DepthMethod:
    """A parsed depth-pruning name: `blocks` cut (None: from the ratio, or DEFAULT_SPLIT
    for a combination) and the per-matrix method `rest` compressing the kept blocks (None:
    pruning alone)."""

    name: str
    blocks: int | None = None
    rest: str | None = None


def parse_depth_method(name: str) -> DepthMethod | None:
    """The DepthMethod `name` spells, None when it is not a depth-pruning name. CospadiError
    for a malformed one (replaceme3 without +M, replaceme0+M, an unknown M)."""
    match = _NAME.fullmatch(name) if isinstance(name, str) else None
    if match is None:
        return None
    blocks, rest = match["blocks"], match["rest"]
    if blocks is not None and rest is None:
        raise CospadiError(f"method {name!r}: a block count goes with a combination, e.g. {PREFIX}{blocks}+cospadi; "
                           f"plain {PREFIX} takes its blocks from --ratio")
    if blocks is not None and int(blocks) < 1:
        raise CospadiError(f"method {name!r} cuts no block: use {PREFIX}1+{rest} or more")
    if rest is not None:
        get_method(rest)  # CospadiError listing the registered methods
    return DepthMethod(name, int(blocks) if blocks is not None else None, rest)


def is_depth_method(name: str) -> bool:
    """Whether `name` is a depth-pruning name (CospadiError when it is a malformed one)."""
    return parse_depth_method(name) is not None


def uses_solver_options(name: str) -> bool:
    """Whether SolverOptions change the result of method `name` (depth names: their rest's)."""
    depth = parse_depth_method(name)
    if depth is None:
        return get_method(name).uses_solver_options
    return depth.rest is not None and get_method(depth.rest).uses_solver_options


def blocks_for_ratio(ratio: float, n_blocks: int) -> int:
    """Blocks cut for `ratio` of `n_blocks` equal blocks: the nearest whole number
    floor(ratio x n_blocks + 1/2), which must be between 1 and n_blocks - 1 (the block
    before the cut must exist: the map is merged into it). CospadiError otherwise."""
    check_ratio(ratio)
    cut = math.floor(ratio * n_blocks + 0.5)
    if cut < 1:
        raise CospadiError(f"ratio {ratio} of {n_blocks} blocks rounds to 0 blocks; {PREFIX} removes whole blocks: "
                           f"use a ratio of at least {0.5 / n_blocks:.3g}")
    if cut > n_blocks - 1:
        raise CospadiError(f"ratio {ratio} would cut {cut} of the {n_blocks} blocks; {PREFIX} keeps at least the "
                           f"first block (the map is merged into it): use a ratio below {(n_blocks - 0.5) / n_blocks:.3g}")
    return cut


# The default split of `replaceme+M` (docs/pruning.md "The combination"): cut this many
# blocks, chosen by the split measurement in BENCHMARKS.md.
DEFAULT_SPLIT_BLOCKS = 1


def default_split(ratio: float, n_blocks: int) -> int:
    """Blocks a `replaceme+M` combination cuts at total `ratio`: DEFAULT_SPLIT_BLOCKS, fewer
    when that would already remove `ratio` (at least 1)."""
    cut = DEFAULT_SPLIT_BLOCKS
    while cut > 1 and cut >= ratio * n_blocks:
        cut -= 1
    return cut


def rest_ratio(ratio: float, cut_linear: int, total_linear: int) -> float:
    """The ratio the rest method applies to the kept blocks' linears so that the total
    removed fraction of all `total_linear` linear weights is `ratio` after `cut_linear`
    went with the cut blocks: 1 - (1 - ratio) total / (total - cut)."""
    return 1.0 - (1.0 - ratio) * total_linear / (total_linear - cut_linear)


def block_linear_params(layer: nn.Module, targets: tuple[str, ...]) -> int:
    """The weight count of a block's target linears (biases excluded, as in report.py)."""
    return sum(cast(nn.Linear, layer.get_submodule(name)).weight.numel() for name in targets)


def check_mergeable(model: PreTrainedModel) -> None:
    """CospadiError unless the map can be merged into each block's down projection: a
    supported family whose MLP output goes straight into the residual stream (Gemma3
    normalises it first, post_feedforward_layernorm, so no linear map merges through),
    with plain nn.Linear down projections (a dense model, not a compressed one)."""
    family = adapter_for(model).family
    layers = decoder_layers(model)
    if hasattr(layers[0], "post_feedforward_layernorm") or not hasattr(getattr(layers[0], "mlp", None), "down_proj"):
        raise CospadiError(f"{PREFIX} merges its map into mlp.down_proj, but {family} blocks normalise the MLP output "
                           "before the residual add, so no linear map merges there; use it on llama, mistral, qwen2 "
                           "or qwen3 models")
    if not all(type(layer.get_submodule("mlp.down_proj")) is nn.Linear for layer in layers):
        raise CospadiError(f"{PREFIX} needs the dense model (plain nn.Linear down projections), but this one is "
                           f"compressed already: prune the dense original, e.g. with {PREFIX}+cospadi")


@dataclass(frozen=True)
class Split:
    """How a depth method spends `ratio` on a model: `cut` blocks removed, then the rest
    method (None: none) at `rest_ratio` on the kept blocks' linears."""

    cut: int
    rest: str | None
    rest_ratio: float | None


def plan_split(model: PreTrainedModel, depth: DepthMethod, ratio: float) -> Split:
    """The Split of `depth` at `ratio` on `model` (check_mergeable first). CospadiError when
    the ratio gives no whole block, or the cut blocks alone already remove `ratio`."""
    check_ratio(ratio)
    check_mergeable(model)
    layers, targets = decoder_layers(model), adapter_for(model).targets
    n = len(layers)
    if depth.rest is None:
        return Split(blocks_for_ratio(ratio, n), None, None)
    cut = depth.blocks if depth.blocks is not None else default_split(ratio, n)
    if cut > n - 1:
        raise CospadiError(f"{depth.name} cuts {cut} blocks but the model has {n}; cut at most {n - 1}")
    total = sum(block_linear_params(layer, targets) for layer in layers)
    cut_linear = sum(block_linear_params(layers[i], targets) for i in range(1, 1 + cut))  # equal blocks: any run
    if cut_linear / total >= ratio:
        raise CospadiError(f"{depth.name} at ratio {ratio}: cutting {cut} of {n} blocks already removes "
                           f"{cut_linear / total:.3g} of the linear weights; raise the ratio or cut fewer blocks")
    return Split(cut, depth.rest, rest_ratio(ratio, cut_linear, total))


def resolve_method_group_size(name: str, group_size: int | None) -> int:
    """The group size a run of method `name` uses (groups.resolve_group_size for per-matrix
    methods and a combination's rest); plain replaceme takes none (1)."""
    depth = parse_depth_method(name)
    if depth is None:
        return resolve_group_size(get_method(name), group_size)
    if depth.rest is not None:
        return resolve_group_size(get_method(depth.rest), group_size)
    if group_size not in (None, 1):
        raise CospadiError(f"{PREFIX} cuts whole blocks and takes no --group-size; share factors with "
                           f"{PREFIX}+cospadi --group-size {group_size}")
    return 1


def check_plan(model: PreTrainedModel, name: str, ratio: float, options: SolverOptions, group_size: int,
               share: tuple[str, ...] | None = None) -> None:
    """Everything about running method `name` at `ratio` on `model` (with groups of
    `group_size` blocks sharing the linears `share` names) that can be checked before
    calibrating (pipeline.check_recipe for per-matrix methods and a combination's rest;
    the block rounding and the family for depth methods). CospadiError otherwise."""
    depth = parse_depth_method(name)
    if depth is None:
        check_recipe(model, Recipe(name, ratio, options, group_size, share=share))
        return
    split = plan_split(model, depth, ratio)
    if split.rest is not None and split.rest_ratio is not None:
        check_recipe(model, Recipe(split.rest, split.rest_ratio, options, group_size, share=share))
