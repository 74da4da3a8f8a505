"""The benchmark subcommands of the command line: `bench` (the methods x ratios sweep),
`bench-solver`, `bench-shapes` and `bench-infer`; each writes its table into BENCHMARKS.md
next to the command that reproduces it (bench/ holds the measurements)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import api
from .bench import allocation as bench_allocation
from .bench import infer as bench_infer
from .bench import pareto as bench_pareto
from .bench import plot as bench_plot
from .bench import shapes as bench_shapes
from .bench import solver as bench_solver
from .bench import sweep as bench
from .cli_common import (
    add_allocation_args,
    add_device_arg,
    add_solver_args,
    add_text_args,
    add_update_arg,
    command_line,
    parse_ratios,
    positive,
    solver_options,
    where,
)
from .devices import resolve_device
from .errors import CospadiError
from .groups import parse_share
from .report import results_table
from .solvers import SolverOptions
from .solvers.quantize import DEFAULT_GROUP


def add_bench_parsers(sub: argparse._SubParsersAction) -> None:
    """The bench, bench-solver, bench-shapes and bench-infer subcommands' options."""
    b = sub.add_parser("bench", help="sweep methods x ratios, cache each cell, write a table into BENCHMARKS.md")
    add_text_args(b)
    add_solver_args(b)
    b.add_argument("--methods", default=",".join(bench.DEFAULT_METHODS),
                   help=f"comma-separated, from {', '.join(bench.BENCH_METHODS)} (cospadi-group: cospadi per group; "
                        "rtn, gptq: quantization alone, once per --baseline-quant), "
                        f"each optionally with {bench.KNAPSACK} (per-matrix ratios; --allocation knapsack adds it to all)")
    b.add_argument("--quant", default="none",
                   help="comma-separated from none, int8, int4, int3: every method x ratio cell once per entry "
                        "(docs/quantization.md)")
    b.add_argument("--baseline-quant", default=None,
                   help="comma-separated quantizations of the rtn / gptq cells (default: --quant less none)")
    b.add_argument("--quant-group", type=int, default=DEFAULT_GROUP, help="inputs per quantization scale")
    b.add_argument("--pareto", action="store_true",
                   help="also a table and PNG of token perplexity against bytes of the linear weights, Pareto front "
                        "marked (its own section of --output; the PNG beside the sweep's)")
    b.add_argument("--group-size", type=int, default=2, help="blocks per group of basis-sharing and cospadi-group")
    b.add_argument("--share", default=None, help="linears the grouped methods share, comma-separated kinds (default: "
                   "each method's: cospadi gate,up; basis-sharing q,k,v,gate,up)")
    add_allocation_args(b, f"knapsack: add {bench.KNAPSACK} to every label (a label without it runs uniform)")
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
    s.add_argument("--configs", default="default,paper", help=f"comma-separated: {', '.join(bench_solver.CONFIG_NAMES)}")
    add_update_arg(s)
    s.add_argument("--repeats", type=int, default=3, help="timed runs per cell (the median is reported)")
    s.add_argument("--paper-repeats", type=int, default=1, help="timed runs of the slow paper reference")
    s.add_argument("--calib-samples", type=int, default=api.DEFAULT_CALIB_SAMPLES)
    s.add_argument("--seq-len", type=int, default=api.DEFAULT_SEQ_LEN)
    s.add_argument("--seed", type=int, default=42)
    s.add_argument("--cache", default="runs/grams", help="folder caching the block's Gram matrices")
    s.add_argument("--output", default="BENCHMARKS.md", help="Markdown file to write the table into")
    s.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    add_device_arg(s, "the solvers")
    h = sub.add_parser("bench-shapes", help="the dictionary solver at real models' shapes (overcomplete gate/up): "
                       "time and error against svd-llm and the complete dictionary")
    h.add_argument("--model", default="smollm2-135m", help="model whose block 15 gives the real matrices")
    h.add_argument("--cases", default=",".join(bench_shapes.DEFAULT_CASES),
                   help=f"comma-separated, from {', '.join(bench_shapes.CASES)}; none: only --estimate")
    h.add_argument("--ratios", default="0.2,0.3", help="comma-separated ratios")
    h.add_argument("--configs", default=",".join(bench_shapes.DEFAULT_CONFIGS),
                   help=f"comma-separated, from {', '.join(bench_shapes.CONFIGS)}")
    add_update_arg(h)
    h.add_argument("--estimate", action="store_true",
                   help="also the whole-model solver time estimate at Qwen2.5-0.5B's shapes")
    h.add_argument("--repeats", type=int, default=1, help="timed runs per cell (the median is reported)")
    h.add_argument("--seed", type=int, default=42, help="seed of the calibration windows and random matrices")
    h.add_argument("--cache", default="runs/grams", help="folder caching the block's Gram matrices")
    h.add_argument("--output", default="BENCHMARKS.md", help="Markdown file to write the tables into")
    h.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    h.add_argument("--quiet", action="store_true", help="no progress lines")
    add_device_arg(h, "the solvers")
    a = sub.add_parser("bench-allocation", help="knapsack costs scored on a validation split of the calibration "
                       "text, and how well the profile's proxy ranks against the dictionary solver")
    a.add_argument("--model", default="smollm2-135m", help="built-in name, local folder or hub id")
    a.add_argument("--data", default="wiki", help="'wiki' (built-in) or a .txt / .jsonl file")
    a.add_argument("--parts", default="costs,proxy", help="comma-separated: costs, proxy, time")
    a.add_argument("--methods", default="svd-llm,cospadi", help="methods whose costs are compared")
    a.add_argument("--ratios", default="0.3", help="comma-separated ratios of the cost comparison")
    a.add_argument("--calib-samples", type=int, default=api.DEFAULT_CALIB_SAMPLES, help="calibration windows")
    a.add_argument("--seq-len", type=int, default=api.DEFAULT_SEQ_LEN, help="tokens per window")
    a.add_argument("--time-ratio", type=float, default=0.3, help="ratio of the time comparison")
    a.add_argument("--time-repeats", type=int, default=1, help="alternating runs per allocation in the time part")
    a.add_argument("--validation-windows", type=int, default=16, help="validation windows scoring the costs")
    a.add_argument("--proxy-blocks", default="3,15,27", help="blocks whose matrices test the proxy")
    a.add_argument("--proxy-ratios", default="0.1,0.3,0.5,0.7", help="ratios at which the proxy is tested")
    a.add_argument("--seed", type=int, default=42, help="seed of the calibration windows")
    add_update_arg(a)
    a.add_argument("--cache", default="runs/allocation", help="folder caching profiles and block Grams")
    a.add_argument("--output", default="BENCHMARKS.md", help="Markdown file to write the tables into")
    a.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    a.add_argument("--quiet", action="store_true", help="no progress bars")
    bench_infer.add_arguments(sub.add_parser("bench-infer", help="dense vs svd-llm vs cospadi: bytes on disk, "
                                             "decode and prefill speed, memory; written into BENCHMARKS.md"))


