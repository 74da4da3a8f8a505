"""Checks that turn a damaged cospadi folder into one clear CospadiError before torch or
transformers meet it: missing or unreadable config.json, no cospadi entry, a format
version from a newer cospadi, a missing shard, a truncated or garbled safetensors file,
a weight file whose sha256 differs from the one cospadi.json recorded at save time."""
from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from ..errors import CospadiError
from ..files import file_sha256
from .config import QUANT_METHOD, CospadiConfig, stored_shapes

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DESCRIPTION = "cospadi.json"
# weight files whose checksums the running `load` verified, so the quantizer skips them
_VERIFIED: ContextVar[frozenset[Path]] = ContextVar("cospadi_verified", default=frozenset())


def read_config(folder: Path) -> dict:
    """config.json of `folder` as a dict, with a valid cospadi quantization entry."""
    if not folder.is_dir():
        raise CospadiError(f"{folder} does not exist or is not a folder: give a folder written by `cospadi compress --out`")
    path = folder / "config.json"
    if not path.is_file():
        raise CospadiError(f"{folder} has no config.json: it is not a saved model (or the copy is incomplete)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CospadiError(f"{path} is not valid JSON ({getattr(exc, 'msg', exc)}); the folder is corrupt") from None
    entry = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(entry, dict) or entry.get("quant_method") != QUANT_METHOD:
        raise CospadiError(f"{folder} is not a cospadi output folder (config.json has no quantization_config with "
                           f"quant_method \"{QUANT_METHOD}\"); load a dense model with transformers instead")
    CospadiConfig.from_dict(entry)  # version and module checks
    return config


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files the folder's index names (or its single model.safetensors);
    CospadiError when the index is unreadable or a file it names is missing."""
    index = folder / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            raise CospadiError(f"{index} is not a valid safetensors index; the folder is corrupt") from None
        missing = [name for name in names if not (folder / name).is_file()]
        if missing:
            raise CospadiError(f"{folder} is missing weight shard {missing[0]} ({len(missing)} of {len(names)} "
                               "missing): the copy is incomplete; copy the whole folder again")
        return [folder / name for name in names]
    if (folder / SINGLE).is_file():
        return [folder / SINGLE]
    raise CospadiError(f"{folder} has no {SINGLE} nor {INDEX}: the save was incomplete; compress again")


def check_safetensors(path: Path) -> dict:
    """The header of a safetensors file; CospadiError unless the file is exactly as long
    as its header says (a truncated or padded copy fails)."""
    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if length > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(fh.read(length))
        ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    except (struct.error, ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError):
        raise CospadiError(f"{path} is not a readable safetensors file (damaged header); the folder is corrupt: "
                           "copy it again or compress again") from None
    expected = 8 + length + max(ends, default=0)
    if size != expected:
        what = "truncated" if size < expected else "longer than its header says"
        raise CospadiError(f"{path} is {what} ({size} bytes, expected {expected}); the folder is corrupt: copy it "
                           "again or compress again")
    return header


def check_weight_files(paths: list[str | Path]) -> None:
    """check_safetensors on every path."""
    for path in paths:
        check_safetensors(Path(path))


def check_module_tensors(entry: dict, headers: list[dict]) -> None:
    """CospadiError naming the first tensor of a listed module that the weight files lack
    or hold with another shape than config.json implies."""
    shapes = {key: tuple(value["shape"]) for header in headers for key, value in header.items()
              if key != "__metadata__"}
    for name, spec in entry["modules"].items():
        for tensor, expected in stored_shapes(spec, entry.get("coef_bits")).items():
            found = shapes.get(f"{name}.{tensor}")
            if found != expected:
                what = "is missing" if found is None else f"has shape {list(found)}"
                raise CospadiError(f"weights do not match config.json: {name}.{tensor} {what}, config.json implies "
                                   f"{list(expected)}; the folder is corrupt or mixed from two runs: compress again")


def recorded_checksums(folder: Path) -> dict[str, str] | None:
    """The `checksums` (file name -> sha256) that cospadi.json of `folder` recorded at
    save time; None when there is no cospadi.json or it has none (folders saved by an
    older cospadi)."""
    path = folder / DESCRIPTION
    if not path.is_file():
        return None
    try:
        sums = json.loads(path.read_text()).get("checksums")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise CospadiError(f"{path} is not a valid cospadi description; the folder is corrupt: copy it again or "
                           "compress again") from None
    if sums is not None and not (isinstance(sums, dict) and all(isinstance(v, str) for v in sums.values())):
        raise CospadiError(f"{path} has an unreadable checksums entry; the folder is corrupt: copy it again or "
                           "compress again")
    return sums


def verify_checksums(paths: list[str | Path]) -> None:
    """CospadiError naming the first weight file whose sha256 differs from the one its
    folder's cospadi.json recorded (or that it does not list); nothing is checked where
    no checksums were recorded, nor for files the running `load` already verified."""
    skip = _VERIFIED.get()
    sums: dict[Path, dict[str, str] | None] = {}
    for path in map(Path, paths):
        if path.resolve() in skip:
            continue
        if path.parent not in sums:
            sums[path.parent] = recorded_checksums(path.parent)
        recorded = sums[path.parent]
        if recorded is None:
            continue
        if path.name not in recorded:
            raise CospadiError(f"{path} is not listed in the checksums of {DESCRIPTION}: the folder mixes files of "
                               "two saves; copy it again or compress again")
        if file_sha256(path) != recorded[path.name]:
            raise CospadiError(f"{path} is damaged (its sha256 differs from the one {DESCRIPTION} recorded at save "
                               "time): copy it again or compress again")


@contextmanager
def verified(paths: list[Path]) -> Iterator[None]:
    """While the block runs, verify_checksums skips `paths` (already verified)."""
    token = _VERIFIED.set(frozenset(path.resolve() for path in paths))
    try:
        yield
    finally:
        _VERIFIED.reset(token)


def check_folder(folder: Path) -> dict:
    """Every check above on a cospadi folder, checksums included; returns its config.json
    as a dict."""
    config = read_config(folder)
    paths = weight_files(folder)
    headers = [check_safetensors(path) for path in paths]
    verify_checksums(paths)
    check_module_tensors(config["quantization_config"], headers)
    return config
