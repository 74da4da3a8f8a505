"""Saving and reloading compressed models (checkpoint.py, config.py, quantizer.py): for every
supported family (tiny random Llama with tied embeddings, Mistral, Qwen2 with q/k/v
biases, Qwen3, Gemma3 with sliding layers) and both module types, a saved folder
rebuilds, through `cospadi.load` and through plain `AutoModelForCausalLM.from_pretrained`,
a model whose logits are bit-identical to the in-memory compressed one, also when stored
in bf16 with 14-bit values, in fp16, or in several shards. Saves are atomic (nothing
half-written, no temporary folder left, an existing destination untouched on failure)."""

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

import cospadi
from cospadi.errors import CospadiError
from cospadi.files import atomic_file, atomic_folder
from cospadi.layers.linear import DictLinear, LowRankLinear
from cospadi.pipeline import Recipe, compress_blocks
from cospadi.solvers import SolverOptions
from cospadi.storage.checkpoint import DESCRIPTION, REPORT
from cospadi.storage.config import FORMAT_VERSION
from cospadi.storage.folder_checks import check_safetensors

RATIO = 0.3
OPTIONS = SolverOptions(iters=2)
VOCAB = 300  # conftest.py's SMALL vocabulary
TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3")
# llama with tied embeddings, like SmolLM2; qwen2 (q/k/v biases) with an untied head
TIED = {"llama": dict(tie_word_embeddings=True), "qwen2": dict(tie_word_embeddings=False)}


def ids(seed: int, rows: int = 4, length: int = 24) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids, use_cache=False).logits


@pytest.fixture(scope="module")
def build(tiny_model):
    """Factory: a fresh tiny model of `family` (tiny_model, with TIED's embeddings)."""
    def make(family: str) -> torch.nn.Module:
        return tiny_model(family, **TIED.get(family, {}))
    return make


@pytest.fixture(scope="module")
def compress(build, calibration_ids):
    """Factory: a fresh (model, report) of `family` compressed with `method`."""
    def make(family: str, method: str):
        model = build(family)
        report = compress_blocks(model, calibration_ids, Recipe(method, RATIO, OPTIONS), batch_size=4, progress=False)
        return model, report
    return make


@pytest.fixture(scope="module")
def compressed(compress):
    """Factory: (model, report) compressed once per (family, method) in this module;
    tests must not mutate it."""
    cache: dict[tuple[str, str], tuple] = {}

    def get(family: str, method: str):
        if (family, method) not in cache:
            cache[(family, method)] = compress(family, method)
        return cache[(family, method)]
    return get


def assert_same_model(loaded: torch.nn.Module, model: torch.nn.Module) -> None:
    """Same module types, tensors, dtypes and logits (bit for bit)."""
    assert type(loaded) is type(model) and not loaded.training
    assert {n: type(m).__name__ for n, m in loaded.named_modules()} == \
        {n: type(m).__name__ for n, m in model.named_modules()}
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    for key in state:
        assert state[key].dtype == loaded_state[key].dtype, key
        assert torch.equal(state[key], loaded_state[key]), key
    for input_ids in (ids(7), ids(8, rows=1, length=1)):  # dense path and sparse (decode) path
        assert torch.equal(logits(loaded, input_ids), logits(model, input_ids))