def run_bench(args: argparse.Namespace) -> list[dict]:
    options = solver_options(args)
    ratios = tuple(parse_ratios(args.ratios))
    methods = [m + bench.KNAPSACK if args.allocation == "knapsack" and not m.endswith(bench.KNAPSACK) else m
               for m in args.methods.split(",")]
    sweep = bench.Sweep(model=args.model, data=args.data, methods=tuple(methods), ratios=ratios, cost=args.cost,
                        calib_samples=args.calib_samples, seq_len=args.seq_len, eval_windows=args.eval_windows,
                        options=options, group_size=args.group_size, lastword_examples=args.lastword_examples,
                        wordppl_docs=args.wordppl_docs, quants=tuple(args.quant.split(",")),
                        quant_group=args.quant_group, share=parse_share(args.share),
                        baseline_quants=None if args.baseline_quant is None else tuple(args.baseline_quant.split(",")))
    sweep.check()
    output = Path(args.output)
    plot = None if args.plot == "none" else (
        output.parent / "benchmarks" / f"{sweep.section}.png" if args.plot == "auto" else Path(args.plot))
    if plot is not None:
        bench_plot.check_matplotlib()
    cells = bench.run_sweep(sweep, Path(args.cache), progress=not args.quiet)
    rows = bench.table_rows(cells)
    command = command_line("bench")
    body = bench.describe(sweep, command, cells) + "\n" + results_table(rows)
    if plot is not None:
        bench_plot.plot_sweep(cells, plot, f"{Path(sweep.model).name}: {sweep.calib_samples} x {sweep.seq_len} "
                              "calibration tokens")
        body += f"\n\n![perplexity against ratio]({os.path.relpath(plot.resolve(), output.resolve().parent)})"
    bench.write_section(output, sweep.section, body)
    if args.pareto:
        _write_pareto(sweep, cells, output, None if plot is None else plot.with_name(f"{plot.stem}-pareto.png"), command)
    return rows


