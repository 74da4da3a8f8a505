"""Perplexity of a causal LM on token windows, the same way for dense and compressed models."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from ..errors import CospadiError


def perplexity(
    model: PreTrainedModel,
    windows: torch.Tensor,
    batch_size: int = 4,
    progress: bool = True,
    desc: str = "perplexity",
) -> float:
    """Token-level perplexity of `model` on `windows` (LongTensor (n, L), L >= 2):
    exp of the mean next-token negative log-likelihood over all n * (L - 1) predicted
    positions. Per-token NLLs come from the float32 logits and are summed in float64.
    Runs under inference mode on the device of the model's parameters, `batch_size`
    windows per forward pass, without a KV cache; the model should be in eval mode.
    A non-finite result (diverged model) is returned as `float("inf")`."""
    if windows.dim() != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
        raise CospadiError(
            f"perplexity needs windows of shape (n >= 1, L >= 2), got {tuple(windows.shape)}; "
            "use evaluation_windows"
        )
    if batch_size < 1:
        raise CospadiError(f"batch size {batch_size} must be at least 1")
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    batches = windows.split(batch_size)
    with torch.inference_mode():
        for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress):
            batch = batch.to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            for row_logits, row in zip(logits, batch):  # one window at a time: no big copies
                nll = F.cross_entropy(row_logits[:-1].float(), row[1:], reduction="none")
                total += nll.double().sum()
    mean = total.item() / (windows.shape[0] * (windows.shape[1] - 1))
    try:
        value = math.exp(mean)
    except OverflowError:
        return float("inf")
    return value if math.isfinite(value) else float("inf")
