"""Saving and reloading compressed models.

A saved folder holds what `save_pretrained` writes (config.json, model.safetensors with
the factors under each compressed linear's name, generation config), the tokenizer, and
`cospadi.json`: the format version, the shape of every compressed module and the run's
report. Folders are written under a temporary name and renamed into place, so a failed
or interrupted save never leaves a half-written folder at the destination."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .errors import CospadiError
from .modules import DictLinear, LowRankLinear

FORMAT_VERSION = 1
DESCRIPTION = "cospadi.json"


@contextmanager
def atomic_folder(out_dir: str | os.PathLike) -> Path:
    """Yield a fresh temporary folder beside `out_dir`; on success it replaces `out_dir`
    (an existing folder there is removed only after the new one is complete); on error
    it is deleted and `out_dir` is left as it was."""
    out = Path(out_dir).resolve()
    if out.exists() and not out.is_dir():
        raise CospadiError(f"output path {out} exists and is not a folder: choose another --out")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        raise CospadiError(f"cannot write beside {out}: {exc.strerror}; choose a writable --out") from exc
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def module_specs(model: nn.Module) -> dict[str, dict]:
    """name -> constructor arguments of every compressed module in `model`."""
    specs: dict[str, dict] = {}
    for name, module in model.named_modules():
        if isinstance(module, DictLinear):
            specs[name] = {"type": "dict", "in_features": module.in_features, "out_features": module.out_features,
                           "atoms": module.atoms, "sparsity": module.sparsity, "bias": module.bias is not None}
        elif isinstance(module, LowRankLinear):
            specs[name] = {"type": "lowrank", "in_features": module.in_features, "out_features": module.out_features,
                           "rank": module.rank, "bias": module.bias is not None}
    return specs


def save(model: PreTrainedModel, tokenizer, out_dir: str | os.PathLike, report: dict | None = None) -> Path:
    """Write the (compressed) model, its tokenizer and cospadi.json to `out_dir` atomically."""
    with atomic_folder(out_dir) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        description = {"format_version": FORMAT_VERSION, "modules": module_specs(model), "report": report}
        (tmp / DESCRIPTION).write_text(json.dumps(description, indent=1))
    return Path(out_dir)


_BUILDERS: dict[str, Callable[[dict, torch.dtype], nn.Module]] = {
    "dict": lambda s, dt: DictLinear(s["in_features"], s["out_features"], s["atoms"], s["sparsity"], s["bias"], dt),
    "lowrank": lambda s, dt: LowRankLinear(s["in_features"], s["out_features"], s["rank"], s["bias"], dt),
}


def load(path: str | os.PathLike) -> tuple[PreTrainedModel, object]:
    """Rebuild a model saved by `save`: (model in eval mode, tokenizer or None)."""
    folder = Path(path)
    description = _read_description(folder)
    config = AutoConfig.from_pretrained(folder)
    dtype = config.dtype if isinstance(getattr(config, "dtype", None), torch.dtype) else torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, spec in description["modules"].items():
        if spec.get("type") not in _BUILDERS:
            raise CospadiError(f"{folder / DESCRIPTION}: unknown module type {spec.get('type')!r} for {name}")
        model.set_submodule(name, _BUILDERS[spec["type"]](spec, dtype))
    state = {}
    shards = sorted(folder.glob("model*.safetensors"))
    if not shards:
        raise CospadiError(f"{folder} has no model*.safetensors weights: the save was incomplete; compress again")
    for shard in shards:
        try:
            state.update(load_file(shard))
        except Exception as exc:  # safetensors raises its own error types for truncated files
            raise CospadiError(f"cannot read {shard}: {exc}; the file is corrupt, compress again") from exc
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches raise even with strict=False
        raise CospadiError(f"{folder}: weights do not match the description ({str(exc).splitlines()[1].strip()}); "
                           "the folder is corrupt or from another tool") from None
    if getattr(config, "tie_word_embeddings", False):  # the saved file holds the tied head once
        missing = [key for key in missing if not key.endswith("lm_head.weight")]
    if missing or unexpected:
        raise CospadiError(f"{folder}: weights do not match the description (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}); the folder is corrupt or from another tool")
    model.tie_weights()
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").exists() else None
    return model, tokenizer


def _read_description(folder: Path) -> dict:
    if not (folder / DESCRIPTION).is_file():
        raise CospadiError(f"{folder} has no {DESCRIPTION}: it is not a cospadi output folder")
    try:
        description = json.loads((folder / DESCRIPTION).read_text())
    except json.JSONDecodeError as exc:
        raise CospadiError(f"{folder / DESCRIPTION} is not valid JSON ({exc.msg}); the folder is corrupt") from exc
    version = description.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CospadiError(f"{folder} uses cospadi format version {version}, newer than this cospadi "
                           f"({FORMAT_VERSION}): upgrade cospadi")
    return description