def _write_pareto(sweep: bench.Sweep, cells: list[dict], output: Path, plot: Path | None, command: str) -> None:
    """`bench --pareto`: the perplexity-against-bytes table (and PNG) in its own section."""
    header = ("Token perplexity against bytes of the compressed linears' weights as a bf16 folder stores them "
              "(floats at 2 bytes, bitmask, packed codes and bf16 scales at their size; biases excluded); "
              "Pareto front = no other point both smaller and better (bench/pareto.py, docs/quantization.md). "
              f"Cells as in the sweep section {sweep.section}.\n\nReproduce: `{command}`\n")
    body = header + "\n" + results_table(bench_pareto.pareto_rows(cells))
    if plot is not None:
        bench_pareto.plot_pareto(cells, plot, f"{Path(sweep.model).name}: token perplexity against bytes")
        body += f"\n\n![perplexity against bytes]({os.path.relpath(plot.resolve(), output.resolve().parent)})"
    bench.write_section(output, f"{sweep.section}-pareto", body)


def run_bench_solver(args: argparse.Namespace) -> list[dict]:
    unknown = [c for c in args.configs.split(",") if c not in bench_solver.CONFIG_NAMES]
    if unknown:
        raise CospadiError(f"unknown solver config {unknown[0]!r}; choose from {', '.join(bench_solver.CONFIG_NAMES)}")
    positive("--repeats", args.repeats)
    positive("--paper-repeats", args.paper_repeats)
    ratios = parse_ratios(args.ratios)
    device = resolve_device(args.device)
    matrices = bench_solver.block_matrices(args.model, args.block, args.calib_samples, args.seq_len, args.seed,
                                           Path(args.cache))
    rows = bench_solver.compare(matrices, args.matrices.split(","), ratios,
                                {c: bench_solver.configs(args.update)[c] for c in args.configs.split(",")}, args.repeats,
                                args.paper_repeats, device)
    header = (f"Block {args.block} of `{args.model}`, Grams from {args.calib_samples} x {args.seq_len} calibration "
              f"tokens; error = ||X(W - W')|| / ||X W||; seconds = median of {args.repeats} "
              f"runs (paper reference: {args.paper_repeats}); "
              f"{where(device)}.\n\nReproduce: `{command_line('bench-solver')}`\n")
    name = f"solver-{Path(args.model).name}-block{args.block}-{args.ratios}-{args.configs}{bench.update_suffix(args.update)}"
    bench.write_section(Path(args.output), name, header + "\n" + results_table(rows))
    return rows


def run_bench_shapes(args: argparse.Namespace) -> list[dict]:
    """`cospadi bench-shapes`: see bench/shapes.py. The comparison (unless --cases none)
    and the --estimate each go into their own BENCHMARKS.md section."""
    configs = args.configs.split(",")
    unknown = [c for c in configs if c not in bench_shapes.CONFIGS]
    if unknown:
        raise CospadiError(f"unknown config {unknown[0]!r}; choose from {', '.join(bench_shapes.CONFIGS)}")
    positive("--repeats", args.repeats)
    ratios = parse_ratios(args.ratios)
    device = resolve_device(args.device)
    options = SolverOptions(update=args.update)
    command = command_line("bench-shapes")
    rows: list[dict] = []
    if args.cases != "none":
        cases = bench_shapes.load_cases(args.cases.split(","), args.model, Path(args.cache), args.seed)
        say = (lambda text: None) if args.quiet else (lambda text: print(text, file=sys.stderr, flush=True))
        rows = bench_shapes.compare_shapes(cases, ratios, configs, args.repeats, device, options, progress=say)
        header = (f"Solver time per matrix (median of {args.repeats}) and relative output error ||X(W - W')|| / "
                  f"||X W||; default = the cospadi solver with --update {args.update}; complete = the same with k = d1 "
                  f"atoms and the same s; mod / sweeps = the default with block (MOD) updates of all atoms / "
                  f"atom-by-atom K-SVD sweeps; before = the k > d1 "
                  f"path the overcomplete start replaced (SVD start, one Batch-OMP alternation); {where(device)}.\n\n"
                  f"Reproduce: `{command}`\n")
        bench.write_section(Path(args.output), f"shapes-{args.cases}-{args.ratios}{bench.update_suffix(args.update)}",
                            header + "\n" + results_table(rows))
    if args.estimate:
        estimate = bench_shapes.estimate_model(0.3, args.repeats, device, options, seed=args.seed)
        estimate.append(bench_shapes.pipeline_estimate(0.3, seed=args.seed, options=options))
        header = (f"Whole-model time at ratio 0.3 for a model with Qwen2.5-0.5B's shapes, cospadi with --update "
                  f"{args.update}: solver seconds per matrix "
                  f"(random weights, synthetic Grams, {where(device)}) times 24 blocks; then the whole compression "
                  "(calibration, solving on the pipeline's worker threads, propagation) measured on a random 2-block "
                  f"model of those shapes with 32 x 512 random tokens, times 12.\n\nReproduce: `{command}`\n")
        bench.write_section(Path(args.output), f"shapes-estimate-qwen2.5-0.5b{bench.update_suffix(args.update)}",
                            header + "\n" + results_table(estimate))
        if not rows:
            return estimate
        print(results_table(estimate))  # main prints the comparison
    return rows


