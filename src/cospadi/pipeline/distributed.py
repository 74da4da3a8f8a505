"""Compression on several processes with torch.distributed (gloo on CPUs, NCCL on GPUs):
`torchrun --nproc-per-node N -m cospadi compress ...` or `cospadi compress --nproc N`.

Every rank holds the model and runs the same loop (run.py); the work of each group of
blocks is split, and the result is the same bytes for any number of ranks:
* windows: the calibration batches (batch_size windows each, as in one process) are cut
  into N contiguous runs, one per rank; each rank captures, calibrates and propagates only
  its own batches (a batch's outputs do not depend on the others);
* Grams: one process sums the per-batch products x^T x left to right in batch order.
  Float sums depend on their order, so the ranks keep that order: each rank forms its
  batches' products, then the running sum travels rank 0 -> 1 -> ... -> N-1, each rank
  adding its products in order, and the last rank broadcasts the total (`fold`);
* solves: the group's jobs go to ranks by size (largest first onto the least loaded rank,
  `assign`), each rank solves its own, and each job's modules and report rows are
  broadcast from their rank to all (`share`), so every rank swaps in the same modules;
* rank 0 alone writes the output folder, the JSON report and the resume files; the hidden
  states of a commit are gathered to it (`gather_states`).
A rank that dies makes the others' next collective fail at once (its sockets close) or,
for a rank that hangs, after `timeout`; the survivors stop with one CospadiError line
(`guarded`), and torchrun stops the job. Rerunning with --resume-dir resumes."""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ..errors import CospadiError

DEFAULT_TIMEOUT = 1800  # seconds a rank waits for the others in one collective
Products = dict[tuple[str, ...], list[torch.Tensor]]  # input group -> one x^T x per batch, in batch order
T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place among `world` ranks of the default process group."""

    rank: int
    world: int

    def batches(self, count: int) -> range:
        """The calibration batches (of `count`, in order) this rank owns: a contiguous run,
        the first count % world ranks one batch longer."""
        base, extra = divmod(count, self.world)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (1 if self.rank < extra else 0))

    def windows(self, input_ids: torch.Tensor, batch_size: int) -> torch.Tensor:
        """This rank's windows of `input_ids`: its batches, cut as one process cuts them."""
        owned = self.batches(-(-input_ids.shape[0] // batch_size))
        return input_ids[owned.start * batch_size:owned.stop * batch_size]

    def fold(self, products: Products) -> dict[tuple[str, ...], torch.Tensor]:
        """Every rank's per-batch products summed left to right in global batch order
        (bit for bit one process's sum), on every rank (module doc)."""
        grams = {}
        for group in sorted(products):
            mine = products[group]
            with guarded("summing the Grams"):
                total = mine[0]
                if self.rank > 0:
                    total = torch.empty_like(mine[0])
                    dist.recv(total, src=self.rank - 1)
                    total = total + mine[0]
                for product in mine[1:]:
                    total = total + product
                if self.rank < self.world - 1:
                    dist.send(total, dst=self.rank + 1)
                    total = torch.empty_like(total)
                dist.broadcast(total, src=self.world - 1)
            grams[group] = total
        return grams

    def assign(self, sizes: list[int]) -> list[int]:
        """The rank solving each job of `sizes` (numbers of weights): largest first, each
        onto the rank with the least work so far (the lowest rank on ties)."""
        load = [0] * self.world
        owners = [0] * len(sizes)
        for job in sorted(range(len(sizes)), key=lambda j: -sizes[j]):
            owner = min(range(self.world), key=lambda r: (load[r], r))
            owners[job] = owner
            load[owner] += sizes[job]
        return owners

    def share(self, results: list[T | None], owners: list[int]) -> list[T]:
        """Every job's result on every rank: result j is broadcast from rank owners[j]
        (the other ranks pass None for it)."""
        out = []
        for result, owner in zip(results, owners):
            box = [result if owner == self.rank else None]
            with guarded("sharing the solved factors"):
                dist.broadcast_object_list(box, src=owner)
            out.append(box[0])
        return out  # type: ignore[return-value]

    def gather_states(self, states: list[torch.Tensor]) -> list[torch.Tensor]:
        """All ranks' batches of hidden states, in global order, on rank 0 (empty
        elsewhere): for the resume files."""
        gathered: list[Any] = [None] * self.world if self.rank == 0 else []
        with guarded("gathering the hidden states"):
            dist.gather_object([s.cpu() for s in states], gathered if self.rank == 0 else None, dst=0)
        return [s for part in gathered for s in part] if self.rank == 0 else []

    def barrier(self) -> None:
        with guarded("waiting for the other ranks"):
            dist.barrier()


def current() -> Ranks | None:
    """The Ranks of the initialised default process group, None without one (or with one
    rank: the one-process path)."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    return Ranks(dist.get_rank(), dist.get_world_size())


def launched() -> bool:
    """Whether this process was started by torchrun (or a launcher setting the same
    variables) as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(timeout: float = DEFAULT_TIMEOUT, device: torch.device | None = None) -> Ranks:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT): NCCL when `device` is a GPU (this rank's LOCAL_RANK one),
    gloo otherwise; `timeout` seconds for every collective. Returns this rank's Ranks."""
    backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    with guarded("joining the process group"):
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
    return Ranks(dist.get_rank(), dist.get_world_size())


def finish() -> None:
    """Leave the process group (at the end of a run)."""
    if dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def guarded(what: str) -> Iterator[None]:
    """Turn a failed collective (a rank died, hung past the timeout, or the network broke)
    into one CospadiError line naming this rank and what it was doing."""
    try:
        yield
    except (RuntimeError, ValueError, ConnectionError) as exc:
        if isinstance(exc, CospadiError):
            raise
        rank = dist.get_rank() if dist.is_initialized() else os.environ.get("RANK", "?")
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CospadiError(f"rank {rank} lost the other ranks while {what} ({reason[:160]}): another rank died or "
                           "hung; rerun the same command (with --resume-dir it resumes from the last finished "
                           "block)") from None


def on_rank0(fn: Callable[[], T], ranks: Ranks | None) -> T | None:
    """fn() on rank 0 (or without ranks); None elsewhere."""
    return fn() if ranks is None or ranks.rank == 0 else None
