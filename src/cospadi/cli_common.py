"""What the command line's subcommands share: the parser class whose --help shows every
default, the argument groups (model and text, solver options generated from
SolverOptions, device), and small parsing and labelling helpers."""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields

import torch

from . import api
from .allocation import ALLOCATIONS, COSTS, DEFAULT_COST
from .budget import check_ratio
from .errors import CospadiError
from .solvers import SolverOptions
from .solvers.options import UPDATES


def add_text_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="built-in name (smollm2-135m, gemma3-270m), local folder, or hub id")
    p.add_argument("--data", default="wiki", help="'wiki' (built-in) or a .txt / .jsonl file")
    p.add_argument("--seq-len", type=int, default=api.DEFAULT_SEQ_LEN, help="tokens per window")
    p.add_argument("--eval-windows", type=int, default=api.DEFAULT_EVAL_WINDOWS,
                   help="held-out windows for perplexity (0: skip evaluation)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_solver_args(p: argparse.ArgumentParser) -> None:
    """One flag per SolverOptions field (--power-iters for power_iters), its default and
    help taken from the field: solvers/options.py is the only place they are written."""
    for option in fields(SolverOptions):
        p.add_argument("--" + option.name.replace("_", "-"), type=type(option.default), default=option.default,
                       help=option.metadata["help"])
    p.add_argument("--workers", type=int, default=None, help="matrices solved at once (default: torch threads)")


def add_update_arg(p: argparse.ArgumentParser) -> None:
    """--update alone, for the benchmarks that run the dictionary solver under fixed
    configurations: figures taken before `mod` became the default reproduce with ksvd."""
    default = SolverOptions().update
    p.add_argument("--update", default=default, choices=list(UPDATES),
                   help=f"dictionary update of the cospadi solver (default: {default}; ksvd: the atom-by-atom "
                        "sweeps of the figures taken before mod became the default)")


def add_allocation_args(p: argparse.ArgumentParser, allocation_help: str | None = None) -> None:
    """--allocation, --cost and --profile-cache (docs/allocation.md); `allocation_help`
    replaces --allocation's help (bench, where labels carry the allocation)."""
    p.add_argument("--allocation", default=None, choices=list(ALLOCATIONS),
                   help=allocation_help or ("knapsack: each matrix its own ratio (0 = dense, up to 0.9) from a "
                                            "profile of its errors, the total still removing --ratio; uniform: every "
                                            "matrix at --ratio. Default: knapsack (uniform for plain replaceme, "
                                            "--lazy and --nproc, which cannot profile the whole model first)"))
    p.add_argument("--cost", default=DEFAULT_COST, choices=list(COSTS),
                   help="what the knapsack minimises: fisher (error x loss sensitivity) or normalized (relative error)")


def add_device_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--device", default="auto",
                   help=f"where {what} runs: auto (CUDA when present, else CPU), cpu, cuda or cuda:N")


def solver_options(args: argparse.Namespace) -> SolverOptions:
    return SolverOptions(**{option.name: getattr(args, option.name) for option in fields(SolverOptions)})


class DefaultsFormatter(argparse.HelpFormatter):
    """Help that ends each option with its default, unless the default is unset (None,
    a flag's False) or the help already says what happens by default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS \
                or "default" in text:
            return text
        return text + " (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser (and, through add_subparsers, subcommand parsers) whose --help
    shows every option's default."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]


def positive(name: str, value: int) -> None:
    if value < 1:
        raise CospadiError(f"{name} {value} must be at least 1")


def parse_ratios(text: str) -> list[float]:
    try:
        values = [float(r) for r in text.split(",")]
    except ValueError:
        raise CospadiError(f"--ratios {text!r} must be comma-separated numbers, e.g. 0.2,0.3") from None
    for value in values:
        check_ratio(value)
    return values


def command_line(subcommand: str) -> str:
    """The command line that reproduces this run, for a benchmark's header: this process's
    arguments when it is `cospadi <subcommand> ...`, else the bare subcommand (API calls)."""
    return "cospadi " + " ".join(sys.argv[1:]) if sys.argv[1:2] == [subcommand] else f"cospadi {subcommand}"


def where(device: torch.device) -> str:
    """What the solvers ran on, for a benchmark's header."""
    if device.type == "cuda":
        return f"on {torch.cuda.get_device_name(device)}"
    return f"on {device.type.upper()}, {torch.get_num_threads()} threads"


def check_seq_len(model: object, seq_len: int) -> None:
    """CospadiError when windows of `seq_len` tokens exceed the positions the model was
    built for (config.max_position_embeddings, when it has one)."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and seq_len > limit:
        raise CospadiError(f"--seq-len {seq_len} exceeds the model's {limit} positions: use --seq-len {limit} or less")
