"""`--quant` with several processes (issue 14), with real gloo process groups of 2 ranks:
the quantized modules a rank solves reach the other by broadcast and both propagate
through them, so the output must be the one-process run's bytes for every quantized kind
(qdict, qlowrank, qdense). Once through the pipeline (3 configurations in one process
group), once through the command line (`compress --nproc 2 --quant int8`, torchrun)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from cospadi import cli
from cospadi.pipeline import Recipe, compress_blocks
from cospadi.solvers import SolverOptions
from cospadi.solvers.quantize import parse_quant
from cospadi.storage.checkpoint import save
from test_distributed import OPTIONS, free_port, same_folders

CONFIGS = [("cospadi", "int4"), ("svd-llm", "int4"), ("gptq", "int3")]  # qdict, qlowrank, qdense
QUANT_GROUP = 16  # 2 groups of the 32 inputs of attention, 4 of the MLP's 64

DRIVER = """
import sys, torch
sys.path.insert(0, TESTS)
from conftest import TINY
from transformers import LlamaConfig, LlamaForCausalLM
from cospadi.pipeline import Recipe, compress_blocks, distributed
from cospadi.solvers import SolverOptions
from cospadi.solvers.quantize import parse_quant
from cospadi.storage.checkpoint import save
torch.set_num_threads(1)
ranks = distributed.init(timeout=60)
ids = torch.load(sys.argv[1])
for method, quant in CONFIGS:
    torch.manual_seed(0)  # tiny_llama(2, seed=0)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, "num_hidden_layers": 2})).eval()
    recipe = Recipe(method, 0.3, SolverOptions(**OPTIONS), quant=parse_quant(quant, GROUP))
    compress_blocks(model, ids, recipe, batch_size=2, workers=1, progress=False)
    if ranks.rank == 0:
        save(model, None, sys.argv[2] + "/" + method + "-" + quant, {})
distributed.finish()
""".replace("TESTS", repr(str(Path(__file__).parent))).replace("CONFIGS", repr(CONFIGS)) \
    .replace("OPTIONS", repr(OPTIONS)).replace("GROUP", str(QUANT_GROUP))


def two_ranks(tmp_path, ids: torch.Tensor, out: Path) -> None:
    """DRIVER on 2 gloo ranks (subprocesses, as torchrun would set them up)."""
    (tmp_path / "driver.py").write_text(DRIVER)
    torch.save(ids, tmp_path / "ids.pt")
    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2", OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), str(tmp_path / "ids.pt"), str(out)],
                              env={**os.environ, **env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err


def differing_tensors(a: Path, b: Path) -> list[str]:
    """Tensors of model.safetensors that differ between folders a and b in name, dtype,
    shape or any byte (empty: identical)."""
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    differ = sorted(set(x) ^ set(y))
    for name in sorted(set(x) & set(y)):
        p, q = x[name], y[name]
        if p.dtype != q.dtype or p.shape != q.shape or \
                not torch.equal(p.contiguous().view(-1).view(torch.uint8), q.contiguous().view(-1).view(torch.uint8)):
            differ.append(name)
    return differ


def test_two_ranks_write_the_one_process_quantized_bytes(tiny_llama, tiny_ids, tmp_path):
    assert -(-tiny_ids.shape[0] // 2) == 3  # 3 batches of 2 windows: rank 0 owns 2, rank 1 one
    two_ranks(tmp_path, tiny_ids, tmp_path / "two")
    for method, quant in CONFIGS:
        model = tiny_llama(2)
        recipe = Recipe(method, 0.3, SolverOptions(**OPTIONS), quant=parse_quant(quant, QUANT_GROUP))
        compress_blocks(model, tiny_ids, recipe, batch_size=2, progress=False)
        one, two = tmp_path / f"one-{method}", tmp_path / "two" / f"{method}-{quant}"
        save(model, None, one, {})
        assert same_folders(one, two), (method, quant, differing_tensors(one, two))
        assert any(name.endswith("_codes") for name in load_file(two / "model.safetensors"))  # it is quantized


def compress_argv(cli_files, out, *extra) -> list[str]:
    """compress on the tiny CLI model: 6 windows in batches of 2 (3 batches, both ranks own
    some), no evaluation, every matrix at ratio 0.3, int8 factors."""
    return ["compress", "--model", str(cli_files["model"]), "--data", str(cli_files["txt"]), "--calib-samples", "6",
            "--batch-size", "2", "--seq-len", "32", "--eval-windows", "0", "--allocation", "uniform", "--iters", "1",
            "--quant", "int8", "--quant-group", str(QUANT_GROUP), "--out", str(out), "--quiet", *extra]


def test_cli_nproc_2_quant_int8_writes_the_one_process_tensors(cli_files, tmp_path, capsys):
    """REPORT.md and cospadi.json hold timings: the model file and its config must match."""
    assert cli.main(compress_argv(cli_files, tmp_path / "two", "--nproc", "2", "--threads", "1")) == 0, \
        capsys.readouterr().err
    assert cli.main(compress_argv(cli_files, tmp_path / "one")) == 0, capsys.readouterr().err
    one, two = tmp_path / "one", tmp_path / "two"
    assert differing_tensors(one, two) == []
    assert (one / "model.safetensors").read_bytes() == (two / "model.safetensors").read_bytes()
    assert (one / "config.json").read_text() == (two / "config.json").read_text()
    modules = json.loads((two / "config.json").read_text())["quantization_config"]["modules"]
    assert {(spec["type"], spec["bits"], spec["group"]) for spec in modules.values()} == {("qdict", 8, QUANT_GROUP)}
