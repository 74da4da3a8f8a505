"""Reliability of what cospadi writes and reads:
* output folders never destroy user files: a non-empty folder cospadi did not write, the
  input model's folder or a parent of it, the current folder, a file, an empty path are
  refused with one line (at the start of `cospadi compress`, before the model is loaded,
  and again at save time); an earlier output is replaced only with --overwrite; stale
  temporaries of killed writers are removed, live ones kept;
* saved folders record the sha256 of every weight file: a flipped bit is refused by
  `cospadi.load` and by plain from_pretrained, naming the file; older folders still load;
* Ctrl-C prints one line and exits 130 leaving nothing half-written; during the solve it
  stops the worker threads at once (jobs not started never start), and the resume folder
  then finishes to the same bytes as an uninterrupted run;
* compressing an already compressed folder is one error line."""

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time

import pytest
from transformers import AutoModelForCausalLM, PreTrainedModel

import cospadi
from cospadi import api, cli, files
from cospadi.errors import CospadiError
from cospadi.files import OUTPUT_MARKERS, atomic_folder, check_output_folder
from cospadi.pipeline import Recipe, compress_blocks
from cospadi.pipeline import solve as solve_module
from cospadi.solvers import SolverOptions
from cospadi.storage import folder_checks
from cospadi.storage.export import EXPORT_DESCRIPTION, export_dense

SEQ_LEN = 32


def compress_argv(cli_files, out=None, *extra) -> list[str]:
    argv = ["compress", "--model", str(cli_files["model"]), "--data", str(cli_files["txt"]), "--method", "svd-llm",
            "--calib-samples", "4", "--seq-len", str(SEQ_LEN), "--eval-windows", "0", "--quiet", *extra]
    return argv + (["--out", str(out)] if out is not None else [])


def run_cli(argv) -> tuple[int, str]:
    """(exit code, stderr) of cli.main(argv)."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(argv)
    return code, stderr.getvalue()


def one_error_line(code: int, stderr: str) -> str:
    assert code == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the compress command gets as far as loading the model."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad output was refused")
    monkeypatch.setattr(cli, "load_model", refuse)


@pytest.fixture(scope="module")
def first_run(cli_files, tmp_path_factory):
    """A successful `cospadi compress --out` of the tiny Llama (svd-llm)."""
    out = tmp_path_factory.mktemp("first") / "out"
    code, stderr = run_cli(compress_argv(cli_files, out))
    assert code == 0, stderr
    return out


def dead_pid() -> int:
    """The id of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---------------------------------------------------------------------------- output folders


def test_compress_refuses_a_folder_of_user_files_before_loading(cli_files, tmp_path, no_model_load):
    out = tmp_path / "x"
    out.mkdir()
    (out / "notes.txt").write_text("hi")
    line = one_error_line(*run_cli(compress_argv(cli_files, out)))
    assert "cospadi did not write" in line and "notes.txt" in line and "choose another path" in line
    line = one_error_line(*run_cli(compress_argv(cli_files, out, "--overwrite")))  # --overwrite is no excuse
    assert "cospadi did not write" in line
    assert (out / "notes.txt").read_text() == "hi" and sorted(p.name for p in tmp_path.iterdir()) == ["x"]


@pytest.mark.parametrize("case", ["model", "model-parent", "dot", "empty", "file", "json-inside", "resume-inside"])
def test_compress_refuses_bad_out_paths_before_loading(case, cli_files, tmp_path, monkeypatch, no_model_load):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # an empty current folder: `--out .` is refused for being it, not for its files
    (tmp_path / "file").write_text("keep")
    out, extra, word = {
        "model": (cli_files["model"], [], "is the --model folder"),
        "model-parent": (cli_files["model"].parent, [], "contains the --model folder"),
        "dot": (".", [], "is the current folder"),
        "empty": ("", [], "empty"),
        "file": (tmp_path / "file", [], "not a folder"),
        "json-inside": (tmp_path / "o", ["--json", str(tmp_path / "o" / "r.json")], "contains the --json file"),
        "resume-inside": (tmp_path / "o", ["--resume-dir", str(tmp_path / "o" / "p")], "contains the --resume-dir"),
    }[case]
    line = one_error_line(*run_cli(compress_argv(cli_files, None, *extra) + ["--out", str(out)]))
    assert word in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "work"] and not list(work.iterdir())
    assert (tmp_path / "file").read_text() == "keep"


