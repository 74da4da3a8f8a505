"""What a compression run reports: per matrix and for the whole model, both ratio
accountings (eq. 11 `effective`, eq. 10 `storage` with the bitmask), errors and costs."""
from __future__ import annotations

import resource
from dataclasses import asdict, dataclass, field

from .budget import ratios


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux ru_maxrss is KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclass
class MatrixReport:
    """One compressed linear at its `ratio`: `rank` for low rank, `atoms`/`sparsity` for dictionaries;
    output_error = ||X (W - W')||_F / ||X W||_F on the calibration inputs. A linear that
    shares its left factor with `members` - 1 others (`shared` names the factor) carries
    1/members of the shared factor's storage and solve time besides its own coefficients,
    so sums over matrices count every shared factor once."""

    layer: int
    name: str
    d1: int
    d2: int
    ratio: float  # the fraction of this matrix removed (its allocation; the run's ratio when uniform)
    effective_params: float
    storage_words: float
    output_error: float
    seconds: float
    rank: int | None = None
    atoms: int | None = None
    sparsity: int | None = None
    members: int = 1
    shared: str | None = None

    @property
    def ratios(self) -> dict[str, float]:
        return ratios(self.d1 * self.d2, self.effective_params, self.storage_words)


@dataclass
class CompressionReport:
    """A whole run. dense_params counts every unique parameter of the dense model;
    the compressed model keeps all of them except the compressed linears' weights.
    group_size: consecutive blocks sharing factors (the rows' `shared`; 1: per layer).
    pruned: the decoder blocks a depth-pruning run cut (pruning/run.py `Pruned.to_dict`;
    empty: none): their target linears' weights (`linear_params`) count as removed linear
    weights and all their parameters (`params`) as removed from the model."""

    method: str
    ratio: float
    options: dict
    dense_params: int
    matrices: list[MatrixReport] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    calibration: dict = field(default_factory=dict)
    group_size: int = 1
    allocation: dict = field(default_factory=lambda: {"allocation": "uniform"})  # pipeline/allocate.py summary
    pruned: dict = field(default_factory=dict)

    @property
    def linear_params(self) -> int:
        """Dense weights of the target linears: the reported matrices' and the cut blocks'."""
        return sum(m.d1 * m.d2 for m in self.matrices) + int(self.pruned.get("linear_params", 0))

    @property
    def _kept_rest(self) -> int:
        """Parameters kept as they were: all but the target linears and the cut blocks."""
        cut_rest = int(self.pruned.get("params", 0)) - int(self.pruned.get("linear_params", 0))
        return self.dense_params - self.linear_params - cut_rest

    @property
    def linear_ratios(self) -> dict[str, float]:
        """Both accountings over the compressed linears only."""
        return ratios(self.linear_params, sum(m.effective_params for m in self.matrices),
                      sum(m.storage_words for m in self.matrices))

    @property
    def model_ratios(self) -> dict[str, float]:
        """Both accountings over all parameters (embeddings, norms, biases included)."""
        rest = self._kept_rest
        return ratios(self.dense_params, rest + sum(m.effective_params for m in self.matrices),
                      rest + sum(m.storage_words for m in self.matrices))

    @property
    def compressed_params(self) -> int:
        """Parameters the compressed model stores (eq. 11 counting, shared factors once)."""
        return round(self._kept_rest + sum(m.effective_params for m in self.matrices))

    def to_dict(self) -> dict:
        """A JSON-ready dict with the derived ratios included."""
        out = asdict(self)
        out.update(linear_ratios=self.linear_ratios, model_ratios=self.model_ratios,
                   compressed_params=self.compressed_params)
        return out


def results_table(rows: list[dict]) -> str:
    """A Markdown table of result rows; each row maps column title -> value."""
    if not rows:
        return ""
    heads = list(rows[0])
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
        return str(v)
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    lines += ["| " + " | ".join(fmt(r.get(h, "")) for h in heads) + " |" for r in rows]
    return "\n".join(lines)
