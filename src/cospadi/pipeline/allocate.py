"""The allocation step before compression: profile (or read the cached profile), measure
sensitivities when the cost needs them, and solve the knapsack for one ratio per job
(docs/allocation.md). `uniform` needs none of it."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel

from ..allocation import DEFAULT_COST, check_allocation, knapsack_ratios
from ..devices import resolve_device
from .profile import DEFAULT_GRID, Profile, profile_key, profile_model, read_cached, write_cached
from .run import Recipe
from .sensitivity import output_sensitivities


@dataclass
class Allocation:
    """What the allocation step decided: the per-matrix `ratios` (None: uniform) and how:
    `allocation`, `cost`, `seconds` spent here, `reused_seconds` the profiling time saved
    by the cache (the time a run without the cache would add), whether the whole profile
    came from the cache, and the profile itself."""

    allocation: str
    cost: str | None = None
    ratios: dict[tuple[int, str], float] | None = None
    seconds: float = 0.0
    reused_seconds: float = 0.0
    cached: bool = False
    profile: Profile | None = None

    def summary(self) -> dict:
        """JSON-ready: the report's `allocation` entry."""
        profile = self.profile
        return {"allocation": self.allocation, "cost": self.cost, "seconds": self.seconds,
                "reused_seconds": self.reused_seconds, "cached_profile": self.cached,
                "profile_seconds": profile.seconds if profile else None,
                "sensitivity_seconds": profile.sensitivity_seconds if profile and self.cost == "fisher" else None}


def allocate(model: PreTrainedModel, input_ids: torch.Tensor, recipe: Recipe, allocation: str = "uniform",
             cost: str = DEFAULT_COST, *, cache: str | Path | None = None, batch_size: int = 8,
             device: str | torch.device | None = None, progress: bool = True) -> Allocation:
    """The per-matrix ratios for `recipe` (its method, ratio, options and group size) on
    `model` calibrated with `input_ids` (N, L): uniform, or the knapsack over a profile
    read from (or written to) `cache` (None: not cached) under `cost`."""
    check_allocation(allocation, cost)
    if allocation == "uniform":
        return Allocation("uniform")
    start = time.perf_counter()
    profile, reused = _profile(model, input_ids, recipe, cache, batch_size, device, progress, cost == "fisher")
    ratios = knapsack_ratios(profile.jobs, recipe.ratio, cost)
    full = profile.seconds + (profile.sensitivity_seconds if cost == "fisher" else 0.0)
    return Allocation(allocation, cost, ratios, time.perf_counter() - start, reused, reused == full, profile)


def _profile(model: PreTrainedModel, input_ids: torch.Tensor, recipe: Recipe, cache: str | Path | None,
             batch_size: int, device: str | torch.device | None, progress: bool,
             sensitive: bool) -> tuple[Profile, float]:
    """The profile (with sensitivities when `sensitive`) and the seconds of it read from
    `cache` rather than measured now."""
    folder = Path(cache) if cache is not None else None
    key = profile_key(model, input_ids, recipe.method, recipe.options, recipe.group_size, DEFAULT_GRID, batch_size,
                      recipe.share) \
        if folder is not None else ""
    profile = read_cached(folder, key) if folder is not None else None
    reused, measured = (profile.seconds, False) if profile is not None else (0.0, True)
    if profile is None:
        profile = profile_model(model, input_ids, recipe.method, recipe.options, recipe.group_size, DEFAULT_GRID,
                                share=recipe.share, batch_size=batch_size, device=resolve_device(device), progress=progress)
    if sensitive and any(job.sensitivity is None for job in profile.jobs):
        start = time.perf_counter()
        values = output_sensitivities(model, input_ids)
        for job in profile.jobs:
            job.sensitivity = sum(values[m] for m in job.members) / len(job.members)
        profile.sensitivity_seconds, measured = time.perf_counter() - start, True
    elif sensitive:
        reused += profile.sensitivity_seconds
    if folder is not None and measured:
        write_cached(folder, key, profile)
    return profile, reused
