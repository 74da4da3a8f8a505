"""Two ranks of one thread against one rank of two threads (issue 18, docs/scale.md).

Runs `cospadi compress` on the same model, method and ratio as
  * 1 rank x 2 threads:  --threads 2
  * 2 ranks x 1 thread:  --nproc 2 --threads 1 (torch.distributed, gloo)
(and, with --with-1x1, 1 rank x 1 thread), interleaved `--repeats` times, each in a fresh
process, and writes a BENCHMARKS.md section: median wall time of each, the ratio, and
whether the saved weights and config are byte-identical between the runs (cospadi.json
and REPORT.md hold timings, so they are left out of the comparison).

Usage: python benchmarks/ranks_vs_threads.py [--model smollm2-135m] [--method cospadi]
       [--ratio 0.3] [--repeats 1] [--work runs/ranks] [--output BENCHMARKS.md]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from cospadi.bench.sweep import write_section
from cospadi.report import results_table

COMPARED = ("config.json",)  # plus every *.safetensors file


def digests(folder: Path) -> dict[str, str]:
    """sha256 of the weight files and config.json of a saved folder."""
    files = sorted(folder.glob("*.safetensors")) + [folder / n for n in COMPARED]
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def compress_argv(args: argparse.Namespace, out: Path, ranks: int, threads: int) -> list[str]:
    argv = [sys.executable, "-m", "cospadi", "compress", "--model", args.model, "--method", args.method,
            "--ratio", str(args.ratio), "--allocation", "uniform", "--eval-windows", "0", "--quiet",
            "--threads", str(threads), "--out", str(out), "--overwrite"]
    return argv + (["--nproc", str(ranks)] if ranks > 1 else [])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--method", default="cospadi")
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--with-1x1", action="store_true", help="also 1 rank x 1 thread")
    p.add_argument("--work", default="runs/ranks")
    p.add_argument("--output", default="BENCHMARKS.md")
    args = p.parse_args()
    layouts = [(1, 2), (2, 1)] + ([(1, 1)] if args.with_1x1 else [])
    seconds: dict[tuple[int, int], list[float]] = {layout: [] for layout in layouts}
    folders = {layout: Path(args.work) / f"{layout[0]}x{layout[1]}" for layout in layouts}
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    for _ in range(args.repeats):
        for layout in layouts:  # interleaved: run i of every layout, then run i + 1
            start = time.perf_counter()
            subprocess.run(compress_argv(args, folders[layout], *layout), check=True, env=env)
            seconds[layout].append(time.perf_counter() - start)
    reference = digests(folders[(1, 2)])
    base = statistics.median(seconds[(1, 2)])
    medians = {layout: statistics.median(times) for layout, times in seconds.items()}
    rows = [{"layout": f"{ranks} rank(s) x {threads} thread(s)", "wall s (median)": medians[(ranks, threads)],
             "time / (1 x 2)": medians[(ranks, threads)] / base,
             "files identical to 1 x 2": digests(folders[(ranks, threads)]) == reference}
            for ranks, threads in layouts]
    load = os.getloadavg()[0]
    command = "python benchmarks/ranks_vs_threads.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    header = (f"`{args.model}`, `{args.method}` at ratio {args.ratio:g}, uniform allocation, calibration 32 x 512 "
              f"tokens: whole `cospadi compress` wall time (process start to exit, median of {args.repeats} "
              "interleaved runs) and whether the weight files and config.json are byte-identical "
              f"(cospadi.json and REPORT.md hold timings). Load average (1 min) at the end: {load:.2f}.\n\n"
              f"Reproduce: `{command.strip()}`\n")
    write_section(Path(args.output), f"ranks-vs-threads-{Path(args.model).name}-{args.method}-{args.ratio:g}",
                  header + "\n" + results_table(rows))
    print(results_table(rows))


if __name__ == "__main__":
    main()
