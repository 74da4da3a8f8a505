"""Block-by-block calibration and compression (the GPTQ-style model loop).

The inputs of block 0 are captured once, with every keyword argument the installed
transformers passes to each block (masks, rotary embeddings, cache flags). Then, for each
block in turn: run it dense to accumulate a float64 Gram X^T X per distinct linear input,
factorize its target linears, swap the compressed modules in, and run the compressed
block to produce the next block's inputs, so errors propagate as in the paper. Only one
block's activations and Grams are alive at a time.

Per-group mode (group_size m > 1) does the same a group of m consecutive blocks at a time,
their q/k/v/gate/up sharing one factor per kind (see compress_blocks)."""
from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from .adapters import Adapter, adapter_for, decoder_layers
from .devices import resolve_device, to_device, visiting
from .errors import CospadiError
from .groups import block_groups, check_group_size, is_shared
from .methods import (SolverOptions, budget_for, build_module, build_shared_modules, check_method,
                      factorize_group)
from .report import CompressionReport, MatrixReport, peak_rss_mb
from .resume import Progress, load_progress, restore_groups, run_fingerprint, save_group, save_progress
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
    return calibrate_block(layer, adapter, states, kwargs)[0]


@torch.no_grad()
def calibrate_block(layer: nn.Module, adapter: Adapter, states: list[torch.Tensor], kwargs: BlockKwargs,
                    keep_outputs: bool = False) -> tuple[dict[tuple[str, ...], torch.Tensor], list[torch.Tensor] | None]:
    """accumulate_grams' Grams and, with `keep_outputs`, the block's outputs of the same
    run (one (B, L, H) tensor per batch of `states`; None otherwise)."""
    grams: dict[tuple[str, ...], torch.Tensor] = {}

    def hook_for(group: tuple[str, ...]) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            product = (x.T @ x).double()
            grams[group] = grams[group] + product if group in grams else product
        return hook

    handles = [layer.get_submodule(group[0]).register_forward_pre_hook(hook_for(group)) for group in adapter.groups]
    try:
        outputs = run_block(layer, states, kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return grams, outputs if keep_outputs else None


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


@dataclass
class _Job:
    """Linears solved together: one (per layer), or the same projection of every block of a
    group sharing one left factor. members[j] = (block index, linear name)."""

    members: list[tuple[int, str]]
    linears: list[nn.Linear]
    grams: list[torch.Tensor]

    @property
    def shared(self) -> str | None:
        """A name for the shared factor, e.g. "blocks 0-1 self_attn.q_proj"; None alone."""
        if len(self.members) == 1:
            return None
        return f"blocks {self.members[0][0]}-{self.members[-1][0]} {self.members[0][1]}"

    @property
    def size(self) -> int:
        return sum(linear.weight.numel() for linear in self.linears)


def compress_blocks(model: PreTrainedModel, input_ids: torch.Tensor, method: str, ratio: float,
                    options: SolverOptions = SolverOptions(), batch_size: int = 8, progress: bool = True,
                    workers: int | None = None, group_size: int = 1,
                    resume_dir: str | Path | None = None, device: str | torch.device | None = None) -> CompressionReport:
    """Compress every target linear of every block of `model` in place with `method` at
    `ratio`, calibrated on `input_ids` (N, L). With group_size m > 1 (basis-sharing,
    cospadi), consecutive blocks form groups (groups.block_groups: a shorter last group
    when m does not divide the block count) whose q/k/v/gate/up share one factor per kind;
    o and down stay per layer. The jobs of a block (or group) are solved by `workers`
    threads at once (default: torch's thread count), each single-threaded: the solvers'
    many small batched operations use cores better side by side than split.
    With `resume_dir`, progress is saved there after every group and a rerun of the same
    run restores it and goes on (see resume.py; report.seconds then sums every attempt).
    `device` (devices.resolve_device; None: the model's own): where calibration and the
    solvers run. The model stays where it is; each group of blocks visits `device` while it
    is calibrated, solved and run, then goes back (GPTQ-style offloading: only the embeddings'
    first pass and one group of blocks need to fit). On CUDA the jobs run one at a time
    unless `workers` says otherwise.
    Returns the report; the target linears become LowRankLinear or DictLinear modules
    (members of a shared job hold the same factor Parameter)."""
    check_method(method)
    check_group_size(group_size, method)
    adapter = adapter_for(model)
    layers = decoder_layers(model)
    check_weights(model, adapter, layers)
    home = next(model.parameters()).device
    target = resolve_device(device) or home
    workers = max(1, workers or (1 if target.type != "cpu" else torch.get_num_threads()))
    start = time.perf_counter()
    report = CompressionReport(method, ratio, dict(vars(options)), unique_param_count(model),
                               calibration={"samples": int(input_ids.shape[0]), "seq_len": int(input_ids.shape[1])},
                               group_size=group_size)
    folder = Path(resume_dir) if resume_dir is not None else None
    fingerprint = ""
    if folder is not None:
        # the device type too: CPU and CUDA arithmetic differ slightly, so their blocks must not mix
        fingerprint = run_fingerprint(model, layers, input_ids, dict(
            method=method, ratio=ratio, options=vars(options), group_size=group_size, batch_size=batch_size,
            device=target.type))
    states, block_kwargs = capture_block_inputs(model, layers, input_ids, batch_size)
    states, block_kwargs = to_device(states, target), to_device(block_kwargs, target)
    groups = block_groups(len(layers), group_size)
    done, seconds_before = 0, 0.0
    saved = load_progress(folder, fingerprint, target) if folder is not None else None
    if saved is not None:
        restore_groups(folder, layers, groups, saved.done, home)
        done, seconds_before, states, report.matrices = saved.done, saved.seconds, saved.states, saved.matrices
    bar = tqdm(total=len(layers) * len(adapter.targets), initial=done * len(adapter.targets),
               desc=f"{method} @ {ratio}", unit="matrix", disable=not progress)
    for blocks in groups:
        if blocks[-1] < done:
            continue
        where = f"block {blocks[0] + 1}/{len(layers)}" if len(blocks) == 1 else \
            f"blocks {blocks[0] + 1}-{blocks[-1] + 1}/{len(layers)}"
        # A shared factor needs the Grams of every block of its group, so no block of a group
        # can be compressed before the group's last block is calibrated. The blocks of a group
        # are therefore calibrated in turn, each on the DENSE outputs of its predecessor in the
        # group, all fed by the already-compressed previous groups; then the whole group is
        # solved, swapped, and run compressed to give the next group its inputs. Errors thus
        # propagate between groups as between blocks in per-layer mode (m = 1 is exactly the
        # per-layer pipeline). Compressing each block's private o/down before calibrating the
        # next would let those errors reach the rest of the group too, but would mix compressed
        # and dense linears inside a block and cost an extra pass per block: not done.
        # Memory: the group's Grams (m blocks) and one block's activations at a time.
        bar.set_postfix_str(f"{where}: calibrating")
        with visiting(nn.ModuleList(layers[i] for i in blocks), target):  # back home afterwards, also on errors
            grams: dict[int, dict[tuple[str, ...], torch.Tensor]] = {}
            inputs = states
            for position, i in enumerate(blocks):
                last = position == len(blocks) - 1
                grams[i], inputs = calibrate_block(layers[i], adapter, inputs, block_kwargs[i],
                                                   keep_outputs=not last)
            jobs = _jobs(layers, blocks, adapter, grams)
            bar.set_postfix_str(f"{where}: solving")
            solved = _solve_all(jobs, method, ratio, options, workers, bar.update)
            for job in jobs:  # swap in the adapter's order, deterministically
                for (i, name), (module, matrix) in zip(job.members, solved[id(job)]):
                    layers[i].set_submodule(name, module)
                    report.matrices.append(MatrixReport(layer=i, name=name, **matrix))
            del grams, jobs, solved, inputs
            for i in blocks:
                states = run_block(layers[i], states, block_kwargs[i])
        if folder is not None:
            save_group(folder, blocks[0], [layers[i] for i in blocks])
            save_progress(folder, fingerprint, Progress(blocks[-1] + 1, states, report.matrices,
                                                        seconds_before + time.perf_counter() - start))
    bar.close()
    report.matrices.sort(key=lambda m: (m.layer, adapter.targets.index(m.name)))
    report.seconds = seconds_before + time.perf_counter() - start
    report.peak_rss_mb = peak_rss_mb()
    return report


def _jobs(layers: nn.ModuleList, blocks: list[int], adapter: Adapter,
          grams: dict[int, dict[tuple[str, ...], torch.Tensor]]) -> list[_Job]:
    """The solve jobs of a group of blocks, in the adapter's order: one job per shared
    projection kind over all the blocks (when there are several), one per private linear."""
    jobs = []
    for group in adapter.groups:
        for name in group:
            together = [blocks] if len(blocks) > 1 and is_shared(name) else [[i] for i in blocks]
            for members in together:
                jobs.append(_Job([(i, name) for i in members], [layers[i].get_submodule(name) for i in members],
                                 [grams[i][group] for i in members]))
    return jobs


def _solve_all(jobs: list[_Job], method: str, ratio: float, options: SolverOptions, workers: int,
               on_done: Callable[[int], object]) -> dict[int, list[tuple[nn.Module, dict]]]:
    """Solve every job, largest first, on `workers` threads with torch set to one thread
    each meanwhile; id(job) -> [(compressed module, report fields)] per member.
    on_done(count) is called with the number of matrices of each finished job."""
    order = sorted(jobs, key=lambda job: job.size, reverse=True)
    if workers == 1:
        out = {}
        for job in order:
            out[id(job)] = _solve_job(job, method, ratio, options)
            on_done(len(job.members))
        return out
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(_solve_job, job, method, ratio, options): job for job in order}
            out = {}
            for future in as_completed(futures):
                job = futures[future]
                out[id(job)] = future.result()
                on_done(len(job.members))
        return out
    finally:
        torch.set_num_threads(threads)