@pytest.mark.parametrize("case", ["folder", "under-a-file", "empty"])
def test_compress_refuses_a_bad_json_path_before_loading(case, cli_files, tmp_path, no_model_load):
    (tmp_path / "file").write_text("keep")
    path, word = {"folder": (tmp_path, "is a folder"), "under-a-file": (tmp_path / "file" / "r.json", "is a file"),
                  "empty": ("", "empty")}[case]
    line = one_error_line(*run_cli(compress_argv(cli_files, tmp_path / "out", "--json", str(path))))
    assert "--json" in line and word in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_an_unwritable_parent_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(files.os, "access", lambda path, mode: False)
    with pytest.raises(CospadiError, match=f"cannot write in {tmp_path}"):
        check_output_folder(tmp_path / "new" / "out")


def test_an_earlier_output_is_replaced_only_with_overwrite(first_run, cli_files, tmp_path, monkeypatch):
    out = shutil.copytree(first_run, tmp_path / "out")
    (out / "extra.txt").write_text("from the earlier run")
    stale = tmp_path / f".out.tmp-{dead_pid()}-abc123"  # left by a killed save
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    live = tmp_path / f".out.tmp-{os.getpid()}-live"  # a writer that is still running
    live.mkdir()
    with monkeypatch.context() as patch:
        patch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("loaded before refusing"))
        line = one_error_line(*run_cli(compress_argv(cli_files, out)))
    assert "earlier cospadi output" in line and "--overwrite" in line
    assert (out / "extra.txt").is_file() and not stale.exists() and live.is_dir()
    code, stderr = run_cli(compress_argv(cli_files, out, "--overwrite"))
    assert code == 0, stderr
    assert not (out / "extra.txt").exists()
    live.rmdir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    cospadi.load(out)


