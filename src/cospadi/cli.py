"""`cospadi` command line: a thin layer over the Python API (api.py)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import transformers

from . import api
from .bench.plot import plot_allocation
from .budget import check_ratio
from .cli_bench import BENCH_COMMANDS, add_bench_parsers
from .cli_common import (
    Parser,
    add_allocation_args,
    add_device_arg,
    add_solver_args,
    add_text_args,
    check_seq_len,
    positive,
    solver_options,
)
from .data import load_corpus
from .devices import resolve_device, visiting
from .errors import CospadiError
from .evaluation.perplexity import perplexity
from .files import atomic_file, check_output_file, check_output_folder
from .groups import parse_share
from .layers.base import compressed_modules
from .memory_estimate import estimate_memory
from .methods import check_quant, get_method, method_names
from .models import BUILTIN_MODELS, builtin_model_dir, cache_dir, load_model
from .pipeline import distributed
from .pruning.plan import check_plan, is_depth_method, resolve_method_group_size
from .pruning.save import save_model
from .report import CompressionReport, peak_rss_mb, results_table
from .resume import check_resume_dir
from .solvers import SolverOptions
from .solvers.quantize import DEFAULT_GROUP, QUANT_BITS, parse_quant
from .storage import export
from .storage.checkpoint import DTYPES, parse_dtype


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="cospadi", description="Training-free LLM compression with "
                                     "calibration-guided sparse dictionaries (CoSpaDi) and low-rank baselines.")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compress", help="compress a model and report ratio, perplexity, time and memory")
    add_text_args(c)
    c.add_argument("--method", default="cospadi", help=f"one of {', '.join(method_names())}; rtn or gptq "
                   "(quantization alone, with --quant); or depth pruning "
                   "(docs/pruning.md): replaceme, replaceme+M (M one of those), replacemeK+M (cut K blocks, then M)")
    c.add_argument("--group-size", type=int, default=None,
                   help="consecutive blocks whose linears named by --share share one dictionary (cospadi) or basis "
                        "(basis-sharing), the others staying per layer (default: 2 for basis-sharing, else 1 = per "
                        "layer; paper: 2); a last group is shorter when it does not divide the blocks")
    c.add_argument("--share", default=None,
                   help="with --group-size > 1: the linears a group shares, comma-separated kinds from q,k,v,o,gate,"
                        "up,down (default: the method's: cospadi gate,up; basis-sharing q,k,v,gate,up)")
    c.add_argument("--ratio", type=float, default=0.3, help="fraction of each linear's weights removed, in (0, 1) "
                   "(replaceme: of all linear weights, in whole blocks)")
    add_solver_args(c)
    add_allocation_args(c)
    c.add_argument("--profile-cache", default="auto",
                   help="folder caching knapsack profiles, so a rerun or another ratio does not profile again "
                        "(auto: profiles/ under cospadi's cache, $COSPADI_CACHE or ~/.cache/cospadi; none: no cache)")
    add_device_arg(c, "calibration, the solvers and evaluation (the model itself stays on the CPU; one block at a "
                       "time visits the device)")
    c.add_argument("--calib-samples", type=int, default=api.DEFAULT_CALIB_SAMPLES,
                   help="calibration windows (paper: 256)")
    c.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward pass")
    c.add_argument("--out", default=None, help="save the compressed model to this folder (a new or empty one, or an "
                   "earlier output with --overwrite)")
    c.add_argument("--overwrite", action="store_true", help="let --out replace an earlier cospadi output folder")
    c.add_argument("--json", default=None, help="write the full report (per matrix) to this JSON file")
    c.add_argument("--resume-dir", default=None,
                   help="save progress here after every block; rerunning the same command resumes from it")
    c.add_argument("--dtype", default=None, choices=list(DTYPES),
                   help="storage dtype of --out (default: the model's own, so the reload is exact)")
    c.add_argument("--coef-bits", type=int, default=None, choices=[14],
                   help="store the values of S in 14 bits (bf16 less 2 mantissa bits; pays for the bitmask)")
    c.add_argument("--quant", default="none", choices=["none", *QUANT_BITS],
                   help="store the factors of every compressed matrix as integer codes, calibrated on the same Grams "
                        "(GPTQ; docs/quantization.md); methods rtn and gptq quantize the dense weights alone")
    c.add_argument("--quant-group", type=int, default=DEFAULT_GROUP,
                   help="inputs per quantization scale (a last group is shorter when it does not divide them)")
    c.add_argument("--lazy", action="store_true",
                   help="load the model folder block by block and write each compressed block out as it finishes: "
                        "memory independent of depth (needs --out; no perplexity, --resume-dir or knapsack; "
                        "docs/scale.md)")
    c.add_argument("--nproc", type=int, default=None,
                   help="run on this many processes (torchrun; gloo on CPUs, NCCL on GPUs): the calibration windows and "
                        "the solves are split across them, the output is the same bytes (docs/scale.md)")
    c.add_argument("--dist-timeout", type=float, default=1800,
                   help="seconds a rank waits for the others before stopping the run (a rank that dies stops it at once)")
    e = sub.add_parser("eval", help="perplexity (and lm-eval tasks) of a model or of a saved cospadi output folder")
    add_text_args(e)
    add_device_arg(e, "the model")
    e.add_argument("--tasks", default=None,
                   help="comma-separated lm-eval tasks run zero-shot on the model in memory: any lm-eval task "
                        "(arc_easy,piqa,... need the network) or the offline ones built from the held-out text, "
                        "cospadi_lastword (LAMBADA-style accuracy) and cospadi_wordppl (word perplexity)")
    e.add_argument("--limit", type=int, default=None, help="examples per lm-eval task (default: all)")
    e.add_argument("--lastword-examples", type=int, default=500, help="passages of cospadi_lastword")
    e.add_argument("--wordppl-docs", type=int, default=200, help="held-out documents of cospadi_wordppl")
    e.add_argument("--batch-size", type=int, default=8, help="lm-eval batch size")
    x = sub.add_parser("export", help="write a plain transformers checkpoint with W = D S multiplied out")
    x.add_argument("--dense", action="store_true", help="export format: dense nn.Linear weights (the only one)")
    x.add_argument("folder", help="a folder written by `cospadi compress --out`")
    x.add_argument("out", help="the folder to write (a new or empty one, or an earlier output with --overwrite)")
    x.add_argument("--overwrite", action="store_true", help="let OUT replace an earlier cospadi output folder")
    x.add_argument("--dtype", default=None, choices=list(DTYPES), help="dtype of the export (default: as saved)")
    x.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    x.add_argument("--quiet", action="store_true", help="no progress bars")
    add_bench_parsers(sub)
    return parser


def run_compress(args: argparse.Namespace) -> list[dict]:
    """Validate everything cheap first, then load, evaluate, compress, evaluate, save."""
    check_ratio(args.ratio)
    options = solver_options(args)
    if args.eval_windows < 0:
        raise CospadiError(f"--eval-windows {args.eval_windows} must be 0 (skip) or more")
    for name in ("calib_samples", "seq_len", "batch_size"):
        positive("--" + name.replace("_", "-"), getattr(args, name))
    parse_dtype(args.dtype)
    _check_outputs(args)
    device = resolve_device(args.device)
    group_size = resolve_method_group_size(args.method, args.group_size)
    _check_quant_args(args, group_size)
    if args.lazy:
        if distributed.launched():
            raise CospadiError("--lazy runs on one process: leave out --nproc (or torchrun)")
        return _run_compress_lazy(args, options, device, group_size)
    if distributed.launched():
        return _run_compress_ranks(args, options, device, group_size)
    return _run_compress(args, options, device, group_size)


def _check_quant_args(args: argparse.Namespace, group_size: int | None) -> None:
    """--quant and --quant-group against the rest of the command (one-line CospadiError)."""
    spec = parse_quant(args.quant, args.quant_group)
    if spec is not None and is_depth_method(args.method):
        raise CospadiError(f"--quant does not work with depth pruning ({args.method}): leave one out")
    if not is_depth_method(args.method):
        check_quant(get_method(args.method), spec, group_size or 1, args.coef_bits, args.lazy)


def _run_compress_ranks(args: argparse.Namespace, options: SolverOptions, device: torch.device,
                        group_size: int | None) -> list[dict]:
    """One rank of a run torchrun started (pipeline/distributed.py): rank 0 evaluates,
    prints and writes; the others only share the compression."""
    if is_depth_method(args.method) or args.allocation not in (None, "uniform"):
        raise CospadiError("several processes (--nproc, torchrun) run a per-matrix method at a uniform ratio: leave "
                           "out --nproc, or --allocation / the depth method")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    args = argparse.Namespace(**{**vars(args), "allocation": "uniform"})  # the knapsack default needs one process
    ranks = distributed.init(args.dist_timeout, device)
    try:
        if ranks.rank != 0:
            args = argparse.Namespace(**{**vars(args), "quiet": True, "eval_windows": 0, "out": None, "json": None})
        rows = _run_compress(args, options, device, group_size)
        ranks.barrier()  # rank 0 has written its files
        return rows if ranks.rank == 0 else []
    finally:
        distributed.finish()


def _run_compress(args: argparse.Namespace, options: SolverOptions, device: torch.device,
                  group_size: int | None) -> list[dict]:
    """run_compress once the arguments are checked: the model loaded whole."""
    calib_texts, eval_texts = load_corpus(args.data)
    model, tokenizer = load_model(args.model)
    check_seq_len(model, args.seq_len)
    if any(True for _ in compressed_modules(model)):
        raise CospadiError(f"model {args.model} is already compressed (a cospadi output folder); compress its dense "
                           f"original, or make a dense model of it with `cospadi export --dense {args.model} OUT` "
                           "and compress that")
    check_plan(model, args.method, args.ratio, options, group_size,  # before the minutes of dense evaluation
               parse_share(args.share))
    _print_estimate(model, args, device, group_size)
    ids = api.calibration_ids(model, tokenizer, calib_texts, args.calib_samples, args.seq_len, args.seed)
    windows = api.evaluation_ids(model, tokenizer, eval_texts, args.seq_len, args.eval_windows) \
        if args.eval_windows else None
    dense_ppl = _evaluate(model, windows, device, args, "dense perplexity")
    model, report = api.compress(model, tokenizer, input_ids=ids, method=args.method, ratio=args.ratio,
                                 batch_size=args.batch_size, progress=not args.quiet, workers=args.workers,
                                 group_size=group_size, resume_dir=args.resume_dir, device=device,
                                 allocation=args.allocation, cost=args.cost,
                                 profile_cache=_profile_cache(args.profile_cache), quant=args.quant,
                                 quant_group=args.quant_group, share=args.share, **asdict(options))
    ppl = _evaluate(model, windows, device, args, "compressed perplexity")
    row = _row(report, dense_ppl, ppl)
    if args.out is not None:
        save_model(model, tokenizer, args.out, {"summary": row, **report.to_dict()}, dtype=args.dtype,
                   coef_bits=args.coef_bits, overwrite=args.overwrite)
    if args.json is not None:
        with atomic_file(args.json) as tmp:
            tmp.write_text(json.dumps({"summary": row, "report": report.to_dict()}, indent=1))
    _write_heatmap(args, report)
    return [row]


def _run_compress_lazy(args: argparse.Namespace, options: SolverOptions, device: torch.device,
                       group_size: int | None) -> list[dict]:
    """`compress --lazy`: pipeline/lazy.py's block-by-block run, straight into --out."""
    from .pipeline.lazy import compress_folder

    if args.out is None:
        raise CospadiError("--lazy writes the compressed blocks as they finish: give --out")
    if is_depth_method(args.method) or args.allocation not in (None, "uniform") or args.resume_dir is not None:
        raise CospadiError("--lazy works with a per-matrix method at a uniform ratio, without --resume-dir: leave "
                           "out --lazy, or those options")
    folder = builtin_model_dir(args.model) if args.model in BUILTIN_MODELS else Path(args.model).expanduser()
    if not folder.is_dir() or (folder / "cospadi.json").is_file():
        raise CospadiError(f"--lazy needs a plain safetensors model folder (or a built-in model); {args.model} is not "
                           "one")
    if args.eval_windows:
        print(f"note: --lazy measures no perplexity; run `cospadi eval --model {args.out}` afterwards",
              file=sys.stderr)
    calib_texts, _ = load_corpus(args.data)
    report = compress_folder(folder, args.out, texts=calib_texts, method=args.method, ratio=args.ratio,
                             calib_samples=args.calib_samples, seq_len=args.seq_len, batch_size=args.batch_size,
                             progress=not args.quiet, workers=args.workers, group_size=group_size, share=args.share,
                             device=device, dtype=args.dtype, coef_bits=args.coef_bits, overwrite=args.overwrite,
                             summary=lambda r: _row(r, None, None),
                             log=None if args.quiet else lambda line: print(line, file=sys.stderr),
                             **asdict(options))
    row = _row(report, None, None)
    if args.json is not None:
        with atomic_file(args.json) as tmp:
            tmp.write_text(json.dumps({"summary": row, "report": report.to_dict()}, indent=1))
    return [row]


