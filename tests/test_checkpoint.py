"""Saving and reloading compressed models (checkpoint.py): a saved folder rebuilds a model
whose logits are bit-identical to the in-memory compressed one (Llama with tied
embeddings, Qwen2 with q/k/v biases; low-rank and dictionary modules), saves are atomic
(nothing half-written, no temporary folder left, an existing destination untouched on
failure), and damaged folders raise CospadiError with a message that says what is wrong."""

import json
import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import cospadi
from cospadi.checkpoint import DESCRIPTION, FORMAT_VERSION, atomic_folder
from cospadi.errors import CospadiError
from cospadi.methods import SolverOptions
from cospadi.modules import DictLinear, LowRankLinear
from cospadi.pipeline import compress_blocks

RATIO = 0.3
OPTIONS = SolverOptions(iters=2)
VOCAB = 300
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny matrices: one intra-op thread avoids spin contention on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "llama":  # tied embeddings, like SmolLM2
        model = LlamaForCausalLM(LlamaConfig(**COMMON, tie_word_embeddings=True))
    elif family == "qwen2":  # q/k/v biases, untied head
        model = Qwen2ForCausalLM(Qwen2Config(**COMMON, tie_word_embeddings=False))
    else:
        raise ValueError(family)
    return model.eval()


def ids(seed: int, rows: int = 4, length: int = 24) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids, use_cache=False).logits


_COMPRESSED: dict[tuple[str, str], tuple] = {}


def compressed(family: str, method: str):
    """(model, report) compressed once per (family, method); tests must not mutate it."""
    key = (family, method)
    if key not in _COMPRESSED:
        model = build(family)
        report = compress_blocks(model, ids(1, rows=8), method, RATIO, OPTIONS, batch_size=4, progress=False)
        _COMPRESSED[key] = (model, report)
    return _COMPRESSED[key]


def module_summary(model: torch.nn.Module) -> dict[str, tuple]:
    """name -> (type, parameter/buffer shapes) of every module with tensors of its own."""
    out = {}
    for name, module in model.named_modules():
        own = {k: tuple(v.shape) for k, v in list(module.named_parameters(recurse=False))
               + list(module.named_buffers(recurse=False))}
        if own:
            out[name] = (type(module).__name__, tuple(sorted(own.items())))
    return out


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    """A cospadi-compressed tiny Llama saved without a tokenizer (read-only for tests)."""
    model, report = compressed("llama", "cospadi")
    out = tmp_path_factory.mktemp("saved") / "llama-cospadi"
    cospadi.save(model, None, out, report.to_dict())
    return out


def copy_folder(src, dst):
    dst.mkdir()
    for path in src.iterdir():
        (dst / path.name).write_bytes(path.read_bytes())
    return dst


