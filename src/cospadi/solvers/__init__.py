"""Pure solvers: (weight (d1, d2), Gram (d1, d1), budget) -> factors. No model code here."""
from .dictionary import cospadi, learn_dictionary
from .factors import LowRankFactors, SparseDictFactors
from .grouped import basis_sharing, cospadi_grouped, mean_gram
from .lowrank import svd, svd_llm
from .omp import batch_omp
from .orthogonal import learn_orthogonal, single_step
from .whitening import cholesky_upper, unwhiten, whiten, output_error

__all__ = ["basis_sharing", "batch_omp", "cholesky_upper", "cospadi", "cospadi_grouped", "learn_dictionary", "learn_orthogonal", "LowRankFactors", "mean_gram", "single_step",
           "SparseDictFactors", "svd", "svd_llm", "unwhiten", "whiten", "output_error"]
