"""Where the work runs: parse a device name and move nested block arguments there.

The solvers are device-agnostic (every tensor they create follows their inputs), so the
GPU path is the same code on CUDA tensors; this file only picks the device and carries
the calibration state to it."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .errors import CospadiError


def resolve_device(name: str | torch.device | None) -> torch.device | None:
    """torch.device for `name`: "auto" (CUDA when available, else CPU), "cpu", "cuda",
    "cuda:N", or None (None: keep the model's own device). CospadiError for an unknown
    name, an accelerator this machine does not have, or one without float64 (MPS: the
    whitening and the Grams need it)."""
    if name is None or isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CospadiError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CospadiError(f"device {name!r} asked for but torch sees no CUDA GPU here; use --device cpu (or "
                               "auto), or install a CUDA build of torch")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CospadiError(f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} "
                               "CUDA device(s)")
    elif device.type != "cpu":
        raise CospadiError(f"device {name!r} is not supported (the solvers need float64); use auto, cpu, cuda or "
                           "cuda:N")
    return device


def to_device(value: object, device: torch.device) -> object:
    """`value` with every tensor inside it (through tuples, lists and dicts) moved to
    `device`; anything else is returned as it is."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(to_device(v, device) for v in value)
    if isinstance(value, list):
        return [to_device(v, device) for v in value]
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (for timing); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def visiting(module: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """Inside the block, `module` lives on `device`; afterwards (also after an error) it is
    back on the device of its first parameter before."""
    home = next(module.parameters()).device
    module.to(device)
    try:
        yield module
    finally:
        module.to(home)
