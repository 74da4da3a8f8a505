"""`compress(method="replaceme" | "replaceme+M" | "replacemeK+M")`: the depth-pruning runs
api.compress hands over (docs/pruning.md). Plain replaceme cuts round(ratio x blocks)
blocks; a combination cuts its blocks, then compresses the kept blocks with method M
through api.compress at the ratio that makes the total removed fraction `ratio`."""
from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .. import api
from ..adapters import adapter_for, decoder_layers
from ..allocation import DEFAULT_COST, RatioMap, check_allocation, resolve_allocation
from ..errors import CospadiError
from ..groups import parse_share
from ..pipeline.run import Recipe, check_recipe, unique_param_count
from ..pipeline.solve import dense_row
from ..report import CompressionReport, peak_rss_mb
from ..solvers import SolverOptions
from .plan import PREFIX, block_linear_params, parse_depth_method, plan_split, resolve_method_group_size, rest_ratio
from .run import replaceme


def compress_depth(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[str] | None = None, *,
                   input_ids: torch.Tensor | None = None, method: str, ratio: float,
                   calib_samples: int = api.DEFAULT_CALIB_SAMPLES, seq_len: int = api.DEFAULT_SEQ_LEN,
                   batch_size: int = 8, progress: bool = True, workers: int | None = None,
                   group_size: int | None = None, resume_dir: str | None = None,
                   device: str | torch.device | None = None, ratios: RatioMap | None = None,
                   allocation: str | None = None, cost: str = DEFAULT_COST, profile_cache: str | None = None,
                   share: str | Sequence[str] | None = None,
                   **solver: object) -> tuple[PreTrainedModel, CompressionReport]:
    """api.compress for a depth-pruning `method` (same arguments): cut blocks of `model` in
    place (pruning/run.py), then, for a combination, compress the kept blocks with its
    rest method, passing the other arguments on. Returns the model and a report whose
    ratios count the cut blocks (report.py `pruned`); seconds cover both parts. `allocation`
    None: uniform for plain replaceme (whole blocks), the default allocation for the rest of
    a combination."""
    depth = parse_depth_method(method)
    if depth is None:
        raise CospadiError(f"{method!r} is not a depth-pruning method")
    allocation = "uniform" if depth.rest is None and allocation is None else resolve_allocation(allocation, ratios)
    options = SolverOptions(**solver)  # type: ignore[arg-type]
    group_size = resolve_method_group_size(method, group_size)
    _check_arguments(depth.rest, resume_dir, ratios, allocation, cost)
    split = plan_split(model, depth, ratio)
    if split.rest is not None and split.rest_ratio is not None:
        check_recipe(model, Recipe(split.rest, split.rest_ratio, options, group_size,  # before any work
                                   share=parse_share(share)))
    dense, layers, targets = unique_param_count(model), decoder_layers(model), adapter_for(model).targets
    total_linear = sum(block_linear_params(layer, targets) for layer in layers)
    if input_ids is None:
        input_ids = api.calibration_ids(model, tokenizer, texts, calib_samples, seq_len, options.seed)
    pruned = replaceme(model, input_ids, split.cut, batch_size=batch_size, device=device, progress=progress)
    if split.rest is None:
        rows = [dense_row(i, name, cast(nn.Linear, layer.get_submodule(name))) for i, layer in enumerate(layers)
                for name in targets]
        report = CompressionReport(method, ratio, {"fit": pruned.fit}, dense, rows, pruned.seconds, peak_rss_mb(),
                                   {"samples": int(input_ids.shape[0]), "seq_len": int(input_ids.shape[1])})
    else:
        kept_ratio = rest_ratio(ratio, pruned.linear_params, total_linear)
        _, report = api.compress(model, tokenizer, input_ids=input_ids, method=split.rest, ratio=kept_ratio,
                                 batch_size=batch_size, progress=progress, workers=workers, group_size=group_size,
                                 resume_dir=resume_dir, device=device, allocation=allocation, cost=cost,
                                 profile_cache=profile_cache, share=share, **solver)  # type: ignore[arg-type]
        report.method, report.ratio, report.dense_params = method, ratio, dense
        report.options = {**report.options, "rest": split.rest, "rest_ratio": kept_ratio, "fit": pruned.fit}
        report.seconds += pruned.seconds
    report.pruned = pruned.to_dict()
    return model, report


def _check_arguments(rest: str | None, resume_dir: str | None, ratios: RatioMap | None, allocation: str,
                     cost: str) -> None:
    """CospadiError for arguments a depth method cannot honour (before any work)."""
    check_allocation(allocation, cost)
    if ratios is not None:
        raise CospadiError(f"{PREFIX} renumbers the blocks it keeps, so a per-matrix ratio map cannot name them; "
                           "use allocation='knapsack' with a combination instead")
    if rest is None and allocation != "uniform":
        raise CospadiError(f"{PREFIX} cuts whole blocks and has no per-matrix ratios; use --allocation knapsack with "
                           f"a combination such as {PREFIX}+cospadi")
    if rest is None and resume_dir is not None:
        raise CospadiError(f"{PREFIX} runs in one short pass and keeps no progress: drop --resume-dir (a combination "
                           f"such as {PREFIX}+cospadi resumes its second part)")
