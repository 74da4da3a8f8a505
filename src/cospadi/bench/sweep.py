"""`cospadi bench`: a methods x ratios sweep on one model with the same calibration and
evaluation text for every cell. Per cell: token perplexity, lm-eval's word perplexity on
held-out documents and last-word accuracy (the local lm-eval tasks, evaluation/lm_eval_tasks.py),
compression wall time and both ratio accountings. Each finished cell is cached as JSON
under the run folder, so an interrupted sweep resumes where it stopped; the table goes
into BENCHMARKS.md between markers that name the sweep, next to a PNG plot."""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import api
from ..adapters import ATTENTION, GATE_UP
from ..allocation import DEFAULT_COST, check_allocation
from ..budget import check_ratio
from ..data import load_corpus
from ..errors import CospadiError
from ..evaluation.lm_eval_tasks import LASTWORD, WORDPPL
from ..evaluation.perplexity import perplexity
from ..files import atomic_file
from ..groups import check_group_size, linear_kind
from ..methods import QUANTIZERS, REGISTRY, check_quant, get_method
from ..models import load_model
from ..pruning.plan import parse_depth_method, uses_solver_options
from ..solvers import SolverOptions
from ..solvers.quantize import DEFAULT_GROUP, parse_quant
from .pareto import linear_bytes


def _bench_labels() -> dict[str, tuple[str, bool]]:
    """bench label -> (method, shares across a group of blocks): every registered method
    under its name (grouped when its default is), and "<name>-group" for a method that
    can share but runs per layer by default (cospadi-group)."""
    labels = {}
    for name, method in {**REGISTRY, **QUANTIZERS}.items():
        labels[name] = (name, method.default_group_size > 1)
        if method.shares and method.default_group_size == 1:
            labels[f"{name}-group"] = (name, True)
    return labels


BENCH_METHODS = _bench_labels()
# the default sweep: every label but the quantization-only baselines (rtn, gptq need --quant)
DEFAULT_METHODS = tuple(label for label, (name, _) in BENCH_METHODS.items() if name in REGISTRY)
DEFAULT_LASTWORD_EXAMPLES = 300
DEFAULT_WORDPPL_DOCS = 100


KNAPSACK = "+knapsack"  # a label's suffix: the method with per-matrix ratios from the knapsack allocation


def parse_label(label: str) -> tuple[str, bool, str]:
    """bench label -> (method, shares across a group of blocks, allocation); a label is
    one of BENCH_METHODS or a depth-pruning name (replaceme, replaceme+M, replacemeK+M:
    pruning/plan.py), optionally followed by "+knapsack" (not plain replaceme).
    CospadiError otherwise."""
    base, allocation = (label[:-len(KNAPSACK)], "knapsack") if label.endswith(KNAPSACK) else (label, "uniform")
    depth = parse_depth_method(base)
    if depth is not None:
        if depth.rest is None and allocation != "uniform":
            raise CospadiError(f"{label!r}: replaceme cuts whole blocks and has no per-matrix ratios; use "
                               f"replaceme+cospadi{KNAPSACK}")
        return base, False, allocation
    if base not in BENCH_METHODS:
        raise CospadiError(f"unknown method {label!r} for bench; choose from: {', '.join(BENCH_METHODS)}, each "
                           f"optionally with {KNAPSACK} (e.g. cospadi{KNAPSACK}), or replaceme, replaceme+M, "
                           "replacemeK+M (depth pruning, docs/pruning.md)")
    return (*BENCH_METHODS[base], allocation)


def check_label(label: str) -> None:
    """CospadiError unless parse_label accepts `label`."""
    parse_label(label)


BASIS_SHARING_KINDS = tuple(linear_kind(name) for name in ATTENTION + GATE_UP)  # what the adapters share by default


