"""Block-by-block calibration and compression (the GPTQ-style model loop).

The inputs of block 0 are captured once, with every keyword argument the installed
transformers passes to each block (masks, rotary embeddings, cache flags). Then, for each
block in turn: run it dense to accumulate a float64 Gram X^T X per distinct linear input,
factorize its target linears, swap the compressed modules in, and run the compressed
block to produce the next block's inputs, so errors propagate as in the paper. Only one
block's activations and Grams are alive at a time."""
from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from .adapters import Adapter, adapter_for, decoder_layers
from .errors import CospadiError
from .methods import SolverOptions, budget_for, build_module, check_method, factorize
from .report import CompressionReport, MatrixReport, peak_rss_mb
from .solvers import output_error

BlockKwargs = dict[int, dict]  # batch size -> keyword arguments of one block's forward


class _StopForward(Exception):
    """Raised by a capture hook to end a forward pass early."""


@torch.no_grad()
def capture_block_inputs(model: PreTrainedModel, layers: nn.ModuleList, input_ids: torch.Tensor,
                         batch_size: int) -> tuple[list[torch.Tensor], list[BlockKwargs]]:
    """Hidden states entering block 0 for `input_ids` (N, L), as a list of (B, L, H)
    batches, and for every block the keyword arguments the model passes it, per batch
    size. Each batch stops right after the embeddings, except the first batch of each size,
    which runs on to the last block to record every block's arguments (Gemma3's sliding
    and global layers get different masks and rotary tables)."""
    states: list[torch.Tensor] = []
    block_kwargs: list[BlockKwargs] = [{} for _ in layers]
    last = len(layers) - 1

    def hook_for(i: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            if len(args) > 1:
                raise CospadiError(f"{type(module).__name__} received positional arguments beyond the hidden "
                                   "states; this transformers version is not supported")
            size = hidden.shape[0]
            if i == 0:
                states.append(hidden.detach())
            if size not in block_kwargs[i]:
                block_kwargs[i][size] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            if i == last or size in block_kwargs[last]:
                raise _StopForward
        return hook

    handles = [layer.register_forward_pre_hook(hook_for(i), with_kwargs=True) for i, layer in enumerate(layers)]
    device = next(model.parameters()).device
    try:
        for batch in input_ids.split(batch_size):
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return states, block_kwargs


@torch.no_grad()
def run_block(layer: nn.Module, states: list[torch.Tensor], kwargs: BlockKwargs) -> list[torch.Tensor]:
    """The block's outputs for each batch of input states."""
    outputs = []
    for hidden in states:
        out = layer(hidden, **kwargs[hidden.shape[0]])
        outputs.append(out[0] if isinstance(out, tuple) else out)
    return outputs


@torch.no_grad()
def accumulate_grams(layer: nn.Module, adapter: Adapter, states: list[torch.Tensor],
                     kwargs: BlockKwargs) -> dict[tuple[str, ...], torch.Tensor]:
    """One Gram X^T X (d1, d1) per input group of the adapter, over every calibration
    token entering the block: each batch's product is formed in float32 and summed in
    float64 across batches."""
    grams: dict[tuple[str, ...], torch.Tensor] = {}

    def hook_for(group: tuple[str, ...]) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            product = (x.T @ x).double()
            grams[group] = grams[group] + product if group in grams else product
        return hook

    handles = [layer.get_submodule(group[0]).register_forward_pre_hook(hook_for(group)) for group in adapter.groups]
    try:
        run_block(layer, states, kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return grams


def unique_param_count(model: nn.Module) -> int:
    """Parameters of the model, tied ones counted once."""
    return sum(p.numel() for p in model.parameters())


def check_weights(model: PreTrainedModel, adapter: Adapter, layers: nn.ModuleList) -> None:
    """CospadiError naming the first target linear with non-finite weights."""
    for i, layer in enumerate(layers):
        for name in adapter.targets:
            weight = layer.get_submodule(name).weight
            if not torch.isfinite(weight).all():
                raise CospadiError(f"block {i} {name} has non-finite weights: the checkpoint is corrupt or was "
                                   "loaded in too low a precision; reload it in float32")


def compress_blocks(model: PreTrainedModel, input_ids: torch.Tensor, method: str, ratio: float,
                    options: SolverOptions = SolverOptions(), batch_size: int = 8, progress: bool = True,
                    workers: int | None = None) -> CompressionReport:
    """Compress every target linear of every block of `model` in place with `method` at
    `ratio`, calibrated on `input_ids` (N, L). The matrices of a block are solved by
    `workers` threads at once (default: torch's thread count), each single-threaded:
    the solvers' many small batched operations use cores better side by side than split.
    Returns the report; the target linears become LowRankLinear or DictLinear modules."""
    check_method(method)
    adapter = adapter_for(model)
    layers = decoder_layers(model)
    check_weights(model, adapter, layers)
    workers = max(1, workers or torch.get_num_threads())
    start = time.perf_counter()
    report = CompressionReport(method, ratio, dict(vars(options)), unique_param_count(model),
                               calibration={"samples": int(input_ids.shape[0]), "seq_len": int(input_ids.shape[1])})
    states, block_kwargs = capture_block_inputs(model, layers, input_ids, batch_size)
    bar = tqdm(total=len(layers) * len(adapter.targets), desc=f"{method} @ {ratio}", unit="matrix",
               disable=not progress)
    for i, layer in enumerate(layers):
        bar.set_postfix_str(f"block {i + 1}/{len(layers)}: calibrating")
        grams = accumulate_grams(layer, adapter, states, block_kwargs[i])
        bar.set_postfix_str(f"block {i + 1}/{len(layers)}: solving")
        jobs = {name: (layer.get_submodule(name), grams[group]) for group in adapter.groups for name in group}
        solved = _solve_all(jobs, method, ratio, options, workers, lambda: bar.update(1))
        for name, (linear, gram) in jobs.items():  # swap in the adapter's order, deterministically
            module, matrix = solved[name]
            layer.set_submodule(name, module)
            report.matrices.append(MatrixReport(layer=i, name=name, **matrix))
        del grams, jobs, solved
        states = run_block(layer, states, block_kwargs[i])
    bar.close()
    report.seconds = time.perf_counter() - start
    report.peak_rss_mb = peak_rss_mb()
    return report


def _solve_all(jobs: dict[str, tuple[nn.Linear, torch.Tensor]], method: str, ratio: float, options: SolverOptions,
               workers: int, on_done: Callable[[], None]) -> dict[str, tuple[nn.Module, dict]]:
    """Solve every (linear, Gram) job, largest first, on `workers` threads with torch
    set to one thread each meanwhile; name -> (compressed module, report fields)."""
    order = sorted(jobs, key=lambda n: jobs[n][0].weight.numel(), reverse=True)
    if workers == 1:
        out = {}
        for name in order:
            out[name] = _solve_linear(*jobs[name], method, ratio, options)
            on_done()
        return out
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(_solve_linear, *jobs[name], method, ratio, options): name for name in order}
            out = {}
            for future in as_completed(futures):
                out[futures[future]] = future.result()
                on_done()
        return out
    finally:
        torch.set_num_threads(threads)


def _solve_linear(linear: nn.Linear, gram: torch.Tensor, method: str, ratio: float,
                  options: SolverOptions) -> tuple[nn.Module, dict]:
    """Factorize one linear: (its compressed replacement, MatrixReport fields but layer/name)."""
    weight = linear.weight.detach().T  # (d1, d2) = (in, out)
    d1, d2 = weight.shape
    budget = budget_for(method, d1, d2, ratio, options)
    start = time.perf_counter()
    factors = factorize(method, weight, gram, budget, options)
    seconds = time.perf_counter() - start
    module = build_module(factors, linear.bias, linear.weight.dtype)
    return module, dict(d1=d1, d2=d2, effective_params=budget.effective_params, storage_words=budget.storage_words,
                        output_error=output_error(gram, weight, factors.weight()), seconds=seconds,
                        rank=getattr(budget, "rank", None), atoms=getattr(budget, "atoms", None),
                        sparsity=getattr(budget, "sparsity", None))