@pytest.mark.parametrize("method", ["svd-llm", "cospadi"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_save_load_round_trip_is_bit_identical(family, method, tmp_path, smollm2):
    model, report = compressed(family, method)
    tokenizer = smollm2[1] if family == "llama" else None
    out = tmp_path / "out"
    returned = cospadi.save(model, tokenizer, out, report.to_dict())
    assert os.fspath(returned) == os.fspath(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left beside it
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", DESCRIPTION} <= files

    loaded, loaded_tok = cospadi.load(out)
    assert not loaded.training
    assert type(loaded) is type(model)
    expected_type = DictLinear if method == "cospadi" else LowRankLinear
    for i, layer in enumerate(loaded.model.layers):
        for name in TARGETS:
            module = layer.get_submodule(name)
            assert type(module) is expected_type, f"block {i} {name} is {type(module).__name__}"
            if family == "qwen2" and name in TARGETS[:3]:
                assert module.bias is not None, f"block {i} {name} lost its bias"
    assert module_summary(loaded) == module_summary(model)
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    for key in state:
        assert state[key].dtype == loaded_state[key].dtype, key
        assert torch.equal(state[key], loaded_state[key]), key
    if family == "llama":  # tied head survives the round trip as a tie, not a copy
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()

    held_out = ids(7)
    assert torch.equal(logits(loaded, held_out), logits(model, held_out))

    if tokenizer is None:
        assert loaded_tok is None
    else:
        text = "The quick brown fox jumps over the lazy dog."
        assert loaded_tok(text).input_ids == tokenizer(text).input_ids
        assert len(loaded_tok) == len(tokenizer)

    description = json.loads((out / DESCRIPTION).read_text())
    assert description["format_version"] == FORMAT_VERSION
    assert len(description["modules"]) == 2 * len(TARGETS)
    assert description["report"]["method"] == method
    assert description["report"]["ratio"] == RATIO
    assert len(description["report"]["matrices"]) == 2 * len(TARGETS)


def test_load_model_routes_cospadi_folders_to_checkpoint_load(saved_llama):
    model, _ = compressed("llama", "cospadi")
    loaded, tokenizer = cospadi.load_model(str(saved_llama))
    assert tokenizer is None  # saved without one
    assert isinstance(loaded.model.layers[1].mlp.down_proj, DictLinear)
    held_out = ids(8)
    assert torch.equal(logits(loaded, held_out), logits(model, held_out))


def test_save_over_an_existing_folder_replaces_it_and_leaves_no_leftovers(tmp_path):
    model, report = compressed("qwen2", "svd-llm")
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier run")
    cospadi.save(model, None, out, report.to_dict())
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

    with pytest.raises(RuntimeError, match="boom"):
        with atomic_folder(out) as tmp:
            (tmp / "a.txt").write_text("b")
            (tmp / "b.txt").write_text("b")
            raise RuntimeError("boom")
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"]
    assert (out / "a.txt").read_text() == "a"
    assert sorted(p.name for p in out.parent.iterdir()) == ["dest"]


def test_atomic_folder_refuses_a_file_destination(tmp_path):
    target = tmp_path / "file"
    target.write_text("keep me")
    with pytest.raises(CospadiError, match="not a folder"):
        with atomic_folder(target):
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


def test_failed_save_leaves_no_destination_and_no_temporary_folder(tmp_path, monkeypatch):
    model, report = compressed("llama", "svd-llm")
    _fail_midway(model, monkeypatch)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="No space left"):
        cospadi.save(model, None, out, report.to_dict())
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_failed_save_leaves_an_existing_destination_untouched(tmp_path, monkeypatch, saved_llama):
    model, report = compressed("llama", "svd-llm")
    out = copy_folder(saved_llama, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _fail_midway(model, monkeypatch)
    with pytest.raises(OSError):
        cospadi.save(model, None, out, report.to_dict())
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    loaded, _ = cospadi.load(out)  # still the earlier cospadi model
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, DictLinear)


def test_load_without_description_says_it_is_not_a_cospadi_folder(tmp_path, saved_llama):
    broken = copy_folder(saved_llama, tmp_path / "broken")
    (broken / DESCRIPTION).unlink()
    with pytest.raises(CospadiError, match=r"cospadi\.json.*not a cospadi output folder"):
        cospadi.load(broken)


def test_load_truncated_weights_says_corrupt(tmp_path, saved_llama):
    broken = copy_folder(saved_llama, tmp_path / "broken")
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CospadiError, match=r"model\.safetensors.*corrupt.*compress again"):
        cospadi.load(broken)


def test_load_without_weights_says_incomplete(tmp_path, saved_llama):
    broken = copy_folder(saved_llama, tmp_path / "broken")
    (broken / "model.safetensors").unlink()
    with pytest.raises(CospadiError, match=r"no model\*\.safetensors.*incomplete"):
        cospadi.load(broken)


def test_load_newer_format_says_upgrade(tmp_path, saved_llama):
    broken = copy_folder(saved_llama, tmp_path / "broken")
    description = json.loads((broken / DESCRIPTION).read_text())
    description["format_version"] = 99
    (broken / DESCRIPTION).write_text(json.dumps(description))
    with pytest.raises(CospadiError, match=r"version 99.*upgrade cospadi"):
        cospadi.load(broken)


def test_load_invalid_description_json_says_corrupt(tmp_path, saved_llama):
    broken = copy_folder(saved_llama, tmp_path / "broken")
    (broken / DESCRIPTION).write_text('{"format_version": 1, "modules": ')
    with pytest.raises(CospadiError, match=r"not valid JSON.*corrupt"):
        cospadi.load(broken)


def test_load_unknown_module_type_is_named(tmp_path, saved_llama):
    broken = copy_folder(saved_llama, tmp_path / "broken")
    description = json.loads((broken / DESCRIPTION).read_text())
    description["modules"]["model.layers.0.mlp.up_proj"]["type"] = "quantized"
    (broken / DESCRIPTION).write_text(json.dumps(description))
    with pytest.raises(CospadiError, match=r"unknown module type 'quantized'.*model\.layers\.0\.mlp\.up_proj"):
        cospadi.load(broken)


def test_load_description_without_modules_reports_mismatched_weights(tmp_path, saved_llama):
    broken = copy_folder(saved_llama, tmp_path / "broken")
    description = json.loads((broken / DESCRIPTION).read_text())
    description["modules"] = {}
    (broken / DESCRIPTION).write_text(json.dumps(description))
    with pytest.raises(CospadiError, match=r"do not match the description.*corrupt"):
        cospadi.load(broken)


def test_load_description_with_wrong_shapes_raises_cospadi_error(tmp_path, saved_llama):
    """A cospadi.json whose module sizes disagree with the weights (e.g. copied from
    another run) is a corrupt folder like any other: CospadiError, not a raw
    RuntimeError from load_state_dict."""
    broken = copy_folder(saved_llama, tmp_path / "broken")
    description = json.loads((broken / DESCRIPTION).read_text())
    description["modules"]["model.layers.0.self_attn.q_proj"]["atoms"] += 1
    (broken / DESCRIPTION).write_text(json.dumps(description))
    with pytest.raises(CospadiError, match=r"model\.layers\.0\.self_attn\.q_proj"):
        cospadi.load(broken)
