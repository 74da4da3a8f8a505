"""Memory layout of a freshly loaded model: realign what transformers' loader left
misaligned, copy what still points into the memory-mapped weight files so they can close, and hand
the heap that loading left free back to the system."""
from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

ALIGNMENT = 64  # bytes; torch's CPU allocator aligns to this


@torch.no_grad()
def _copy_where(model: nn.Module, needs_copy: Callable[[torch.Tensor], bool]) -> int:
    """Give every CPU parameter and buffer for which needs_copy(tensor) holds memory of its
    own (a clone); parameters keep their identity, so tied ones stay tied. Returns the
    bytes copied."""
    copied = 0
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if param.device.type == "cpu" and needs_copy(param):
                param.data = param.data.clone()
                copied += param.numel() * param.element_size()
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and buffer.device.type == "cpu" and needs_copy(buffer):
                module._buffers[name] = buffer.clone()
                copied += buffer.numel() * buffer.element_size()
    return copied


def realign(model: nn.Module) -> None:
    """Copy every CPU parameter and buffer that does not start on a 64-byte boundary into
    fresh (aligned) memory. transformers' loader leaves them misaligned, and torch's CPU
    kernels then round differently (and run slower): the reloaded model would not be
    bit-identical to the one that was saved. Tied parameters stay tied."""
    _copy_where(model, lambda t: t.data_ptr() % ALIGNMENT != 0)


def _mapped_weight_files() -> list[tuple[int, int]]:
    """Address ranges of the .safetensors files this process has memory-mapped (from
    /proc/self/maps; [] where that does not exist)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[5].endswith(".safetensors"):
            low, high = fields[0].split("-")
            ranges.append((int(low, 16), int(high, 16)))
    return ranges


def release_weight_files(model: nn.Module) -> int:
    """Copy every parameter and buffer that still points into a memory-mapped .safetensors
    file (a same-dtype load leaves the float tensors whose offsets happen to be aligned as
    views of the file; the bitmask and packed values too before prepare()) into memory of
    its own, so the mapping can close. While one tensor refers to it, every page of the
    file read during loading stays resident, the packed forms of S that prepare() already
    converted included: bench-infer measured a bf16 SmolLM2 folder at ratio 0.3 whose
    tensors were all aligned at 697 MiB peak while generating before this copy, 634 after.
    Returns the bytes copied."""
    ranges = _mapped_weight_files()
    if not ranges:
        return 0
    return _copy_where(model, lambda t: any(low <= t.data_ptr() < high for low, high in ranges))


def trim_heap() -> bool:
    """Return the free memory at the top and inside the C heap to the system (glibc's
    malloc_trim). Turning the stored form of S into the ELL form (layers/linear.py)
    allocates and frees many temporaries; glibc keeps those pages, about 90 MiB for
    SmolLM2-135M, resident for the life of the process. Small freed objects (a tokenized
    corpus's Python integers) likewise leave pages that no allocation above the mmap
    threshold reuses (pipeline/lazy.py). False where there is no glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        trim = getattr(libc, "malloc_trim", None)
    except OSError:
        return False
    return bool(trim(0)) if trim is not None else False
