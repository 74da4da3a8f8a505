"""An interrupted compression resumes from its progress folder with exactly the result of
an uninterrupted run, skips the finished blocks, keeps shared factors shared, and refuses
a folder of another run, a changed or unreadable file, or one of the old pickle format.
The folder holds safetensors and JSON only, and is read without pickles."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from cospadi import resume
from cospadi.adapters import decoder_layers
from cospadi.errors import CospadiError
from cospadi.pipeline import Recipe, compress_blocks
from cospadi.resume import run_fingerprint
from cospadi.solvers import SolverOptions

OPTIONS = SolverOptions(sweeps=2)
CONFIG = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=64)


def build() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()


def ids() -> torch.Tensor:
    return torch.randint(0, 300, (6, 24), generator=torch.Generator().manual_seed(1))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(ids()[:2]).logits


SHARE = ("q", "k", "v", "gate", "up")  # grouped runs share these (more than cospadi's default gate/up)


def compress(model, folder, method="cospadi", ratio=0.3, group_size=1, data=None):
    """The run every test resumes: batches of 3 (two batches), one worker, no bar."""
    recipe = Recipe(method, ratio, OPTIONS, group_size, share=SHARE if group_size > 1 else None)
    return compress_blocks(model, ids() if data is None else data, recipe, batch_size=3, progress=False, workers=1,
                           resume_dir=folder)


def interrupt_after(monkeypatch, commits: int) -> None:
    """Make the pipeline die (like a Ctrl-C) right after its `commits`-th progress save."""
    calls = []
    real_save = resume.save_progress

    def save_then_stop(*args, **kwargs):
        real_save(*args, **kwargs)
        calls.append(1)
        if len(calls) == commits:
            raise KeyboardInterrupt

    monkeypatch.setattr("cospadi.pipeline.run.save_progress", save_then_stop)


def count_solves(monkeypatch) -> list[int]:
    from cospadi.pipeline import solve

    solved = []

    def counting(jobs, *args, **kwargs):
        solved.append(len(jobs))
        return solve.solve_jobs(jobs, *args, **kwargs)

    monkeypatch.setattr("cospadi.pipeline.run.solve_jobs", counting)
    return solved


def no_pickles(monkeypatch) -> None:
    """Resuming must not unpickle anything."""
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load called while resuming")

    monkeypatch.setattr(torch, "load", refuse)


def flip_byte(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A folder of a finished per-layer cospadi run, and the model's logits; tests copy it."""
    folder = tmp_path_factory.mktemp("finished")
    model = build()
    compress(model, folder)
    return folder, logits(model)


def copy_of(finished, tmp_path):
    folder = tmp_path / "resume"
    shutil.copytree(finished[0], folder)
    return folder


@pytest.mark.parametrize("method,group_size", [("cospadi", 1), ("cospadi", 2), ("svd-llm", 1)])
def test_resumed_run_equals_uninterrupted(tmp_path, monkeypatch, method, group_size):
    whole = build()
    expected = compress_blocks(whole, ids(), Recipe(method, 0.3, OPTIONS, group_size,
                                                    share=SHARE if group_size > 1 else None),
                               batch_size=3, progress=False, workers=1)
    with monkeypatch.context() as patch:
        interrupt_after(patch, 1)
        with pytest.raises(KeyboardInterrupt):
            compress(build(), tmp_path, method, group_size=group_size)
    solved = count_solves(monkeypatch)
    no_pickles(monkeypatch)
    resumed_model = build()
    resumed = compress(resumed_model, tmp_path, method, group_size=group_size)
    assert len(solved) == 4 // group_size - 1  # the first group was not solved again
    assert torch.equal(logits(resumed_model), logits(whole))
    assert [(m.layer, m.name, m.output_error) for m in resumed.matrices] == \
        [(m.layer, m.name, m.output_error) for m in expected.matrices]
    if group_size == 2:  # restored blocks of a group still share one dictionary
        layers = decoder_layers(resumed_model)
        assert layers[0].self_attn.q_proj.dictionary is layers[1].self_attn.q_proj.dictionary
        assert layers[0].self_attn.o_proj.dictionary is not layers[1].self_attn.o_proj.dictionary