def run_bench_allocation(args: argparse.Namespace) -> list[dict]:
    """`cospadi bench-allocation`: see bench/allocation.py; each part its own section."""
    parts = args.parts.split(",")
    if not parts or any(p not in ("costs", "proxy", "time") for p in parts):
        raise CospadiError(f"--parts {args.parts!r}: give a comma-separated subset of costs,proxy,time")
    for name in ("calib_samples", "seq_len", "validation_windows", "time_repeats"):
        positive("--" + name.replace("_", "-"), getattr(args, name))
    options = SolverOptions(seed=args.seed, update=args.update)
    command, rows = command_line("bench-allocation"), []
    suffix = f"{Path(args.model).name}{bench.update_suffix(args.update)}"  # the sections' names
    if "costs" in parts:
        rows = bench_allocation.compare_costs(args.model, args.data, args.methods.split(","), parse_ratios(args.ratios),
                                              args.calib_samples, args.seq_len, args.validation_windows, options,
                                              Path(args.cache), progress=not args.quiet)
        header = (f"`{args.model}`, calibration {args.calib_samples} x {args.seq_len} tokens from the first 90% of "
                  f"the {args.data} calibration documents; validation perplexity on {args.validation_windows} x "
                  f"{args.seq_len} tokens of the last 10% (never the held-out evaluation split). Seconds include "
                  "profiling where the profile was not cached yet (the first knapsack row of each method).\n\n"
                  f"Reproduce: `{command}`\n")
        bench.write_section(Path(args.output), f"allocation-costs-{suffix}", header + "\n" +
                            results_table(rows))
    if "proxy" in parts:
        blocks = [int(b) for b in args.proxy_blocks.split(",")]
        pairs, summary = bench_allocation.proxy_agreement(args.model, blocks, parse_ratios(args.proxy_ratios),
                                                          args.calib_samples, args.seq_len, args.seed,
                                                          Path(args.cache), options)
        header = (f"Blocks {args.proxy_blocks} of `{args.model}`, every target matrix at ratios {args.proxy_ratios}: "
                  "the relative error ||X(W - W')|| / ||X W|| the profile's proxy predicts (orthogonal dictionary, "
                  "one SVD) against the default cospadi solver's.\n\n"
                  f"Reproduce: `{command}`\n")
        bench.write_section(Path(args.output), f"allocation-proxy-{suffix}", header + "\n" +
                            results_table([summary]) + "\n\n" + results_table(pairs))
        rows = rows or [summary]
    if "time" in parts:
        timed = bench_allocation.time_allocations(args.model, args.data, args.methods.split(","), args.time_ratio,
                                                  args.calib_samples, args.seq_len, args.time_repeats, options,
                                                  progress=not args.quiet)
        header = (f"`{args.model}` at ratio {args.time_ratio}, calibration {args.calib_samples} x {args.seq_len} "
                  "tokens: whole-model compression time, uniform against knapsack with the profile measured afresh "
                  "(no cache), alternating in one process; torch threads as set.\n\n"
                  f"Reproduce: `{command}`\n")
        bench.write_section(Path(args.output), f"allocation-time-{suffix}", header + "\n" +
                            results_table(timed))
        rows = rows or timed
    return rows


def run_bench_infer(args: argparse.Namespace) -> list[dict]:
    """`cospadi bench-infer`: see bench/infer.py."""
    command = command_line("bench-infer")
    return bench_infer.run(bench_infer.from_args(args), Path(args.work), Path(args.output), command,
                           progress=not args.quiet)


BENCH_COMMANDS = {"bench": run_bench, "bench-allocation": run_bench_allocation, "bench-solver": run_bench_solver,
                  "bench-shapes": run_bench_shapes,
                  "bench-infer": run_bench_infer}
