"""`cospadi` command line: a thin layer over the Python API (api.py)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

import torch
import transformers

from . import api
from .bench import infer as bench_infer
from .bench import plot as bench_plot
from .bench import shapes as bench_shapes
from .bench import solver as bench_solver
from .bench import sweep as bench
from .budget import check_ratio
from .data import load_corpus
from .devices import resolve_device, visiting
from .errors import CospadiError
from .evaluation.perplexity import perplexity
from .groups import resolve_group_size
from .methods import get_method, method_names
from .models import load_model
from .pipeline import Recipe, check_recipe
from .report import CompressionReport, peak_rss_mb, results_table
from .solvers import SolverOptions
from .storage import export
from .storage.checkpoint import DTYPES, parse_dtype, save


def _add_text_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="built-in name (smollm2-135m, gemma3-270m), local folder, or hub id")
    p.add_argument("--data", default="wiki", help="'wiki' (built-in) or a .txt / .jsonl file")
    p.add_argument("--seq-len", type=int, default=api.DEFAULT_SEQ_LEN, help="tokens per window")
    p.add_argument("--eval-windows", type=int, default=api.DEFAULT_EVAL_WINDOWS,
                   help="held-out windows for perplexity (0: skip evaluation)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_solver_args(p: argparse.ArgumentParser) -> None:
    """One flag per SolverOptions field (--power-iters for power_iters), its default and
    help taken from the field: solvers/options.py is the only place they are written."""
    for option in fields(SolverOptions):
        p.add_argument("--" + option.name.replace("_", "-"), type=type(option.default), default=option.default,
                       help=option.metadata["help"])
    p.add_argument("--workers", type=int, default=None, help="matrices solved at once (default: torch threads)")


def _add_device_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--device", default="auto",
                   help=f"where {what} runs: auto (CUDA when present, else CPU), cpu, cuda or cuda:N")


def _solver_options(args: argparse.Namespace) -> SolverOptions:
    return SolverOptions(**{option.name: getattr(args, option.name) for option in fields(SolverOptions)})


class _DefaultsFormatter(argparse.HelpFormatter):
    """Help that ends each option with its default, unless the default is unset (None,
    a flag's False) or the help already says what happens by default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS \
                or "default" in text:
            return text
        return text + " (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser (and, through add_subparsers, subcommand parsers) whose --help
    shows every option's default."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cospadi", description="Training-free LLM compression with "
                                     "calibration-guided sparse dictionaries (CoSpaDi) and low-rank baselines.")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compress", help="compress a model and report ratio, perplexity, time and memory")
    _add_text_args(c)
    c.add_argument("--method", default="cospadi", help=f"one of {', '.join(method_names())}")
    c.add_argument("--group-size", type=int, default=None,
                   help="consecutive blocks whose q/k/v/gate/up share one dictionary (cospadi) or basis "
                        "(basis-sharing); o/down stay per layer (default: 2 for basis-sharing, else 1 = per layer; "
                        "paper: 2); a last group is shorter when it does not divide the blocks")
    c.add_argument("--ratio", type=float, default=0.3, help="fraction of each linear's weights removed, in (0, 1)")
    _add_solver_args(c)
    _add_device_arg(c, "calibration, the solvers and evaluation (the model itself stays on the CPU; one block at a "
                       "time visits the device)")
    c.add_argument("--calib-samples", type=int, default=api.DEFAULT_CALIB_SAMPLES,
                   help="calibration windows (paper: 256)")
    c.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward pass")
    c.add_argument("--out", default=None, help="save the compressed model to this folder")
    c.add_argument("--json", default=None, help="write the full report (per matrix) to this JSON file")
    c.add_argument("--resume-dir", default=None,
                   help="save progress here after every block; rerunning the same command resumes from it")
    c.add_argument("--dtype", default=None, choices=list(DTYPES),
                   help="storage dtype of --out (default: the model's own, so the reload is exact)")
    c.add_argument("--coef-bits", type=int, default=None, choices=[14],
                   help="store the values of S in 14 bits (bf16 less 2 mantissa bits; pays for the bitmask)")
    b = sub.add_parser("bench", help="sweep methods x ratios, cache each cell, write a table into BENCHMARKS.md")
    _add_text_args(b)
    _add_solver_args(b)
    b.add_argument("--methods", default=",".join(bench.BENCH_METHODS),
                   help=f"comma-separated, from {', '.join(bench.BENCH_METHODS)} (cospadi-group: cospadi per group)")
    b.add_argument("--group-size", type=int, default=2, help="blocks per group of basis-sharing and cospadi-group")
    b.add_argument("--lastword-examples", type=int, default=bench.DEFAULT_LASTWORD_EXAMPLES,
                   help="last-word accuracy passages per cell (lm-eval, offline; 0: skip)")
    b.add_argument("--wordppl-docs", type=int, default=bench.DEFAULT_WORDPPL_DOCS,
                   help="held-out documents for lm-eval's word perplexity per cell (0: skip)")
    b.add_argument("--plot", default="auto",
                   help="PNG to draw (auto: benchmarks/<sweep>.png beside --output; none: no plot)")
    b.add_argument("--ratios", default="0.2,0.3,0.4,0.5", help="comma-separated ratios")
    b.add_argument("--calib-samples", type=int, default=api.DEFAULT_CALIB_SAMPLES, help="calibration windows")
    b.add_argument("--cache", default="runs/bench", help="folder of finished cells (a rerun skips them)")
    b.add_argument("--output", default="BENCHMARKS.md", help="Markdown file to write the table into")
    s = sub.add_parser("bench-solver", help="solver settings on one block's real matrices and Grams, side by side")
    s.add_argument("--model", default="smollm2-135m", help="built-in name, local folder or hub id")
    s.add_argument("--block", type=int, default=15, help="which block's matrices (default 15, SmolLM2's middle)")
    s.add_argument("--matrices", default="self_attn.q_proj,self_attn.o_proj,mlp.gate_proj,mlp.down_proj")
    s.add_argument("--ratios", default="0.3", help="comma-separated ratios")
    s.add_argument("--configs", default="default,paper", help=f"comma-separated: {', '.join(bench_solver.CONFIGS)}")
    s.add_argument("--repeats", type=int, default=3, help="timed runs per cell (the median is reported)")
    s.add_argument("--paper-repeats", type=int, default=1, help="timed runs of the slow paper reference")
    s.add_argument("--calib-samples", type=int, default=api.DEFAULT_CALIB_SAMPLES)
    s.add_argument("--seq-len", type=int, default=api.DEFAULT_SEQ_LEN)
    s.add_argument("--seed", type=int, default=42)
    s.add_argument("--cache", default="runs/grams", help="folder caching the block's Gram matrices")
    s.add_argument("--output", default="BENCHMARKS.md", help="Markdown file to write the table into")
    s.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_device_arg(s, "the solvers")
    h = sub.add_parser("bench-shapes", help="the dictionary solver at real models' shapes (overcomplete gate/up): "
                       "time and error against svd-llm and the complete dictionary")
    h.add_argument("--model", default="smollm2-135m", help="model whose block 15 gives the real matrices")
    h.add_argument("--cases", default=",".join(bench_shapes.DEFAULT_CASES),
                   help=f"comma-separated, from {', '.join(bench_shapes.CASES)}; none: only --estimate")
    h.add_argument("--ratios", default="0.2,0.3", help="comma-separated ratios")
    h.add_argument("--configs", default=",".join(bench_shapes.CONFIGS),
                   help=f"comma-separated, from {', '.join(bench_shapes.CONFIGS)}")
    h.add_argument("--estimate", action="store_true",
                   help="also the whole-model solver time estimate at Qwen2.5-0.5B's shapes")
    h.add_argument("--repeats", type=int, default=1, help="timed runs per cell (the median is reported)")
    h.add_argument("--seed", type=int, default=42, help="seed of the calibration windows and random matrices")
    h.add_argument("--cache", default="runs/grams", help="folder caching the block's Gram matrices")
    h.add_argument("--output", default="BENCHMARKS.md", help="Markdown file to write the tables into")
    h.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    h.add_argument("--quiet", action="store_true", help="no progress lines")
    _add_device_arg(h, "the solvers")
    e = sub.add_parser("eval", help="perplexity (and lm-eval tasks) of a model or of a saved cospadi output folder")
    _add_text_args(e)
    _add_device_arg(e, "the model")
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
    x.add_argument("out", help="the folder to write")
    x.add_argument("--dtype", default=None, choices=list(DTYPES), help="dtype of the export (default: as saved)")
    x.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    x.add_argument("--quiet", action="store_true", help="no progress bars")
    bench_infer.add_arguments(sub.add_parser("bench-infer", help="dense vs svd-llm vs cospadi: bytes on disk, "
                                             "decode and prefill speed, memory; written into BENCHMARKS.md"))
    return parser


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise CospadiError(f"{name} {value} must be at least 1")


