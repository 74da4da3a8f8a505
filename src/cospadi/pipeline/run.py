"""Block-by-block compression (the GPTQ-style model loop), as a few explicit passes:

1. capture: the hidden states and keyword arguments entering block 0 (capture.py);
2. per group of blocks (one block per layer mode):
   calibrate (a Gram per linear input, calibrate.py), solve (the method at each matrix's
   ratio, solve.py), swap the compressed modules in, propagate (run the compressed blocks
   to give the next group its inputs, so errors propagate as in the paper) and checkpoint
   (resume.py, with --resume-dir).
Only one group's Grams and one block's activations are alive at a time."""
from __future__ import annotations

import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from ..adapters import Adapter, adapter_for, decoder_layers
from ..allocation import RatioMap, check_ratio_map, shared_ratio, uniform_ratios
from ..budget import check_ratio
from ..devices import resolve_device, to_device, visiting
from ..errors import CospadiError
from ..groups import block_groups, check_group_size, shared_adapter
from ..methods import Method, check_quant, get_method
from ..report import CompressionReport, peak_rss_mb
from ..resume import Progress, check_resume_dir, load_progress, restore_groups, run_fingerprint, save_group, save_progress
from ..solvers import SolverOptions
from ..solvers.quantize import QuantSpec
from . import distributed
from .calibrate import calibrate_block
from .capture import BlockKwargs, capture_block_inputs, propagate
from .distributed import Ranks
from .solve import Job, Solved, job_members, plan_jobs, solve_jobs


@dataclass(frozen=True)
class Recipe:
    """What a run does: `method` (a registered name) removing `ratio` of the compressed
    linears, spread by `ratios` (one ratio per (block, linear); None: uniform, every
    matrix at `ratio`), with solver `options`, consecutive blocks in groups of
    `group_size` sharing factors (1: per layer): the linears `share` names (kinds such as
    "gate"; None: the method's default, groups.shared_adapter)."""

    method: str
    ratio: float
    options: SolverOptions = field(default_factory=SolverOptions)
    group_size: int = 1
    ratios: RatioMap | None = None
    quant: QuantSpec | None = None  # the factors quantized (docs/quantization.md); None: not
    share: tuple[str, ...] | None = None

    def settings(self) -> dict:
        """The JSON-ready description of the recipe (resume fingerprints)."""
        ratios = None if self.ratios is None else sorted([b, n, r] for (b, n), r in self.ratios.items())
        quant = {} if self.quant is None else {"quant": [self.quant.bits, self.quant.group]}
        share = {} if self.group_size == 1 else {"share": list(get_method(self.method).default_share or ["adapter"])
                                                 if self.share is None else list(self.share)}
        return dict(method=self.method, ratio=self.ratio, options=vars(self.options), group_size=self.group_size,
                    ratios=ratios, **quant, **share)


class BlockSource(Protocol):
    """Blocks whose weights are not held in memory (pipeline/lazy.py StreamedBlocks)."""

    def capturing(self) -> AbstractContextManager[None]:
        """A context in which the model can run the capture pass without the blocks' weights."""

    def load(self, blocks: list[int]) -> None:
        """Bring the weights of `blocks` into the model."""

    def finish(self, blocks: list[int]) -> None:
        """Store the compressed `blocks` and release their memory."""


@dataclass
class _Run:
    """The state one compress_blocks call carries from pass to pass."""

    model: PreTrainedModel
    layers: nn.ModuleList
    adapter: Adapter
    method: Method
    recipe: Recipe
    ratios: RatioMap
    target: torch.device
    workers: int
    report: CompressionReport
    states: list[torch.Tensor] = field(default_factory=list)
    block_kwargs: list[BlockKwargs] = field(default_factory=list)
    ranks: Ranks | None = None  # several processes (distributed.py): this rank's share of the work


