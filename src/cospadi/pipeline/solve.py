"""The solve pass: a group of calibrated blocks becomes a list of jobs (one linear, or the
same projection of every block of a group sharing one left factor), each job is solved
by its method at its ratio, and the results are compressed modules plus report rows."""
from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from ..adapters import Adapter
from ..allocation import RatioMap, shared_ratio
from ..layers.quantized import QuantLinear
from ..methods import Method
from ..report import MatrixReport
from ..solvers import SolverOptions, output_error
from ..solvers.quantize import QuantSpec, quantize_dense

Grams = dict[int, dict[tuple[str, ...], torch.Tensor]]  # block -> input group of the adapter -> Gram (d1, d1)
POLL = 0.2  # seconds the main thread waits for a job at a time (solve_jobs)


@dataclass
class Job:
    """Linears solved together: one (per layer), or the same projection of every block of a
    group sharing one left factor. members[j] = (block index, linear name); homes[j]: the
    block module holding member j (release swaps the solved module into it). size: the
    job's weight count, fixed when planned."""

    members: list[tuple[int, str]]
    linears: list[nn.Linear]
    grams: list[torch.Tensor]
    ratio: float
    homes: list[nn.Module]
    size: int = field(init=False)

    def __post_init__(self) -> None:
        self.size = sum(linear.weight.numel() for linear in self.linears)

    @property
    def shared(self) -> str | None:
        """A name for the shared factor, e.g. "blocks 0-1 self_attn.q_proj"; None alone."""
        if len(self.members) == 1:
            return None
        return f"blocks {self.members[0][0]}-{self.members[-1][0]} {self.members[0][1]}"

    def release(self, solved: Solved) -> None:
        """Swap the solved modules into their blocks (homes) and drop the job's dense
        linears and Grams: a replaced linear's weight and a Gram no other job holds are
        freed now rather than with the whole group (solve_jobs)."""
        for home, (_, name), (module, _) in zip(self.homes, self.members, solved):
            home.set_submodule(name, module)
        self.linears, self.grams = [], []


Solved = list[tuple[nn.Module, MatrixReport]]  # per member of a job: its module (compressed, or kept dense) and row


def job_members(blocks: list[int], name: str, adapter: Adapter) -> list[list[int]]:
    """The blocks whose linear `name` is solved together, per job: all the group's blocks
    when the adapter shares `name` across a group of several, else one block per job."""
    return [blocks] if len(blocks) > 1 and adapter.shares(name) else [[i] for i in blocks]


def plan_jobs(layers: nn.ModuleList, blocks: list[int], adapter: Adapter, grams: Grams, ratios: RatioMap) -> list[Job]:
    """The jobs of a group of blocks, in the adapter's order: one job per shared projection
    kind over all the blocks (when there are several), one per private linear; each at
    its ratio from `ratios` (one ratio per shared job). The Grams move into the jobs:
    `grams` is left empty, so that each is freed once its last job is solved (Job.release)."""
    jobs = []
    for group in adapter.groups:
        for name in group:
            for members in job_members(blocks, name, adapter):
                keys = [(i, name) for i in members]
                jobs.append(Job(keys, [cast(nn.Linear, layers[i].get_submodule(name)) for i in members],
                                [grams[i][group] for i in members], shared_ratio(keys, ratios),
                                [layers[i] for i in members]))
    for i in blocks:
        grams[i].clear()
    return jobs


def solve_jobs(jobs: list[Job], method: Method, options: SolverOptions, workers: int,
               on_done: Callable[[int], object], quant: QuantSpec | None = None) -> dict[int, Solved]:
    """Solve every job on `workers` threads with torch set to one thread each meanwhile
    (the solvers' many small operations use cores better side by side); id(job) -> its
    Solved. Each finished job is released (Job.release: its modules swapped into their
    blocks, its dense weights and Grams dropped). One worker takes the smallest jobs first,
    so the largest solves' work space comes when the least is held (peak memory); several
    take the largest first (the last to finish are short). on_done(count) is called with
    each finished job's member count.
    When the main thread is interrupted (Ctrl-C) or a job fails, the jobs not started are
    cancelled and the running ones stopped (_Running.stop), so the error goes up at once;
    the solvers write no files, and no worker outlives the call. The main thread waits in
    short slices: a signal that lands just before it blocks is seen within POLL seconds.
    `quant`: every job's factors quantized (solve_job)."""
    order = sorted(jobs, key=lambda job: job.size, reverse=workers > 1)
    out: dict[int, Solved] = {}
    if workers == 1:
        for job in order:
            out[id(job)] = solve_job(job, method, options, quant)
            job.release(out[id(job)])
            on_done(len(job.members))
        return out
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pool, running = ThreadPoolExecutor(max_workers=workers), _Running()
    try:
        futures = {pool.submit(running.call, solve_job, job, method, options, quant): job for job in order}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=POLL, return_when=FIRST_COMPLETED)
            for future in done:
                job = futures[future]
                out[id(job)] = future.result()
                job.release(out[id(job)])
                on_done(len(job.members))
        return out
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)  # the jobs not started never start
        running.stop()
        raise
    finally:
        try:
            pool.shutdown(wait=True)  # quick: every job has finished or been stopped
        finally:
            torch.set_num_threads(threads)


