"""Block-by-block loading: compress a safetensors model folder that need not fit in memory.

The model is built without weights (accelerate's `init_empty_weights`: parameters on the
meta device), then the embeddings, final norm and head are read from the shards. Each
block's weights are read (plain file reads, storage/stream.py read_tensors, one file at a
time) only when its group's turn comes; once compressed and propagated, the group is cast
to the storage dtype, written to a scratch BlockStore and released to meta placeholders
(storage/stream.py). The embeddings and head are released after the capture pass, and the
tokenizer after the calibration windows are drawn; both are read again for the save. The
output folder is then assembled by `checkpoint.save` with the streamed writer. Peak
memory: the runtime plus the largest of the capture pass (embeddings, hidden states), one
group's turn (its blocks, Grams, hidden states and solver work) and the save, whatever the
depth (memory_estimate.py); the folder is byte for byte the one the in-memory run saves
(tests/test_lazy.py)."""
from __future__ import annotations

import ctypes
import os
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ..adapters import adapter_for, decoder_layers
from ..devices import resolve_device
from ..errors import CospadiError
from ..files import check_output_folder, scratch_folder
from ..memory_estimate import estimate_memory
from ..models import LOAD_ERRORS
from ..report import CompressionReport
from ..storage.checkpoint import to_storage
from ..storage.folder_checks import INDEX, SINGLE, _Damaged, _weight_map, check_safetensors
from ..storage.memory import trim_heap
from ..storage.stream import BlockStore, read_tensors, release, streamed_weights
from .run import check_weights


class _PassThrough(nn.Module):
    """Stands in for a block whose weights are not loaded while the capture pass records
    the keyword arguments every block receives (they do not depend on the block)."""

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return hidden_states


