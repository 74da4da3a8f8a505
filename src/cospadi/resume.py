"""Progress files that let an interrupted compression resume after its last finished group
of blocks (`cospadi compress --resume-dir DIR`, `compress(..., resume_dir=DIR)`).

After each group the pipeline writes into DIR:
* `group-NNN.pt`: the group's compressed blocks, pickled together so that members of a
  shared factor still share one Parameter when loaded;
* `progress.pt` (written last, so it is the commit point): the run's fingerprint, how many
  blocks are done, the hidden states entering the next block, the per-matrix reports so
  far and the seconds spent.
Every file is written to a temporary name and renamed. A rerun of the same command
(same model weights, calibration windows, method, ratio, solver options, group size and
batch size: the fingerprint) restores the finished blocks and goes on; a folder from a
different run is refused rather than mixed in. The files are pickles written by this
library: load only folders you wrote."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import CospadiError
from .report import MatrixReport
from .storage.checkpoint import atomic_file

PROGRESS_FILE = "progress.pt"
FORMAT = 1


@dataclass
class Progress:
    """A resumable run's state after `done` blocks (always the end of a group)."""

    done: int
    states: list[torch.Tensor]  # hidden states entering block `done`, one (B, L, H) per batch
    matrices: list[MatrixReport]
    seconds: float


def run_fingerprint(model: nn.Module, layers: nn.ModuleList, input_ids: torch.Tensor, settings: dict) -> str:
    """A hex digest of what determines the run's result: the model's config and weights
    (its input embedding and the first parameter of each of `layers`, a cheap proxy for the whole),
    the calibration windows and `settings` (method, ratio, options, group and batch size;
    JSON-serialisable)."""
    digest = hashlib.sha256()
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    digest.update(model.config.to_json_string(use_diff=False).encode())
    digest.update(input_ids.detach().cpu().contiguous().numpy().tobytes())
    probes = [model.get_input_embeddings().weight]
    probes += [next(block.parameters()) for block in layers]
    for tensor in probes:
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _save(obj: object, path: Path) -> None:
    with atomic_file(path) as tmp:
        torch.save(obj, tmp)


def _load(path: Path, folder: Path, device: torch.device) -> object:
    """torch.load of one of the folder's files; CospadiError when it cannot be read."""
    try:
        return torch.load(path, map_location=device, weights_only=False)
    except Exception as exc:  # missing, truncated or foreign
        raise CospadiError(f"cannot read {path} ({type(exc).__name__}); delete the folder {folder} to start "
                           "over") from exc


def save_group(folder: Path, first: int, blocks: list[nn.Module]) -> None:
    """Write a finished group's compressed blocks (first block index `first`)."""
    _save(blocks, folder / f"group-{first:03d}.pt")


def save_progress(folder: Path, fingerprint: str, progress: Progress) -> None:
    """Commit `progress` (call after save_group of the groups it counts as done)."""
    _save({"format": FORMAT, "fingerprint": fingerprint, "done": progress.done,
                  "states": progress.states, "matrices": [asdict(m) for m in progress.matrices],
                  "seconds": progress.seconds}, folder / PROGRESS_FILE)


def load_progress(folder: Path, fingerprint: str, device: torch.device) -> Progress | None:
    """The committed progress in `folder`, or None when it holds none yet. CospadiError
    when it belongs to another run or cannot be read."""
    path = folder / PROGRESS_FILE
    if not path.exists():
        return None
    saved = _load(path, folder, device)
    if not isinstance(saved, dict) or saved.get("format") != FORMAT or saved.get("fingerprint") != fingerprint:
        raise CospadiError(f"{folder} holds the progress of a different run (other model, data, method, ratio or "
                           "options); pass another --resume-dir or delete it")
    return Progress(saved["done"], saved["states"], [MatrixReport(**m) for m in saved["matrices"]], saved["seconds"])


def restore_groups(folder: Path, layers: nn.ModuleList, groups: list[list[int]], done: int,
                   device: torch.device) -> None:
    """Put the saved compressed blocks of every group ending before block `done` into
    `layers`. CospadiError when a group file is missing or unreadable."""
    for blocks in groups:
        if blocks[-1] >= done:
            break
        path = folder / f"group-{blocks[0]:03d}.pt"
        saved = _load(path, folder, device)
        if len(saved) != len(blocks):
            raise CospadiError(f"{path} holds {len(saved)} blocks, expected {len(blocks)}; delete {folder}")
        for i, block in zip(blocks, saved):
            layers[i] = block
