"""ReplaceMe on a whole model, in two passes over the calibration windows (docs/pruning.md):

1. distances: run the blocks one after another (pipeline.capture's capture and run_block),
   keeping the last n + 1 hidden states, and record for every start s >= 1 the mean
   cosine distance between h_s and h_{s+n}; the smallest one is cut (replaceme.select_run);
2. fit: run again up to block s + n - 1, collecting block s-1's MLP output x and the
   target z = h_{s+n} - h_s + x; fit T (fit_map), remove the blocks and merge T into block
   s-1's down projection; with fit "auto", two closed-form maps are tried and the one
   whose cut model has the lower calibration perplexity is kept (score_maps).
Memory: n + 1 hidden states of the calibration set in pass 1, about four in pass 2."""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import cast

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from ..adapters import adapter_for, decoder_layers
from ..devices import resolve_device, to_device, visiting
from ..errors import CospadiError
from ..evaluation.perplexity import perplexity
from ..pipeline.capture import BlockKwargs, capture_block_inputs, run_block
from ..pipeline.run import check_input_ids
from .plan import block_linear_params, check_mergeable
from .replaceme import MapData, cosine_map, lstsq_map, mean_cosine_distance, merge_map, remove_blocks, select_run

FITS = ("auto", "normalized", "lstsq", "cosine")
AUTO_FITS = ("lstsq", "normalized")  # "auto" keeps whichever gives the lower calibration perplexity
DEFAULT_FIT = "auto"  # docs/pruning.md "The map": neither closed form wins at every depth
States = list[torch.Tensor]  # one (B, L, d) hidden state per calibration batch


@dataclass
class Pruned:
    """What replaceme did: the `blocks` cut (indices of the model before the cut), the
    weights they held (`linear_params`: their target linears' weights, `params`: all their
    parameters), every candidate start's mean cosine `distances`, the `fit` used (with
    "auto": the winner; `calibration_ppl` has each candidate's calibration perplexity), its
    `ridge`, the map's calibration errors (`map_error` = ||X T - Z|| / ||Z||, `token_error`
    = the root mean over tokens of ||x_t T - z_t||^2 / ||z_t||^2) and those of plain removal,
    T = I (`identity_error`, `identity_token_error`), the wall time, the calibration tokens
    and the map T itself (d, d, float64; not in to_dict)."""

    blocks: list[int]
    linear_params: int
    params: int
    distances: dict[int, float]
    fit: str
    ridge: float = 0.0
    map_error: float = 0.0
    identity_error: float = 0.0
    token_error: float = 0.0
    identity_token_error: float = 0.0
    calibration_ppl: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    tokens: int = 0
    transform: torch.Tensor | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        """JSON-ready (distances keyed by the start block as a string), without the map."""
        out = {k: v for k, v in asdict(self).items() if k != "transform"}
        out["distances"] = {str(k): v for k, v in self.distances.items()}
        return out


def replaceme(model: PreTrainedModel, input_ids: torch.Tensor, cut: int, *, fit: str = DEFAULT_FIT,
              batch_size: int = 8, device: str | torch.device | None = None, progress: bool = True) -> Pruned:
    """Cut `cut` consecutive decoder blocks of `model` in place, chosen and replaced as the
    module docstring says, calibrated on `input_ids` (N, L) in batches of `batch_size`.
    `fit` (fit_map): "lstsq" (the paper's least squares), "normalized" (least squares with
    every token's error relative to its target), "auto" (the default: both, keeping the one
    whose cut model has the lower perplexity on `input_ids`, score_maps) or "cosine". The
    model stays a plain transformers model with fewer blocks. `device` (None: the model's
    own): where each block runs while calibrating."""
    start_time = time.perf_counter()
    if fit not in FITS:
        raise CospadiError(f"unknown replaceme fit {fit!r}; choose one of {', '.join(FITS)}")
    check_input_ids(model, input_ids, batch_size)
    check_mergeable(model)
    layers = decoder_layers(model)
    if not isinstance(cut, int) or not 1 <= cut <= len(layers) - 1:
        raise CospadiError(f"cannot cut {cut!r} of {len(layers)} blocks: cut 1 to {len(layers) - 1} (the first block "
                           "stays, the map is merged into it)")
    target = resolve_device(device) or next(model.parameters()).device
    distances, data, maps = _calibrate(model, layers, input_ids, cut, fit, batch_size, target, progress)
    start = select_run(distances)
    blocks, targets = list(range(start, start + cut)), adapter_for(model).targets
    pruned = Pruned(blocks, sum(block_linear_params(layers[i], targets) for i in blocks),
                    sum(p.numel() for i in blocks for p in layers[i].parameters()), distances, fit, tokens=data.tokens)
    down_proj = cast(nn.Linear, layers[start - 1].get_submodule("mlp.down_proj"))  # check_mergeable
    remove_blocks(model, layers, blocks)
    if len(maps) > 1:
        pruned.calibration_ppl = score_maps(model, down_proj, maps, input_ids, batch_size, target, progress)
        pruned.fit = min(pruned.calibration_ppl, key=lambda name: pruned.calibration_ppl[name])
    transform, pruned.ridge = maps[pruned.fit]
    identity = torch.eye(data.dim, dtype=torch.float64)
    pruned.map_error, pruned.identity_error = data.relative_error(transform), data.relative_error(identity)
    pruned.token_error, pruned.identity_token_error = data.token_error(transform), data.token_error(identity)
    merge_map(down_proj, transform)
    pruned.transform, pruned.seconds = transform, time.perf_counter() - start_time
    return pruned


