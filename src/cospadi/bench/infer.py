"""`cospadi bench-infer`: the dense model, the low-rank baseline and CoSpaDi side by side
in one run: bytes on disk (the compressed linears' weights and the whole folder), decode
speed (greedy generation, batch 1), prefill speed (one long forward pass per batch
size) and peak resident memory while generating, each with its ratio to dense. Each
model is saved once under the work folder at the storage dtype (dense too, so the byte
counts compare like with like), then measured at every run dtype (`--dtypes`,
infer_worker.py): speeds in one process per dtype that holds all models and interleaves
their runs, so drifting background load hits them alike; peak memory in one fresh
process per model and dtype. The table goes into the --output file between markers that
name the run."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .. import api
from ..budget import check_ratio
from ..cli_common import add_update_arg
from ..data import load_corpus
from ..errors import CospadiError
from ..files import atomic_folder
from ..layers.coefficients import check_coef_bits
from ..layers.kernels import max_sparse_rows
from ..methods import get_method, method_names
from ..models import load_model
from ..report import results_table
from ..solvers import SolverOptions
from ..storage.checkpoint import parse_dtype, save, to_storage
from ..storage.folder_checks import check_safetensors, read_config, weight_files
from .sweep import write_section
from .synthetic import SHAPES, check_shapes, save_random_folders

TARGETS = {"linear bytes": 0.71, "decode": 1.4, "prefill": 1.0, "peak memory": 0.85}  # vs dense (issue 15)
# the two prefill measurements: figure name -> the worker's timings (infer_worker.Runner.prefill / first_token)
PREFILL_KINDS = {"prefill": "prefill_s", "first token": "first_token_s"}


@dataclass(frozen=True)
class InferBench:
    """What one bench-infer run measures."""

    model: str = "smollm2-135m"
    data: str = "wiki"
    ratio: float = 0.3
    methods: tuple[str, ...] = ("svd-llm", "cospadi")
    storage_dtype: str = "bfloat16"
    coef_bits: int | None = 14
    compute_dtypes: tuple[str, ...] = ("float32", "bfloat16")
    calib_samples: int = api.DEFAULT_CALIB_SAMPLES
    seq_len: int = api.DEFAULT_SEQ_LEN
    seed: int = 42
    prompt_len: int = 32
    new_tokens: int = 128
    prefill_len: int = 512
    batches: tuple[int, ...] = (1, 8)
    repeats: int = 5
    threads: int = 2
    dense_path_row: bool = True
    profile: bool = False
    crossover: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 512)
    options: SolverOptions = field(default_factory=SolverOptions)
    shapes: str | None = None  # random weights at a larger model's shapes (synthetic.py) instead of `model`

    def check(self) -> None:
        """CospadiError for any unusable setting, before any work."""
        check_ratio(self.ratio)
        if self.shapes is not None:
            check_shapes(self.shapes)
        for method in self.methods:
            get_method(method)
        parse_dtype(self.storage_dtype)
        if not self.compute_dtypes:
            raise CospadiError("--dtypes must name at least one dtype, e.g. float32,bfloat16")
        for dtype in self.compute_dtypes:
            parse_dtype(dtype)
        check_coef_bits(self.coef_bits)
        for name in ("calib_samples", "seq_len", "prompt_len", "new_tokens", "prefill_len", "repeats", "threads"):
            if getattr(self, name) < 1:
                raise CospadiError(f"--{name.replace('_', '-')} {getattr(self, name)} must be at least 1")
        if not self.batches or min(self.batches) < 1:
            raise CospadiError(f"--batches {self.batches} must be positive batch sizes, e.g. 1,8")

    @property
    def key(self) -> str:
        """Names the cached folders: everything that changes what is saved."""
        if self.shapes is not None:
            digest = hashlib.sha1(repr((self.shapes, self.options)).encode()).hexdigest()[:8]
            return (f"{self.shapes}-random-r{self.ratio:g}-{self.storage_dtype}-c{self.coef_bits or 'full'}"
                    f"-s{self.seed}-{digest}")
        digest = hashlib.sha1(repr((self.model, self.data, self.options)).encode()).hexdigest()[:8]
        return (f"{Path(self.model).name}-{Path(self.data).stem}-r{self.ratio:g}-{self.storage_dtype}"
                f"-c{self.coef_bits or 'full'}-n{self.calib_samples}x{self.seq_len}-s{self.seed}-{digest}")

    @property
    def section(self) -> str:
        """Names the BENCHMARKS.md section: the key, and the run dtypes when not the default's."""
        dtypes = "" if self.compute_dtypes == InferBench.compute_dtypes else "-" + "+".join(self.compute_dtypes)
        return f"infer-{self.key}{dtypes}"


