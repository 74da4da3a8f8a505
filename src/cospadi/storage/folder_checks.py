"""Checks that turn a damaged cospadi folder into one clear CospadiError before torch or
transformers meet it: missing or unreadable config.json, no cospadi entry, a format
version from a newer cospadi, a missing shard, a garbled index or one that puts a tensor
in the wrong shard, a truncated or garbled safetensors file, a weight file whose sha256
differs from the one cospadi.json recorded at save time. find_damage names the first
damaged file of any model folder (plain ones too) for loaders that failed."""
from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from ..errors import CospadiError
from ..files import file_sha256
from .config import QUANT_METHOD, CospadiConfig, stored_shapes

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DESCRIPTION = "cospadi.json"
CORRUPT = "the folder is corrupt: copy it again or compress again"
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


class _Damaged(Exception):
    """A damaged file: its path and what is wrong ("is truncated (...)"), as one phrase."""

    def __init__(self, path: Path, what: str) -> None:
        super().__init__(f"{path} {what}")


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files the folder's index names (or its single model.safetensors);
    CospadiError when the index is unreadable or a file it names is missing."""
    index = folder / INDEX
    if index.is_file():
        try:
            names = sorted(set(_weight_map(index).values()))
        except _Damaged as exc:
            raise CospadiError(f"{exc}; {CORRUPT}") from None
        missing = [name for name in names if not (folder / name).is_file()]
        if missing:
            raise CospadiError(f"{folder} is missing weight shard {missing[0]} ({len(missing)} of {len(names)} "
                               "missing): the copy is incomplete; copy the whole folder again")
        return [folder / name for name in names]
    if (folder / SINGLE).is_file():
        return [folder / SINGLE]
    raise CospadiError(f"{folder} has no {SINGLE} nor {INDEX}: the save was incomplete; compress again")


def _weight_map(index: Path) -> dict[str, str]:
    """The weight_map (tensor name -> shard file name) of a safetensors index; _Damaged
    when it cannot be read."""
    try:
        weight_map = json.loads(index.read_bytes())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise _Damaged(index, "is not a valid safetensors index") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise _Damaged(index, "is not a valid safetensors index")
    return weight_map


def check_index(folder: Path, headers: dict[str, dict]) -> None:
    """CospadiError naming the first tensor that the folder's index maps to a shard whose
    header (`headers`: shard file name -> header) lacks it; loaded as is, transformers
    would leave that weight randomly initialized. Nothing to check without an index (or
    beside a single model.safetensors, which transformers reads instead)."""
    index = folder / INDEX
    if not index.is_file() or (folder / SINGLE).is_file():
        return
    try:
        weight_map = _weight_map(index)
    except _Damaged as exc:
        raise CospadiError(f"{exc}; {CORRUPT}") from None
    misplaced = _misplaced(index, weight_map, headers)
    if misplaced:
        raise CospadiError(f"{misplaced}; {CORRUPT}")


def _misplaced(index: Path, weight_map: dict[str, str], headers: dict[str, dict]) -> str | None:
    """The first tensor the index maps to a shard (among `headers`) that lacks it, said
    as a phrase naming the index; None when all are where it says."""
    for key, name in sorted(weight_map.items()):
        if name in headers and key not in headers[name]:
            return f"{index} maps {key} to {name}, which does not hold it"
    return None


def check_safetensors(path: Path) -> dict:
    """The header of a safetensors file; CospadiError unless the file is exactly as long
    as its header says (a truncated or padded copy fails)."""
    try:
        return _safetensors_header(path)
    except _Damaged as exc:
        raise CospadiError(f"{exc}; {CORRUPT}") from None


def _safetensors_header(path: Path) -> dict:
    """The header of a safetensors file; _Damaged unless it is readable and the file is
    exactly as long as it says."""
    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if length > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(fh.read(length))
        ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    except (struct.error, ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError, AttributeError):
        raise _Damaged(path, "is not a readable safetensors file (damaged header)") from None
    expected = 8 + length + max(ends, default=0)
    if size != expected:
        what = "truncated" if size < expected else "longer than its header says"
        raise _Damaged(path, f"is {what} ({size} bytes, expected {expected})")
    return header


def check_weight_files(paths: Sequence[str | Path]) -> None:
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


def with_digest(description: dict) -> dict:
    """`description` (cospadi.json's content) with `digest`, the sha256 of the rest in
    canonical JSON, so a change anywhere in cospadi.json is seen."""
    rest = {k: v for k, v in description.items() if k != "digest"}
    return {**rest, "digest": hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()}


def recorded_checksums(folder: Path) -> dict[str, str] | None:
    """The `checksums` (file name -> sha256) that cospadi.json of `folder` recorded at
    save time; None when there is no cospadi.json or it has none (folders saved by an
    older cospadi)."""
    path = folder / DESCRIPTION
    if not path.is_file():
        return None
    try:
        description = json.loads(path.read_text())
        sums = description.get("checksums")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise CospadiError(f"{path} is not a valid cospadi description; the folder is corrupt: copy it again or "
                           "compress again") from None
    if "digest" in description and with_digest(description)["digest"] != description["digest"]:
        raise CospadiError(f"{path} is damaged (its digest does not match its content): copy it again or compress "
                           "again")
    if sums is not None and not (isinstance(sums, dict) and all(isinstance(v, str) for v in sums.values())):
        raise CospadiError(f"{path} has an unreadable checksums entry; the folder is corrupt: copy it again or "
                           "compress again")
    return sums


def verify_checksums(paths: Sequence[str | Path]) -> None:
    """CospadiError naming the first weight file of `paths`, or other recorded file of
    their folders (config, tokenizer), whose sha256 differs from the one its folder's
    cospadi.json recorded (or a weight file it does not list, a recorded file that is
    gone); nothing is checked where no checksums were recorded, nor for files the running
    `load` already verified."""
    skip = _VERIFIED.get()
    sums: dict[Path, dict[str, str] | None] = {}
    for path in map(Path, paths):
        if path.parent not in sums:
            sums[path.parent] = recorded_checksums(path.parent)
            others = [path.parent / n for n in sums[path.parent] or {} if not n.endswith(".safetensors")]
            for other in others:
                if other.resolve() not in skip:
                    _verify_file(other, sums[path.parent] or {})
        recorded = sums[path.parent]
        if recorded is None or path.resolve() in skip:
            continue
        if path.name not in recorded:
            raise CospadiError(f"{path} is not listed in the checksums of {DESCRIPTION}: the folder mixes files of "
                               "two saves; copy it again or compress again")
        _verify_file(path, recorded)


def _verify_file(path: Path, recorded: dict[str, str]) -> None:
    """CospadiError unless `path` exists with the sha256 `recorded` lists for it."""
    if not path.is_file():
        raise CospadiError(f"{path} is missing ({DESCRIPTION} recorded it at save time): copy the folder again or "
                           "compress again")
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
    check_index(folder, {path.name: header for path, header in zip(paths, headers)})
    check_module_tensors(config["quantization_config"], headers)
    return config


def find_damage(folder: Path) -> str | None:
    """The first damaged file of a model folder (a cospadi output or a plain Hugging Face
    one), in words that name it, or None: a top-level JSON file (config, index, tokenizer
    ...) that does not parse, an index naming a missing shard, a safetensors weight file
    with an unreadable header or another size than its header says, an index that puts a
    tensor in a shard that lacks it. For loaders that failed or found weights missing:
    it tells the user which file is damaged."""
    try:
        for path in sorted(folder.glob("*.json")):
            try:
                json.loads(path.read_bytes())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                return f"{path} is not valid JSON ({getattr(exc, 'msg', exc)})"
        single, index = folder / SINGLE, folder / INDEX
        weight_map = _weight_map(index) if index.is_file() and not single.is_file() else {}
        names = sorted(set(weight_map.values())) if weight_map else [SINGLE] if single.is_file() else []
        headers = {}
        for name in names:
            if not (folder / name).is_file():
                return f"{folder} is missing weight shard {name}"
            headers[name] = _safetensors_header(folder / name)
        return _misplaced(index, weight_map, headers)
    except _Damaged as exc:
        return str(exc)
    except OSError as exc:
        return f"{exc.filename} cannot be read ({exc.strerror})"
    return None