def run_compress(args: argparse.Namespace) -> list[dict]:
    """Validate everything cheap first, then load, evaluate, compress, evaluate, save."""
    check_ratio(args.ratio)
    options = _solver_options(args)
    method = get_method(args.method)
    if args.eval_windows < 0:
        raise CospadiError(f"--eval-windows {args.eval_windows} must be 0 (skip) or more")
    for name in ("calib_samples", "seq_len", "batch_size"):
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    parse_dtype(args.dtype)
    device = resolve_device(args.device)
    group_size = resolve_group_size(method, args.group_size)
    calib_texts, eval_texts = load_corpus(args.data)
    model, tokenizer = load_model(args.model)
    check_recipe(model, Recipe(args.method, args.ratio, options, group_size))  # before the minutes of dense evaluation
    ids = api.calibration_ids(model, tokenizer, calib_texts, args.calib_samples, args.seq_len, args.seed)
    windows = api.evaluation_ids(model, tokenizer, eval_texts, args.seq_len, args.eval_windows) \
        if args.eval_windows else None
    dense_ppl = _evaluate(model, windows, device, args, "dense perplexity")
    model, report = api.compress(model, tokenizer, input_ids=ids, method=args.method, ratio=args.ratio,
                                 batch_size=args.batch_size, progress=not args.quiet, workers=args.workers,
                                 group_size=group_size, resume_dir=args.resume_dir, device=device,
                                 **asdict(options))
    ppl = _evaluate(model, windows, device, args, "compressed perplexity")
    row = _row(report, dense_ppl, ppl)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"summary": row, "report": report.to_dict()}, fh, indent=1)
    if args.out:
        save(model, tokenizer, args.out, {"summary": row, **report.to_dict()}, dtype=args.dtype,
             coef_bits=args.coef_bits)
    return [row]


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
            "time (s)": round(report.seconds, 1), "peak RSS (MiB)": round(report.peak_rss_mb)}


