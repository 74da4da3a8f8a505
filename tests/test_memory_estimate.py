"""The memory estimate printed before a compress run (memory_estimate.py): block by block
it does not grow with depth, loaded whole it grows by every block, and it matches the
peak RSS measured on the issue-18 model (docs/scale.md) from above, within 20%."""

import pytest
import torch
from accelerate import init_empty_weights
from transformers import LlamaConfig, LlamaForCausalLM

from cospadi.memory_estimate import RUNTIME, MiB, estimate_memory

CPU = torch.device("cpu")


def skeleton(layers: int, hidden: int = 2048, inner: int = 5632, vocab: int = 49152) -> LlamaForCausalLM:
    """A meta Llama of the issue-18 measurement's shapes (benchmarks/make_random_llama.py)."""
    with init_empty_weights():
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inner,
                                             num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=16,
                                             tie_word_embeddings=True))
    model.tie_weights()
    return model


def total(estimate) -> int:
    return sum(estimate.host.values())


def test_block_by_block_does_not_grow_with_depth_and_whole_loading_does():
    lazy = [total(estimate_memory(skeleton(n), 8, 512, 4, 1, 1, True, CPU)) for n in (2, 24)]
    eager = [total(estimate_memory(skeleton(n), 8, 512, 4, 1, 1, False, CPU)) for n in (2, 24)]
    block = (4 * 2048 * 2048 + 3 * 2048 * 5632 + 2 * 2048) * 4  # 7 linears and 2 norms
    assert lazy[0] == lazy[1]
    assert eager[1] - eager[0] == 22 * block
    assert eager[1] > 4 * 2**30 > lazy[1]  # the measurement's point: loaded whole it needs more than 4 GB


def test_the_peak_phase_and_its_parts():
    model = skeleton(2)
    loop = estimate_memory(model, 8, 512, 4, 1, 1, True, CPU).host
    assert loop["runtime"] == RUNTIME and "outside the blocks" not in loop  # released during the block loop
    assert loop["Grams"] == 8 * (3 * 2048**2 + 5632**2)
    assert loop["solvers"] == 8 * 5 * 5632 * 2048  # more than one 5632^2 matrix (the in-place Cholesky)
    assert loop["hidden states"] == (8 + 4) * 512 * 2048 * 4  # one copy, plus one batch of outputs
    grouped = estimate_memory(model, 8, 512, 4, 2, 1, True, CPU).host
    assert grouped["Grams"] == 2 * loop["Grams"] and grouped["hidden states"] == (16 + 4) * 512 * 2048 * 4
    # small blocks and a large vocabulary: the capture pass (embeddings and final norm) is the peak
    small = estimate_memory(skeleton(2, hidden=256, inner=512, vocab=10**6), 8, 512, 4, 1, 1, True, CPU).host
    assert small["outside the blocks"] == (10**6 + 1) * 256 * 4
    device = estimate_memory(model, 8, 512, 4, 1, 1, True, torch.device("cuda"))
    assert set(device.device) == {"one group of blocks", "hidden states", "Grams", "solvers"}


# (blocks, calibration windows, measured peak RSS in bytes: /usr/bin/time's maximum resident set size) of
# `compress --lazy --method svd-llm --ratio 0.3 --batch-size 4` on make_random_llama.py's 2048-wide Llama
# (benchmarks/measure_lazy_memory.py; docs/scale.md)
MEASURED = [(2, 8, 1_395_244 * 1024)]


@pytest.mark.parametrize("layers, samples, peak", MEASURED)
def test_the_estimate_errs_high_by_at_most_20_percent(layers, samples, peak):
    """It counts every block and Gram of the group through the solve, which one worker
    releases job by job (memory_estimate.py): never below the measured peak, not far above."""
    estimate = total(estimate_memory(skeleton(layers), samples, 512, 4, 1, 1, True, CPU))
    assert peak <= estimate < 1.2 * peak, (estimate / MiB, peak / MiB)
