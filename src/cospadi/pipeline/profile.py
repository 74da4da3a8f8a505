"""The profile pass (docs/allocation.md): every job's error at a grid of candidate ratios,
measured block by block on the DENSE model's activations, so that an allocation can give
each matrix its own ratio. Only one group's Grams and one block's activations are alive
at a time, and only the error tables are kept. Profiles are cached as JSON keyed by the
model's weights, the calibration windows and the settings, so a rerun or another target
ratio does not profile again."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from ..adapters import Adapter, adapter_for, decoder_layers
from ..devices import to_device, visiting
from ..errors import CospadiError
from ..files import atomic_file
from ..groups import block_groups, shared_adapter
from ..methods import Method, get_method
from ..resume import run_fingerprint
from ..solvers import SolverOptions
from .calibrate import calibrate_block
from .capture import capture_block_inputs
from .solve import job_members

DEFAULT_GRID = tuple(round(0.05 * i, 2) for i in range(19))  # 0 (dense), 0.05, ..., 0.9
PROFILE_FORMAT = 1


@dataclass
class JobProfile:
    """One job (a linear, or the linears sharing one factor) at its feasible candidate
    ratios: `params` stored numbers (eq. 11, the whole job, ratio 0: dense) and `errors`
    whitened squared errors (Method.error_curve; 0 when dense); `energy` = ||L_bar W||^2;
    `sensitivity`: the mean squared loss gradient per output (pipeline/sensitivity.py),
    None until measured."""

    members: list[tuple[int, str]]
    d1: int
    d2: int
    ratios: list[float]
    params: list[float]
    errors: list[float]
    energy: float
    sensitivity: float | None = None

    @property
    def dense_params(self) -> int:
        return len(self.members) * self.d1 * self.d2


@dataclass
class Profile:
    """Every job of a model for one method and group size; `seconds`: the pass's time,
    `sensitivity_seconds`: the sensitivity pass's (0 until measured)."""

    method: str
    group_size: int
    grid: list[float]
    jobs: list[JobProfile] = field(default_factory=list)
    seconds: float = 0.0
    sensitivity_seconds: float = 0.0

    def to_json(self) -> str:
        return json.dumps({"format": PROFILE_FORMAT, **asdict(self)})

    @classmethod
    def from_json(cls, text: str) -> Profile:
        data = json.loads(text)
        if data.pop("format", None) != PROFILE_FORMAT:
            raise ValueError("unknown profile format")
        jobs = [JobProfile(**{**j, "members": [tuple(m) for m in j["members"]]}) for j in data.pop("jobs")]
        return cls(**data, jobs=jobs)


def job_candidates(method: Method, d1: int, d2: int, members: int, grid: list[float],
                   options: SolverOptions) -> tuple[list[float], list]:
    """The grid ratios a job can take (0: dense, kept; others where the method has a
    budget its solver accepts) and their budgets (None for dense)."""
    ratios, budgets = [], []
    for ratio in grid:
        if ratio == 0:
            ratios.append(0.0)
            budgets.append(None)
            continue
        try:
            budget = method.budget(d1, d2, ratio, options, members)
            method.check(budget, options)
        except CospadiError:
            continue
        ratios.append(ratio)
        budgets.append(budget)
    return ratios, budgets


def profile_job(method: Method, weights: list[torch.Tensor], grams: list[torch.Tensor], members: list[tuple[int, str]],
                grid: list[float], options: SolverOptions) -> JobProfile:
    """The error table of one job: weights (d1, d2) each, their Grams (d1, d1)."""
    d1, d2 = weights[0].shape
    ratios, budgets = job_candidates(method, d1, d2, len(weights), grid, options)
    compressed = [b for b in budgets if b is not None]
    errors = iter(method.error_curve(weights, grams, compressed, options) if compressed else [])
    energy = sum(float(((g.double() @ w.double()) * w.double()).sum()) for w, g in zip(weights, grams))
    return JobProfile(members, d1, d2, ratios,
                      [float(len(weights) * d1 * d2) if b is None else float(b.effective_params) for b in budgets],
                      [0.0 if b is None else next(errors) for b in budgets], energy)


@torch.no_grad()
def profile_model(model: PreTrainedModel, input_ids: torch.Tensor, method_name: str, options: SolverOptions,
                  group_size: int = 1, grid: tuple[float, ...] = DEFAULT_GRID, *, share: tuple[str, ...] | None = None,
                  batch_size: int = 8, device: torch.device | None = None, progress: bool = True) -> Profile:
    """Profile every job of `model` (calibrated on `input_ids` (N, L)) for `method_name`
    with groups of `group_size` blocks sharing the linears `share` names (None: the
    method's default), at the ratios of `grid` (0 = dense). The model is not changed;
    each group of blocks visits `device` in turn."""
    start = time.perf_counter()
    method, layers = get_method(method_name), decoder_layers(model)
    adapter = shared_adapter(adapter_for(model), method, share)
    target = device or next(model.parameters()).device
    states, block_kwargs = capture_block_inputs(model, layers, input_ids, batch_size)
    states, block_kwargs = to_device(states, target), to_device(block_kwargs, target)
    profile = Profile(method_name, group_size, list(grid))
    for blocks in tqdm(block_groups(len(layers), group_size), desc=f"profiling {method_name}", unit="group",
                       disable=not progress):
        with visiting(nn.ModuleList(layers[i] for i in blocks), target):
            grams = {}
            for i in blocks:
                grams[i], states = calibrate_block(layers[i], adapter, states, block_kwargs[i], keep_outputs=True)
            profile.jobs += _profile_group(method, adapter, layers, blocks, grams, list(grid), options)
    profile.seconds = time.perf_counter() - start
    return profile


def _profile_group(method: Method, adapter: Adapter, layers: nn.ModuleList, blocks: list[int], grams: dict,
                   grid: list[float], options: SolverOptions) -> list[JobProfile]:
    """The JobProfiles of one calibrated group of blocks, in the adapter's order."""
    out = []
    for group in adapter.groups:
        for name in group:
            for members in job_members(blocks, name, adapter):
                weights = [layers[i].get_submodule(name).weight.detach().T for i in members]
                out.append(profile_job(method, weights, [grams[i][group] for i in members],
                                       [(i, name) for i in members], grid, options))
    return out


def profile_key(model: PreTrainedModel, input_ids: torch.Tensor, method_name: str, options: SolverOptions,
                group_size: int, grid: tuple[float, ...], batch_size: int, share: tuple[str, ...] | None = None) -> str:
    """The cache name of a profile: a digest of every weight, the windows and the settings
    (the shared linears too, in per-group mode)."""
    method = get_method(method_name)
    settings = {"profile": PROFILE_FORMAT, "method": method_name, "group_size": group_size, "grid": list(grid),
                "batch_size": batch_size, "options": vars(options) if method.uses_solver_options else None}
    if group_size > 1:
        settings["share"] = shared_adapter(adapter_for(model), method, share).shared
    return run_fingerprint(model, input_ids, settings)[:32]


def read_cached(cache: Path, key: str) -> Profile | None:
    """The cached profile `key` under `cache`, or None when there is none (or it is unreadable)."""
    path = cache / f"profile-{key}.json"
    try:
        return Profile.from_json(path.read_text())
    except (OSError, ValueError, TypeError, KeyError):
        return None


def write_cached(cache: Path, key: str, profile: Profile) -> None:
    """Store `profile` under `cache` as profile-<key>.json, atomically."""
    with atomic_file(cache / f"profile-{key}.json") as tmp:
        tmp.write_text(profile.to_json())
