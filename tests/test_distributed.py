"""Compression on several processes (pipeline/distributed.py), with real gloo process groups
of 2 ranks in subprocesses: the output folder is byte for byte the one-process folder
(per layer and in groups sharing factors, resumable), a rank that is killed stops the
other with one clear line in bounded time, and rerunning with the resume folder resumes."""

import os
import signal
import socket
import subprocess
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cospadi.pipeline import Recipe, compress_blocks
from cospadi.pipeline.distributed import Ranks
from cospadi.solvers import SolverOptions
from cospadi.storage.checkpoint import save

TINY = dict(vocab_size=200, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
OPTIONS = dict(iters=1, rounds=3, sweeps=1)

DRIVER = """
import os, signal, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from cospadi.errors import CospadiError
from cospadi.pipeline import Recipe, compress_blocks, distributed
from cospadi.solvers import SolverOptions
from cospadi.storage.checkpoint import save
torch.set_num_threads(1)
method, group, out, resume, kill = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] or None, sys.argv[5]
ranks = distributed.init(timeout=60)
if kill and ranks.rank == int(kill):  # dies in the middle of block 1's solves
    share = distributed.Ranks.share
    calls = []
    def dying(self, results, owners):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return share(self, results, owners)
    distributed.Ranks.share = dying
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(**TINY_CONFIG)).eval()
ids = torch.randint(0, 200, (7, 16), generator=torch.Generator().manual_seed(3))
try:
    compress_blocks(model, ids, Recipe(method, 0.3, SolverOptions(**OPTIONS_CONFIG), group), batch_size=2, workers=1,
                    progress=False, resume_dir=resume)
except CospadiError as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(2)
if ranks.rank == 0:
    save(model, None, out, {})
distributed.finish()
""".replace("TINY_CONFIG", repr(TINY)).replace("OPTIONS_CONFIG", repr(OPTIONS))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(tmp_path, method: str, group: int, out, resume="", kill="") -> list[subprocess.Popen]:
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2",
               OMP_NUM_THREADS="1")
    return [subprocess.Popen([sys.executable, str(script), method, str(group), str(out), str(resume), kill],
                             env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for rank in range(2)]


def one_process(out, method: str, group: int) -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    ids = torch.randint(0, 200, (7, 16), generator=torch.Generator().manual_seed(3))
    compress_blocks(model, ids, Recipe(method, 0.3, SolverOptions(**OPTIONS), group), batch_size=2, progress=False)
    save(model, None, out, {})


def same_folders(a, b) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names)


def test_two_gloo_ranks_write_the_one_process_bytes(tmp_path):
    """cospadi in groups of 2: shared dictionaries solved on one rank, broadcast to both."""
    procs = launch(tmp_path, "cospadi", 2, tmp_path / "two", resume=tmp_path / "resume")
    one_process(tmp_path / "one", "cospadi", 2)  # meanwhile
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    assert same_folders(tmp_path / "one", tmp_path / "two")
    assert (tmp_path / "resume" / "progress.json").is_file()  # rank 0 wrote the resume files


def test_a_killed_rank_stops_the_other_with_one_line_and_the_rerun_resumes(tmp_path):
    start = time.monotonic()
    procs = launch(tmp_path, "svd-llm", 1, tmp_path / "two", resume=tmp_path / "resume", kill="1")
    results = [proc.communicate(timeout=120) for proc in procs]
    assert procs[1].returncode == -signal.SIGKILL
    assert procs[0].returncode == 2, results[0][1]
    last = results[0][1].strip().splitlines()[-1]
    assert last.startswith("error: rank 0 lost the other ranks while") and "--resume-dir" in last, last
    assert time.monotonic() - start < 120
    assert not (tmp_path / "two").exists()
    assert '"done": 1' in (tmp_path / "resume" / "progress.json").read_text()  # block 0 committed
    procs = launch(tmp_path, "svd-llm", 1, tmp_path / "two", resume=tmp_path / "resume")
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    one_process(tmp_path / "one", "svd-llm", 1)
    assert same_folders(tmp_path / "one", tmp_path / "two")


def test_batches_and_jobs_are_split_deterministically():
    assert [list(Ranks(r, 3).batches(7)) for r in range(3)] == [[0, 1, 2], [3, 4], [5, 6]]
    assert [list(Ranks(r, 2).batches(1)) for r in range(2)] == [[0], []]
    assert Ranks(0, 2).assign([10, 40, 30, 20]) == [0, 0, 1, 1]  # 40 -> 0, 30 -> 1, 20 -> 1 (30 < 40), 10 -> 0