def test_killed_swap_is_undone_by_the_next_writer(tmp_path):
    """A kill between moving the earlier output aside and moving the new one in leaves
    `.out.old-<pid>` and no `out`: the next writer puts the earlier output back first."""
    old = tmp_path / f".out.old-{dead_pid()}"
    old.mkdir()
    (old / "cospadi.json").write_text("{}")
    with pytest.raises(CospadiError, match="earlier cospadi output"):
        check_output_folder(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (tmp_path / "out" / "cospadi.json").is_file()


def test_an_empty_folder_is_filled(tmp_path):
    (tmp_path / "out").mkdir()
    with atomic_folder(tmp_path / "out") as tmp:
        (tmp / "a").write_text("a")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a"]


def test_export_output_rules(first_run, tmp_path):
    source = shutil.copytree(first_run, tmp_path / "cospadi")
    with pytest.raises(CospadiError, match="contains the source folder"):
        export_dense(source, tmp_path)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("hi")
    with pytest.raises(CospadiError, match="cospadi did not write"):
        export_dense(source, tmp_path / "mine")
    out = export_dense(source, tmp_path / "dense")
    assert EXPORT_DESCRIPTION in OUTPUT_MARKERS
    assert json.loads((out / EXPORT_DESCRIPTION).read_text())["exported_from"] == str(source.resolve())
    code, stderr = run_cli(["export", "--dense", str(source), str(out), "--quiet"])
    assert "--overwrite" in one_error_line(code, stderr)
    assert run_cli(["export", "--dense", str(source), str(out), "--quiet", "--overwrite"])[0] == 0
    assert (tmp_path / "mine" / "notes.txt").read_text() == "hi"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cospadi", "dense", "mine"]


def test_save_refuses_the_folder_the_model_was_loaded_from(first_run, tmp_path):
    folder = shutil.copytree(first_run, tmp_path / "m")
    model, tokenizer = cospadi.load(folder)
    with pytest.raises(CospadiError, match="is the folder the model was loaded from"):
        cospadi.save(model, tokenizer, folder, overwrite=True)
    cospadi.load(folder)


def test_compressing_a_compressed_folder_is_one_error_line(first_run, cli_files, tmp_path):
    argv = compress_argv(cli_files, tmp_path / "again")
    argv[argv.index("--model") + 1] = str(first_run)
    line = one_error_line(*run_cli(argv))
    assert "already compressed" in line and "cospadi export --dense" in line
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- Ctrl-C


def interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("resume", [False, True])
def test_ctrl_c_prints_one_line_and_exits_130(resume, cli_files, tmp_path, monkeypatch):
    monkeypatch.setattr(api, "compress", interrupt)
    extra = ["--json", str(tmp_path / "r.json")] + (["--resume-dir", str(tmp_path / "progress")] if resume else [])
    code, stderr = run_cli(compress_argv(cli_files, tmp_path / "out", *extra))
    assert code == 130
    expected = "interrupted; rerun the same command to resume" if resume else "interrupted"
    assert stderr.strip().splitlines() == [expected]
    assert list(tmp_path.iterdir()) == []


def hang_block_1(monkeypatch, entered: list, outcomes: list, both_inside: threading.Event) -> None:
    """Solve block 0 as usual; every job of block 1 records itself in `entered` and spins
    (in Python, as the solvers do) until stopped, recording how it ended in `outcomes`;
    `both_inside` is set once two jobs run."""
    real = solve_module.solve_job

    def solve_job(job, method, options, quant=None):
        if job.members[0][0] == 0:
            return real(job, method, options, quant)
        entered.append(job.members[0][1])
        if len(entered) == 2:
            both_inside.set()
        deadline = time.monotonic() + 300  # a bound, not a timing: the test interrupts as soon as both run
        try:
            while time.monotonic() < deadline:
                time.sleep(0.002)
        except BaseException as exc:
            outcomes.append(type(exc).__name__)
            raise
        outcomes.append("finished")
        return real(job, method, options)

    monkeypatch.setattr(solve_module, "solve_job", solve_job)


def test_ctrl_c_during_the_solve_stops_the_workers_and_resumes_to_the_same_bytes(first_run, cli_files, tmp_path,
                                                                                monkeypatch):
    progress, out = tmp_path / "progress", tmp_path / "out"
    argv = compress_argv(cli_files, out, "--resume-dir", str(progress), "--workers", "2")
    entered, outcomes, both_inside = [], [], threading.Event()
    with monkeypatch.context() as patch:
        hang_block_1(patch, entered, outcomes, both_inside)
        main = threading.main_thread().ident
        ctrl_c = threading.Thread(target=lambda: both_inside.wait(300) and signal.pthread_kill(main, signal.SIGINT))
        ctrl_c.start()
        code, stderr = run_cli(argv)
        ctrl_c.join()
    assert code == 130 and stderr.strip().splitlines() == ["interrupted; rerun the same command to resume"], stderr
    assert len(entered) == 2  # the five other jobs of block 1 never started
    assert outcomes == ["_Stopped", "_Stopped"]  # the running ones did not run on to their end
    assert sorted(p.name for p in progress.iterdir()) == ["group-000.json", "group-000.safetensors", "progress.json",
                                                          "states-001.safetensors"]
    assert json.loads((progress / "progress.json").read_text())["done"] == 1 and not out.exists()
    code, stderr = run_cli(argv)
    assert code == 0, stderr
    for name in ("config.json", "model.safetensors"):
        assert (out / name).read_bytes() == (first_run / name).read_bytes(), name


def test_ctrl_c_during_the_save_leaves_nothing_half_written(cli_files, tmp_path, monkeypatch):
    real = PreTrainedModel.save_pretrained

    def save_then_interrupt(self, folder, *args, **kwargs):
        real(self, folder, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_then_interrupt)
    code, stderr = run_cli(compress_argv(cli_files, tmp_path / "out", "--json", str(tmp_path / "r.json")))
    assert code == 130 and stderr.strip() == "interrupted"
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- integrity


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_model, calibration_ids):
    """{"single": one weight file, "sharded": several shards} of a compressed tiny Llama."""
    model = tiny_model("llama")
    compress_blocks(model, calibration_ids, Recipe("cospadi", 0.3, SolverOptions(iters=1)), batch_size=4,
                    progress=False)
    root = tmp_path_factory.mktemp("integrity")
    cospadi.save(model, None, root / "single")
    cospadi.save(model, None, root / "sharded", max_shard_size="60KB")
    return {"single": root / "single", "sharded": root / "sharded"}