def _calibrate(model: PreTrainedModel, layers: nn.ModuleList, input_ids: torch.Tensor, cut: int, fit: str,
               batch_size: int, target: torch.device,
               progress: bool) -> tuple[dict[int, float], MapData, dict[str, tuple[torch.Tensor, float]]]:
    """The two passes: (distances of every start, the map sums, {fit: (T, ridge)} for
    `fit`, or for each of AUTO_FITS with "auto"), the model unchanged."""
    states, block_kwargs = capture_block_inputs(model, layers, input_ids, batch_size)
    states, block_kwargs = cast(States, to_device(states, target)), cast(list[BlockKwargs], to_device(block_kwargs, target))
    with tqdm(total=len(layers), desc=f"replaceme: cut {cut}", unit="block", disable=not progress) as bar:
        step = _runner(layers, block_kwargs, target, bar)
        distances = block_distances(len(layers), states, cut, step)
        start = select_run(distances)
        bar.total = len(layers) + start + cut  # the fit pass runs up to the last cut block
        xs, zs = map_inputs(states, start, cut, step, layers[start - 1].get_submodule("mlp.down_proj"))
    data = MapData(xs[0].shape[-1])
    for x, z in zip(xs, zs):
        data.add(x, z)
    return distances, data, {name: fit_map(data, xs, zs, name) for name in (AUTO_FITS if fit == "auto" else (fit,))}


def fit_map(data: MapData, xs: States, zs: States, fit: str) -> tuple[torch.Tensor, float]:
    """(T, ridge) by `fit` from the sums `data` (and, for "cosine", the tokens xs, zs):
    "lstsq" minimises sum_t ||x_t T - z_t||^2 (the paper; the few tokens with massive
    activations, such as each window's first, dominate it), "normalized"
    sum_t ||x_t T - z_t||^2 / ||z_t||^2, both in closed form (replaceme.lstsq_map); "cosine"
    runs replaceme.cosine_map from the lstsq map."""
    if fit == "normalized":
        return lstsq_map(data.normalized.gram, data.normalized.cross)
    transform, ridge = lstsq_map(data.plain.gram, data.plain.cross)
    if fit == "cosine":
        transform = cosine_map(xs, zs, transform)
    return transform, ridge


@torch.no_grad()
def score_maps(model: PreTrainedModel, down_proj: nn.Linear, maps: dict[str, tuple[torch.Tensor, float]],
               input_ids: torch.Tensor, batch_size: int, target: torch.device, progress: bool) -> dict[str, float]:
    """{fit: perplexity on `input_ids` (N, L) of the already cut `model` with that map
    merged into `down_proj`}, the model visiting `target`; down_proj is left as it was."""
    weight = down_proj.weight.detach().clone()
    bias = None if down_proj.bias is None else down_proj.bias.detach().clone()
    scores = {}
    try:
        with visiting(model, target):
            for name, (transform, _) in maps.items():
                merge_map(down_proj, transform)
                scores[name] = perplexity(model, input_ids, batch_size=batch_size, progress=progress,
                                          desc=f"replaceme: {name} map")
                _restore(down_proj, weight, bias)
    finally:
        _restore(down_proj, weight, bias)
    return scores


def _restore(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None and linear.bias is not None:
            linear.bias.copy_(bias)


def _runner(layers: nn.ModuleList, block_kwargs: list[BlockKwargs], target: torch.device,
            bar: tqdm) -> Callable[[int], Callable[[States], States]]:
    """step(i)(states): block i's outputs for `states`, the block visiting `target`."""
    def step(i: int) -> Callable[[States], States]:
        def run(states: States) -> States:
            with visiting(layers[i], target):
                out = run_block(layers[i], states, block_kwargs[i])
            bar.update()
            return out
        return run
    return step


def block_distances(n_blocks: int, states: States, cut: int,
                    step: Callable[[int], Callable[[States], States]]) -> dict[int, float]:
    """{s: mean cosine distance between h_s and h_{s+cut}} for s = 1 .. n_blocks - cut,
    from h_0 = `states`, each block run once by step(i); holds cut + 1 states at a time."""
    window: deque[States] = deque([states], maxlen=cut + 1)
    distances = {}
    for i in range(n_blocks):
        window.append(step(i)(window[-1]))
        first = i + 1 - cut
        if first >= 1:
            distances[first] = mean_cosine_distance(window[0], window[-1])
    return distances


def map_inputs(states: States, start: int, cut: int, step: Callable[[int], Callable[[States], States]],
               down_proj: nn.Module) -> tuple[States, States]:
    """(xs, zs) per batch: block start-1's MLP output x (B, L, d), read at `down_proj`, and
    the target z = h_{start+cut} - h_start + x, from h_0 = `states`."""
    for i in range(start - 1):
        states = step(i)(states)
    xs: States = []
    handle = down_proj.register_forward_hook(lambda module, args, out: xs.append(out.detach()))
    try:
        before = step(start - 1)(states)
    finally:
        handle.remove()
    after = before
    for i in range(start, start + cut):
        after = step(i)(after)
    return xs, [h_end - h_start + x for h_end, h_start, x in zip(after, before, xs)]
