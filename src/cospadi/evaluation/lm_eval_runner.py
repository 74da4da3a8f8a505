"""Zero-shot evaluation of an in-memory model through lm-evaluation-harness.

Any lm-eval task name works (arc_easy, piqa, ... download their data from the hub, so
they need a network); the local tasks of lm_eval_tasks.py (`cospadi_lastword`,
`cospadi_wordppl`) are built from held-out text on the fly and run offline. The model is
wrapped with lm-eval's HFLM as it is, compressed modules included: nothing is saved or
reloaded."""
from __future__ import annotations

import contextlib
import io
import logging
import math
import tempfile

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..errors import CospadiError
from ..models import needs_bos
from .lm_eval_tasks import DEFAULT_LASTWORD_EXAMPLES, DEFAULT_WORDPPL_DOCS, LOCAL_TASKS, write_tasks

# lm-eval metric key -> our column name, in display order
METRICS = {"acc,none": "acc", "acc_norm,none": "acc_norm", "perplexity,none": "target ppl",
           "word_perplexity,none": "word ppl", "byte_perplexity,none": "byte ppl", "bits_per_byte,none": "bits/byte"}


def require_lm_eval():
    """(lm_eval, HFLM, TaskManager); CospadiError with the pip command when not installed."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise CospadiError("accuracy evaluation needs lm-evaluation-harness: pip install 'cospadi[eval]' "
                           "(or pip install 'lm-eval>=0.4.5')") from None
    return lm_eval, HFLM, TaskManager


def parse_tasks(text: str) -> list[str]:
    """'arc_easy,piqa' -> ['arc_easy', 'piqa']; CospadiError when empty."""
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    if not tasks:
        raise CospadiError(f"--tasks {text!r} names no task; e.g. --tasks cospadi_lastword,arc_easy")
    return tasks


def check_task_names(tasks: list[str]) -> None:
    """CospadiError naming the first of `tasks` that is neither a local task nor one of
    lm-eval's (reading lm-eval's task index takes a few seconds: run it before any work)."""
    hub = [t for t in tasks if t not in LOCAL_TASKS]
    if hub:
        _, _, TaskManager = require_lm_eval()
        _refuse_unknown(hub, TaskManager().all_tasks)


def _refuse_unknown(tasks: list[str], known: list[str]) -> None:
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise CospadiError(f"lm-eval has no task {unknown[0]!r}; see `lm_eval ls tasks` for the names "
                           f"(offline, only {', '.join(LOCAL_TASKS)} work)")


def evaluate_tasks(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, tasks: list[str],
                   held_out: list[str] | None = None, *, batch_size: int = 8, limit: int | None = None,
                   lastword_examples: int = DEFAULT_LASTWORD_EXAMPLES, wordppl_docs: int = DEFAULT_WORDPPL_DOCS,
                   quiet: bool = True) -> dict[str, dict[str, float]]:
    """Run lm-eval `tasks` zero-shot on `model` as it is in memory: task -> {column: value}
    with the columns of METRICS that the task reports plus `n` (examples scored) and, for
    accuracies, `acc stderr` (binomial, sqrt(p (1 - p) / (n - 1))). Local tasks are built
    from the held-out documents `held_out` (required when one is asked for) with
    `lastword_examples` passages / `wordppl_docs` documents; `limit` caps every task's
    examples. A task lm-eval cannot load (unknown name, or hub data while offline) raises
    CospadiError naming it."""
    lm_eval, HFLM, TaskManager = require_lm_eval()
    if limit is not None and limit < 1:
        raise CospadiError(f"--limit {limit} must be at least 1")
    local = [t for t in tasks if t in LOCAL_TASKS]
    if local and not held_out:
        raise CospadiError(f"task {local[0]} is built from held-out text: give the held-out documents")
    if quiet:
        for name in ("lm-eval", "lm_eval", "datasets"):
            logging.getLogger(name).setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="cospadi-lm-eval-") as folder:
        # lm-eval's own task index takes seconds to build: skip it when only local tasks run
        manager = TaskManager(include_path=str(write_tasks(folder, held_out, lastword_examples, wordppl_docs))
                              if local else None, include_defaults=len(local) < len(tasks))
        _refuse_unknown(tasks, manager.all_tasks)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                  add_bos_token=True if needs_bos(tokenizer, model) else None)
        was_training = model.training
        model.eval()
        # quiet: lm-eval's and datasets' progress bars go to a discarded stream
        bars = contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext()
        try:
            with bars:
                results = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                                                  bootstrap_iters=0, log_samples=False)
        except (ConnectionError, OSError, ValueError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CospadiError(f"lm-eval could not run {', '.join(tasks)} ({reason[:200]}); hub tasks need a "
                               f"network, offline use {', '.join(LOCAL_TASKS)}") from None
        finally:
            model.train(was_training)
    return {task: _summary(results["results"][task], results.get("n-samples", {}).get(task, {}))
            for task in tasks if task in results["results"]}


def _summary(metrics: dict, samples: dict) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, column in METRICS.items():
        if isinstance(metrics.get(key), (int, float)):
            out[column] = float(metrics[key])
    n = samples.get("effective") or samples.get("original")
    if n:
        out["n"] = int(n)
        if "acc" in out and n > 1:
            out["acc stderr"] = math.sqrt(out["acc"] * (1 - out["acc"]) / (n - 1))
    return out