def _print_estimate(model, args: argparse.Namespace, device: torch.device, group_size: int | None) -> None:
    """The memory estimate of the run about to start, on stderr (memory_estimate.py)."""
    if is_depth_method(args.method) or args.quiet:
        return
    threads = args.workers or (torch.get_num_threads() if device.type == "cpu" else 1)
    print(estimate_memory(model, args.calib_samples, args.seq_len, args.batch_size, group_size or 1, threads, False,
                          device).describe(), file=sys.stderr)


def _write_heatmap(args: argparse.Namespace, report: CompressionReport) -> None:
    """Without --out (whose folder holds allocation.png), a per-matrix allocation's heatmap
    goes next to --json as <json>.allocation.png; a note when matplotlib is missing."""
    if report.allocation.get("allocation", "uniform") == "uniform" or args.out is not None or args.json is None:
        return
    try:
        plot_allocation([asdict(m) for m in report.matrices], Path(args.json).with_suffix(".allocation.png"),
                        f"{report.method} at ratio {report.ratio:g}: per-matrix ratios ({report.allocation['cost']} cost)")
    except CospadiError as exc:  # matplotlib missing: the model and report are saved; say what was skipped
        print(f"note: no allocation heatmap: {exc}", file=sys.stderr)


def _profile_cache(value: str) -> str | None:
    """--profile-cache: auto -> cache_dir()/profiles, none -> None, else the folder given."""
    return {"auto": str(cache_dir() / "profiles"), "none": None}.get(value, value)