@dataclass(frozen=True)
class Sweep:
    """What one sweep runs; `key` names its cache folder and its BENCHMARKS.md section."""

    model: str = "smollm2-135m"
    data: str = "wiki"
    methods: tuple[str, ...] = DEFAULT_METHODS
    ratios: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5)
    calib_samples: int = api.DEFAULT_CALIB_SAMPLES
    seq_len: int = api.DEFAULT_SEQ_LEN
    eval_windows: int = api.DEFAULT_EVAL_WINDOWS
    options: SolverOptions = SolverOptions()
    group_size: int = 2  # blocks per group for basis-sharing and cospadi-group
    lastword_examples: int = DEFAULT_LASTWORD_EXAMPLES  # 0: no last-word accuracy
    wordppl_docs: int = DEFAULT_WORDPPL_DOCS  # 0: no word perplexity
    cost: str = DEFAULT_COST  # the knapsack's cost, for "+knapsack" labels
    quants: tuple[str, ...] = ("none",)  # each method x ratio cell once per entry (docs/quantization.md)
    quant_group: int = DEFAULT_GROUP
    baseline_quants: tuple[str, ...] | None = None  # rtn / gptq cells (None: quants less "none")
    share: tuple[str, ...] | None = None  # linears a group shares (None: each method's default; groups.py)

    @property
    def key(self) -> str:
        """Readable names plus a digest of the full model and data paths (two files both
        called corpus.txt must not share a cache), and the methods when they are not all of
        them (a sweep of a few methods gets its own BENCHMARKS.md section). Solver options are not in the key but
        in the names of the cells that use them, so baselines survive a solver change."""
        digest = hashlib.sha1(f"{Path(self.model).resolve() if Path(self.model).exists() else self.model}|"
                              f"{Path(self.data).resolve() if Path(self.data).exists() else self.data}".encode())
        lm_eval = f"-lw{self.lastword_examples}-wd{self.wordppl_docs}" if self.tasks() else ""
        subset = "" if set(self.methods) == set(DEFAULT_METHODS) else "-m" + "+".join(self.methods)
        return (f"{Path(self.model).name}-{Path(self.data).stem}-{digest.hexdigest()[:8]}"
                f"-c{self.calib_samples}x{self.seq_len}-e{self.eval_windows}{lm_eval}-s{self.options.seed}{subset}")

    @property
    def section(self) -> str:
        """The BENCHMARKS.md section (and plot) name: the key, plus the dictionary update
        when a method uses it and it is not ksvd (sections taken before mod became the
        default keep their names and are not overwritten by the default's), plus the
        shared kinds when --share is given."""
        solver = any(uses_solver_options(parse_label(label)[0]) for label in self.methods)
        share = "" if self.share is None else "-sh" + "+".join(self.share)  # --share given: its own section
        return self.key + (update_suffix(self.options.update) if solver else "") + share

    def cell_name(self, label: str, ratio: float, quant: str = "none") -> str:
        """The cache file of one cell: grouped methods carry their group size, dictionary
        methods their solver options, quantized cells their quantization (e.g. "-int4",
        "-int4-g64" for another group size; cells without one keep their names)."""
        method, grouped, allocation = parse_label(label)
        o = self.options
        solver = (f"-rho{o.rho:g}-{o.solver}-{o.init}-r{o.rounds}-it{o.iters}-sw{o.sweeps}-p{o.power_iters}-{o.coder}"
                  f"{update_suffix(o.update)}" if uses_solver_options(method) else "")
        cost = f"-{self.cost}" if allocation != "uniform" else ""
        quantized = "" if quant == "none" else f"-{quant}" + (f"-g{self.quant_group}" if self.quant_group != DEFAULT_GROUP
                                                               else "")
        return f"{label}{self.grouping(method) if grouped else ''}{solver}{cost}-{ratio:g}{quantized}.json"

    def shared(self, method: str) -> tuple[str, ...] | None:
        """The linears a grouped cell of `method` shares (None: the family adapter's q/k/v/gate/up)."""
        return self.share if self.share is not None else get_method(method).default_share

    def grouping(self, method: str) -> str:
        """A grouped cell's name part: "-g2", plus "-sh" and the shared kinds when they are
        not the adapters' q/k/v/gate/up (cells cached before --share keep their names)."""
        shared = self.shared(method)
        protocol = shared is None or sorted(map(linear_kind, shared)) == sorted(BASIS_SHARING_KINDS)
        return f"-g{self.group_size}" + ("" if protocol else "-sh" + "+".join(shared or ()))

    def cells(self) -> list[tuple[str, float, str]]:
        """(label, ratio, quant) of every compressed cell in sweep order: ratio by ratio
        every label but the quantization-only baselines at each of `quants`, then the
        baselines (ratio 0, once per baseline quantization)."""
        baselines = [label for label in self.methods if _ratio_free(label)]
        cells = [(label, ratio, quant) for ratio in self.ratios for label in self.methods if label not in baselines
                 for quant in self.quants]
        return cells + [(label, 0.0, quant) for label in baselines for quant in self.baseline_quant_names()]

    def baseline_quant_names(self) -> tuple[str, ...]:
        """The quantizations of the rtn / gptq cells."""
        chosen = self.baseline_quants if self.baseline_quants is not None else self.quants
        return tuple(q for q in chosen if q != "none")

    def tasks(self) -> list[str]:
        """The local lm-eval tasks every cell runs."""
        return [t for t, n in ((LASTWORD, self.lastword_examples), (WORDPPL, self.wordppl_docs)) if n > 0]

    def check(self) -> None:
        """CospadiError on any bad setting, before anything runs."""
        for label in self.methods:
            check_label(label)
        self._check_quants()
        for ratio in self.ratios:
            check_ratio(ratio)
        check_group_size(self.group_size, get_method("cospadi"))
        check_allocation("knapsack", self.cost)
        for name in ("lastword_examples", "wordppl_docs"):
            if getattr(self, name) < 0:
                raise CospadiError(f"--{name.replace('_', '-')} {getattr(self, name)} must be 0 (skip) or more")
        if self.tasks():
            from ..evaluation.lm_eval_runner import require_lm_eval

            require_lm_eval()  # fails now, with the pip command, when lm-eval is missing

    def _check_quants(self) -> None:
        """CospadiError for a quantization a label cannot take (methods/quantized.py)."""
        for quant in (*self.quants, *(self.baseline_quants or ())):
            parse_quant(quant, self.quant_group)
        for label, _, quant in self.cells():
            method, grouped, _ = parse_label(label)
            spec = parse_quant(quant, self.quant_group)
            if spec is not None and parse_depth_method(method) is not None:
                raise CospadiError(f"bench: {label} cannot be quantized (depth pruning takes --quant none)")
            if parse_depth_method(method) is None:
                check_quant(get_method(method), spec, self.group_size if grouped else 1)
        if any(_ratio_free(label) for label in self.methods) and not self.baseline_quant_names():
            raise CospadiError("bench: rtn and gptq only quantize: give --quant (or --baseline-quant) with int8, int4 "
                               "or int3")


