"""Pure solvers: (weight (d1, d2), Gram (d1, d1), budget[, options]) -> factors. No model
code here; docs/method.md describes what each computes."""
from .dictionary import cospadi, learn_dictionary
from .factors import LowRankFactors, SparseDictFactors
from .grouped import basis_sharing, cospadi_grouped, mean_gram
from .lowrank import svd, svd_llm
from .omp import batch_omp
from .options import INITS, PAPER, SOLVERS, SolverOptions
from .orthogonal import learn_orthogonal, single_step
from .whitening import cholesky_upper, output_error, unwhiten, whiten

__all__ = ["INITS", "PAPER", "SOLVERS", "LowRankFactors", "SolverOptions", "SparseDictFactors", "basis_sharing",
           "batch_omp", "cholesky_upper", "cospadi", "cospadi_grouped", "learn_dictionary", "learn_orthogonal",
           "mean_gram", "output_error", "single_step", "svd", "svd_llm", "unwhiten", "whiten"]
