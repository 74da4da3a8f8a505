"""Progress files that let an interrupted compression resume after its last finished group
of blocks (`cospadi compress --resume-dir DIR`, `compress(..., resume_dir=DIR)`).

The folder holds safetensors (tensors) and JSON (everything else), never a pickle:
* `group-NNN.safetensors`: the state dict of a finished group's blocks, keys prefixed by
  the block index (`5.self_attn.q_proj.dictionary`); a factor shared by several modules is
  stored once, under its owner, as in saved folders;
* `group-NNN.json`: per block, the dtype, coef_bits and spec of each compressed module,
  with `"shares": "<owner>"` (e.g. "4.self_attn.q_proj") for the holders of a shared
  factor; restoring swaps the model's dense linears for modules built from these specs,
  re-ties the shared factors and loads the state dict strictly;
* `states-NNN.safetensors`: the hidden states entering block NNN (`batch.000`, ...);
* `progress.json`, written last (the commit point): the format, the run's fingerprint,
  the blocks done, the per-matrix reports, the seconds spent and the sha256 of every file
  it commits. The previous commit's states file is removed only after it.
Every file is written to a temporary name and renamed, so an interruption at any moment
leaves the last commit whole. A rerun of the same run (same weights and config, calibration
windows, recipe, batch size and device type: the fingerprint) verifies the checksums,
restores the finished blocks and goes on; a folder of another run, a changed file or a
folder of the older pickle format (progress.pt) is refused with a CospadiError."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from .errors import CospadiError
from .files import atomic_file, file_sha256, remove_stale_temporary_files
from .layers.base import compressed_modules
from .report import MatrixReport
from .storage.config import replace_modules
from .storage.sharing import shared_factors, tie_shared

FORMAT = 2  # 1: pickled progress.pt and group-NNN.pt
PROGRESS_FILE = "progress.json"
OLD_PROGRESS_FILE = "progress.pt"
PATH_KEYS = {"_name_or_path", "_model_name_or_path", "_commit_hash"}  # where a config came from, not what it is
DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64)}


@dataclass
class Progress:
    """A resumable run's state after `done` blocks (always the end of a group)."""

    done: int
    states: list[torch.Tensor]  # hidden states entering block `done`, one (B, L, H) per batch
    matrices: list[MatrixReport]
    seconds: float
    files: dict[str, str] = field(default_factory=dict)  # committed group file name -> sha256


