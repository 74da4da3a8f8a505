"""Perplexity of a causal LM on token windows, the same way for dense and compressed models.

Memory stays bounded whatever the vocabulary: the decoder's final hidden states of a
batch are formed once, and the output head and the loss run on a few positions at a time
(LOGIT_BYTES of float32 logits), never on a batch's full (B, L, vocab) logits (a 152k-token
vocabulary made those 1.2 GB for 4 windows of 512 tokens)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from ..errors import CospadiError

LOGIT_BYTES = 64 * 2**20  # float32 logits formed at a time


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
    The logits are formed a chunk of positions at a time (module doc).
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
    decoder, head = _decoder_and_head(model)
    vocab = int(model.get_output_embeddings().weight.shape[0])
    chunk = max(1, LOGIT_BYTES // (4 * vocab))
    with torch.inference_mode():
        for batch in tqdm(windows.split(batch_size), desc=desc, unit="batch", disable=not progress):
            batch = batch.to(device)
            hidden = decoder(input_ids=batch, use_cache=False).last_hidden_state
            for row_hidden, row in zip(hidden, batch):  # one window, then a chunk of positions, at a time
                total += window_nll(head, row_hidden[:-1], row[1:], chunk)
    mean = total.item() / (windows.shape[0] * (windows.shape[1] - 1))
    try:
        value = math.exp(mean)
    except OverflowError:
        return float("inf")
    return value if math.isfinite(value) else float("inf")


def window_nll(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor,
               chunk: int) -> torch.Tensor:
    """Sum (float64 scalar) of the NLLs of `targets` (T,) given the final hidden states
    `hidden` (T, H) that predict them, through `head` (hidden -> logits), `chunk`
    positions at a time."""
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk):
        logits = head(hidden[start:start + chunk]).float()
        total += F.cross_entropy(logits, targets[start:start + chunk], reduction="none").double().sum()
    return total


def _decoder_and_head(model: PreTrainedModel) -> tuple[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    """The model's decoder (input ids -> final hidden states, after the last norm) and its
    head (hidden states -> logits), as the causal-LM forward composes them: the output
    embedding, then Gemma's final logit soft-capping where the config sets one."""
    decoder = model.get_decoder()
    lm_head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap is None:
        return decoder, lm_head

    def capped(hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(lm_head(hidden) / cap) * cap
    return decoder, capped