def run_eval(args: argparse.Namespace) -> list[dict]:
    """Token perplexity and, with --tasks, lm-eval's metrics as `<task> <metric>` columns."""
    _positive("--seq-len", args.seq_len)
    _positive("--eval-windows", args.eval_windows)
    tasks = None
    if args.tasks is not None:
        from .evaluation.lm_eval_runner import parse_tasks, require_lm_eval

        tasks = parse_tasks(args.tasks)
        for name in ("lastword_examples", "wordppl_docs", "batch_size"):
            _positive("--" + name.replace("_", "-"), getattr(args, name))
        if args.limit is not None:
            _positive("--limit", args.limit)
        require_lm_eval()
    device = resolve_device(args.device)
    _, eval_texts = load_corpus(args.data)
    model, tokenizer = load_model(args.model)
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


def run_bench(args: argparse.Namespace) -> list[dict]:
    options = _solver_options(args)
    ratios = tuple(_ratios(args.ratios))
    sweep = bench.Sweep(model=args.model, data=args.data, methods=tuple(args.methods.split(",")), ratios=ratios,
                        calib_samples=args.calib_samples, seq_len=args.seq_len, eval_windows=args.eval_windows,
                        options=options, group_size=args.group_size, lastword_examples=args.lastword_examples,
                        wordppl_docs=args.wordppl_docs)
    sweep.check()
    output = Path(args.output)
    plot = None if args.plot == "none" else (
        output.parent / "benchmarks" / f"{sweep.key}.png" if args.plot == "auto" else Path(args.plot))
    if plot is not None:
        bench_plot.check_matplotlib()
    cells = bench.run_sweep(sweep, Path(args.cache), progress=not args.quiet)
    rows = bench.table_rows(cells)
    command = _command("bench")
    body = bench.describe(sweep, command, cells) + "\n" + results_table(rows)
    if plot is not None:
        bench_plot.plot_sweep(cells, plot, f"{Path(sweep.model).name}: {sweep.calib_samples} x {sweep.seq_len} "
                              "calibration tokens")
        body += f"\n\n![perplexity against ratio]({os.path.relpath(plot.resolve(), output.resolve().parent)})"
    bench.write_section(output, sweep.key, body)
    return rows


def _ratios(text: str) -> list[float]:
    try:
        values = [float(r) for r in text.split(",")]
    except ValueError:
        raise CospadiError(f"--ratios {text!r} must be comma-separated numbers, e.g. 0.2,0.3") from None
    for value in values:
        check_ratio(value)
    return values


def run_bench_solver(args: argparse.Namespace) -> list[dict]:
    unknown = [c for c in args.configs.split(",") if c not in bench_solver.CONFIGS]
    if unknown:
        raise CospadiError(f"unknown solver config {unknown[0]!r}; choose from {', '.join(bench_solver.CONFIGS)}")
    _positive("--repeats", args.repeats)
    _positive("--paper-repeats", args.paper_repeats)
    ratios = _ratios(args.ratios)
    device = resolve_device(args.device)
    matrices = bench_solver.block_matrices(args.model, args.block, args.calib_samples, args.seq_len, args.seed,
                                           Path(args.cache))
    rows = bench_solver.compare(matrices, args.matrices.split(","), ratios,
                                {c: bench_solver.CONFIGS[c] for c in args.configs.split(",")}, args.repeats,
                                args.paper_repeats, device)
    header = (f"Block {args.block} of `{args.model}`, Grams from {args.calib_samples} x {args.seq_len} calibration "
              f"tokens; error = ||X(W - W')|| / ||X W||; seconds = median of {args.repeats} "
              f"runs (paper reference: {args.paper_repeats}); "
              f"{_where(device)}.\n\nReproduce: `{_command('bench-solver')}`\n")
    name = f"solver-{Path(args.model).name}-block{args.block}-{args.ratios}-{args.configs}"
    bench.write_section(Path(args.output), name, header + "\n" + results_table(rows))
    return rows