def _check_outputs(args: argparse.Namespace) -> None:
    """Refuse a bad --json or --out before the model is loaded (save checks --out again):
    see files.check_output_folder."""
    if args.json is not None:
        check_output_file(args.json, "--json file")
    if args.resume_dir is not None:
        check_resume_dir(args.resume_dir, create=False)
    if args.out is not None:
        model = Path(args.model).expanduser()
        inputs = {"the --model folder": model if model.is_dir() else None, "the --resume-dir": args.resume_dir,
                  "the --json file": args.json}
        check_output_folder(args.out, overwrite=args.overwrite, inputs=inputs, what="--out folder")


def _evaluate(model, windows: torch.Tensor | None, device: torch.device, args: argparse.Namespace,
              desc: str) -> float | None:
    """Perplexity on `windows` with the whole model visiting `device`; None without windows."""
    if windows is None:
        return None
    with visiting(model, device):
        return perplexity(model, windows, progress=not args.quiet, desc=desc)


def _row(report: CompressionReport, dense_ppl: float | None, ppl: float | None) -> dict:
    lin, mod = report.linear_ratios, report.model_ratios
    return {"method": report.method, "ratio": report.ratio,
            "eff. ratio (linears / model)": f"{lin['effective']:.3f} / {mod['effective']:.3f}",
            "storage ratio (linears / model)": f"{lin['storage']:.3f} / {mod['storage']:.3f}",
            "params (M)": f"{report.dense_params / 1e6:.1f} -> {report.compressed_params / 1e6:.1f}",
            "dense ppl": dense_ppl if dense_ppl is not None else "-", "ppl": ppl if ppl is not None else "-",
            "allocation": report.allocation.get("allocation", "uniform"),
            "time (s)": round(report.seconds, 1), "peak RSS (MiB)": round(report.peak_rss_mb)}


