"""Damaged plain (uncompressed) model folders: garbage, truncated or padded weights, a
missing shard, a garbled index or one that puts a tensor in the wrong shard, a truncated
config.json or tokenizer.json, a tensor missing from the weights or of another shape.
Each is one CospadiError naming the damaged file (or tensor) and what to do, through
the Python loader (`cospadi.load_model`) and through `cospadi compress --model` and
`cospadi eval --model` (exit 2, one `error:` line, no traceback): never a traceback,
and never a model with weights transformers initialized at random."""

import contextlib
import io
import json
import os
import shutil

import pytest
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from cospadi import cli
from cospadi.errors import CospadiError
from cospadi.models import load_model

INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def plain(cli_files, tmp_path_factory):
    """{"single": the CLI tests' tiny Llama folder (one model.safetensors, tokenizer),
    "sharded": the same model in several shards with its index}."""
    root = tmp_path_factory.mktemp("plain")
    single = shutil.copytree(cli_files["model"], root / "single")
    sharded = root / "sharded"
    AutoModelForCausalLM.from_pretrained(single).save_pretrained(sharded, max_shard_size="2MB")
    for path in single.glob("tokenizer*"):
        shutil.copy(path, sharded)
    assert len(list(sharded.glob("model-*.safetensors"))) >= 2
    return {"single": single, "sharded": sharded}


def truncate(path, keep: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100 if keep is None else keep])


def rewrite(path, change) -> None:
    """Rewrite the safetensors file `path` with change(tensors) applied."""
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def move_first_tensor_to_another_shard(folder) -> None:
    """Make the index name the wrong shard for its first tensor."""
    index = json.loads((folder / INDEX).read_text())
    key = sorted(index["weight_map"])[0]
    shards = sorted(set(index["weight_map"].values()))
    index["weight_map"][key] = next(s for s in shards if s != index["weight_map"][key])
    (folder / INDEX).write_text(json.dumps(index))


def last_shard(folder):
    return sorted(folder.glob("model-*.safetensors"))[-1]


# case -> (folder kind, damage, what the one error line says)
CASES = {
    "garbage-weights": ("single", lambda f: (f / "model.safetensors").write_bytes(os.urandom(4096)),
                        r"model\.safetensors is not a readable safetensors file .*copy or download it again"),
    "empty-weights": ("single", lambda f: (f / "model.safetensors").write_bytes(b""),
                      r"model\.safetensors is not a readable safetensors file"),
    "truncated-weights": ("single", lambda f: truncate(f / "model.safetensors"),
                          r"model\.safetensors is truncated \(\d+ bytes, expected \d+\).*copy or download it again"),
    "padded-weights": ("single", lambda f: (f / "model.safetensors").write_bytes(
        (f / "model.safetensors").read_bytes() + b"\0" * 64), r"model\.safetensors is longer than its header says"),
    "truncated-shard": ("sharded", lambda f: truncate(last_shard(f)),
                        r"model-\d+-of-\d+\.safetensors is truncated"),
    "missing-shard": ("sharded", lambda f: last_shard(f).unlink(),
                      r"is missing weight shard model-\d+-of-\d+\.safetensors.*copy or download it again"),
    "garbled-index": ("sharded", lambda f: (f / INDEX).write_text("{not json"),
                      rf"{INDEX} is not valid JSON"),
    "index-without-weight-map": ("sharded", lambda f: (f / INDEX).write_text("{}"),
                                 rf"{INDEX} is not a valid safetensors index"),
    "index-names-the-wrong-shard": ("sharded", move_first_tensor_to_another_shard,
                                    rf"{INDEX} maps model\.embed_tokens\.weight to model-\d+-of-\d+\.safetensors, "
                                    "which does not hold it.*copy or download it again"),
    "truncated-config": ("single", lambda f: truncate(f / "config.json", 40), r"config\.json is not valid JSON"),
    "truncated-tokenizer": ("single", lambda f: truncate(f / "tokenizer.json", 1000),
                            r"tokenizer\.json is not valid JSON"),
    "tensor-missing": ("single", lambda f: rewrite(f / "model.safetensors",
                                                   lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
                       r"weight files lack model\.layers\.1\.mlp\.up_proj\.weight \(1 tensor"),
    "tensor-of-another-shape": ("single", lambda f: rewrite(f / "model.safetensors", lambda t: t.update(
        {"model.norm.weight": t["model.norm.weight"][:-1].clone()})), r"hold model\.norm\.weight at another shape"),
}


def run_cli(argv) -> tuple[int, str]:
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(argv)
    return code, stderr.getvalue()


@pytest.mark.parametrize("case", list(CASES))
def test_a_damaged_plain_folder_is_one_clear_error(case, plain, cli_files, tmp_path):
    kind, damage, pattern = CASES[case]
    folder = shutil.copytree(plain[kind], tmp_path / case)
    damage(folder)
    with pytest.raises(CospadiError, match=pattern) as info:
        load_model(str(folder))
    assert str(folder) in str(info.value) and "\n" not in str(info.value)
    common = ["--model", str(folder), "--data", str(cli_files["txt"]), "--seq-len", "32", "--quiet"]
    for argv in (["compress", *common, "--calib-samples", "2", "--eval-windows", "0", "--out", str(tmp_path / "out")],
                 ["eval", *common, "--eval-windows", "2"]):
        code, stderr = run_cli(argv)
        assert code == 2 and "Traceback" not in stderr, stderr
        assert stderr.strip().splitlines() == [f"error: {info.value}"], stderr
    assert not (tmp_path / "out").exists()


def test_intact_folders_load_and_transformers_still_reports_extra_tensors(plain, tmp_path, caplog):
    for folder in plain.values():
        model, tokenizer = load_model(str(folder))
        assert tokenizer is not None and not model.training
    assert not [r for r in caplog.records if "LOAD REPORT" in r.getMessage()]
    folder = shutil.copytree(plain["single"], tmp_path / "extra")
    rewrite(folder / "model.safetensors", lambda t: t.update({"extra.weight": t["model.norm.weight"].clone()}))
    load_model(str(folder))  # an unexpected tensor is harmless: it loads, and transformers' report is logged
    reports = [r.getMessage() for r in caplog.records if "LOAD REPORT" in r.getMessage()]
    assert len(reports) == 1 and "extra.weight" in reports[0]
