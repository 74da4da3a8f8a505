"""ReplaceMe on a whole model, in two passes over the calibration windows (docs/pruning.md):

1. distances: run the blocks one after another (pipeline.capture's capture and run_block),
   keeping the last n + 1 hidden states, and record for every start s >= 1 the mean
   cosine distance between h_s and h_{s+n}; the smallest one is cut (replaceme.select_run);
2. fit: run again up to block s + n - 1, collecting block s-1's MLP output x and the
   target z = h_{s+n} - h_s + x; fit T (least squares, or the cosine variant), merge it
   into block s-1's down projection and remove the blocks.
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
from ..pipeline.capture import BlockKwargs, capture_block_inputs, run_block
from ..pipeline.run import check_input_ids
from .plan import block_linear_params, check_mergeable
from .replaceme import MapData, cosine_map, lstsq_map, mean_cosine_distance, merge_map, remove_blocks, select_run

FITS = ("lstsq", "cosine")
States = list[torch.Tensor]  # one (B, L, d) hidden state per calibration batch


@dataclass
class Pruned:
    """What replaceme did: the `blocks` cut (indices of the model before the cut), the
    weights they held (`linear_params`: their target linears' weights, `params`: all their
    parameters), every candidate start's mean cosine `distances`, the `fit` used, its
    `ridge`, the relative calibration error ||X T - Z|| / ||Z|| of the map (`map_error`) and
    of plain removal, T = I (`identity_error`), the wall time, the calibration tokens and
    the map T itself (d, d, float64; not in to_dict)."""

    blocks: list[int]
    linear_params: int
    params: int
    distances: dict[int, float]
    fit: str
    ridge: float = 0.0
    map_error: float = 0.0
    identity_error: float = 0.0
    seconds: float = 0.0
    tokens: int = 0
    transform: torch.Tensor | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        """JSON-ready (distances keyed by the start block as a string), without the map."""
        out = {k: v for k, v in asdict(self).items() if k != "transform"}
        out["distances"] = {str(k): v for k, v in self.distances.items()}
        return out


def replaceme(model: PreTrainedModel, input_ids: torch.Tensor, cut: int, *, fit: str = "lstsq", batch_size: int = 8,
              device: str | torch.device | None = None, progress: bool = True) -> Pruned:
    """Cut `cut` consecutive decoder blocks of `model` in place, chosen and replaced as the
    module docstring says, calibrated on `input_ids` (N, L) in batches of `batch_size`.
    `fit`: "lstsq" (closed form, float64) or "cosine" (Adam on the cosine loss, from the
    least-squares map). The model stays a plain transformers model with fewer blocks.
    `device` (None: the model's own): where each block runs while calibrating."""
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
    states, block_kwargs = capture_block_inputs(model, layers, input_ids, batch_size)
    states, block_kwargs = cast(States, to_device(states, target)), cast(list[BlockKwargs], to_device(block_kwargs, target))
    with tqdm(total=len(layers), desc=f"replaceme: cut {cut}", unit="block", disable=not progress) as bar:
        step = _runner(layers, block_kwargs, target, bar)
        distances = block_distances(len(layers), states, cut, step)
        start = select_run(distances)
        bar.total = len(layers) + start + cut  # the fit pass runs up to the last cut block
        down_proj = cast(nn.Linear, layers[start - 1].get_submodule("mlp.down_proj"))  # check_mergeable
        xs, zs = map_inputs(states, start, cut, step, down_proj)
    data = MapData(xs[0].shape[-1])
    for x, z in zip(xs, zs):
        data.add(x, z)
    transform, ridge = lstsq_map(data.gram, data.cross)
    if fit == "cosine":
        transform = cosine_map(xs, zs, transform)
    identity = torch.eye(data.dim, dtype=torch.float64)
    blocks = list(range(start, start + cut))
    targets = adapter_for(model).targets
    pruned = Pruned(blocks, sum(block_linear_params(layers[i], targets) for i in blocks),
                    sum(p.numel() for i in blocks for p in layers[i].parameters()), distances, fit, ridge,
                    data.relative_error(transform), data.relative_error(identity), tokens=data.tokens,
                    transform=transform)
    merge_map(down_proj, transform)
    remove_blocks(model, layers, blocks)
    pruned.seconds = time.perf_counter() - start_time
    return pruned


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
