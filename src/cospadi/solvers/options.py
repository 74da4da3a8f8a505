"""The dictionary solver's options: the one place their defaults and meanings live. The
solvers, the Python API and the command line (whose flags and --help are generated from
the fields below) all read them from here."""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

from ..budget import check_rho
from ..errors import CospadiError

SOLVERS = ("ksvd", "orthogonal", "single-step")
INITS = ("orthogonal", "svd", "random")
CODERS = ("htp", "omp")
UPDATES = ("mod", "ksvd")


def _option(default: Any, help: str, low: int | None = None) -> Any:
    """A dataclass field whose metadata carries the CLI help and the least valid integer."""
    return field(default=default, metadata={"help": help, "low": low})


@dataclass(frozen=True)
class SolverOptions:
    """How the dictionary solver runs (ignored by the low-rank methods); see
    docs/method.md "Solvers". The defaults (an orthogonal start, then K-SVD sweeps on its
    support, no coding alternation) measured as good as or better than the paper's setting
    at a small fraction of its time (BENCHMARKS.md); the paper's setting is PAPER below.
    The dictionary update is `mod` (block updates of all atoms at once), measured faster
    at equal or lower error than the atom-by-atom K-SVD sweeps (`update="ksvd"`, the
    default before; figures taken with it say `--update ksvd` in their commands)."""

    # Field order is the order of saved reports' option lists: keep it.
    rho: float = _option(2.0, "atoms per nonzero, k / s (the paper: 2)")
    solver: str = _option("ksvd", f"one of {', '.join(SOLVERS)}: ksvd = sparse coding + dictionary updates, "
                                  "orthogonal = (threshold, Procrustes) rounds only, single-step = closed form")
    iters: int = _option(0, "ksvd alternations of sparse coding (--coder) and dictionary updates (the paper: 60; "
                            "0 needs the orthogonal start, whose codes come first)", low=0)
    power_iters: int = _option(2, "power iterations per atom of --update ksvd (the paper: 8)", low=1)
    sweeps: int = _option(8, "dictionary update passes per alternation (--update; the paper: 1 K-SVD sweep)", low=0)
    init: str = _option("orthogonal", f"ksvd start, one of {', '.join(INITS)} (the paper: random)")
    seed: int = _option(42, "seed of the calibration sampling and of random starts")
    rounds: int = _option(25, "at most this many (threshold, Procrustes) rounds of the orthogonal start or "
                              "solver; they stop early once a round gains < 1e-4 (40: about +15%% time, lower "
                              "error)", low=1)
    coder: str = _option("htp", f"sparse coding of the ksvd alternations, one of {', '.join(CODERS)}: htp = hard "
                                "thresholding pursuit with a least-squares refit (cost independent of s), omp = "
                                "Batch-OMP (the paper's)")
    update: str = _option("mod", f"dictionary update of ksvd, one of {', '.join(UPDATES)}: ksvd = atom by atom "
                                  "(rank-1 power iterations); mod = all atoms at once (least squares, then a CG refit "
                                  "of the codes; docs/method.md)")

    def __post_init__(self) -> None:
        check_rho(self.rho)
        if self.solver not in SOLVERS:
            raise CospadiError(f"solver {self.solver!r} is unknown; choose one of: {', '.join(SOLVERS)}")
        for option in fields(self):
            low = option.metadata.get("low")
            value = getattr(self, option.name)
            if low is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
                raise CospadiError(f"{option.name} {value!r} must be an integer >= {low} (the paper uses iters=60, "
                                   "power_iters=8, sweeps=1)")
        if self.coder not in CODERS:
            raise CospadiError(f"coder {self.coder!r} is unknown; choose one of: {', '.join(CODERS)}")
        if self.update not in UPDATES:
            raise CospadiError(f"update {self.update!r} is unknown; choose one of: {', '.join(UPDATES)}")
        if self.init not in INITS:
            raise CospadiError(f"init {self.init!r} is unknown; choose one of: {', '.join(INITS)}")
        if self.solver == "ksvd" and self.iters == 0 and self.init != "orthogonal":
            raise CospadiError(f"iters 0 needs --init orthogonal (a {self.init} start has no codes yet): "
                               "pass --iters 1 or more")

    def but(self, **changes: Any) -> SolverOptions:
        """A copy with `changes` applied (and checked)."""
        return replace(self, **changes)


# the paper's solver
PAPER = SolverOptions(solver="ksvd", init="random", iters=60, power_iters=8, sweeps=1, coder="omp", update="ksvd")