def prepare_folders(bench: InferBench, work: Path, progress: bool) -> dict[str, Path]:
    """Saved folders for "dense" and every method, made once under work/bench.key."""
    root = work / bench.key
    folders = {"dense": root / "dense", **{method: root / method for method in bench.methods}}
    if bench.shapes is not None:
        save_random_folders(bench.shapes, folders, bench.ratio, bench.options, bench.seed, bench.storage_dtype,
                            bench.coef_bits)
        return folders
    if not (folders["dense"] / "config.json").is_file():
        model, tokenizer = load_model(bench.model)
        to_storage(model, bench.storage_dtype)
        with atomic_folder(folders["dense"]) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    missing = [m for m in bench.methods if not (folders[m] / "cospadi.json").is_file()]
    if missing:
        calib_texts, _ = load_corpus(bench.data)
        for method in missing:
            model, tokenizer = load_model(bench.model)
            ids = api.calibration_ids(model, tokenizer, calib_texts, bench.calib_samples, bench.seq_len, bench.seed)
            model, report = api.compress(model, tokenizer, input_ids=ids, method=method, ratio=bench.ratio,
                                         allocation="uniform",  # every linear factored: the kernels are measured
                                         progress=progress, **asdict(bench.options))
            save(model, tokenizer, folders[method], report.to_dict(), dtype=bench.storage_dtype,
                 coef_bits=bench.coef_bits)
    return folders


def folder_bytes(folder: Path, linears: list[str]) -> tuple[int, int]:
    """(bytes of the tensors of the named linear layers, biases excluded, in the folder's
    safetensors files; bytes of every file in the folder)."""
    prefixes = tuple(f"{name}." for name in linears)
    linear = 0
    for path in weight_files(folder):
        for key, entry in check_safetensors(path).items():
            if key.startswith(prefixes) and not key.endswith(".bias"):
                begin, end = entry["data_offsets"]
                linear += end - begin
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return linear, total