@pytest.mark.parametrize("method", ["svd-llm", "cospadi"])
@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_both_ways_is_bit_identical(family, method, tmp_path, compressed):
    model, report = compressed(family, method)
    out = tmp_path / "out"
    returned = cospadi.save(model, None, out, report.to_dict())
    assert os.fspath(returned) == os.fspath(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left beside it
    assert {"config.json", "model.safetensors", DESCRIPTION, REPORT} <= {p.name for p in out.iterdir()}

    loaded, tokenizer = cospadi.load(out)
    assert tokenizer is None
    expected_type = DictLinear if method == "cospadi" else LowRankLinear
    for i, layer in enumerate(loaded.model.layers):
        for name in TARGETS:
            assert type(layer.get_submodule(name)) is expected_type, f"block {i} {name}"
    assert_same_model(loaded, model)
    if family == "llama":  # tied head survives the round trip as a tie, not a copy
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    if family == "qwen2":
        assert loaded.model.layers[0].self_attn.q_proj.bias is not None

    plain = AutoModelForCausalLM.from_pretrained(out)  # the transformers route, after `import cospadi`
    assert_same_model(plain, model)

    entry = json.loads((out / "config.json").read_text())["quantization_config"]
    assert entry["quant_method"] == "cospadi" and entry["format_version"] == FORMAT_VERSION
    assert entry["method"] == method and entry["ratio"] == RATIO and entry["coef_bits"] is None
    assert sorted(entry["modules"]) == sorted(f"model.layers.{i}.{n}" for i in range(2) for n in TARGETS)
    description = json.loads((out / DESCRIPTION).read_text())
    assert description["format_version"] == FORMAT_VERSION
    assert description["report"]["method"] == method and len(description["report"]["matrices"]) == 2 * len(TARGETS)
    text = (out / REPORT).read_text()
    assert f"`{method}` at ratio {RATIO}" in text and "from_pretrained" in text and "mlp.down_proj" in text


@pytest.mark.parametrize("dtype,coef_bits", [("bfloat16", 14), ("bfloat16", None), ("float16", 14)])
def test_compact_storage_round_trips_bit_identically(dtype, coef_bits, tmp_path, compress):
    model, report = compress("llama", "cospadi")
    full_bytes = sum(t.numel() * t.element_size() for k, t in model.state_dict().items() if "layers" in k)
    cospadi.save(model, None, tmp_path / "out", report.to_dict(), dtype=dtype, coef_bits=coef_bits,
                 max_shard_size="40KB")
    assert str(model.dtype) == f"torch.{dtype}"  # converted in place: what you hold is what was saved
    module = model.model.layers[0].self_attn.q_proj
    assert module.coef_bits == coef_bits and module.dictionary.dtype == model.dtype
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32  # as from_pretrained builds it
    shards = sorted(p.name for p in (tmp_path / "out").glob("model-*.safetensors"))
    assert len(shards) >= 2 and (tmp_path / "out" / "model.safetensors.index.json").is_file()
    assert_same_model(cospadi.load(tmp_path / "out")[0], model)
    assert_same_model(AutoModelForCausalLM.from_pretrained(tmp_path / "out"), model)
    headers = [check_safetensors(tmp_path / "out" / name) for name in shards]
    entries = {k: v for header in headers for k, v in header.items() if "layers" in k}
    saved = sum(v["data_offsets"][1] - v["data_offsets"][0] for v in entries.values())
    assert saved < full_bytes * 0.55  # half of fp32, plus the (uint8) bitmasks
    key = "model.layers.0.self_attn.q_proj"
    assert entries[f"{key}.mask"]["dtype"] == "U8"
    if coef_bits:
        assert f"{key}.coefs" not in entries and entries[f"{key}.coefs14"]["dtype"] == "U8"
    if coef_bits:
        assert "14 bits" in (tmp_path / "out" / REPORT).read_text()


def test_load_with_another_dtype(tmp_path, compressed):
    model, report = compressed("qwen2", "cospadi")
    cospadi.save(model, None, tmp_path / "out", report.to_dict())
    loaded, _ = cospadi.load(tmp_path / "out", dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16
    assert loaded.model.layers[0].mlp.up_proj.dictionary.dtype == torch.bfloat16
    close = logits(loaded, ids(3)).float()
    assert float((close - logits(model, ids(3))).norm() / logits(model, ids(3)).norm()) < 0.05


def test_generate_runs_on_the_reloaded_model(tmp_path, compressed):
    model, report = compressed("llama", "cospadi")
    cospadi.save(model, None, tmp_path / "out", report.to_dict())
    loaded, _ = cospadi.load(tmp_path / "out")
    prompt = ids(4, rows=1, length=5)
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(loaded.generate(prompt, **kwargs), model.generate(prompt, **kwargs))


def test_load_model_routes_cospadi_folders_to_checkpoint_load(tmp_path, compressed):
    model, report = compressed("llama", "cospadi")
    cospadi.save(model, None, tmp_path / "out", report.to_dict())
    loaded, tokenizer = cospadi.load_model(str(tmp_path / "out"))
    assert tokenizer is None  # saved without one
    assert isinstance(loaded.model.layers[1].mlp.down_proj, DictLinear)
    assert torch.equal(logits(loaded, ids(8)), logits(model, ids(8)))


def test_saving_a_model_without_compressed_modules_is_refused(tmp_path, build):
    with pytest.raises(CospadiError, match="no compressed modules"):
        cospadi.save(build("llama"), None, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_bad_storage_options_are_refused_before_writing(tmp_path, compressed):
    model, report = compressed("llama", "svd-llm")
    with pytest.raises(CospadiError, match="dtype 'int8'"):
        cospadi.save(model, None, tmp_path / "out", dtype="int8")
    with pytest.raises(CospadiError, match="coefficient bits 12"):
        cospadi.save(model, None, tmp_path / "out", coef_bits=12)
    assert list(tmp_path.iterdir()) == []


def test_save_over_an_earlier_output_replaces_it_and_leaves_no_leftovers(tmp_path, compressed):
    model, report = compressed("qwen2", "svd-llm")
    out = tmp_path / "out"
    out.mkdir()
    (out / DESCRIPTION).write_text("{}")  # an earlier cospadi output
    (out / "stale.txt").write_text("from an earlier run")
    with pytest.raises(CospadiError, match="earlier cospadi output: pass --overwrite"):
        cospadi.save(model, None, out, report.to_dict())
    assert (out / "stale.txt").is_file()
    cospadi.save(model, None, out, report.to_dict(), overwrite=True)
    assert not (out / "stale.txt").exists()
    assert (out / DESCRIPTION).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .out.tmp-* nor .out.old-*
    loaded, _ = cospadi.load(out)
    assert torch.equal(logits(loaded, ids(3)), logits(model, ids(3)))


def test_atomic_folder_success_and_failure(tmp_path):
    out = tmp_path / "nested" / "dest"
    with atomic_folder(out) as tmp:
        assert tmp.parent == out.parent.resolve()
        assert tmp.name.startswith(".dest.tmp-")
        assert not out.exists()  # nothing at the destination until the block finishes
        (tmp / "a.txt").write_text("a")
    assert (out / "a.txt").read_text() == "a"
    assert sorted(p.name for p in out.parent.iterdir()) == ["dest"]

    with pytest.raises(CospadiError, match="cospadi did not write"), atomic_folder(out, overwrite=True):
        pass
    (out / "cospadi.json").write_text("{}")  # now an earlier output: replaceable with overwrite
    with pytest.raises(RuntimeError, match="boom"), atomic_folder(out, overwrite=True) as tmp:
        (tmp / "a.txt").write_text("b")
        (tmp / "b.txt").write_text("b")
        raise RuntimeError("boom")
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", "cospadi.json"]
    assert (out / "a.txt").read_text() == "a"
    assert sorted(p.name for p in out.parent.iterdir()) == ["dest"]


def test_atomic_file_success_and_failure(tmp_path):
    out = tmp_path / "nested" / "cell.json"
    with atomic_file(out) as tmp:
        assert tmp.parent == out.parent and not out.exists()
        tmp.write_text("first")
    assert out.read_text() == "first"
    with pytest.raises(RuntimeError, match="boom"), atomic_file(out) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert out.read_text() == "first"
    assert sorted(p.name for p in out.parent.iterdir()) == ["cell.json"]


def test_atomic_folder_refuses_a_file_destination(tmp_path):
    target = tmp_path / "file"
    target.write_text("keep me")
    with pytest.raises(CospadiError, match="not a folder"), atomic_folder(target):
        pass
    assert target.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def _fail_midway(model, monkeypatch):
    """Make model.save_pretrained write one real file and then fail."""
    real = model.save_pretrained

    def save_then_fail(folder, *args, **kwargs):
        real(folder, *args, **kwargs)
        assert (folder / "model.safetensors").is_file()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model, "save_pretrained", save_then_fail)


def test_failed_save_leaves_no_destination_and_no_temporary_folder(tmp_path, monkeypatch, compressed):
    model, report = compressed("llama", "svd-llm")
    _fail_midway(model, monkeypatch)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="No space left"):
        cospadi.save(model, None, out, report.to_dict())
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_failed_save_leaves_an_existing_destination_untouched(tmp_path, monkeypatch, compressed):
    cospadi_model, report = compressed("llama", "cospadi")
    out = tmp_path / "out"
    cospadi.save(cospadi_model, None, out, report.to_dict())
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    model, report = compressed("llama", "svd-llm")
    _fail_midway(model, monkeypatch)
    with pytest.raises(OSError):
        cospadi.save(model, None, out, report.to_dict(), overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    loaded, _ = cospadi.load(out)  # still the earlier cospadi model
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, DictLinear)


def test_saved_folder_has_ordinary_permissions(tmp_path, compressed):
    model, report = compressed("llama", "svd-llm")
    cospadi.save(model, None, tmp_path / "out", report.to_dict())
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask
    for path in (tmp_path / "out").iterdir():
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path.name


def test_float32_load_of_a_compact_folder_releases_the_weight_file(tmp_path, compressed):
    """Loading a bf16 / 14-bit folder at float32 converts every float tensor; the bitmask
    and packed values are copied too, so no tensor keeps the memory-mapped file (and all
    its pages) alive. The reload still matches the saved model."""
    from cospadi.storage.memory import _mapped_weight_files, release_weight_files

    model, report = compressed("llama", "cospadi")
    cospadi.save(model, None, tmp_path / "out", report.to_dict(), dtype="bfloat16", coef_bits=14)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    ranges = _mapped_weight_files()
    inside = [name for name, t in list(loaded.named_parameters()) + list(loaded.named_buffers())
              if any(low <= t.data_ptr() < high for low, high in ranges)]
    assert inside == []
    assert release_weight_files(loaded) == 0  # nothing left to copy
    reference, _ = cospadi.load(tmp_path / "out", dtype="float32")
    assert torch.equal(logits(loaded, ids(3)), logits(reference, ids(3)))


def test_float_tensors_left_on_the_weight_file_are_copied_so_the_mapping_closes(tmp_path):
    """A same-dtype load leaves the float tensors whose file offsets are aligned as views of
    the memory-mapped .safetensors file; release_weight_files copies them (and any buffer)
    into memory of their own, with the same values, so no tensor keeps the mapping."""
    from safetensors.torch import save_file

    from cospadi.storage.memory import _mapped_weight_files, release_weight_files

    weight = torch.randn(16, 8).to(torch.bfloat16)
    path = tmp_path / "w.safetensors"
    save_file({"weight": weight, "other": torch.arange(4, dtype=torch.int16)}, str(path))
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    begin, end = json.loads(raw[8:8 + size])["weight"]["data_offsets"]
    mapped = torch.from_file(str(path), shared=False, size=len(raw), dtype=torch.uint8)  # a real file mapping
    module = torch.nn.Linear(8, 16, bias=False).to(torch.bfloat16)
    module.weight.data = mapped[8 + size + begin:8 + size + end].view(torch.bfloat16).view(16, 8)
    assert torch.equal(module.weight.data, weight)

    def inside(t: torch.Tensor) -> bool:
        return any(low <= t.data_ptr() < high for low, high in _mapped_weight_files())

    assert inside(module.weight)
    assert release_weight_files(module) == weight.numel() * 2
    assert not inside(module.weight) and torch.equal(module.weight.data, weight)
    assert release_weight_files(module) == 0
