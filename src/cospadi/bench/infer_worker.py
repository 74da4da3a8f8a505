"""Inference measurements for `cospadi bench-infer`, run in fresh processes:

    python -m cospadi.bench.infer_worker '{"mode": "speed" | "memory", ...}'

prints one JSON line. "speed" loads every model of the run into one process and
interleaves them (run 1 of each model, then run 2 of each, ...), so a change in the
machine's background load hits all models alike and the ratios stay fair: decode
seconds per run (greedy generation of `new_tokens` tokens after a `prompt_len`-token
prompt, batch 1), prefill seconds per run for each batch size (one forward pass over
`prefill_len` tokens, no cache, every position's logits) and first-token seconds (the
same tokens as generate's prompt pass: into a cache, the last position's logits),
optionally the forward time of a few token counts on each path and profiler tables.
"memory" loads one model and reports its peak resident memory while generating, the
resident memory before loading it and the bytes of the tensors it holds."""
from __future__ import annotations

import gc
import json
import re
import resource
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..layers import ell_native
from ..layers.linear import forward_path
from ..storage.checkpoint import parse_dtype
from ..storage.memory import realign, trim_heap


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of this process's resident memory (Linux
    /proc/self/clear_refs); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def status_mib(field: str) -> float | None:
    """A memory line of /proc/self/status ("VmRSS", "VmHWM") in MiB; None where there is none."""
    try:
        match = re.search(rf"{field}:\s+(\d+)\s+kB", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(match.group(1)) / 1024 if match else None


def peak_rss_mib(since_reset: bool) -> float:
    """Peak resident memory in MiB: VmHWM (since the last reset) or ru_maxrss."""
    peak = status_mib("VmHWM") if since_reset else None
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def import_model_code(folder: str) -> None:
    """Import the modeling code of the folder's architecture, as from_pretrained would, so
    that memory measured afterwards is the model's own."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(folder))]


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


class Runner:
    """One loaded model (at the compute dtype, weights realigned as the cospadi quantizer
    does, so every model runs on 64-byte aligned memory) and the calls the bench times."""

    def __init__(self, spec: dict, folder: str) -> None:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        import_model_code(folder)
        gc.collect()
        trim_heap()  # what the loading so far freed goes back to the system, as cospadi's loader later does
        self.rss_before_model_mib = status_mib("VmRSS")  # the runtime: python, torch, modeling code, tokenizer
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=parse_dtype(spec["compute_dtype"])).eval()
        realign(self.model)
        self.tokens = torch.tensor(spec["tokens"], dtype=torch.long)
        self.prompt = self.tokens[: spec["prompt_len"]][None]
        self.prefill_len = spec.get("prefill_len", 1)

    def generate(self, count: int) -> torch.Tensor:
        """Greedy generation of exactly `count` new tokens after the prompt (batch 1)."""
        return self.model.generate(self.prompt, attention_mask=torch.ones_like(self.prompt), max_new_tokens=count,
                                   min_new_tokens=count, do_sample=False, pad_token_id=self.pad)

    def prefill(self, batch: int) -> None:
        """One forward pass over (batch, prefill_len) held-out tokens, no cache, logits at
        every position (what scoring a text costs)."""
        self.model(input_ids=self._window(batch), use_cache=False)

    def first_token(self, batch: int) -> None:
        """The prompt's forward pass as generate runs it before its first new token: (batch,
        prefill_len) tokens into a fresh cache, logits at the last position only."""
        self.model(input_ids=self._window(batch), use_cache=True, logits_to_keep=1)

    def _window(self, batch: int) -> torch.Tensor:
        return self.tokens[: batch * self.prefill_len].view(batch, self.prefill_len)


def speed(spec: dict) -> dict:
    """label -> {decode_s, generated, prefill_s and first_token_s: {batch: [s]}} for spec["models"] = [{label,
    folder, path}], interleaved; plus "crossover" and "profile_*" of spec["detail_label"] (with
    spec["profile"], also "profile_decode_dense": the dense model's decode)."""
    runners: dict[str, Runner] = {}
    for entry in spec["models"]:
        if entry["folder"] not in runners:
            runners[entry["folder"]] = Runner(spec, entry["folder"])
    models = [(e["label"], runners[e["folder"]], e["path"]) for e in spec["models"]]
    out = {label: {"decode_s": [], "prefill_s": {str(b): [] for b in spec["batches"]},
                   "first_token_s": {str(b): [] for b in spec["batches"]}} for label, _, _ in models}
    with torch.inference_mode():
        for label, runner, path in models:  # warm-up: allocator, kernels, caches of the compressed modules
            with forward_path(runner.model, path):
                out[label]["generated"] = int(runner.generate(8).shape[1] - runner.prompt.shape[1])
                for batch in spec["batches"]:
                    runner.prefill(batch)
                    runner.first_token(batch)
        for _ in range(spec["repeats"]):
            for label, runner, path in models:
                with forward_path(runner.model, path):
                    out[label]["decode_s"].append(_timed(lambda: runner.generate(spec["new_tokens"])))
        for batch in spec["batches"]:
            for _ in range(spec["repeats"]):
                for label, runner, path in models:
                    with forward_path(runner.model, path):
                        out[label]["prefill_s"][str(batch)].append(_timed(lambda: runner.prefill(batch)))
                        out[label]["first_token_s"][str(batch)].append(_timed(lambda: runner.first_token(batch)))
        detail = next((r for label, r, _ in models if label == spec.get("detail_label")), None)
        if detail is not None:
            out["detail"] = details(spec, detail)
            dense = next((r for label, r, _ in models if label == "dense"), None)
            if spec.get("profile") and dense is not None:  # where dense's decoding time goes, beside cospadi's
                out["detail"]["profile_decode_dense"] = profile_table(lambda: dense.generate(min(spec["new_tokens"], 32)))
    return out


def details(spec: dict, runner: Runner) -> dict:
    """Forward time of each token count in spec["crossover"] on both paths, and (with
    spec["profile"]) profiler tables of a decode and a batch-1 prefill."""
    result: dict = {"crossover": {}, "kernel": "compiled" if ell_native.load() is not None else "pytorch fallback"}
    for rows in spec.get("crossover", []):
        ids = runner.tokens[:rows][None]
        times = {}
        for path in ("sparse", "dense"):
            with forward_path(runner.model, path):
                runner.model(input_ids=ids, use_cache=False)
                times[path] = [_timed(lambda: runner.model(input_ids=ids, use_cache=False))
                               for _ in range(spec["repeats"])]
        result["crossover"][str(rows)] = times
    if spec.get("profile"):
        result["profile_decode"] = profile_table(lambda: runner.generate(min(spec["new_tokens"], 32)))
        result["profile_prefill"] = profile_table(lambda: runner.prefill(1))
    return result


def tensor_mib(model: torch.nn.Module) -> float:
    """MiB of the distinct parameters and buffers `model` holds (a shared one counted once)."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20


def memory(spec: dict) -> dict:
    """{peak_rss_mib, peak_rss_scope, runtime_rss_mib, tensor_mib} of one model (spec folder,
    path) generating spec["new_tokens"] tokens, the model loaded and warmed up beforehand;
    runtime_rss_mib is the process's resident memory just before loading the model (None
    without /proc), so peak - runtime is what the model adds."""
    runner = Runner(spec, spec["folder"])
    with torch.inference_mode(), forward_path(runner.model, spec["path"]):
        runner.generate(8)
        reset = reset_peak_rss()
        runner.generate(spec["new_tokens"])
        return {"peak_rss_mib": peak_rss_mib(reset), "peak_rss_scope": "while generating" if reset else
                "whole process", "runtime_rss_mib": runner.rss_before_model_mib, "tensor_mib": tensor_mib(runner.model)}


def measure(spec: dict) -> dict:
    """speed(spec) or memory(spec), by spec["mode"], on spec["threads"] torch threads."""
    torch.set_num_threads(spec["threads"])
    import cospadi  # noqa: F401  registers the quantizer

    return speed(spec) if spec["mode"] == "speed" else memory(spec)


def main() -> None:
    print(json.dumps(measure(json.loads(sys.argv[1]))))


if __name__ == "__main__":
    main()
