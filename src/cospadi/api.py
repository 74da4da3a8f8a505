"""The Python API: compress a model you already hold, measure perplexity, save, load.

    model, tok = cospadi.load_model("smollm2-135m")
    model, report = cospadi.compress(model, tok, method="cospadi", ratio=0.3)
    print(cospadi.perplexity_on_texts(model, tok, cospadi.load_corpus("wiki")[1]))
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .allocation import DEFAULT_COST, RatioMap, check_allocation, resolve_allocation
from .budget import check_ratio
from .data import calibration_windows, evaluation_windows, load_corpus, tokenize_corpus
from .errors import CospadiError
from .evaluation.perplexity import perplexity
from .groups import parse_share, resolve_group_size
from .methods import check_quant, get_method
from .models import needs_bos
from .pipeline import Recipe, check_recipe, compress_blocks
from .pipeline.allocate import allocate
from .pruning.plan import is_depth_method
from .report import CompressionReport
from .solvers import SolverOptions
from .solvers.quantize import DEFAULT_GROUP, parse_quant

DEFAULT_CALIB_SAMPLES = 32
DEFAULT_SEQ_LEN = 512
DEFAULT_EVAL_WINDOWS = 32


def _bos(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> int | None:
    return tokenizer.bos_token_id if needs_bos(tokenizer, model) else None


def calibration_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[str] | None = None,
                    samples: int = DEFAULT_CALIB_SAMPLES, seq_len: int = DEFAULT_SEQ_LEN, seed: int = 42) -> torch.Tensor:
    """(samples, seq_len) token windows drawn with `seed` from `texts` (default: the
    built-in wiki calibration split), BOS-prefixed for models that need it."""
    texts = load_corpus("wiki")[0] if texts is None else texts
    return calibration_windows(tokenize_corpus(tokenizer, texts), samples, seq_len, seed, _bos(model, tokenizer))


def evaluation_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[str] | None = None,
                   seq_len: int = DEFAULT_SEQ_LEN, max_windows: int | None = DEFAULT_EVAL_WINDOWS) -> torch.Tensor:
    """(n, seq_len) non-overlapping windows from the start of `texts` (default: the
    built-in wiki held-out split), at most `max_windows`, BOS-prefixed where needed."""
    texts = load_corpus("wiki")[1] if texts is None else texts
    return evaluation_windows(tokenize_corpus(tokenizer, texts), seq_len, max_windows, _bos(model, tokenizer))


def compress(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[str] | None = None, *,
             input_ids: torch.Tensor | None = None, method: str = "cospadi", ratio: float = 0.3,
             calib_samples: int = DEFAULT_CALIB_SAMPLES, seq_len: int = DEFAULT_SEQ_LEN, batch_size: int = 8,
             progress: bool = True, workers: int | None = None, group_size: int | None = None,
             resume_dir: str | None = None, device: str | torch.device | None = None,
             ratios: RatioMap | None = None, allocation: str | None = None, cost: str = DEFAULT_COST,
             profile_cache: str | None = None, quant: str | None = None, quant_group: int = DEFAULT_GROUP,
             share: str | Sequence[str] | None = None, **solver: object) -> tuple[PreTrainedModel, CompressionReport]:
    """Compress `model` in place: every q/k/v/o/gate/up/down linear of every block becomes
    a DictLinear (method "cospadi") or LowRankLinear ("svd", "svd-llm", "basis-sharing")
    removing `ratio` of its weights, calibrated on `calib_samples` windows of `seq_len`
    tokens of `texts` (or on the given `input_ids` (N, L) windows). `group_size` m:
    consecutive blocks whose linears named by `share` share one dictionary (cospadi) or
    basis (basis-sharing) per kind, the others staying per layer; None: the method's
    default (2 for basis-sharing, else 1 = per layer). `share` ("gate,up", or a list of
    kinds or linear names; None: the method's default: gate and up for cospadi,
    q/k/v/gate/up for basis-sharing; docs/method.md "Per-group mode"). `solver` keywords
    are SolverOptions fields (rho, solver, init, iters, sweeps, power_iters, rounds,
    seed; defaults in solvers/options.py). Returns the same model object and a
    CompressionReport. `resume_dir`: save progress there after every block (or group) and
    resume from it when it already holds progress of this same run (pipeline.compress_blocks).
    `device` ("auto", "cpu", "cuda", "cuda:N"; None: the model's own): where calibration
    and the solvers run, one block at a time, the model itself staying where it is.
    `allocation` "knapsack" (the default, None, unless `ratios` is given): each matrix
    gets its own ratio (0 = kept dense, up to 0.9) from a profile of its errors under
    `cost` ("normalized" or "fisher"), the stored numbers still (1 - ratio) of the dense
    ones (docs/allocation.md); the profile is cached under `profile_cache` (None: not
    cached). "uniform": every matrix at `ratio`. `ratios` gives the map directly.
    The report's seconds include the allocation's.
    Depth pruning (docs/pruning.md): method "replaceme" cuts round(ratio x blocks)
    consecutive blocks and merges a fitted linear map into the block before the cut;
    "replaceme+M" / "replacemeK+M" cut a few blocks (K) and compress the rest with method M,
    `ratio` being the total removed fraction of the linear weights.
    `quant` ("int8", "int4", "int3"; None or "none": no quantization) stores the factors
    of every compressed matrix as integer codes with one bf16 scale per `quant_group`
    inputs, calibrated on the same Grams (docs/quantization.md); methods "rtn" and "gptq"
    quantize the dense weights alone (they ignore `ratio` and need `quant`).
    """
    spec = parse_quant(quant, quant_group)
    if spec is not None and is_depth_method(method):
        raise CospadiError(f"--quant does not work with depth pruning ({method}): leave one out")
    if not (not is_depth_method(method) and get_method(method).ignores_ratio):
        check_ratio(ratio)
    if is_depth_method(method):  # replaceme[K][+method]: pruning/ cuts blocks, then calls back here for the rest
        from .pruning.compress import compress_depth

        return compress_depth(model, tokenizer, texts, input_ids=input_ids, method=method, ratio=ratio,
                              calib_samples=calib_samples, seq_len=seq_len, batch_size=batch_size, progress=progress,
                              workers=workers, group_size=group_size, resume_dir=resume_dir, device=device,
                              ratios=ratios, allocation=allocation, cost=cost, profile_cache=profile_cache, share=share,
                              **solver)
    group_size = resolve_group_size(get_method(method), group_size)
    check_quant(get_method(method), spec, group_size)
    if get_method(method).ignores_ratio:  # rtn, gptq: every matrix at ratio 0, quantized
        if allocation not in (None, "uniform") or ratios is not None:
            raise CospadiError(f"method {method} keeps every matrix's shape: it takes no allocation or ratios")
        ratio, allocation = 0.0, "uniform"
    options = SolverOptions(**solver)  # type: ignore[arg-type]
    if input_ids is None:
        input_ids = calibration_ids(model, tokenizer, texts, calib_samples, seq_len, options.seed)
    allocation = resolve_allocation(allocation, ratios)
    check_allocation(allocation, cost)
    if ratios is not None and allocation != "uniform":
        raise CospadiError("give either ratios (a per-matrix map) or allocation='knapsack', not both")
    recipe = Recipe(method, ratio, options, group_size, ratios, spec, parse_share(share))
    check_recipe(model, recipe)  # before the profile pass
    chosen = allocate(model, input_ids, recipe, allocation, cost, cache=profile_cache, batch_size=batch_size,
                      device=device, progress=progress)
    if chosen.ratios is not None:
        recipe = replace(recipe, ratios=chosen.ratios)
    report = compress_blocks(model, input_ids, recipe, batch_size=batch_size, progress=progress, workers=workers,
                             resume_dir=resume_dir, device=device)
    report.allocation = chosen.summary()
    report.seconds += chosen.seconds
    return model, report


def perplexity_on_texts(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[str] | None = None,
                        seq_len: int = DEFAULT_SEQ_LEN, max_windows: int | None = DEFAULT_EVAL_WINDOWS,
                        batch_size: int = 4, progress: bool = True) -> float:
    """Token-level perplexity on non-overlapping `seq_len` windows of `texts` (default:
    the built-in wiki held-out split), at most `max_windows` of them."""
    windows = evaluation_ids(model, tokenizer, texts, seq_len, max_windows)
    return perplexity(model, windows, batch_size=batch_size, progress=progress)