class LazyModel:
    """A causal LM of `folder` (a plain safetensors model folder) whose decoder blocks stay
    meta placeholders until load_blocks reads them. `model` holds everything else."""

    def __init__(self, folder: str | os.PathLike, dtype: torch.dtype = torch.float32) -> None:
        self.folder = Path(folder).expanduser()
        self.dtype = dtype
        self.files = _tensor_files(self.folder)
        try:
            config = AutoConfig.from_pretrained(self.folder)
            with init_empty_weights():
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        except LOAD_ERRORS as exc:
            raise CospadiError(f"folder {self.folder} holds no model transformers can build ({exc}); give a Hugging "
                               "Face model folder") from None
        model.eval()
        model.name_or_path = str(self.folder)  # as from_pretrained sets it
        model._weight_conversions = []  # from_pretrained's record of the key conversions it used: none, the tensors
        # are read by their own names (a checkpoint with legacy names fails as lacking them); save_pretrained reads it
        if (self.folder / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(self.folder)
        self.model: PreTrainedModel = model
        self.layers = decoder_layers(model)
        self.prefix = next(name for name, module in model.named_modules() if module is self.layers) + "."
        self._load_rest()

    def _read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The tensors `names` from the weight files, floating ones cast to the model's
        dtype; each file is opened once and closed again. Read without a memory map
        (stream.read_tensors): a tensor kept from the map (the embeddings) would keep the
        whole file mapped, and copying out of it holds the bytes twice."""
        by_file: dict[Path, list[str]] = defaultdict(list)
        for name in names:
            if name not in self.files:
                raise CospadiError(f"the weight files of {self.folder} lack {name}; the folder is damaged or mixed "
                                   "from two models: copy or download it again")
            by_file[self.files[name]].append(name)
        out = {}
        for path, keys in by_file.items():
            for key, tensor in read_tensors(path, keys).items():
                out[key] = tensor.to(self.dtype) if tensor.is_floating_point() else tensor
        return out

    def _load_rest(self) -> None:
        """Read every tensor outside the blocks (embeddings, norm, head), then tie the head
        to the embeddings where the config says so."""
        expected = {name: t for name, t in self.model.state_dict(keep_vars=True).items()
                    if not name.startswith(self.prefix)}
        present = [name for name in expected if name in self.files]
        for name, tensor in self._read(present).items():
            _check_shape(self.folder, name, tensor, expected[name])
            _assign(self.model, name, tensor)
        self.model.tie_weights()
        for name, tensor in self.model.state_dict(keep_vars=True).items():
            if not name.startswith(self.prefix) and tensor.is_meta:
                raise CospadiError(f"the weight files of {self.folder} lack {name}; the folder is damaged or mixed "
                                   "from two models: copy or download it again")

    def release_rest(self) -> None:
        """Replace every parameter outside the blocks (embeddings, norm, head; tied ones
        stay tied) by a meta placeholder: the block loop does not use them, and
        reload_rest reads them again for the save."""
        in_blocks = {id(module) for module in self.layers.modules()}
        memo: dict[int, nn.Parameter] = {}
        for module in self.model.modules():
            if id(module) in in_blocks:
                continue
            for name, param in list(module._parameters.items()):
                if param is not None:
                    if id(param) not in memo:
                        memo[id(param)] = nn.Parameter(torch.empty_like(param, device="meta"),
                                                       requires_grad=param.requires_grad)
                    module._parameters[name] = memo[id(param)]

    def reload_rest(self) -> None:
        """Read the tensors outside the blocks again (after release_rest)."""
        self._load_rest()

    def load_blocks(self, blocks: list[int]) -> None:
        """Read the weights of `blocks` into the model (CospadiError for a missing tensor,
        another shape, or non-finite weights)."""
        for i in blocks:
            prefix = f"{self.prefix}{i}."
            expected = self.layers[i].state_dict(prefix=prefix, keep_vars=True)
            tensors = self._read(list(expected))
            for name, tensor in tensors.items():
                _check_shape(self.folder, name, tensor, expected[name])
            self.layers[i].load_state_dict({n.removeprefix(prefix): t for n, t in tensors.items()}, strict=True,
                                           assign=True)
        check_weights(adapter_for(self.model), self.layers, blocks)

    @contextmanager
    def capturing(self) -> Iterator[None]:
        """Within the block, every decoder block is a pass-through (the capture pass)."""
        real = list(self.layers)
        for i in range(len(real)):
            self.layers[i] = _PassThrough()
        try:
            yield
        finally:
            for i, layer in enumerate(real):
                self.layers[i] = layer

    def block_bytes(self) -> int:
        """Bytes of the largest decoder block's weights at the model's dtype."""
        return max(sum(t.numel() * t.element_size() for t in layer.state_dict().values()) for layer in self.layers)


class StreamedBlocks:
    """What compress_blocks asks of a lazily loaded model (run.BlockSource): capture with
    pass-through blocks, load a group's weights before calibrating it, and once it is
    compressed, store it (at the storage `dtype` and `coef_bits`) and release it."""

    def __init__(self, lazy: LazyModel, store: BlockStore, dtype: torch.dtype | str | None,
                 coef_bits: int | None) -> None:
        self.lazy, self.store, self.dtype, self.coef_bits = lazy, store, dtype, coef_bits

    @contextmanager
    def capturing(self) -> Iterator[None]:
        """The capture pass; afterwards the embeddings and head are released until the save
        (LazyModel.release_rest): only the blocks run from then on."""
        with self.lazy.capturing():
            yield
        self.lazy.release_rest()
        trim_heap()

    def load(self, blocks: list[int]) -> None:
        self.lazy.load_blocks(blocks)

    def finish(self, blocks: list[int]) -> None:
        group = nn.ModuleList(self.lazy.layers[i] for i in blocks)
        to_storage(group, self.dtype, self.coef_bits)  # type: ignore[arg-type]
        tensors = {}
        for i in blocks:
            tensors.update(self.lazy.layers[i].state_dict(prefix=f"{self.lazy.prefix}{i}.", keep_vars=True))
        self.store.put(blocks[0], tensors)
        del tensors
        release(group)
        trim_heap()


def _tensor_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it, from the folder's index or its
    single model.safetensors (headers checked). CospadiError when there is neither."""
    index, single = folder / INDEX, folder / SINGLE
    if single.is_file():
        return {name: single for name in check_safetensors(single) if name != "__metadata__"}
    if not index.is_file():
        raise CospadiError(f"{folder} has no {SINGLE} nor {INDEX}: block-by-block loading needs a safetensors model "
                           "folder")
    try:
        weight_map = _weight_map(index)
    except _Damaged as exc:
        raise CospadiError(f"{exc}; copy or download the folder again") from None
    files = {}
    for shard in sorted(set(weight_map.values())):
        if not (folder / shard).is_file():
            raise CospadiError(f"{folder} is missing weight shard {shard}: copy or download it again")
        files.update({name: folder / shard for name in check_safetensors(folder / shard) if name != "__metadata__"})
    return files


def _check_shape(folder: Path, name: str, tensor: torch.Tensor, expected: torch.Tensor) -> None:
    if tensor.shape != expected.shape:
        raise CospadiError(f"the weight files of {folder} hold {name} at shape {list(tensor.shape)}, config.json "
                           f"implies {list(expected.shape)}; the folder is damaged or mixed from two models")


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put `tensor` in place of the (meta) parameter or buffer `name` of `model`."""
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner)
    if leaf in module._parameters:
        old = module._parameters[leaf]
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=bool(old is not None and old.requires_grad))
    else:
        module._buffers[leaf] = tensor


def compress_folder(folder: str | os.PathLike, out: str | os.PathLike, *, input_ids: torch.Tensor | None = None,
                    texts: list[str] | None = None, method: str = "cospadi", ratio: float = 0.3,
                    calib_samples: int = 32, seq_len: int = 512, batch_size: int = 8, progress: bool = True,
                    workers: int | None = None, group_size: int | None = None, share: str | None = None,
                    device: str | torch.device | None = None, dtype: torch.dtype | str | None = None,
                    coef_bits: int | None = None, overwrite: bool = False,
                    max_shard_size: str | int | None = None, summary: Callable[[CompressionReport], dict] | None = None,
                    log: Callable[[str], object] | None = None, **solver: object) -> CompressionReport:
    """Compress the safetensors model folder `folder` block by block into the cospadi
    folder `out` (module doc): the arguments are api.compress's and checkpoint.save's
    (uniform allocation, no depth pruning). Calibration windows: `input_ids`, or drawn
    from `texts` as api.calibration_ids does. `summary(report)`: extra entries of the
    saved report's "summary". `log(line)` receives the memory estimate before the run
    starts. Returns the report. The folder is byte for byte what compressing the model
    loaded whole and saving it gives (max_shard_size as in checkpoint.save)."""
    from .. import api
    from ..groups import parse_share, resolve_group_size
    from ..methods import get_method
    from ..solvers import SolverOptions
    from ..storage.checkpoint import parse_dtype, save
    from .run import Recipe, check_recipe, compress_blocks

    folder = Path(folder).expanduser()
    check_output_folder(out, overwrite=overwrite, inputs={"the model folder": folder})
    return_freed_memory()
    parse_dtype(dtype)
    options = SolverOptions(**solver)  # type: ignore[arg-type]
    recipe = Recipe(method, ratio, options, resolve_group_size(get_method(method), group_size), share=parse_share(share))
    lazy = LazyModel(folder)
    tokenizer = load_tokenizer(folder)
    check_recipe(lazy.model, recipe)
    if log is not None:
        target = resolve_device(device) or torch.device("cpu")
        threads = workers or (torch.get_num_threads() if target.type == "cpu" else 1)
        log(estimate_memory(lazy.model, calib_samples if input_ids is None else int(input_ids.shape[0]),
                            seq_len if input_ids is None else int(input_ids.shape[1]), batch_size, recipe.group_size,
                            threads, True, target).describe())
    if input_ids is None:
        input_ids = api.calibration_ids(lazy.model, tokenizer, texts, calib_samples, seq_len, options.seed)
    del tokenizer  # read again for the save: the block loop has no use for it
    trim_heap()  # the tokenizer and the tokenized corpus's Python objects (about 150 MiB with the built-in text)
    with scratch_folder(Path(out), "--out folder") as scratch:
        store = BlockStore(scratch)
        report = compress_blocks(lazy.model, input_ids, recipe, batch_size=batch_size, progress=progress,
                                 workers=workers, device=device, source=StreamedBlocks(lazy, store, dtype, coef_bits))
        saved = {"summary": summary(report), **report.to_dict()} if summary is not None else report.to_dict()
        lazy.reload_rest()
        with streamed_weights(store):
            save(lazy.model, load_tokenizer(folder), out, saved, dtype=dtype, coef_bits=coef_bits, overwrite=overwrite,
                 max_shard_size=max_shard_size)
    return report


def load_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved in `folder`; CospadiError when there is none."""
    try:
        return AutoTokenizer.from_pretrained(folder)
    except LOAD_ERRORS as exc:
        raise CospadiError(f"folder {folder} holds no loadable tokenizer ({exc}); give a Hugging Face model folder "
                           "with its tokenizer files") from None


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def return_freed_memory(threshold: int = 2**20) -> bool:
    """Make glibc's malloc serve every allocation above `threshold` bytes (tensors) by its
    own mmap, returned to the system when freed. By default glibc raises that threshold
    up to 32 MiB as large blocks are freed, and the block-by-block loop's tensors then
    fragment its heap: measured on 2 blocks of a 1024-wide Llama, peak RSS 1566 MiB
    instead of 1251 MiB, growing from block to block. Process-wide; whether it applied
    (False off glibc)."""
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False
