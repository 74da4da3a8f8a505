"""A streamed save: compressed blocks go to disk as they finish, and the saved folder is
assembled at the end one tensor at a time, byte for byte what `checkpoint.save` writes
for the same model held whole in memory.

* `BlockStore` keeps the finished blocks' tensors in one safetensors file per group of
  blocks, in a scratch folder, each tensor once (a shared factor under its first name).
  The model then holds only meta placeholders of those tensors (`release`), so the
  memory of a finished block is given back.
* `streamed_weights(store)`: while it is active, transformers' `save_pretrained` (called
  by `checkpoint.save`) writes each weight file through `write_safetensors`, which takes
  the bytes of a meta placeholder from the store. Everything else of the save (config,
  index, shards, tied and shared tensors, tokenizer, REPORT.md, checksums) is the very
  code of the in-memory save, so the two folders cannot drift apart.
* `write_safetensors` lays the file out exactly as the safetensors library does (header
  JSON without spaces, `__metadata__` first, tensors by dtype in the library's order then
  by name, the header padded with spaces to 8 bytes), writing one tensor at a time."""
from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers.modeling_utils as modeling_utils
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..layers.base import compressed_modules
from .config import replace_modules
from .sharing import shared_factors, tie_shared

# safetensors' layout order of dtypes (measured on its save_file: widest first)
_ORDER = ["U64", "I64", "F64", "C64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16", "F8_E4M3", "F8_E5M2", "I8",
          "U8", "BOOL"]
_NAMES = {torch.uint64: "U64", torch.int64: "I64", torch.float64: "F64", torch.complex64: "C64", torch.float32: "F32",
          torch.uint32: "U32", torch.int32: "I32", torch.bfloat16: "BF16", torch.float16: "F16", torch.uint16: "U16",
          torch.int16: "I16", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int8: "I8",
          torch.uint8: "U8", torch.bool: "BOOL"}

_DTYPES = {name: dtype for dtype, name in _NAMES.items()}


def read_tensors(path: str | os.PathLike, names: list[str]) -> dict[str, torch.Tensor]:
    """The tensors `names` of the safetensors file `path`, each read with plain file reads
    straight into memory of its own: no memory map, whose pages would count in the
    resident set beside a copy (twice the embeddings at once). ValueError when the header
    does not hold a name or its bytes."""
    out = {}
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        entries = json.loads(fh.read(length))
        for name in names:
            entry = entries[name]
            start, end = entry["data_offsets"]
            tensor = torch.empty(entry["shape"], dtype=_DTYPES[entry["dtype"]])
            data = tensor.reshape(-1).view(torch.uint8)
            if end - start != data.numel():
                raise ValueError(f"{path} holds {end - start} bytes for {name}, its shape needs {data.numel()}")
            fh.seek(8 + length + start)
            if data.numel() and fh.readinto(data.numpy().data) != data.numel():
                raise ValueError(f"{path} is shorter than its header says")
            out[name] = tensor
    return out


class BlockStore:
    """The tensors of finished blocks, on disk in `folder` (one safetensors file per
    group), fetched back one at a time by their state-dict name."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.where: dict[str, tuple[Path, str]] = {}  # state-dict name -> (file, name stored under)

    def put(self, first: int, tensors: dict[str, torch.Tensor]) -> None:
        """Write a group's tensors (state-dict name -> tensor; a tensor object listed under
        several names is stored once, under its first)."""
        stored: dict[str, torch.Tensor] = {}
        first_name: dict[int, str] = {}
        path = self.folder / f"group-{first:05d}.safetensors"
        for name, tensor in tensors.items():
            owner = first_name.setdefault(id(tensor), name)
            if owner == name:
                stored[name] = tensor.detach().cpu().contiguous()
            self.where[name] = (path, owner)
        save_file(stored, str(path))

    def fetch(self, name: str) -> torch.Tensor:
        """The stored tensor `name` (read from its file; the file is closed again)."""
        path, key = self.where[name]
        with safe_open(str(path), framework="pt") as fh:
            return fh.get_tensor(key)

    def __contains__(self, name: str) -> bool:
        return name in self.where


def release(module: nn.Module) -> None:
    """Replace every parameter and buffer of `module` by a meta tensor of the same dtype and
    shape, in place, keeping the module tree (specs, shapes and shared factors stay as
    they were: a Parameter held by several submodules becomes one meta Parameter held by
    all of them). Compressed modules become empty ones of their spec in storage form
    (the tensors their state dict holds, e.g. a DictLinear's mask rather than its row
    indices), tied again where they shared a factor. Frees the memory the tensors held."""
    shares = shared_factors(module)
    for name, compressed in list(compressed_modules(module)):
        with torch.device("meta"):
            replace_modules(module, {name: compressed.spec()}, compressed.factor_dtype, compressed.coef_bits)
    tie_shared(module, shares)
    memo: dict[int, torch.Tensor] = {}
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None:
                if id(param) not in memo:
                    memo[id(param)] = nn.Parameter(torch.empty_like(param, device="meta"),
                                                   requires_grad=param.requires_grad)
                sub._parameters[name] = memo[id(param)]  # type: ignore[assignment]
        for name, buffer in list(sub._buffers.items()):
            if buffer is not None:
                sub._buffers[name] = memo.setdefault(id(buffer), torch.empty_like(buffer, device="meta"))


def header(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> tuple[bytes, list[str]]:
    """The safetensors header bytes (length prefix included) of `tensors` (only dtype and
    shape are read: meta tensors do) and the names in the order their data follow."""
    if metadata is not None and len(metadata) > 1:
        raise ValueError("the streamed writer reproduces safetensors' layout for one metadata entry at most")
    order = sorted(tensors, key=lambda n: (_ORDER.index(_NAMES[tensors[n].dtype]), n))
    entries: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in order:
        tensor = tensors[name]
        size = tensor.numel() * tensor.element_size()
        entries[name] = {"dtype": _NAMES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, order


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None,
                      fetch: Callable[[str], torch.Tensor]) -> None:
    """Write `tensors` to the safetensors file `path` as safetensors' save_file would,
    holding one tensor at a time: a meta tensor's bytes come from fetch(name)."""
    head, order = header(tensors, metadata)
    with open(path, "wb") as fh:
        fh.write(head)
        for name in order:
            tensor = tensors[name]
            if tensor.is_meta:
                data = fetch(name)
                if data.dtype != tensor.dtype or data.shape != tensor.shape:
                    raise ValueError(f"stored {name} is {data.dtype} {tuple(data.shape)}, the model's "
                                     f"{tensor.dtype} {tuple(tensor.shape)}")
                tensor = data
            if tensor.numel():
                fh.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del tensor


@contextmanager
def streamed_weights(store: BlockStore) -> Iterator[None]:
    """While active, save_pretrained writes weight files with write_safetensors, taking
    the meta placeholders' bytes from `store` (module doc)."""
    original = modeling_utils.safe_save_file

    def save(tensors: dict[str, torch.Tensor], filename: str | os.PathLike, metadata: dict[str, str] | None = None,
             ) -> None:
        if not any(t.is_meta for t in tensors.values()):
            return original(tensors, filename, metadata=metadata)
        write_safetensors(tensors, filename, metadata, store.fetch)

    modeling_utils.safe_save_file = save
    try:
        yield
    finally:
        modeling_utils.safe_save_file = original
