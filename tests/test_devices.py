"""Device selection and the GPU path. The CUDA tests run only where torch sees a GPU
(they are skipped on the 2-core CI machine); the rest pins down the parsing, the errors
and the moving of nested calibration state on any machine."""

import pytest
import torch

from cospadi.cli import main
from cospadi.devices import resolve_device, to_device, visiting
from cospadi.errors import CospadiError
from cospadi.pipeline import Recipe, compress_blocks
from cospadi.solvers import SolverOptions

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def test_resolve_device_names():
    assert resolve_device(None) is None
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if CUDA else "cpu")


@pytest.mark.parametrize("name,words", [("gpu0", "unknown device"), ("mps", "not supported"),
                                        ("meta", "not supported")])
def test_resolve_device_refuses_what_cannot_run(name, words):
    with pytest.raises(CospadiError, match=words) as info:
        resolve_device(name)
    assert name in str(info.value) and "\n" not in str(info.value)


@pytest.mark.skipif(CUDA, reason="checks the error on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_one_line_cli_error(capsys, tmp_path):
    out = tmp_path / "never"
    code = main(["compress", "--device", "cuda", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: device 'cuda'") and err.count("\n") == 1
    assert not out.exists()


def test_to_device_moves_every_tensor_and_keeps_the_structure():
    a, b, c = torch.ones(2), torch.zeros(3, dtype=torch.long), torch.arange(4.0)
    moved = to_device({"mask": None, "rope": (a, b), "ids": [c], "flag": True, "n": 3},
                      torch.device("meta"))
    assert moved["mask"] is None and moved["flag"] is True and moved["n"] == 3
    assert isinstance(moved["rope"], tuple) and isinstance(moved["ids"], list)
    for tensor, before in ((moved["rope"][0], a), (moved["rope"][1], b), (moved["ids"][0], c)):
        assert tensor.device.type == "meta" and tensor.shape == before.shape and tensor.dtype == before.dtype
    assert a.device.type == "cpu"  # the input is not modified


@needs_cuda
def test_visiting_returns_the_module_home_even_after_an_error():
    module = torch.nn.Linear(4, 4)
    with pytest.raises(RuntimeError, match="boom"), visiting(module, torch.device("cuda")):
        assert module.weight.device.type == "cuda"
        raise RuntimeError("boom")
    assert module.weight.device.type == "cpu"


@needs_cuda
@pytest.mark.parametrize("method,group_size", [("cospadi", 1), ("cospadi", 2), ("svd-llm", 1)])
def test_cuda_compression_matches_cpu_and_leaves_the_model_on_the_cpu(method, group_size, tmp_path, tiny_model,
                                                                      calibration_ids):
    """The same pipeline on CUDA tensors: blocks visit the GPU one group at a time and come
    back; the factors agree with the CPU run up to float rounding (same seeds, same
    algorithm); a resumable CUDA run resumes, but not from a CPU run's folder."""
    def build():
        return tiny_model("llama", layers=4)

    def ids():
        return calibration_ids[:6]

    cpu, gpu = build(), build()
    recipe = Recipe(method, 0.4, SolverOptions(sweeps=2), group_size)
    ref = compress_blocks(cpu, ids(), recipe, batch_size=3, progress=False, resume_dir=tmp_path / "cpu")
    with pytest.raises(CospadiError, match="different run"):  # a CPU run's folder is not resumed on CUDA
        compress_blocks(build(), ids(), recipe, batch_size=3, progress=False, device="cuda",
                        resume_dir=tmp_path / "cpu")
    got = compress_blocks(gpu, ids(), recipe, batch_size=3, progress=False, device="cuda",
                          resume_dir=tmp_path / "resume")
    assert all(p.device.type == "cpu" for p in gpu.parameters())
    assert all(b.device.type == "cpu" for b in gpu.buffers())
    for r, g in zip(ref.matrices, got.matrices):
        assert (r.layer, r.name) == (g.layer, g.name)
        assert g.output_error == pytest.approx(r.output_error, rel=0.05, abs=1e-3)
    with torch.no_grad():
        a, b = cpu(ids()[:2]).logits, gpu(ids()[:2]).logits
    assert (a - b).norm() / a.norm() < 0.05
    again = build()
    resumed = compress_blocks(again, ids(), recipe, batch_size=3, progress=False, device="cuda",
                              resume_dir=tmp_path / "resume")
    assert [m.output_error for m in resumed.matrices] == [m.output_error for m in got.matrices]


@needs_cuda
def test_cuda_solver_benchmark_runs_on_the_gpu():
    from cospadi.bench.solver import compare

    torch.manual_seed(0)
    x = torch.randn(400, 48, dtype=torch.float64)
    weight = torch.randn(48, 40, dtype=torch.float64)
    matrices = {"w": (weight, x.T @ x)}
    configs = {"default": SolverOptions(), "paper": SolverOptions(init="random", iters=5, sweeps=1, power_iters=8)}
    cpu = compare(matrices, ["w"], [0.3], configs, 2)
    gpu = compare(matrices, ["w"], [0.3], configs, 2, device=torch.device("cuda"))
    assert [r["solver"] for r in gpu] == [r["solver"] for r in cpu]
    for c, g in zip(cpu, gpu):
        assert g["error"] == pytest.approx(c["error"], rel=0.02) and g["seconds"] > 0
