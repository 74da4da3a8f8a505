"""Damaged cospadi folders give one clear CospadiError (what is wrong, what to do) through
`cospadi.load`, and through plain `AutoModelForCausalLM.from_pretrained` wherever the
damage reaches cospadi's quantizer: a missing or garbled config.json, a folder that is
not cospadi's, a format version from a newer (or older) cospadi, bad module entries, a
missing shard, a garbled index or one that puts a tensor in the wrong shard, truncated
or garbled safetensors, and a corrupt bitmask. A truncated config.json stops plain
transformers before cospadi's quantizer is chosen: its own one-line OSError names the
file, and `cospadi.load`, `cospadi eval --model` and `cospadi export` give one line."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import cospadi
from cospadi import cli
from cospadi.errors import CospadiError
from cospadi.pipeline import Recipe, compress_blocks
from cospadi.solvers import SolverOptions
from cospadi.storage.config import replace_modules

Q = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_model, calibration_ids):
    """{"single": one-file folder, "sharded": several shards, "dense": a plain folder}."""
    model = tiny_model("llama", tie_word_embeddings=True)
    root = tmp_path_factory.mktemp("saved")
    model.save_pretrained(root / "dense")
    report = compress_blocks(model, calibration_ids, Recipe("cospadi", 0.3, SolverOptions(iters=1)), batch_size=4,
                             progress=False)
    cospadi.save(model, None, root / "single", report.to_dict())
    cospadi.save(model, None, root / "sharded", report.to_dict(), max_shard_size="60KB")
    assert len(list((root / "sharded").glob("model-*.safetensors"))) >= 2
    return {name: root / name for name in ("single", "sharded", "dense")}


@pytest.fixture
def copy(saved, tmp_path):
    def make(name: str = "single"):
        return shutil.copytree(saved[name], tmp_path / f"broken-{name}")
    return make


def without_checksums(folder) -> None:
    """Drop cospadi.json's checksums and digest, as folders saved before them lack them:
    the tests below reach the checks that stand behind the checksums (which refuse any
    rewritten file first)."""
    description = json.loads((folder / "cospadi.json").read_text())
    description.pop("checksums"), description.pop("digest")
    (folder / "cospadi.json").write_text(json.dumps(description))


def edit_config(folder, change) -> None:
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))
    without_checksums(folder)


def both_routes(folder, pattern: str) -> None:
    with pytest.raises(CospadiError, match=pattern):
        cospadi.load(folder)
    with pytest.raises(CospadiError, match=pattern):
        AutoModelForCausalLM.from_pretrained(folder)


def test_the_intact_folders_load(saved):
    for name in ("single", "sharded"):
        cospadi.load(saved[name])


def test_missing_folder_and_config(copy, tmp_path):
    with pytest.raises(CospadiError, match="does not exist"):
        cospadi.load(tmp_path / "nowhere")
    folder = copy()
    (folder / "config.json").unlink()
    with pytest.raises(CospadiError, match="no config.json"):
        cospadi.load(folder)


def test_garbled_config_json(copy):
    folder = copy()
    (folder / "config.json").write_text('{"model_type": "llama", "quantization_config": ')
    with pytest.raises(CospadiError, match=r"config\.json is not valid JSON.*corrupt"):
        cospadi.load(folder)


def test_a_dense_folder_is_not_a_cospadi_folder(saved):
    with pytest.raises(CospadiError, match="not a cospadi output folder"):
        cospadi.load(saved["dense"])


def test_newer_format_version_says_upgrade(copy):
    folder = copy()
    edit_config(folder, lambda c: c["quantization_config"].update(format_version=99))
    both_routes(folder, r"format version 99, newer than this cospadi.*upgrade cospadi")


def test_older_format_version_says_compress_again(copy):
    folder = copy()
    edit_config(folder, lambda c: c["quantization_config"].update(format_version=1))
    both_routes(folder, r"format version 1.*compress the model again")


def test_unknown_module_type_is_named(copy):
    folder = copy()
    edit_config(folder, lambda c: c["quantization_config"]["modules"][Q].update(type="quantized"))
    both_routes(folder, rf"unknown module type 'quantized' for {Q}")


def test_module_entry_that_does_not_fit_the_model(copy, tiny_model):
    folder = copy()
    edit_config(folder, lambda c: c["quantization_config"]["modules"][Q].update(in_features=63))
    both_routes(folder, rf"{Q}\.dictionary has shape \[64, \d+\], config\.json implies \[63, \d+\].*corrupt")
    folder = copy("sharded")
    edit_config(folder, lambda c: c["quantization_config"]["modules"].update({"model.layers.9.mlp.up_proj": {
        "type": "lowrank", "in_features": 64, "out_features": 128, "rank": 4}}))
    both_routes(folder, r"model\.layers\.9\.mlp\.up_proj\.left is missing.*corrupt")
    model = tiny_model("llama")  # SMALL sizes: hidden 64, intermediate 128
    spec = {"type": "lowrank", "in_features": 64, "out_features": 128, "rank": 4}
    with pytest.raises(CospadiError, match=r"lists compressed module model\.layers\.9\.mlp\.up_proj.*corrupt"):
        replace_modules(model, {"model.layers.9.mlp.up_proj": spec}, torch.float32, None)
    with pytest.raises(CospadiError, match=r"model\.layers\.0\.mlp\.down_proj is 64x128 but the model's layer "
                                           r"is 128x64"):
        replace_modules(model, {"model.layers.0.mlp.down_proj": spec}, torch.float32, None)


def test_module_sizes_that_disagree_with_the_weights(copy):
    folder = copy()
    edit_config(folder, lambda c: c["quantization_config"]["modules"][Q].update(atoms=c["quantization_config"]
                                                                                ["modules"][Q]["atoms"] + 1))
    both_routes(folder, rf"do not match config\.json: {Q}\.dictionary has shape.*compress again")


def test_module_missing_from_the_config(copy, caplog):
    folder = copy()
    edit_config(folder, lambda c: c["quantization_config"]["modules"].pop(Q))
    with pytest.raises(CospadiError, match=rf"do not match config\.json.*{Q}"):
        cospadi.load(folder)
    assert not [r for r in caplog.records if "LOAD REPORT" in r.getMessage()]  # the one line says it all


def test_missing_shard(copy):
    folder = copy("sharded")
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.unlink()
    both_routes(folder, rf"missing weight shard {shard.name}.*copy the whole folder again")


@pytest.mark.parametrize("text", ["{}", "{not json", '{"weight_map": ["model.safetensors"]}', '{"weight_map": {"a'])
def test_garbled_index(copy, text):
    folder = copy("sharded")
    (folder / "model.safetensors.index.json").write_text(text)
    both_routes(folder, r"model\.safetensors\.index\.json is not a valid safetensors index.*copy it again")


def test_index_that_puts_a_tensor_in_the_wrong_shard(copy):
    """transformers would leave that tensor at its random initialization."""
    folder = copy("sharded")
    path = folder / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    key = "model.norm.weight"
    index["weight_map"][key] = next(s for s in sorted(set(index["weight_map"].values()))
                                    if s != index["weight_map"][key])
    path.write_text(json.dumps(index))
    without_checksums(folder)
    both_routes(folder, rf"index\.json maps {key} to {index['weight_map'][key]}, which does not hold it.*corrupt")


@pytest.mark.parametrize("keep", [0, 60])
def test_truncated_config_json_is_one_line_on_every_route(copy, tmp_path, keep, capsys):
    folder = copy()
    config = folder / "config.json"
    config.write_text(config.read_text()[:keep])
    with pytest.raises(CospadiError, match=r"config\.json is not valid JSON.*corrupt"):
        cospadi.load(folder)
    with pytest.raises(OSError, match=rf"config file at '{config}' is not a valid JSON file") as info:
        AutoModelForCausalLM.from_pretrained(folder)  # transformers' own error, before any cospadi code runs
    assert "\n" not in str(info.value)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Document {i} says something short." for i in range(20)))
    for argv in (["eval", "--model", str(folder), "--data", str(corpus), "--seq-len", "8", "--quiet"],
                 ["export", "--dense", str(folder), str(tmp_path / "dense"), "--quiet"]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {config} is not valid JSON"), err
    assert not (tmp_path / "dense").exists()


def test_no_weights_at_all(copy):
    folder = copy()
    (folder / "model.safetensors").unlink()
    with pytest.raises(CospadiError, match=r"no model\.safetensors.*incomplete"):
        cospadi.load(folder)


@pytest.mark.parametrize("name", ["single", "sharded"])
def test_truncated_weights(copy, name):
    folder = copy(name)
    weights = sorted(folder.glob("model*.safetensors"))[0]
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    both_routes(folder, rf"{weights.name} is truncated.*corrupt")
    weights.write_bytes(data[:5])
    both_routes(folder, rf"{weights.name} is not a readable safetensors file")


def test_garbled_header(copy):
    folder = copy()
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:20] = b"not json!!!!"
    weights.write_bytes(bytes(data))
    both_routes(folder, r"not a readable safetensors file \(damaged header\)")


def test_corrupt_bitmask(copy):
    """Behind the checksums (which refuse any rewritten file first): a folder saved before
    checksums were recorded still gets the bitmask check."""
    folder = copy()
    without_checksums(folder)
    weights = folder / "model.safetensors"
    tensors = load_file(weights)
    tensors[f"{Q}.mask"][0] ^= 0xFF  # flips 8 pattern bits of column 0
    save_file(tensors, weights, metadata={"format": "pt"})
    both_routes(folder, r"bitmask of S has \d+ entries in column 0, expected \d+.*corrupt")