def update_suffix(update: str) -> str:
    """The suffix of a cell or section name computed with dictionary update `update`: none
    for ksvd, so what was computed before mod became the default keeps its name."""
    return "" if update == "ksvd" else f"-{update}"


def _ratio_free(label: str) -> bool:
    """Whether a bench label is a quantization-only baseline (rtn, gptq: no ratio)."""
    method = parse_label(label)[0]
    return parse_depth_method(method) is None and get_method(method).ignores_ratio


def _write_json(path: Path, data: dict) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1))


def run_sweep(sweep: Sweep, cache: Path, progress: bool = True) -> list[dict]:
    """Run (or read from `cache`) the dense cell and every method x ratio cell; return
    the rows in sweep order. A cell is written only once it has finished."""
    sweep.check()
    calib_texts, eval_texts = load_corpus(sweep.data)
    model, tokenizer = load_model(sweep.model)
    folder = cache / sweep.key
    folder.mkdir(parents=True, exist_ok=True)
    ids = api.calibration_ids(model, tokenizer, calib_texts, sweep.calib_samples, sweep.seq_len, sweep.options.seed)
    windows = api.evaluation_ids(model, tokenizer, eval_texts, sweep.seq_len, sweep.eval_windows)
    dense_path = folder / "dense.json"
    if not dense_path.exists():
        _write_json(dense_path, {"method": "dense", "ratio": 0.0, "linear_bytes": linear_bytes(model),
                                 **evaluate_cell(model, tokenizer, windows, eval_texts, sweep, progress)})
    rows = [json.loads(dense_path.read_text())]
    if "linear_bytes" not in rows[0]:  # cached before bytes were recorded
        rows[0]["linear_bytes"] = linear_bytes(model)
        _write_json(dense_path, rows[0])
    for label, ratio, quant in sweep.cells():
        path = folder / sweep.cell_name(label, ratio, quant)
        if not path.exists():
            method, grouped, allocation = parse_label(label)
            model, _ = load_model(sweep.model)  # fresh dense weights for every cell
            start = time.perf_counter()
            _, report = api.compress(model, tokenizer, input_ids=ids, method=method, ratio=ratio,
                                     progress=progress, group_size=sweep.group_size if grouped else 1,
                                     share=sweep.share if grouped else None,
                                     allocation=allocation, cost=sweep.cost, profile_cache=str(folder / "profiles"),
                                     quant=quant, quant_group=sweep.quant_group, **asdict(sweep.options))
            seconds = time.perf_counter() - start
            quantized = {} if quant == "none" else {"quant": quant, "quant_group": sweep.quant_group}
            _write_json(path, {"method": label, "ratio": ratio, "group_size": report.group_size, **quantized,
                               **evaluate_cell(model, tokenizer, windows, eval_texts, sweep, progress),
                               "seconds": seconds, "linear_ratios": report.linear_ratios,
                               "model_ratios": report.model_ratios, "params": report.compressed_params,
                               "linear_bytes": linear_bytes(model),
                               "peak_rss_mb": report.peak_rss_mb, "output_errors": mean_errors(report),
                               "allocation": report.allocation})
        rows.append(json.loads(path.read_text()))
    return rows