def check_resume_dir(folder: str | os.PathLike, create: bool = True) -> Path:
    """`folder` as a Path once it is (or, with create=False, can become) a writable folder;
    created when missing unless create=False. CospadiError when it is a file or cannot be
    written."""
    path = Path(folder).expanduser()
    if path.exists() and not path.is_dir():
        raise CospadiError(f"--resume-dir {path} is a file: give a folder (new, or one a run of this command wrote)")
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CospadiError(f"cannot create the --resume-dir {path} ({exc.strerror}): choose a writable "
                               "folder") from None
    existing = next(p for p in [path, *path.absolute().parents] if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CospadiError(f"the --resume-dir {path} is not writable: choose a writable folder")
    if create:
        remove_stale_temporary_files(path)  # files a killed run was writing
    return path


def run_fingerprint(model: PreTrainedModel, input_ids: torch.Tensor, settings: dict) -> str:
    """A hex digest of what determines the run's result: every tensor of the model's state
    dict (name, dtype, shape, bytes), its config without where it was loaded from, the
    calibration windows and `settings` (recipe, batch size, device type; JSON-ready)."""
    digest = hashlib.sha256()
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    config = _without_paths(model.config.to_dict())
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    _hash_tensor(digest, "input_ids", input_ids)
    for name, tensor in model.state_dict().items():
        _hash_tensor(digest, name, tensor)
    return digest.hexdigest()


def _without_paths(config: object) -> object:
    """`config` (a config dict, nested ones included) less the PATH_KEYS entries."""
    if isinstance(config, dict):
        return {k: _without_paths(v) for k, v in config.items() if k not in PATH_KEYS}
    return config


def _hash_tensor(digest: hashlib._Hash, name: str, tensor: torch.Tensor) -> None:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    digest.update(json.dumps([name, str(flat.dtype), list(tensor.shape)]).encode())
    digest.update(flat.view(torch.uint8).numpy().data)


def save_group(folder: Path, first: int, blocks: list[nn.Module]) -> dict[str, str]:
    """Write a finished group's compressed blocks (first block index `first`): its
    safetensors and JSON files. Returns {file name: sha256} of both."""
    group = nn.ModuleDict({str(first + j): block for j, block in enumerate(blocks)})
    shares = shared_factors(group)
    tensors = {key: t.detach().cpu().contiguous() for key, t in group.state_dict().items()}
    for holder in shares:  # stored once, under the owner
        del tensors[f"{holder}.{group.get_submodule(holder).shared_factor}"]
    description = {"format": FORMAT, "blocks": {key: _describe(key, block, shares) for key, block in group.items()}}
    name = f"group-{first:03d}"
    return {f"{name}.safetensors": _write_tensors(folder / f"{name}.safetensors", tensors),
            f"{name}.json": _write_json(folder / f"{name}.json", description)}


def _describe(key: str, block: nn.Module, shares: dict[str, str]) -> dict:
    """The dtype, coef_bits and module specs of block `key` of a group (see the module doc)."""
    modules, kinds = {}, set()
    for name, module in compressed_modules(block):
        modules[name] = module.spec()
        if f"{key}.{name}" in shares:
            modules[name]["shares"] = shares[f"{key}.{name}"]
        kinds.add((str(module.factor_dtype).removeprefix("torch."), module.coef_bits))
    if len(kinds) > 1:
        raise CospadiError(f"block {key} mixes compressed modules of several dtypes or coef_bits {sorted(kinds)}; "
                           "resume files cannot describe it")
    dtype, coef_bits = kinds.pop() if kinds else (None, None)
    return {"dtype": dtype, "coef_bits": coef_bits, "modules": modules}


def save_progress(folder: Path, fingerprint: str, progress: Progress) -> None:
    """Commit `progress` (call after save_group of the groups it counts as done, whose
    checksums `progress.files` holds): the states file, then progress.json."""
    states = f"states-{progress.done:03d}.safetensors"
    tensors = {f"batch.{i:03d}": s.detach().cpu().contiguous() for i, s in enumerate(progress.states)}
    files = dict(progress.files, **{states: _write_tensors(folder / states, tensors)})
    _write_json(folder / PROGRESS_FILE, {
        "format": FORMAT, "fingerprint": fingerprint, "done": progress.done, "states": states,
        "matrices": [asdict(m) for m in progress.matrices], "seconds": progress.seconds, "files": files})
    for old in folder.glob("states-*.safetensors"):
        if old.name != states:
            old.unlink(missing_ok=True)


def load_progress(folder: Path, fingerprint: str, device: torch.device) -> Progress | None:
    """The committed progress in `folder` (states on `device`), or None when it holds none
    yet. Verifies the checksum of every committed file first. CospadiError when the folder
    belongs to another run, is of another format, or a file is missing or changed."""
    if (folder / OLD_PROGRESS_FILE).exists():
        raise CospadiError(f"{folder} was written by an older cospadi (pickled {OLD_PROGRESS_FILE}) and cannot be "
                           "resumed; delete it to start over")
    path = folder / PROGRESS_FILE
    if not path.exists():
        return None
    saved = _read_json(path, folder)
    if saved.get("format") != FORMAT:
        raise CospadiError(f"{path} is in resume format {saved.get('format')!r}, this cospadi reads format {FORMAT}; "
                           f"delete the folder {folder} to start over")
    if saved.get("fingerprint") != fingerprint:
        raise CospadiError(f"{folder} holds the progress of a different run (other model, data, method, ratio or "
                           "options); pass another --resume-dir or delete it")
    try:
        files, states = dict(saved["files"]), saved["states"]
        if states not in files:
            raise KeyError(states)
        for name, digest in files.items():
            _verify(folder, name, digest)
        tensors = load_file(folder / states)
        batches = [tensors[f"batch.{i:03d}"].to(device) for i in range(len(tensors))]
        matrices = [MatrixReport(**row) for row in saved["matrices"]]
        del files[states]
        return Progress(int(saved["done"]), batches, matrices, float(saved["seconds"]), files)
    except (KeyError, TypeError, ValueError) as exc:
        raise CospadiError(f"{path} is inconsistent ({type(exc).__name__}: {exc}); delete the folder {folder} to "
                           "start over") from exc


def restore_groups(folder: Path, layers: nn.ModuleList, groups: list[list[int]], progress: Progress,
                   device: torch.device) -> None:
    """Turn the dense blocks of every group ending before block `progress.done` into their
    saved compressed form, in place on `device`. CospadiError when a group's files are
    not committed in progress.json or do not fit the model."""
    for blocks in groups:
        if blocks[-1] >= progress.done:
            break
        name = f"group-{blocks[0]:03d}"
        missing = [n for n in (f"{name}.json", f"{name}.safetensors") if n not in progress.files]
        if missing:
            raise CospadiError(f"{folder / PROGRESS_FILE} does not list {missing[0]}; delete the folder {folder} to "
                               "start over")
        try:
            _restore_group(folder, name, nn.ModuleDict({str(i): layers[i] for i in blocks}), device)
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
            raise CospadiError(f"{folder / name}.* do not fit this model ({type(exc).__name__}: {exc}); delete the "
                               f"folder {folder} to start over") from exc


def _restore_group(folder: Path, name: str, group: nn.ModuleDict, device: torch.device) -> None:
    """Rebuild the blocks of `group` ({str(block index): dense block}) from its files."""
    described = _read_json(folder / f"{name}.json", folder)["blocks"]
    if sorted(described) != sorted(group.keys()):
        raise ValueError(f"it holds blocks {sorted(described)}, expected {sorted(group.keys())}")
    shares = {}
    with torch.device(device):
        for key, block in described.items():
            dtype = DTYPES[block["dtype"]] if block["modules"] else torch.float32
            replace_modules(group[key], block["modules"], dtype, block["coef_bits"])
            shares.update({f"{key}.{n}": s["shares"] for n, s in block["modules"].items() if s.get("shares")})
    tie_shared(group, shares)
    tensors = load_file(folder / f"{name}.safetensors")
    for holder, owner in shares.items():  # the shared factor, stored under its owner only
        factor = group.get_submodule(holder).shared_factor
        tensors[f"{holder}.{factor}"] = tensors[f"{owner}.{factor}"]
    group.load_state_dict(tensors, strict=True)


def _verify(folder: Path, name: str, digest: str) -> None:
    """CospadiError unless `folder`/`name` exists with this sha256."""
    path = folder / name
    if Path(name).name != name or not path.is_file():
        raise CospadiError(f"{path} is missing; delete the folder {folder} to start over")
    if file_sha256(path) != digest:
        raise CospadiError(f"{path} does not match its checksum in {PROGRESS_FILE} (changed, truncated or copied "
                           f"over); delete the folder {folder} to start over")


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    """Write `tensors` to the safetensors file `path` atomically; its sha256."""
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp))
        return file_sha256(tmp)


def _write_json(path: Path, obj: dict) -> str:
    """Write `obj` as JSON to `path` atomically; the file's sha256."""
    data = json.dumps(obj, indent=1).encode()
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def _read_json(path: Path, folder: Path) -> dict:
    """The JSON object in `path`; CospadiError when it cannot be read."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # missing, truncated or foreign
        raise CospadiError(f"cannot read {path} ({type(exc).__name__}); delete the folder {folder} to start "
                           "over") from exc
    if not isinstance(obj, dict):
        raise CospadiError(f"cannot read {path} (not a JSON object); delete the folder {folder} to start over")
    return obj