def flip_a_bit_inside_a_tensor(path) -> None:
    """Flip one bit in the middle of the largest floating tensor of a safetensors file."""
    data = bytearray(path.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    begin, end = max((entry["data_offsets"] for key, entry in header.items()
                      if key != "__metadata__" and entry["dtype"] in ("F32", "F16", "BF16")),
                     key=lambda offsets: offsets[1] - offsets[0])
    data[8 + length + (begin + end) // 2] ^= 0x04
    path.write_bytes(bytes(data))


def test_saved_folders_record_the_sha256_of_every_file(saved):
    for folder in saved.values():
        sums = json.loads((folder / "cospadi.json").read_text())["checksums"]
        shards = sorted(p.name for p in folder.glob("*.safetensors"))
        others = sorted(p.name for p in folder.iterdir() if p.suffix != ".safetensors" and p.name != "cospadi.json")
        assert {"config.json", "REPORT.md"} <= set(others) and sorted(sums) == sorted(shards + others)
        assert (len(shards) >= 2) == (folder.name == "sharded")
        for name, digest in sums.items():
            assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest


@pytest.mark.parametrize("name", ["config.json", "generation_config.json", "cospadi.json", "REPORT.md"])
def test_a_flipped_bit_in_a_json_file_is_refused_by_both_routes(name, saved, tmp_path):
    """One flipped bit turning a digit into another keeps the JSON valid, so only the
    checksums (and cospadi.json's own digest) can see it."""
    folder = shutil.copytree(saved["single"], tmp_path / "json")
    data = bytearray((folder / name).read_bytes())
    position = next(i for i in range(len(data) // 2, len(data)) if chr(data[i]) in "2345")
    data[position] ^= 0x01
    (folder / name).write_bytes(bytes(data))
    if name.endswith(".json"):
        json.loads(data)  # still valid
    pattern = rf"{name} is damaged"
    with pytest.raises(CospadiError, match=pattern):
        cospadi.load(folder)
    with pytest.raises(CospadiError, match=pattern):
        AutoModelForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize("name", ["single", "sharded"])
def test_a_flipped_bit_is_refused_by_both_routes(name, saved, tmp_path):
    folder = shutil.copytree(saved[name], tmp_path / name)
    shard = sorted(folder.glob("*.safetensors"))[-1]
    flip_a_bit_inside_a_tensor(shard)
    folder_checks.check_safetensors(shard)  # the header is intact: only the checksum sees it
    pattern = rf"{shard.name} is damaged .*sha256.*copy it again or compress again"
    with pytest.raises(CospadiError, match=pattern):
        cospadi.load(folder)
    with pytest.raises(CospadiError, match=pattern):
        AutoModelForCausalLM.from_pretrained(folder)


def test_load_hashes_each_file_once(saved, monkeypatch):
    calls = []
    real = folder_checks.file_sha256
    monkeypatch.setattr(folder_checks, "file_sha256", lambda path: calls.append(path.name) or real(path))
    cospadi.load(saved["sharded"])
    recorded = sorted(json.loads((saved["sharded"] / "cospadi.json").read_text())["checksums"])
    assert sorted(calls) == recorded
    calls.clear()
    AutoModelForCausalLM.from_pretrained(saved["sharded"])  # the quantizer checks on its own
    assert sorted(calls) == recorded


def test_folders_without_checksums_still_load(saved, tmp_path):
    folder = shutil.copytree(saved["single"], tmp_path / "old")
    description = json.loads((folder / "cospadi.json").read_text())
    del description["checksums"], description["digest"]  # as the previous version wrote it
    (folder / "cospadi.json").write_text(json.dumps(description))
    flip_a_bit_inside_a_tensor(folder / "model.safetensors")  # no check possible: it loads
    cospadi.load(folder)
    AutoModelForCausalLM.from_pretrained(folder)
    (folder / "cospadi.json").unlink()
    AutoModelForCausalLM.from_pretrained(folder)


def test_an_unlisted_file_or_garbled_description_is_refused(saved, tmp_path):
    folder = shutil.copytree(saved["single"], tmp_path / "mixed")
    description = json.loads((folder / "cospadi.json").read_text())
    description["checksums"] = {"other.safetensors": "0" * 64}
    (folder / "cospadi.json").write_text(json.dumps(folder_checks.with_digest(description)))
    with pytest.raises(CospadiError, match="model.safetensors is not listed in the checksums"):
        cospadi.load(folder)
    (folder / "cospadi.json").write_text("{not json")
    with pytest.raises(CospadiError, match="cospadi.json is not a valid cospadi description"):
        cospadi.load(folder)


def test_threads_below_one_is_one_line(capsys):
    from cospadi import cli

    assert cli.main(["compress", "--threads", "-3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--threads -3 must be at least 1" in err[0]


@pytest.mark.parametrize("command", ["compress", "eval"])
def test_seq_len_beyond_the_models_positions_is_refused_before_any_work(command, cli_files, capsys, monkeypatch,
                                                                         tmp_path):
    from cospadi import api, cli

    never = lambda *a, **k: pytest.fail("evaluated before the check")  # noqa: E731
    monkeypatch.setattr(cli, "perplexity", never)
    monkeypatch.setattr(api, "perplexity_on_texts", never)
    argv = [command, "--model", str(cli_files["model"]), "--data", str(cli_files["txt"]), "--seq-len", "129",
            "--quiet"]
    if command == "compress":
        argv += ["--calib-samples", "2", "--out", str(tmp_path / "out")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--seq-len 129 exceeds the model's 128 positions" in err[0]
    assert not (tmp_path / "out").exists()


def test_a_resume_dir_that_is_a_file_is_refused_before_any_work(cli_files, capsys, monkeypatch, tmp_path,
                                                                 tiny_llama, tiny_ids):
    from cospadi import cli
    from cospadi.pipeline import Recipe, compress_blocks

    blocker = tmp_path / "progress"
    blocker.write_text("not a folder")
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("loaded before the check"))
    argv = ["compress", "--model", str(cli_files["model"]), "--data", str(cli_files["txt"]), "--quiet",
            "--resume-dir", str(blocker)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a file" in err[0]
    monkeypatch.undo()
    import cospadi.pipeline.run as run

    monkeypatch.setattr(run, "capture_block_inputs", lambda *a, **k: pytest.fail("captured before the check"))
    with pytest.raises(CospadiError, match="is a file"):
        compress_blocks(tiny_llama(2), tiny_ids, Recipe("svd-llm", 0.3), progress=False, resume_dir=blocker)
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize("bad,match", [
    (lambda ids: ids[0], "2-D integer tensor"),
    (lambda ids: ids.float(), "2-D integer tensor"),
    (lambda ids: ids[:0], "non-empty"),
    (lambda ids: ids + 10_000, "outside the model's vocabulary"),
    (lambda ids: ids.tolist(), "got list"),
])
def test_the_api_refuses_bad_calibration_ids_in_one_line(bad, match, tiny_llama, tiny_ids):
    from cospadi.layers.base import compressed_modules
    from cospadi.pipeline import Recipe, compress_blocks

    model = tiny_llama(2)
    with pytest.raises(CospadiError, match=match):
        compress_blocks(model, bad(tiny_ids), Recipe("svd-llm", 0.3), progress=False)
    with pytest.raises(CospadiError, match="batch_size 0"):
        compress_blocks(model, tiny_ids, Recipe("svd-llm", 0.3), batch_size=0, progress=False)
    assert not list(compressed_modules(model))


def test_texts_given_as_one_string_are_refused(smollm2):
    from cospadi import api

    model, tokenizer = smollm2
    with pytest.raises(CospadiError, match="not a single string"):
        api.calibration_ids(model, tokenizer, "one long document given as a string", samples=1, seq_len=8)