def run_bench_shapes(args: argparse.Namespace) -> list[dict]:
    """`cospadi bench-shapes`: see bench/shapes.py. The comparison (unless --cases none)
    and the --estimate each go into their own BENCHMARKS.md section."""
    configs = args.configs.split(",")
    unknown = [c for c in configs if c not in bench_shapes.CONFIGS]
    if unknown:
        raise CospadiError(f"unknown config {unknown[0]!r}; choose from {', '.join(bench_shapes.CONFIGS)}")
    _positive("--repeats", args.repeats)
    ratios = _ratios(args.ratios)
    device = resolve_device(args.device)
    command = _command("bench-shapes")
    rows: list[dict] = []
    if args.cases != "none":
        cases = bench_shapes.load_cases(args.cases.split(","), args.model, Path(args.cache), args.seed)
        say = (lambda text: None) if args.quiet else (lambda text: print(text, file=sys.stderr, flush=True))
        rows = bench_shapes.compare_shapes(cases, ratios, configs, args.repeats, device, progress=say)
        header = (f"Solver time per matrix (median of {args.repeats}) and relative output error ||X(W - W')|| / "
                  f"||X W||; complete = the default solver with k = d1 atoms and the same s; before = the k > d1 "
                  f"path this replaced (SVD start, one Batch-OMP alternation); {_where(device)}.\n\n"
                  f"Reproduce: `{command}`\n")
        bench.write_section(Path(args.output), f"shapes-{args.cases}-{args.ratios}", header + "\n" + results_table(rows))
    if args.estimate:
        estimate = bench_shapes.estimate_model(0.3, args.repeats, device, seed=args.seed)
        estimate.append(bench_shapes.pipeline_estimate(0.3, seed=args.seed))
        header = ("Whole-model time at ratio 0.3 for a model with Qwen2.5-0.5B's shapes: solver seconds per matrix "
                  f"(random weights, synthetic Grams, {_where(device)}) times 24 blocks; then the whole compression "
                  "(calibration, solving on the pipeline's worker threads, propagation) measured on a random 2-block "
                  f"model of those shapes with 32 x 512 random tokens, times 12.\n\nReproduce: `{command}`\n")
        bench.write_section(Path(args.output), "shapes-estimate-qwen2.5-0.5b", header + "\n" + results_table(estimate))
        if not rows:
            return estimate
        print(results_table(estimate))  # main prints the comparison
    return rows


def _command(subcommand: str) -> str:
    """The command line that reproduces this run, for a benchmark's header: this process's
    arguments when it is `cospadi <subcommand> ...`, else the bare subcommand (API calls)."""
    return "cospadi " + " ".join(sys.argv[1:]) if sys.argv[1:2] == [subcommand] else f"cospadi {subcommand}"


def _where(device: torch.device) -> str:
    """What the solvers ran on, for a benchmark's header."""
    if device.type == "cuda":
        return f"on {torch.cuda.get_device_name(device)}"
    return f"on {device.type.upper()}, {torch.get_num_threads()} threads"


def run_export(args: argparse.Namespace) -> list[dict]:
    """`cospadi export --dense FOLDER OUT`."""
    if not args.dense:
        raise CospadiError("choose an export format: --dense (W = D S multiplied out into plain linear layers)")
    out = export.export_dense(args.folder, args.out, args.dtype)
    files = sorted(p.name for p in out.iterdir())
    return [{"exported": str(out), "from": args.folder, "files": ", ".join(files)}]


def run_bench_infer(args: argparse.Namespace) -> list[dict]:
    """`cospadi bench-infer`: see bench/infer.py."""
    command = _command("bench-infer")
    return bench_infer.run(bench_infer.from_args(args), Path(args.work), Path(args.output), command,
                           progress=not args.quiet)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quiet:
        transformers.utils.logging.disable_progress_bar()
    try:
        rows = {"compress": run_compress, "eval": run_eval, "bench": run_bench,
                "bench-solver": run_bench_solver, "bench-shapes": run_bench_shapes, "export": run_export,
                "bench-infer": run_bench_infer}[args.command](args)
    except CospadiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(results_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