def mean_errors(report) -> dict[str, float]:
    """Mean relative calibration output error ||X (W - W')|| / ||X W|| per linear kind
    (self_attn.q_proj, ...), over the blocks: where a method loses, per kind."""
    kinds: dict[str, list[float]] = {}
    for m in report.matrices:
        kinds.setdefault(m.name, []).append(m.output_error)
    return {kind: sum(errors) / len(errors) for kind, errors in kinds.items()}


def evaluate_cell(model, tokenizer, windows: torch.Tensor, eval_texts: list[str], sweep: Sweep,
                  progress: bool) -> dict:
    """Token perplexity on `windows` and, through lm-eval, word perplexity and last-word
    accuracy on the held-out documents `eval_texts`, as the sweep asks."""
    out = {"token_ppl": perplexity(model, windows, progress=progress)}
    if sweep.tasks():
        from ..evaluation.lm_eval_runner import evaluate_tasks

        results = evaluate_tasks(model, tokenizer, sweep.tasks(), eval_texts, lastword_examples=sweep.lastword_examples,
                                 wordppl_docs=sweep.wordppl_docs, quiet=not progress)
        if LASTWORD in results:
            r = results[LASTWORD]
            out.update(lastword_acc=r["acc"], lastword_stderr=r.get("acc stderr"), lastword_n=r.get("n"),
                       lastword_target_ppl=r.get("target ppl"))
        if WORDPPL in results:
            out.update(word_ppl=results[WORDPPL]["word ppl"], wordppl_docs=results[WORDPPL].get("n"))
    return out