def run_eval(args: argparse.Namespace) -> list[dict]:
    """Token perplexity and, with --tasks, lm-eval's metrics as `<task> <metric>` columns."""
    positive("--seq-len", args.seq_len)
    positive("--eval-windows", args.eval_windows)
    tasks = None
    if args.tasks is not None:
        from .evaluation.lm_eval_runner import check_task_names, parse_tasks

        tasks = parse_tasks(args.tasks)
        for name in ("lastword_examples", "wordppl_docs", "batch_size"):
            positive("--" + name.replace("_", "-"), getattr(args, name))
        if args.limit is not None:
            positive("--limit", args.limit)
        check_task_names(tasks)  # lm-eval installed, every name known: before the model loads
    device = resolve_device(args.device)
    _, eval_texts = load_corpus(args.data)
    model, tokenizer = load_model(args.model)
    check_seq_len(model, args.seq_len)
    model.to(device)
    start = time.perf_counter()
    ppl = api.perplexity_on_texts(model, tokenizer, eval_texts, args.seq_len, args.eval_windows,
                                  progress=not args.quiet)
    row = {"model": args.model, "windows": f"{args.eval_windows} x {args.seq_len}", "token ppl": ppl}
    if tasks:
        from .evaluation.lm_eval_runner import evaluate_tasks

        results = evaluate_tasks(model, tokenizer, tasks, eval_texts, batch_size=args.batch_size, limit=args.limit,
                                 lastword_examples=args.lastword_examples, wordppl_docs=args.wordppl_docs,
                                 quiet=args.quiet)
        row.update({f"{task} {metric}": value for task, metrics in results.items() for metric, value in metrics.items()})
    return [{**row, "time (s)": round(time.perf_counter() - start, 1), "peak RSS (MiB)": round(peak_rss_mb())}]


