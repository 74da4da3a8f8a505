"""Measure the peak memory of block-by-block compression (issue 18, docs/scale.md) in one
command: build the random Llama checkpoint if it is missing (make_random_llama.py), run
`cospadi compress --lazy` under `/usr/bin/time -v`, and write a BENCHMARKS.md section
(peak RSS, wall time, the printed estimate, the checkpoint's bytes, and what loading it
whole would need by the same estimate) to --output.

    python benchmarks/measure_lazy_memory.py --output /tmp/lazy-memory.md

The output section replaces a section of the same marker in --output (appended otherwise)."""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM

from cospadi.memory_estimate import GiB, estimate_memory

HERE = Path(__file__).resolve().parent


def run_measured(args: argparse.Namespace) -> tuple[str, str]:
    """Run the compression under /usr/bin/time -v; (the command as written, its stderr)."""
    command = ["cospadi", "compress", "--lazy", "--model", str(args.model), "--method", args.method, "--ratio",
               str(args.ratio), "--out", str(args.out), "--eval-windows", "0", "--batch-size", str(args.batch_size),
               "--calib-samples", str(args.calib_samples), "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "cospadi", *command[1:]], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"the compression failed:\n{done.stderr[-3000:]}")
    return "OMP_NUM_THREADS=1 /usr/bin/time -v " + " ".join(command), done.stderr


def field(text: str, pattern: str) -> str:
    match = re.search(pattern, text)
    if match is None:
        sys.exit(f"no {pattern!r} in the output of /usr/bin/time")
    return match.group(1)


def estimates(folder: Path, args: argparse.Namespace) -> tuple[float, float]:
    """(GiB block by block, GiB loaded whole) by memory_estimate, as the CLI prints them."""
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32)
    cpu = torch.device("cpu")
    lazy, whole = (sum(estimate_memory(model, args.calib_samples, 512, args.batch_size, 1, 1, lazy, cpu)
                       .host.values()) / GiB for lazy in (True, False))
    return lazy, whole


def section(args: argparse.Namespace, command: str, stderr: str) -> tuple[str, str]:
    """(marker, the BENCHMARKS.md section)."""
    peak_kb = int(field(stderr, r"Maximum resident set size \(kbytes\): (\d+)"))
    elapsed = field(stderr, r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)")
    weights = sum(p.stat().st_size for p in Path(args.model).glob("*.safetensors"))
    written = sum(p.stat().st_size for p in Path(args.out).iterdir() if p.is_file())
    lazy, whole = estimates(Path(args.model), args)
    config = AutoConfig.from_pretrained(args.model)
    name = f"lazy-memory-llama-h{config.hidden_size}-l{config.num_hidden_layers}-{args.method}-{args.ratio}"
    head = (f"Block-by-block compression (`compress --lazy`) of a random-initialised Llama (hidden "
            f"{config.hidden_size}, intermediate {config.intermediate_size}, {config.num_hidden_layers} blocks, "
            f"tied embeddings; `benchmarks/make_random_llama.py`), {args.method} at {args.ratio}, "
            f"{args.calib_samples} x 512 calibration tokens, 1 thread. Peak RSS is /usr/bin/time's maximum resident "
            f"set size; {'the time was taken under load' if args.under_load else 'time on an idle machine'}.")
    rows = [
        "| checkpoint (fp32 safetensors) | output folder | peak RSS | printed estimate | loaded whole (estimate) "
        "| wall time |",
        "|---|---|---|---|---|---|",
        f"| {weights / 1e9:.2f} GB ({weights / GiB:.2f} GiB) | {written / 1e9:.2f} GB | {peak_kb * 1024 / 1e9:.2f} GB "
        f"({peak_kb / 2**20:.2f} GiB) | {lazy:.2f} GiB | {whole:.2f} GiB | {elapsed}"
        f"{' (under load)' if args.under_load else ''} |",
    ]
    reproduce = "python benchmarks/measure_lazy_memory.py --output BENCHMARKS.md " + " ".join(args.passed)
    body = "\n".join([f"<!-- bench:{name} -->", head, "", f"Reproduce: `{reproduce.strip()}`", "",
                      f"Command measured: `{command}`", "", *rows, f"<!-- /bench:{name} -->"])
    return name, body


def write(output: Path, name: str, body: str) -> None:
    """Replace the section `name` in `output`, or append it."""
    text = output.read_text() if output.is_file() else ""
    pattern = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _: body, text) if pattern.search(text) else (text.rstrip() + "\n\n" + body).lstrip()
    output.write_text(text.rstrip() + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, type=Path, help="markdown file the section goes to")
    parser.add_argument("--model", type=Path, default=Path("/tmp/llama4g"), help="built here when missing")
    parser.add_argument("--out", type=Path, default=None, help="the compressed folder (default: MODEL-METHOD)")
    parser.add_argument("--layers", type=int, default=24, help="blocks of a model built here")
    parser.add_argument("--method", default="svd-llm")
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--under-load", action="store_true", help="mark the time as taken under load")
    args = parser.parse_args()
    args.passed = [a for a in sys.argv[1:] if a not in ("--output", str(args.output))]
    args.out = args.out or Path(f"{args.model}-{args.method}")
    if not args.model.is_dir():
        subprocess.run([sys.executable, str(HERE / "make_random_llama.py"), str(args.model), "--hidden", "2048",
                        "--intermediate", "5632", "--layers", str(args.layers), "--heads", "16", "--kv-heads", "16"],
                       check=True)
    if args.out.exists():
        sys.exit(f"{args.out} exists: remove it or give another --out")
    command, stderr = run_measured(args)
    name, body = section(args, command, stderr)
    write(args.output, name, body)
    print(body)


if __name__ == "__main__":
    main()