def table_rows(rows: list[dict]) -> list[dict]:
    """Rows for results_table: one per cell, dense first. Ratios over the compressed
    linears and over the whole model (embeddings included), eq. 11 / eq. 10."""
    dense = rows[0]["token_ppl"]
    out = []
    for r in rows:
        lin, mod = r.get("linear_ratios"), r.get("model_ratios")
        quant = {"quant": r.get("quant", "none")} if any("quant" in row for row in rows) else {}
        out.append({"method": r["method"], "ratio": f"{r['ratio']:g}", **quant,
                    "eff. ratio": f"{lin['effective']:.3f}" if lin else "-",
                    "storage ratio": f"{lin['storage']:.3f}" if lin else "-",
                    "model eff. / storage": f"{mod['effective']:.3f} / {mod['storage']:.3f}" if mod else "-",
                    "token ppl": r["token_ppl"], "x dense": r["token_ppl"] / dense,
                    "word ppl": r.get("word_ppl", "-"),
                    "last-word acc": _accuracy(r),
                    "time (s)": round(r["seconds"] + (r.get("allocation") or {}).get("reused_seconds", 0.0))
                    if "seconds" in r else "-"})
    return out


def _accuracy(row: dict) -> str:
    """'0.620 ± 0.049' (binomial standard error), '0.620' without one, '-' when not measured."""
    if row.get("lastword_acc") is None:
        return "-"
    stderr = row.get("lastword_stderr")
    return f"{row['lastword_acc']:.3f}" + (f" ± {stderr:.3f}" if stderr is not None else "")


def write_section(path: Path, name: str, body: str) -> None:
    """Replace (or append) the part of `path` between the markers of section `name`."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{start}\n{body}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def describe(sweep: Sweep, command: str, rows: list[dict] | None = None) -> str:
    """The header that says exactly what a sweep measured and how to reproduce it."""
    o = sweep.options
    dense = (rows or [{}])[0]
    evals = []
    if sweep.wordppl_docs:
        evals.append(f"word perplexity (lm-eval `{WORDPPL}`, rolling log-likelihood) on the first "
                     f"{dense.get('wordppl_docs', sweep.wordppl_docs)} held-out documents")
    if sweep.lastword_examples:
        evals.append(f"last-word accuracy ± binomial standard error (lm-eval `{LASTWORD}`, LAMBADA-style, "
                     f"{dense.get('lastword_n', sweep.lastword_examples)} passages from held-out documents)")
    grouped = [m for m in sweep.methods if parse_label(m)[1]]
    sharing = "".join(f"; {label} shares {'/'.join(sweep.shared(parse_label(label)[0]) or BASIS_SHARING_KINDS)}"
                      f" across groups of {sweep.group_size} consecutive blocks (the other linears per layer)"
                      for label in grouped)
    measured = "; ".join([f"token perplexity on {sweep.eval_windows} x {sweep.seq_len} held-out tokens"] + evals)
    if any(quant != "none" for _, _, quant in sweep.cells()):
        sharing += (f"; quantized cells (quant column): factors as symmetric integer codes with one bf16 scale per "
                    f"{sweep.quant_group} inputs, GPTQ on the calibration Grams (rtn: round to nearest; "
                    "docs/quantization.md)")
    return (f"Model `{sweep.model}`; calibration {sweep.calib_samples} x {sweep.seq_len} tokens ({sweep.data}, "
            f"seed {o.seed}); {measured}. cospadi rho={o.rho:g}, solver={o.solver}, init={o.init}, "
            f"iters={o.iters}, update={o.update}, sweeps={o.sweeps}"
            f"{f', power_iters={o.power_iters}' if o.update == 'ksvd' else ''}{sharing}. "
            f"Ratios: eff. = eq. 11, storage = eq. 10 with the bitmask, over the compressed linears, then over the "
            f"whole model (embeddings stay dense); shared factors count once. Time: compression wall time "
            f"(calibration + solving; for +knapsack also the whole profiling for the {sweep.cost} cost, measured once per "
            f"method and added to the cells that reused it from the cache). {torch.get_num_threads()} CPU threads.\n\n"
            f"Reproduce: `{command}`\n")