def run_export(args: argparse.Namespace) -> list[dict]:
    """`cospadi export --dense FOLDER OUT`."""
    if not args.dense:
        raise CospadiError("choose an export format: --dense (W = D S multiplied out into plain linear layers)")
    out = export.export_dense(args.folder, args.out, args.dtype, overwrite=args.overwrite)
    files = sorted(p.name for p in out.iterdir())
    return [{"exported": str(out), "from": args.folder, "files": ", ".join(files)}]


def _launch(nproc: int, argv: list[str]) -> int:
    """`compress --nproc N`: run the same command on N processes under torchrun; its exit
    status (torchrun names a rank that failed)."""
    if nproc < 1:
        print(f"error: --nproc {nproc} must be at least 1", file=sys.stderr)
        return 2
    rest, skip = [], False
    for arg in argv:
        if skip or arg == "--nproc" or arg.startswith("--nproc="):
            skip = arg == "--nproc"
            continue
        rest.append(arg)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               "-m", "cospadi", *rest]
    return subprocess.call(command)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "nproc", None) is not None and not distributed.launched():
        return _launch(args.nproc, sys.argv[1:] if argv is None else argv)
    if args.threads is not None and args.threads < 1:
        print(f"error: --threads {args.threads} must be at least 1 (or left out: torch's choice)", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quiet:
        transformers.utils.logging.disable_progress_bar()
    try:
        commands = {"compress": run_compress, "eval": run_eval, "export": run_export, **BENCH_COMMANDS}
        rows = commands[args.command](args)
    except CospadiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # every writer is atomic: nothing half-written is left
        resumable = getattr(args, "resume_dir", None) is not None
        print("interrupted; rerun the same command to resume" if resumable else "interrupted", file=sys.stderr)
        return 130
    if rows:  # none on the ranks after the first of a distributed run
        print(results_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
