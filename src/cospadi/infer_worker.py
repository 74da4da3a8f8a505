"""One model's inference measurements, run in a fresh process by `cospadi bench-infer`
(so every model's peak memory is its own):

    python -m cospadi.infer_worker '{"folder": ..., "threads": 2, ...}'

prints one JSON line: decode seconds per run (greedy generation of `new_tokens` tokens
after a `prompt_len`-token prompt, batch 1), prefill seconds per run for each batch size
(one forward pass over `prefill_len` tokens, no cache), and the peak resident memory
while generating."""
from __future__ import annotations

import json
import re
import resource
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .checkpoint import parse_dtype
from .hf_integration import realign
from .modules import forward_path


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of this process's resident memory (Linux
    /proc/self/clear_refs); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mib(since_reset: bool) -> float:
    """Peak resident memory in MiB: VmHWM (since the last reset) or ru_maxrss."""
    if since_reset:
        match = re.search(r"VmHWM:\s+(\d+)\s+kB", Path("/proc/self/status").read_text())
        if match:
            return int(match.group(1)) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def profile_table(fn, rows: int = 12) -> str:
    """torch.profiler's table of the `rows` operators with the most self CPU time in fn()."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def measure(spec: dict) -> dict:
    """The measurements described in the module doc for spec = {folder, threads,
    compute_dtype, path, tokens (list of held-out token ids), prompt_len, new_tokens,
    prefill_len, batches, repeats, profile, crossover (token counts to time on both
    forward paths; optional)}."""
    torch.set_num_threads(spec["threads"])
    import cospadi  # noqa: F401  registers the quantizer

    model = AutoModelForCausalLM.from_pretrained(spec["folder"], dtype=parse_dtype(spec["compute_dtype"])).eval()
    realign(model)  # as the cospadi quantizer does: every model runs on 64-byte aligned weights
    tokenizer = AutoTokenizer.from_pretrained(spec["folder"])
    tokens = torch.tensor(spec["tokens"], dtype=torch.long)
    prompt = tokens[: spec["prompt_len"]][None]
    new = spec["new_tokens"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def generate(count: int) -> torch.Tensor:
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=count,
                              min_new_tokens=count, do_sample=False, pad_token_id=pad)

    def prefill(batch: int) -> None:
        ids = tokens[: batch * spec["prefill_len"]].view(batch, spec["prefill_len"])
        model(input_ids=ids, use_cache=False)

    result: dict = {}
    with torch.inference_mode(), forward_path(model, spec.get("path", "auto")):
        generate(8)  # warm-up: allocator, kernels, caches of the compressed modules
        reset = reset_peak_rss()
        result["decode_s"] = [_timed(lambda: generate(new)) for _ in range(spec["repeats"])]
        result["peak_rss_mib"] = peak_rss_mib(reset)
        result["peak_rss_scope"] = "while generating" if reset else "whole process"
        result["generated"] = int(generate(new).shape[1] - prompt.shape[1])
        result["prefill_s"] = {}
        for batch in spec["batches"]:
            prefill(batch)  # warm-up at this shape
            result["prefill_s"][str(batch)] = [_timed(lambda: prefill(batch)) for _ in range(spec["repeats"])]
        for rows in spec.get("crossover", []):  # forward of `rows` tokens on each path (cospadi)
            ids = tokens[:rows][None]
            times = {}
            for path in ("sparse", "dense"):
                with forward_path(model, path):
                    model(input_ids=ids, use_cache=False)
                    times[path] = [_timed(lambda: model(input_ids=ids, use_cache=False))
                                   for _ in range(spec["repeats"])]
            result.setdefault("crossover", {})[str(rows)] = times
        if spec.get("profile"):
            result["profile_decode"] = profile_table(lambda: generate(min(new, 32)))
            result["profile_prefill"] = profile_table(lambda: prefill(1))
    return result


def main() -> None:
    print(json.dumps(measure(json.loads(sys.argv[1]))))


if __name__ == "__main__":
    main()