class _Stopped(BaseException):
    """Raised inside a worker whose job an abandoned solve_jobs stops."""


class _Running:
    """The worker threads now inside a job. stop() raises _Stopped in each of them at its
    next Python line (CPython's PyThreadState_SetAsyncExc; torch calls finish first, and
    the solvers' loops return to Python every few milliseconds): without it an interrupted
    run would wait for every running matrix to finish, seconds to minutes. A thread counts
    as running until it leaves `call` under the lock, so the exception is always raised
    inside `call`, never in the executor's own loop."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.threads: set[int] = set()

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        ident = threading.get_ident()
        with self.lock:
            self.threads.add(ident)
        try:
            return fn(*args)
        finally:
            with self.lock:
                self.threads.discard(ident)

    def stop(self) -> None:
        with self.lock:
            for ident in self.threads:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(_Stopped))


def solve_job(job: Job, method: Method, options: SolverOptions, quant: QuantSpec | None = None) -> Solved:
    """Factorize a job's m linears (one shared left factor when m > 1): per member, its
    compressed replacement and report row. A shared factor's storage and solve time are
    split evenly over the members, so sums over the report count it once. With `quant`
    the factors are quantized (method.quantize), and a job kept dense (ratio 0) becomes
    its quantized weight (QuantLinear, method.dense_quantizer; docs/quantization.md)."""
    if job.ratio == 0:
        if quant is not None:
            return [quantized_dense(block, name, linear, gram, method.dense_quantizer, quant)
                    for (block, name), linear, gram in zip(job.members, job.linears, job.grams)]
        return [(linear, dense_row(block, name, linear)) for (block, name), linear in zip(job.members, job.linears)]
    weights = [linear.weight.detach().T for linear in job.linears]  # (d1, d2) = (in, out)
    d1, d2 = weights[0].shape
    m = len(weights)
    budget = method.budget(d1, d2, job.ratio, options, members=m)
    start = time.perf_counter()
    factors = method.solve(weights, job.grams, budget, options)
    if quant is not None:
        factors = [method.quantize(f, w, g, quant) for f, w, g in zip(factors, weights, job.grams)]
    seconds = time.perf_counter() - start
    modules = method.build(factors, [linear.bias for linear in job.linears], job.linears[0].weight.dtype)
    share = (lambda x: x) if m == 1 else (lambda x: x / m)
    return [(module, MatrixReport(
        layer=block, name=name, d1=d1, d2=d2, ratio=job.ratio, effective_params=share(budget.effective_params),
        storage_words=share(budget.storage_words), output_error=output_error(gram, weight, factor.weight()),
        seconds=share(seconds), rank=getattr(budget, "rank", None), atoms=getattr(budget, "atoms", None),
        sparsity=getattr(budget, "sparsity", None), members=m, shared=job.shared))
        for (block, name), module, gram, weight, factor in zip(job.members, modules, job.grams, weights, factors)]


def quantized_dense(block: int, name: str, linear: nn.Linear, gram: torch.Tensor, how: str,
                    quant: QuantSpec) -> tuple[nn.Module, MatrixReport]:
    """A linear kept at its shape, its weight quantized (`how`: "gptq" or "rtn"): the
    QuantLinear and its report row (all numbers stored, the quantization's output error)."""
    weight = linear.weight.detach().T
    start = time.perf_counter()
    factors = quantize_dense(weight, gram, quant, how)
    seconds = time.perf_counter() - start
    module = QuantLinear.from_factors(factors, linear.bias, linear.weight.dtype)
    row = dense_row(block, name, linear)
    row.output_error, row.seconds = output_error(gram, weight, factors.weight()), seconds
    return module, row


def dense_row(block: int, name: str, linear: nn.Linear) -> MatrixReport:
    """The report row of a linear an allocation keeps dense (ratio 0): all its numbers
    stored, no error."""
    d1, d2 = linear.in_features, linear.out_features
    return MatrixReport(layer=block, name=name, d1=d1, d2=d2, ratio=0.0, effective_params=float(d1 * d2),
                        storage_words=float(d1 * d2), output_error=0.0, seconds=0.0)