def _solve_job(job: _Job, method: str, ratio: float, options: SolverOptions) -> list[tuple[nn.Module, dict]]:
    """Factorize a job's m linears (one shared left factor when m > 1): per member, its
    compressed replacement and MatrixReport fields but layer/name. A shared factor's
    storage and solve time are split evenly over the members, so sums over the report
    count it once."""
    weights = [linear.weight.detach().T for linear in job.linears]  # (d1, d2) = (in, out)
    d1, d2 = weights[0].shape
    m = len(weights)
    budget = budget_for(method, d1, d2, ratio, options, members=m)
    start = time.perf_counter()
    factors = factorize_group(method, weights, job.grams, budget, options)
    seconds = time.perf_counter() - start
    biases = [linear.bias for linear in job.linears]
    dtype = job.linears[0].weight.dtype
    modules = build_shared_modules(factors, biases, dtype) if m > 1 else [build_module(factors[0], biases[0], dtype)]
    share = (lambda x: x) if m == 1 else (lambda x: x / m)
    return [(module, dict(d1=d1, d2=d2, effective_params=share(budget.effective_params),
                          storage_words=share(budget.storage_words),
                          output_error=output_error(gram, weight, factor.weight()), seconds=share(seconds),
                          rank=getattr(budget, "rank", None), atoms=getattr(budget, "atoms", None),
                          sparsity=getattr(budget, "sparsity", None), members=m, shared=job.shared))
            for module, gram, weight, factor in zip(modules, job.grams, weights, factors)]