def compress_blocks(model: PreTrainedModel, input_ids: torch.Tensor, recipe: Recipe, *, batch_size: int = 8,
                    workers: int | None = None, device: str | torch.device | None = None, progress: bool = True,
                    resume_dir: str | Path | None = None, source: BlockSource | None = None) -> CompressionReport:
    """Compress every target linear of every block of `model` in place as `recipe` says,
    calibrated on `input_ids` (N, L) in batches of `batch_size`; the target linears become
    the method's CompressedLinear modules (members of a shared job hold the same factor
    Parameter). Returns the report.

    `workers`: jobs of a group solved at once on threads (default: torch's thread count
    on the CPU, 1 on an accelerator). `device` (devices.resolve_device; None: the model's
    own): where calibration and the solvers run; the model stays where it is and each
    group of blocks visits the device (GPTQ-style offloading). `resume_dir`: progress is
    saved there after every group, and a rerun of the same run restores it and goes on
    (resume.py; report.seconds then sums every attempt). `source` (pipeline/lazy.py): the
    blocks' weights are not in memory; it loads each group before its turn and stores and
    releases it once compressed (no resume_dir then). In a process group of several ranks
    (distributed.py) the windows and the solves are split across the ranks, the result is
    the same, and rank 0 alone writes the resume files."""
    start = time.perf_counter()
    check_input_ids(model, input_ids, batch_size)
    run = _prepare(model, input_ids, recipe, workers, device)
    if source is not None and resume_dir is not None:
        raise CospadiError("--resume-dir does not work with block-by-block loading (--lazy) yet: leave one out")
    run.ranks = distributed.current()
    if run.ranks is not None and -(-input_ids.shape[0] // batch_size) < run.ranks.world:
        raise CospadiError(f"{run.ranks.world} ranks need at least {run.ranks.world} calibration batches: raise "
                           "--calib-samples, lower --batch-size or use fewer ranks")
    folder = check_resume_dir(resume_dir) if resume_dir is not None else None
    fingerprint = run_fingerprint(model, input_ids, dict(
        recipe.settings(), batch_size=batch_size, device=run.target.type)) if folder is not None else ""
    saved = load_progress(folder, fingerprint, run.target) if folder is not None else None  # before the capture pass
    with source.capturing() if source is not None else nullcontext():
        own = input_ids if run.ranks is None else run.ranks.windows(input_ids, batch_size)
        states, block_kwargs = capture_block_inputs(model, run.layers, own, batch_size)
    run.states, run.block_kwargs = to_device(states, run.target), to_device(block_kwargs, run.target)
    del states, block_kwargs  # the run's lists only: a second one would hold block 0's inputs to the end
    groups = block_groups(len(run.layers), recipe.group_size)
    done, seconds_before, files = 0, 0.0, {}
    if saved is not None:
        home = next(model.parameters()).device
        restore_groups(folder, run.layers, groups, saved, home)
        done, seconds_before, run.states, run.report.matrices = saved.done, saved.seconds, saved.states, saved.matrices
        if run.ranks is not None:  # this rank's batches
            run.states = [run.states[b] for b in run.ranks.batches(len(run.states))]
        files = saved.files
    per_block = len(run.adapter.targets)
    with tqdm(total=len(run.layers) * per_block, initial=done * per_block, desc=f"{recipe.method} @ {recipe.ratio}",
              unit="matrix", disable=not progress) as bar:  # closed on errors too (Ctrl-C prints on a clean line)
        for blocks in groups:
            if blocks[-1] < done:
                continue
            if source is not None:
                source.load(blocks)
            _compress_group(run, blocks, bar)
            if source is not None:
                source.finish(blocks)
            if folder is not None:
                states = run.states if run.ranks is None else run.ranks.gather_states(run.states)
                if run.ranks is None or run.ranks.rank == 0:
                    files.update(save_group(folder, blocks[0], [run.layers[i] for i in blocks]))
                    save_progress(folder, fingerprint, Progress(blocks[-1] + 1, states, run.report.matrices,
                                                                seconds_before + time.perf_counter() - start, files))
    run.report.matrices.sort(key=lambda m: (m.layer, run.adapter.targets.index(m.name)))
    run.report.seconds = seconds_before + time.perf_counter() - start
    run.report.peak_rss_mb = peak_rss_mb()
    return run.report


def _prepare(model: PreTrainedModel, input_ids: torch.Tensor, recipe: Recipe, workers: int | None,
             device: str | torch.device | None) -> _Run:
    """Check the recipe against the model (CospadiError before any work) and set up the run."""
    ratios = check_recipe(model, recipe)
    layers = decoder_layers(model)
    target = resolve_device(device) or next(model.parameters()).device
    workers = max(1, workers or (1 if target.type != "cpu" else torch.get_num_threads()))
    report = CompressionReport(recipe.method, recipe.ratio, dict(vars(recipe.options)), unique_param_count(model),
                               calibration={"samples": int(input_ids.shape[0]), "seq_len": int(input_ids.shape[1])},
                               group_size=recipe.group_size)
    adapter = shared_adapter(adapter_for(model), get_method(recipe.method), recipe.share)
    return _Run(model, layers, adapter, get_method(recipe.method), recipe, ratios, target, workers, report)


def check_recipe(model: PreTrainedModel, recipe: Recipe) -> RatioMap:
    """Everything about `recipe` that can be checked against `model` without calibrating:
    the method, ratio and group size, the family, finite weights, the ratio map, and every
    job's budget (a budget too small for one nonzero per column, a solver that cannot hold
    it). CospadiError otherwise; returns the per-matrix ratios the run will use."""
    method = get_method(recipe.method)
    if not method.ignores_ratio:
        check_ratio(recipe.ratio)
    check_group_size(recipe.group_size, method)
    if recipe.quant is not None:
        check_quant(method, recipe.quant, recipe.group_size)
    if recipe.share is not None and recipe.group_size == 1:
        raise CospadiError("--share chooses the linears a group of blocks shares: give --group-size 2 or more")
    adapter = shared_adapter(adapter_for(model), method, recipe.share)
    layers = decoder_layers(model)
    check_weights(adapter, layers)
    if method.ignores_ratio:  # rtn, gptq: every matrix keeps its shape (ratio 0) and is quantized
        return {(block, name): 0.0 for block in range(len(layers)) for name in adapter.targets}
    ratios = recipe.ratios if recipe.ratios is not None else uniform_ratios(len(layers), adapter.targets, recipe.ratio)
    check_ratio_map(ratios, len(layers), adapter.targets)
    for blocks in block_groups(len(layers), recipe.group_size):
        for name in adapter.targets:
            for members in job_members(blocks, name, adapter):
                linear = layers[members[0]].get_submodule(name)
                ratio = shared_ratio([(i, name) for i in members], ratios)
                if ratio == 0:  # stays dense
                    continue
                budget = method.budget(linear.in_features, linear.out_features, ratio, recipe.options, len(members))
                method.check(budget, recipe.options)
    return ratios


def _compress_group(run: _Run, blocks: list[int], bar: tqdm) -> None:
    """Calibrate, solve, swap and propagate one group of blocks (one block per layer mode).

    A shared factor needs the Grams of every block of its group, so no block of a group can
    be compressed before the group's last block is calibrated: the blocks are calibrated in
    turn, each on the DENSE outputs of its predecessor in the group, all fed by the already
    compressed previous groups; then the group is solved, swapped, and run compressed to
    give the next group its inputs. Errors thus propagate between groups as between blocks
    in per-layer mode (a group of one block is exactly the per-layer pipeline). Memory: the
    group's Grams and one block's activations at a time."""
    layers, n = run.layers, len(run.layers)
    where = f"block {blocks[0] + 1}/{n}" if len(blocks) == 1 else f"blocks {blocks[0] + 1}-{blocks[-1] + 1}/{n}"
    bar.set_postfix_str(f"{where}: calibrating")
    with visiting(nn.ModuleList(layers[i] for i in blocks), run.target):  # back home afterwards, also on errors
        grams, inputs = {}, run.states
        for position, i in enumerate(blocks):
            last = position == len(blocks) - 1
            grams[i], inputs = calibrate_block(layers[i], run.adapter, inputs, run.block_kwargs[i], keep_outputs=not last,
                                               fold=run.ranks.fold if run.ranks is not None else None)
        jobs = plan_jobs(layers, blocks, run.adapter, grams, run.ratios)
        bar.set_postfix_str(f"{where}: solving")
        solved = _solve(run, jobs, bar)  # every job released: its modules are in their blocks
        for job in jobs:  # the report's rows in the adapter's order, deterministically
            run.report.matrices.extend(row for _, row in solved[id(job)])
        del grams, jobs, solved, inputs
        for i in blocks:
            propagate(layers[i], run.states, run.block_kwargs[i])


def _solve(run: _Run, jobs: list[Job], bar: tqdm) -> dict[int, Solved]:
    """solve_jobs on one process; on several ranks, each solves the jobs distributed.py
    assigns it and every job's result is shared with all (on the CPU, then back). Every
    job comes back released (Job.release): the ones solved here by solve_jobs, the others
    once their result arrives."""
    if run.ranks is None:
        return solve_jobs(jobs, run.method, run.recipe.options, run.workers, bar.update, run.recipe.quant)
    owners = run.ranks.assign([job.size for job in jobs])
    mine = solve_jobs([job for job, owner in zip(jobs, owners) if owner == run.ranks.rank], run.method,
                      run.recipe.options, run.workers, bar.update, run.recipe.quant)
    home = torch.device("cpu")
    results = run.ranks.share([_moved(mine[id(job)], home) if id(job) in mine else None for job in jobs], owners)
    bar.update(sum(len(job.members) for job, owner in zip(jobs, owners) if owner != run.ranks.rank))
    solved = {id(job): _moved(result, run.target) for job, result in zip(jobs, results)}
    for job, owner in zip(jobs, owners):
        if owner != run.ranks.rank:
            job.release(solved[id(job)])
    return solved


def _moved(solved: Solved, device: torch.device) -> Solved:
    """A job's modules on `device` (in place; a factor shared by the job's members stays one
    Parameter: moving a dense tensor between devices keeps the Parameter object)."""
    for module, _ in solved:
        module.to(device)
    return solved


def check_input_ids(model: PreTrainedModel, input_ids: object, batch_size: int) -> None:
    """CospadiError unless `input_ids` is a 2-D integer tensor (windows, tokens) of ids the
    model's vocabulary has and `batch_size` a positive integer."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point() \
            or input_ids.dtype == torch.bool or input_ids.numel() == 0:
        what = f"{tuple(input_ids.shape)} {input_ids.dtype}" if isinstance(input_ids, torch.Tensor) else \
            type(input_ids).__name__
        raise CospadiError(f"input_ids must be a non-empty 2-D integer tensor (windows, tokens), got {what}")
    vocab = getattr(model.config, "vocab_size", None)
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or (isinstance(vocab, int) and high >= vocab):
        raise CospadiError(f"input_ids hold ids from {low} to {high}, outside the model's vocabulary 0..{vocab}: "
                           "tokenize with the model's own tokenizer")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise CospadiError(f"batch_size {batch_size!r} must be an integer >= 1")


def unique_param_count(model: nn.Module) -> int:
    """Parameters of the model, tied ones counted once."""
    return sum(p.numel() for p in model.parameters())


def check_weights(adapter: Adapter, layers: nn.ModuleList, blocks: list[int] | None = None) -> None:
    """CospadiError naming the first target linear with non-finite weights, among `blocks`
    (None: all); weights not loaded yet (meta, pipeline/lazy.py) are checked on loading."""
    for i in range(len(layers)) if blocks is None else blocks:
        for name in adapter.targets:
            weight = layers[i].get_submodule(name).weight
            if not weight.is_meta and not torch.isfinite(weight).all():
                raise CospadiError(f"block {i} {name} has non-finite weights: the checkpoint is corrupt or was "
                                   "loaded in too low a precision; reload it in float32")
