"""The solve pass: a group of calibrated blocks becomes a list of jobs (one linear, or the
same projection of every block of a group sharing one left factor), each job is solved
by its method at its ratio, and the results are compressed modules plus report rows."""
from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

import torch
from torch import nn

from ..adapters import Adapter
from ..allocation import RatioMap, shared_ratio
from ..layers.base import CompressedLinear
from ..methods import Method
from ..report import MatrixReport
from ..solvers import SolverOptions, output_error

Grams = dict[int, dict[tuple[str, ...], torch.Tensor]]  # block -> input group of the adapter -> Gram (d1, d1)


@dataclass
class Job:
    """Linears solved together: one (per layer), or the same projection of every block of a
    group sharing one left factor. members[j] = (block index, linear name)."""

    members: list[tuple[int, str]]
    linears: list[nn.Linear]
    grams: list[torch.Tensor]
    ratio: float

    @property
    def shared(self) -> str | None:
        """A name for the shared factor, e.g. "blocks 0-1 self_attn.q_proj"; None alone."""
        if len(self.members) == 1:
            return None
        return f"blocks {self.members[0][0]}-{self.members[-1][0]} {self.members[0][1]}"

    @property
    def size(self) -> int:
        return sum(linear.weight.numel() for linear in self.linears)


Solved = list[tuple[CompressedLinear, MatrixReport]]  # per member of a job


def job_members(blocks: list[int], name: str, adapter: Adapter) -> list[list[int]]:
    """The blocks whose linear `name` is solved together, per job: all the group's blocks
    when the adapter shares `name` across a group of several, else one block per job."""
    return [blocks] if len(blocks) > 1 and adapter.shares(name) else [[i] for i in blocks]


def plan_jobs(layers: nn.ModuleList, blocks: list[int], adapter: Adapter, grams: Grams, ratios: RatioMap) -> list[Job]:
    """The jobs of a group of blocks, in the adapter's order: one job per shared projection
    kind over all the blocks (when there are several), one per private linear; each at
    its ratio from `ratios` (one ratio per shared job)."""
    jobs = []
    for group in adapter.groups:
        for name in group:
            for members in job_members(blocks, name, adapter):
                keys = [(i, name) for i in members]
                jobs.append(Job(keys, [layers[i].get_submodule(name) for i in members],
                                [grams[i][group] for i in members], shared_ratio(keys, ratios)))
    return jobs


def solve_jobs(jobs: list[Job], method: Method, options: SolverOptions, workers: int,
               on_done: Callable[[int], object]) -> dict[int, Solved]:
    """Solve every job, largest first, on `workers` threads with torch set to one thread
    each meanwhile (the solvers' many small operations use cores better side by side);
    id(job) -> its Solved. on_done(count) is called with each finished job's member count."""
    order = sorted(jobs, key=lambda job: job.size, reverse=True)
    out: dict[int, Solved] = {}
    if workers == 1:
        for job in order:
            out[id(job)] = solve_job(job, method, options)
            on_done(len(job.members))
        return out
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(solve_job, job, method, options): job for job in order}
            for future in as_completed(futures):
                job = futures[future]
                out[id(job)] = future.result()
                on_done(len(job.members))
        return out
    finally:
        torch.set_num_threads(threads)


def solve_job(job: Job, method: Method, options: SolverOptions) -> Solved:
    """Factorize a job's m linears (one shared left factor when m > 1): per member, its
    compressed replacement and report row. A shared factor's storage and solve time are
    split evenly over the members, so sums over the report count it once."""
    weights = [linear.weight.detach().T for linear in job.linears]  # (d1, d2) = (in, out)
    d1, d2 = weights[0].shape
    m = len(weights)
    budget = method.budget(d1, d2, job.ratio, options, members=m)
    start = time.perf_counter()
    factors = method.solve(weights, job.grams, budget, options)
    seconds = time.perf_counter() - start
    modules = method.build(factors, [linear.bias for linear in job.linears], job.linears[0].weight.dtype)
    share = (lambda x: x) if m == 1 else (lambda x: x / m)
    return [(module, MatrixReport(
        layer=block, name=name, d1=d1, d2=d2, ratio=job.ratio, effective_params=share(budget.effective_params),
        storage_words=share(budget.storage_words), output_error=output_error(gram, weight, factor.weight()),
        seconds=share(seconds), rank=getattr(budget, "rank", None), atoms=getattr(budget, "atoms", None),
        sparsity=getattr(budget, "sparsity", None), members=m, shared=job.shared))
        for (block, name), module, gram, weight, factor in zip(job.members, modules, job.grams, weights, factors)]