def test_folder_holds_safetensors_and_json_only_with_shared_factors_stored_once(tmp_path):
    compress(build(), tmp_path, group_size=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["group-000.json", "group-000.safetensors", "group-002.json", "group-002.safetensors",
                     "progress.json", "states-004.safetensors"]  # no .pt, no temporary, old states removed
    tensors = load_file(tmp_path / "group-000.safetensors")
    assert "0.self_attn.q_proj.dictionary" in tensors and "1.self_attn.q_proj.dictionary" not in tensors
    assert "1.self_attn.o_proj.dictionary" in tensors and "1.input_layernorm.weight" in tensors
    described = json.loads((tmp_path / "group-000.json").read_text())["blocks"]
    assert sorted(described) == ["0", "1"] and described["1"]["dtype"] == "float32"
    assert described["1"]["modules"]["self_attn.q_proj"]["shares"] == "0.self_attn.q_proj"
    assert "shares" not in described["0"]["modules"]["self_attn.q_proj"]
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert progress["done"] == 4 and sorted(progress["files"]) == [n for n in names if n != "progress.json"]
    states = load_file(tmp_path / "states-004.safetensors")
    assert sorted(states) == ["batch.000", "batch.001"] and states["batch.000"].shape == (3, 24, 64)


def test_interruption_between_states_and_commit_resumes(tmp_path, monkeypatch, finished):
    """Killed after the second commit's states file but before its progress.json: the first
    commit is still whole and the run resumes from it."""
    real = resume._write_json
    commits = []

    def write_or_die(path, obj):
        if path.name == "progress.json":
            commits.append(1)
            if len(commits) == 2:
                raise KeyboardInterrupt
        return real(path, obj)

    with monkeypatch.context() as patch:
        patch.setattr(resume, "_write_json", write_or_die)
        with pytest.raises(KeyboardInterrupt):
            compress(build(), tmp_path)
    assert (tmp_path / "states-001.safetensors").exists() and (tmp_path / "states-002.safetensors").exists()
    solved = count_solves(monkeypatch)
    model = build()
    compress(model, tmp_path)
    assert len(solved) == 3
    assert torch.equal(logits(model), finished[1])


def test_finished_folder_replays_without_solving(tmp_path, monkeypatch, finished):
    folder = copy_of(finished, tmp_path)
    solved = count_solves(monkeypatch)
    no_pickles(monkeypatch)
    again = build()
    report = compress(again, folder)
    assert solved == []
    assert len(report.matrices) == 4 * 7
    assert torch.equal(logits(again), finished[1])


def test_folder_of_another_run_is_refused(tmp_path, finished):
    folder = copy_of(finished, tmp_path)
    with pytest.raises(CospadiError, match="different run"):
        compress(build(), folder, ratio=0.4)
    with pytest.raises(CospadiError, match="different run"):
        compress(build(), folder, data=ids().flip(0))
    other = build()  # one weight of the LAST block changed
    with torch.no_grad():
        decoder_layers(other)[-1].mlp.down_proj.weight[3, 5] += 1e-3
    assert run_fingerprint(other, ids(), {}) != run_fingerprint(build(), ids(), {})
    with pytest.raises(CospadiError, match="different run"):
        compress(other, folder)


@pytest.mark.parametrize("name", ["states-004.safetensors", "group-002.safetensors", "group-001.json"])
def test_bit_flip_is_refused_naming_the_file(tmp_path, finished, name):
    folder = copy_of(finished, tmp_path)
    path = folder / name
    flip_byte(path, path.stat().st_size - 7)  # inside the data, past the header
    with pytest.raises(CospadiError, match=f"{name} does not match its checksum.*delete the folder"):
        compress(build(), folder)


def test_group_file_copied_over_another_is_refused(tmp_path, finished):
    folder = copy_of(finished, tmp_path)
    shutil.copyfile(folder / "group-000.safetensors", folder / "group-002.safetensors")
    with pytest.raises(CospadiError, match="group-002.safetensors does not match its checksum"):
        compress(build(), folder)


def test_unreadable_progress_is_a_clear_error(tmp_path, finished):
    folder = copy_of(finished, tmp_path)
    (folder / "progress.json").write_bytes(b'{"format": 2, "fingerpr')
    with pytest.raises(CospadiError, match="cannot read .*progress.json"):
        compress(build(), folder)
    folder = copy_of(finished, tmp_path / "truncated")
    path = folder / "group-003.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CospadiError, match="group-003.safetensors does not match"):
        compress(build(), folder)


def test_old_pickle_folder_is_a_one_line_error(tmp_path):
    (tmp_path / "progress.pt").write_bytes(b"old pickle")
    with pytest.raises(CospadiError, match="older cospadi.*delete it") as info:
        compress(build(), tmp_path)
    assert "\n" not in str(info.value)


def test_fingerprint_ignores_where_the_model_was_loaded_from(tmp_path, monkeypatch):
    build().save_pretrained(tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    relative = LlamaForCausalLM.from_pretrained("model")
    absolute = LlamaForCausalLM.from_pretrained(str(tmp_path / "model"))
    assert relative.config._name_or_path != absolute.config._name_or_path
    settings = Recipe("cospadi", 0.3, OPTIONS).settings()
    assert run_fingerprint(relative, ids(), settings) == run_fingerprint(absolute, ids(), settings)
    half = build().to(torch.bfloat16)  # bf16 tensors are hashed by their bytes, and differ from float32
    assert run_fingerprint(half, ids(), settings) != run_fingerprint(build(), ids(), settings)


def test_temporary_files_of_a_killed_run_are_removed_on_the_next(tmp_path, finished):
    """A run killed with SIGKILL inside atomic_file leaves `.NAME.tmp-<pid>`; the next run
    in the folder removes it when that process is gone, and keeps a live writer's."""
    import subprocess
    import sys

    folder = copy_of(finished, tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = folder / f".group-001.safetensors.tmp-{int(dead.stdout)}"
    stale.write_bytes(b"half a file")
    live = folder / f".progress.json.tmp-{os.getpid()}"
    live.write_text("{")
    compress(build(), folder)
    assert not stale.exists() and live.exists()