def run_worker(spec: dict) -> dict:
    """infer_worker.measure(spec) in a fresh Python process; CospadiError with its last
    line of stderr when it fails."""
    env = dict(os.environ, HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"))
    done = subprocess.run([sys.executable, "-m", "cospadi.bench.infer_worker", json.dumps(spec)], capture_output=True,
                          text=True, env=env)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        what = spec.get("folder") or ", ".join(m["folder"] for m in spec.get("models", []))
        raise CospadiError(f"measuring {what} failed: {tail[0]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def held_out_tokens(bench: InferBench, dense: Path) -> list[int]:
    """Enough held-out tokens for the largest prefill batch (and the prompt)."""
    with torch.device("meta"):  # the config is all evaluation_ids reads of the model
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(dense))
    tokenizer = AutoTokenizer.from_pretrained(dense)
    _, eval_texts = load_corpus(bench.data)
    windows = api.evaluation_ids(model, tokenizer, eval_texts, bench.prefill_len, max(bench.batches))
    if windows.shape[0] < max(bench.batches):
        raise CospadiError(f"the held-out text gives {windows.shape[0]} windows of {bench.prefill_len} tokens, "
                           f"fewer than --batches {max(bench.batches)}: use more text or smaller batches")
    return windows.reshape(-1).tolist()


def measure_all(bench: InferBench, folders: dict[str, Path]) -> tuple[dict[str, dict[str, dict]], dict]:
    """(run dtype -> label -> sizes, speed and memory measurements; run dtype -> the
    cospadi model's crossover, profiles and kernel), for every model and the cospadi model
    with the dense path forced. Speeds come from one worker per dtype that interleaves the
    models; memory from one worker per model and dtype (a process's peak includes whatever
    else it holds)."""
    linears = sorted(read_config(folders[bench.methods[0]])["quantization_config"]["modules"]) if bench.methods \
        else []
    tokens = held_out_tokens(bench, folders["dense"])
    runs = [(label, folder, "auto") for label, folder in folders.items()]
    if bench.dense_path_row and "cospadi" in folders:
        runs.append(("cospadi (dense path only)", folders["cospadi"], "dense"))
    sizes = {label: folder_bytes(folder, linears) for label, folder, _ in runs}
    results: dict[str, dict[str, dict]] = {}
    details: dict = {"load": [os.getloadavg()[0]]}
    for dtype in bench.compute_dtypes:
        common = {"threads": bench.threads, "compute_dtype": dtype, "tokens": tokens,
                  "prompt_len": bench.prompt_len, "new_tokens": bench.new_tokens}
        speeds = run_worker(common | {
            "mode": "speed", "prefill_len": bench.prefill_len, "batches": list(bench.batches),
            "models": [{"label": label, "folder": str(folder), "path": path} for label, folder, path in runs],
            "repeats": bench.repeats, "detail_label": "cospadi", "crossover": list(bench.crossover),
            "profile": bench.profile})
        details[dtype] = speeds.get("detail", {})
        results[dtype] = {}
        for label, folder, path in runs:
            rss = run_worker(common | {"mode": "memory", "folder": str(folder), "path": path})
            linear, total = sizes[label]
            results[dtype][label] = {"linear_bytes": linear, "folder_bytes": total, **speeds[label], **rss}
        details["load"].append(os.getloadavg()[0])
    return results, details


def table_rows(bench: InferBench, dtype: str, results: dict[str, dict]) -> list[dict]:
    """One row per model run at `dtype`: sizes, speeds (medians) and memory, each with its
    ratio to dense."""
    def speeds(r: dict) -> dict[str, float]:
        out = {"decode": bench.new_tokens / statistics.median(r["decode_s"])}
        for kind, key in PREFILL_KINDS.items():
            for batch, times in r[key].items():
                out[f"{kind} b{batch}"] = int(batch) * bench.prefill_len / statistics.median(times)
        return out

    dense, dense_speed = results["dense"], speeds(results["dense"])
    rows = []
    for label, r in results.items():
        s = speeds(r)
        row = {"model": label, "run dtype": dtype, "linear weights (MB)": round(r["linear_bytes"] / 1e6, 2),
               "x dense": round(r["linear_bytes"] / dense["linear_bytes"], 3),
               "folder (MB)": round(r["folder_bytes"] / 1e6, 1),
               "decode (tok/s)": round(s["decode"], 2), "decode x dense": round(s["decode"] / dense_speed["decode"], 3)}
        for name in (f"{kind} b{batch}" for kind in PREFILL_KINDS for batch in bench.batches):
            row[f"{name} (tok/s)"] = round(s[name], 1)
            row[f"{name} x dense"] = round(s[name] / dense_speed[name], 3)
        row["peak RSS generating (MiB)"] = round(r["peak_rss_mib"])
        row["peak RSS x dense"] = round(r["peak_rss_mib"] / dense["peak_rss_mib"], 3)
        row["model tensors (MiB)"] = round(r["tensor_mib"], 1)
        if r.get("runtime_rss_mib") is not None and dense.get("runtime_rss_mib") is not None:
            added, dense_added = r["peak_rss_mib"] - r["runtime_rss_mib"], dense["peak_rss_mib"] - dense["runtime_rss_mib"]
            if dense_added > 0:
                row["peak above runtime (MiB)"] = round(added)
                row["above runtime x dense"] = round(added / dense_added, 3)
        rows.append(row)
    return rows


def verdicts(bench: InferBench, rows: list[dict]) -> list[str]:
    """'met' / 'MISSED' lines for the issue's targets, for the cospadi row of each run dtype."""
    lines = []
    for row in (r for r in rows if r["model"] == "cospadi"):
        dtype = row["run dtype"]
        lowrank = next((r for r in rows if r["model"] == "svd-llm" and r["run dtype"] == dtype), None)
        checks = [("linear-weight bytes", row["x dense"], "<=", TARGETS["linear bytes"]),
                  ("decode", row["decode x dense"], ">=", TARGETS["decode"])]
        if lowrank is not None:
            checks.append(("decode vs svd-llm", round(row["decode x dense"] / lowrank["decode x dense"], 3), ">=", 1.0))
        checks += [(f"{kind} batch {batch}", row[f"{kind} b{batch} x dense"], ">=", TARGETS["prefill"])
                   for kind in PREFILL_KINDS for batch in bench.batches]
        checks.append(("peak RSS generating", row["peak RSS x dense"], "<=", TARGETS["peak memory"]))
        if "above runtime x dense" in row:
            checks.append(("peak RSS above the runtime", row["above runtime x dense"], "<=", TARGETS["peak memory"]))
        for what, value, op, target in checks:
            met = value <= target if op == "<=" else value >= target
            lines.append(f"- {dtype}: {what} {value:.3f} x (target {op} {target}): {'met' if met else 'MISSED'}")
    return lines


def crossover_table(dtype: str, kernel: str, crossover: dict[str, dict[str, list[float]]]) -> str:
    """Which forward path of the cospadi model is faster for how many tokens (the basis of
    kernels.max_sparse_rows), at run dtype `dtype`."""
    rows = []
    for tokens, times in crossover.items():
        sparse, dense = statistics.median(times["sparse"]), statistics.median(times["dense"])
        rows.append({"tokens": tokens, "sparse path (ms)": round(sparse * 1e3, 2),
                     "dense path (ms)": round(dense * 1e3, 2), "sparse / dense": round(sparse / dense, 3)})
    limit = max_sparse_rows(parse_dtype(dtype))
    return (f"Forward pass of the cospadi model at {dtype} (no cache) on n tokens, each path forced, medians "
            f"(sparse kernel: {kernel}); the automatic choice takes the sparse path up to {limit} tokens:\n\n"
            + results_table(rows))


def describe(bench: InferBench, command: str, results: dict[str, dict[str, dict]], detail: dict) -> str:
    """The header saying what was measured and how to reproduce it."""
    scope = next(iter(next(iter(results.values())).values()))["peak_rss_scope"]
    load = " / ".join(f"{x:.2f}" for x in detail.get("load", ())) or "unknown"
    subject = f"Model `{bench.model}`" if bench.shapes is None else (
        f"Random weights at the shapes of `{bench.shapes}` (bench/synthetic.py: dense weights and every method's "
        "factors drawn at random, so no quality; bytes, speed and memory depend on the shapes alone)")
    return (f"{subject} at ratio {bench.ratio:g}; every model saved at {bench.storage_dtype}"
            f"{f' with {bench.coef_bits}-bit values of S' if bench.coef_bits else ''} and run at "
            f"{', '.join(bench.compute_dtypes)} on {bench.threads} CPU threads; cospadi with rho={bench.options.rho:g} "
            f"and update={bench.options.update}; speeds from one process per run dtype "
            "holding every model, runs interleaved (run 1 of each model, then run 2, ...); peak memory from one fresh "
            f"process per model and run dtype. Load average of the machine (1 min) before / after each dtype: {load}. "
            "Linear weights = the q/k/v/o/gate/up/down tensors in the safetensors files (bitmask included); folder = "
            f"every file. Decode = greedy generation of {bench.new_tokens} new tokens after a {bench.prompt_len}-token "
            f"prompt, batch 1 (tokens / wall time of the generate call); prefill = one {bench.prefill_len}-token "
            "forward pass without cache, logits at every position (scoring a text); first token = the same tokens "
            "as generate's prompt pass (into a fresh cache, logits at the last position only); speeds are medians "
            f"of {bench.repeats} runs. Peak RSS is the process's resident high-water mark {scope} (model loaded); "
            "peak above runtime = that peak minus the process's resident memory just before loading the model "
            "(python, torch, transformers' modeling code and the tokenizer already loaded), what the model adds; "
            "model tensors = the bytes of the model's parameters and buffers as held after loading. Held-out wiki "
            "tokens.\n\n"
            f"Reproduce: `{command}`\n")


def run(bench: InferBench, work: Path, output: Path | None, command: str, progress: bool = True) -> list[dict]:
    """Prepare, measure, write the section into `output` (None: don't); return the rows."""
    bench.check()
    folders = prepare_folders(bench, work, progress)
    results, detail = measure_all(bench, folders)
    rows = [row for dtype in bench.compute_dtypes for row in table_rows(bench, dtype, results[dtype])]
    body = describe(bench, command, results, detail) + "\n" + results_table(rows) + "\n\n" + "\n".join(verdicts(bench, rows))
    for dtype in bench.compute_dtypes:
        extra = detail.get(dtype, {})
        if extra.get("crossover"):
            body += "\n\n" + crossover_table(dtype, extra.get("kernel", "?"), extra["crossover"])
        profiles = [f"**{kind}** ({model} at {dtype}, top operators by self CPU time)\n\n```\n{extra[key].strip()}\n```"
                    for kind, model, key in (("decode", "cospadi", "profile_decode"), ("decode", "dense",
                                             "profile_decode_dense"), ("prefill", "cospadi", "profile_prefill"))
                    if extra.get(key)]
        if profiles:
            body += "\n\n" + "\n\n".join(profiles)
    if output is not None:
        write_section(output, bench.section, body)
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The bench-infer command line options."""
    d = InferBench()
    p.add_argument("--model", default=d.model, help="built-in name, local folder or hub id")
    p.add_argument("--data", default=d.data, help="'wiki' or a .txt / .jsonl file (calibration and prompts)")
    p.add_argument("--shapes", choices=sorted(SHAPES), default=None,
                   help="instead of --model: random weights and random factors at this larger model's shapes "
                        "(bytes, speed and memory only; no calibration, no quality)")
    p.add_argument("--ratio", type=float, default=d.ratio, help="compression ratio of both methods")
    p.add_argument("--methods", default=",".join(d.methods), help=f"comma-separated, from {', '.join(method_names())}")
    p.add_argument("--storage-dtype", default=d.storage_dtype, help="dtype of every saved folder")
    p.add_argument("--coef-bits", type=int, default=d.coef_bits, help="14: packed 14-bit values of S; 0: none")
    p.add_argument("--dtypes", default=",".join(d.compute_dtypes),
                   help="comma-separated dtypes the models run at, each measured side by side")
    p.add_argument("--calib-samples", type=int, default=d.calib_samples, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per calibration window")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--prompt-len", type=int, default=d.prompt_len, help="prompt tokens before decoding")
    p.add_argument("--new-tokens", type=int, default=d.new_tokens, help="tokens generated per decode run")
    p.add_argument("--prefill-len", type=int, default=d.prefill_len, help="tokens per prefill sequence")
    p.add_argument("--batches", default=",".join(map(str, d.batches)), help="comma-separated prefill batch sizes")
    p.add_argument("--repeats", type=int, default=d.repeats, help="timed runs per figure (the median is kept)")
    p.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads of the measured processes")
    add_update_arg(p)
    p.add_argument("--rho", type=float, default=SolverOptions().rho,
                   help="atoms per stored value of S (k / s) of the cospadi model: below 2, fewer atoms and fewer "
                        "multiply-adds for a long input at the same bytes")
    p.add_argument("--no-dense-path-row", action="store_true", help="skip the cospadi row with the dense path forced")
    p.add_argument("--profile", action="store_true",
                   help="add torch.profiler tables of cospadi's decode and prefill and of dense's decode")
    p.add_argument("--work", default="runs/bench-infer", help="folder keeping the saved models between runs")
    p.add_argument("--output", default="BENCHMARKS.md", help="Markdown file to write the table into")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def from_args(args: argparse.Namespace) -> InferBench:
    """The InferBench the parsed command line describes."""
    try:
        batches = tuple(int(b) for b in args.batches.split(","))
    except ValueError:
        raise CospadiError(f"--batches {args.batches!r} must be comma-separated integers, e.g. 1,8") from None
    return InferBench(model=args.model, data=args.data, ratio=args.ratio, methods=tuple(args.methods.split(",")),
                      storage_dtype=args.storage_dtype, coef_bits=args.coef_bits or None,
                      compute_dtypes=tuple(args.dtypes.split(",")), calib_samples=args.calib_samples, seq_len=args.seq_len,
                      seed=args.seed, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                      prefill_len=args.prefill_len, batches=batches, repeats=args.repeats, threads=args.threads,
                      dense_path_row=not args.no_dense_path_row, profile=args.profile,
                      options=SolverOptions(update=args.update, rho=args.rho), shapes=args.shapes)
