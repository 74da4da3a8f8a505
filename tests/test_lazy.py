"""Models that do not fit (issue 18): block-by-block loading (pipeline/lazy.py) with the
streamed save (storage/stream.py) writes byte for byte the folder of the in-memory run;
the weights it holds and its peak RSS grow with one block, not with depth; the streamed safetensors
writer lays files out exactly as safetensors does; perplexity forms its logits in chunks
and gives the full-logits value."""

import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

import cospadi
from cospadi.cli import main as cli_main
from cospadi.errors import CospadiError
from cospadi.evaluation import perplexity as perplexity_module
from cospadi.evaluation.perplexity import perplexity
from cospadi.pipeline import Recipe, compress_blocks
from cospadi.pipeline.lazy import LazyModel, StreamedBlocks, compress_folder
from cospadi.solvers import SolverOptions
from cospadi.storage.checkpoint import DESCRIPTION, save
from cospadi.storage.stream import write_safetensors

TINY = dict(vocab_size=200, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, max_position_embeddings=64)


def write_tiny(folder, tokenizer, layers: int, shard: str = "50GB", **config) -> None:
    """A tiny random Llama of `layers` blocks (seed 0) saved in `folder` with `tokenizer`."""
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**{**TINY, "num_hidden_layers": layers, **config})).save_pretrained(
        folder, max_shard_size=shard)
    tokenizer.save_pretrained(folder)


def folder_bytes(folder) -> dict:
    """Every file's bytes; cospadi.json (which holds the run's seconds) by its checksums."""
    out = {p.name: p.read_bytes() for p in folder.iterdir() if p.name != DESCRIPTION}
    out[DESCRIPTION] = json.loads((folder / DESCRIPTION).read_text())["checksums"]
    return out


CASES = {  # method, group size, storage dtype, coef bits, tied embeddings, input shards, output shard size
    "svd-llm-tied": ("svd-llm", 1, None, None, True, "50GB", None),
    "cospadi-groups-bf16-14bit-sharded": ("cospadi", 2, "bfloat16", 14, False, "60KB", "40KB"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_lazy_folder_equals_the_in_memory_folder_byte_for_byte(case, tmp_path, smollm2, tiny_ids):
    method, group, dtype, bits, tied, shard, out_shard = CASES[case]
    _, tokenizer = smollm2
    source = tmp_path / "model"
    write_tiny(source, tokenizer, 4, shard, tie_word_embeddings=tied)
    options = dict(iters=1, rounds=3, sweeps=1)
    model, tok = cospadi.load_model(str(source))
    report = compress_blocks(model, tiny_ids, Recipe(method, 0.3, SolverOptions(**options), group), batch_size=4,
                             progress=False)
    save(model, tok, tmp_path / "eager", report.to_dict(), dtype=dtype, coef_bits=bits, max_shard_size=out_shard)
    lazy = compress_folder(source, tmp_path / "lazy", input_ids=tiny_ids, method=method, ratio=0.3, group_size=group,
                           batch_size=4, progress=False, dtype=dtype, coef_bits=bits, max_shard_size=out_shard,
                           **options)
    eager_files, lazy_files = folder_bytes(tmp_path / "eager"), folder_bytes(tmp_path / "lazy")
    assert sorted(eager_files) == sorted(lazy_files)
    assert [n for n in eager_files if eager_files[n] != lazy_files[n]] == []
    assert len([n for n in eager_files if n.endswith(".safetensors")]) == (1 if out_shard is None else 2)
    assert [m.output_error for m in lazy.matrices] == [m.output_error for m in report.matrices]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # the scratch folder is gone
    reloaded, _ = cospadi.load(tmp_path / "lazy")  # checksums verify
    with torch.no_grad():
        assert torch.equal(reloaded(tiny_ids).logits, model(tiny_ids).logits)


def held_weight_bytes(tmp_path, tokenizer, layers: int, monkeypatch) -> tuple[int, int]:
    """(most bytes of real parameters the lazy run's model held at once, bytes of the
    whole model) for a tiny Llama of `layers` blocks."""
    source = tmp_path / f"model-{layers}"
    write_tiny(source, tokenizer, layers)
    peak, real_load = [0], StreamedBlocks.load

    def load(self, blocks):
        real_load(self, blocks)
        peak[0] = max(peak[0], sum(p.numel() * p.element_size() for p in self.lazy.model.parameters()
                                   if not p.is_meta))
    monkeypatch.setattr(StreamedBlocks, "load", load)
    compress_folder(source, tmp_path / f"out-{layers}", input_ids=torch.randint(0, 200, (4, 16)), method="svd",
                    ratio=0.3, progress=False)
    whole = LazyModel(source)
    return peak[0], sum(p.numel() * p.element_size() for p in whole.model.parameters()) + \
        len(whole.layers) * whole.block_bytes()


def test_held_weights_grow_with_one_block_not_with_depth(tmp_path, smollm2, monkeypatch):
    _, tokenizer = smollm2
    peak2, whole2 = held_weight_bytes(tmp_path, tokenizer, 2, monkeypatch)
    peak8, whole8 = held_weight_bytes(tmp_path, tokenizer, 8, monkeypatch)
    block = (whole8 - whole2) // 6
    assert peak8 == peak2  # compressed blocks are released: the earlier blocks weigh nothing
    assert peak8 < whole2 - block + 1 < whole8  # the head, embeddings and one block


RSS_SCRIPT = """
import sys, torch
import cospadi, cospadi.methods.svd as svd_method, cospadi.pipeline.solve as solve
from cospadi.solvers.factors import LowRankFactors

def shaped_svd(weight, gram, budget):  # the real factors' shapes and dtype without an SVD's seconds per matrix
    return LowRankFactors(weight[:, :budget.rank].double(), torch.ones(budget.rank, weight.shape[1]).double())
svd_method.svd = shaped_svd
solve.output_error = lambda gram, weight, approx: 0.0
torch.set_num_threads(1)
folder, out, mode = sys.argv[1:]
ids = torch.randint(0, 200, (4, 32), generator=torch.Generator().manual_seed(0))
if mode == "lazy":
    from cospadi.pipeline.lazy import compress_folder
    compress_folder(folder, out, input_ids=ids, method="svd", ratio=0.3, progress=False)
else:
    from cospadi.pipeline import Recipe, compress_blocks
    from cospadi.storage.checkpoint import save
    model, tokenizer = cospadi.load_model(folder)
    save(model, tokenizer, out, compress_blocks(model, ids, Recipe("svd", 0.3), progress=False).to_dict())
print(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1])  # kB
"""
BIG = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=8, num_key_value_heads=8, head_dim=128)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status (VmHWM)")
def test_peak_rss_grows_with_one_block_not_with_depth(tmp_path, smollm2):
    """Peak RSS (each run in a fresh process) of 2- and 8-block models with 64 MiB blocks:
    the lazy run of 8 blocks peaks less than 1.5 blocks above the 2-block one, while
    loading whole (the eager run) adds more than 3 of its 6 extra blocks, so holding
    several blocks at once would show. The SVD and the output error are replaced by
    stand-ins of the same shapes in the subprocess: the test measures what the loop
    holds (weights, Grams, activations, stored blocks), not the solver's seconds.

    The peak is the child's VmHWM, not getrusage's ru_maxrss: Linux carries into a
    child's ru_maxrss the resident set of the image it was forked from (here pytest,
    which has just built the 8-block model), which made an earlier version of this test
    fail for the 8-block run alone."""
    _, tokenizer = smollm2
    peaks = {}
    for layers in (2, 8):
        source = tmp_path / f"model-{layers}"
        write_tiny(source, tokenizer, layers, **BIG)
        for mode in ("lazy", "eager"):
            done = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(source), str(tmp_path / f"{mode}-{layers}"),
                                   mode], capture_output=True, text=True)
            assert done.returncode == 0, done.stderr
            peaks[mode, layers] = int(done.stdout.split()[-1]) * 1024
    six = 6 * (4 * 1024 * 1024 + 3 * 1024 * 4096) * 4  # bytes of the 6 extra blocks (384 MiB)
    mib = {f"{mode}-{layers}": peak // 2**20 for (mode, layers), peak in peaks.items()}
    print("peak RSS, MiB:", mib)
    assert peaks["eager", 8] - peaks["eager", 2] > six / 2, mib
    assert peaks["lazy", 8] - peaks["lazy", 2] < six / 4, mib


def test_lazy_refuses_a_damaged_folder_in_one_line(tmp_path, smollm2):
    _, tokenizer = smollm2
    source = tmp_path / "model"
    write_tiny(source, tokenizer, 2)
    tensors = load_file(source / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.q_proj.weight"] = torch.full((32, 32), float("nan"))
    save_file(tensors, str(source / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CospadiError, match="block 0 self_attn.q_proj has non-finite weights"):
        compress_folder(source, tmp_path / "out", input_ids=torch.randint(0, 200, (2, 8)), method="svd", progress=False)
    assert not (tmp_path / "out").exists() and not any(p.name.startswith(".") for p in tmp_path.iterdir())
    tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(32, 32)
    save_file(tensors, str(source / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CospadiError, match="lack model.layers.1.mlp.up_proj.weight"):
        compress_folder(source, tmp_path / "out", input_ids=torch.randint(0, 200, (2, 8)), method="svd", progress=False)


def test_cli_lazy_prints_the_estimate_and_writes_the_folder(tmp_path, smollm2, capsys):
    _, tokenizer = smollm2
    source = tmp_path / "model"
    write_tiny(source, tokenizer, 2, vocab_size=len(tokenizer), max_position_embeddings=128)
    code = cli_main(["compress", "--lazy", "--model", str(source), "--method", "svd-llm", "--seq-len", "32",
                     "--calib-samples", "4", "--eval-windows", "0", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "memory estimate: host" in err
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert cli_main(["compress", "--lazy", "--model", str(source), "--allocation", "knapsack",
                     "--out", str(tmp_path / "out2"), "--quiet"]) == 2
    assert "--lazy works with" in capsys.readouterr().err


# ---------------------------------------------------------------------------- the streamed writer


def test_streamed_writer_lays_files_out_as_safetensors_does(tmp_path):
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.uint8, torch.int64, torch.int32, torch.bool,
              torch.float64, torch.int8, torch.int16]
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for i, dtype in enumerate(dtypes * 2):
        shape = tuple(int(s) for s in torch.randint(0, 5, (i % 3 + 1,), generator=gen))
        tensors[f"t.{(7 * i) % 13}.{dtype}"] = (torch.randn(shape, generator=gen) * 50).to(dtype)
    for metadata in (None, {"format": "pt"}):
        save_file(tensors, str(tmp_path / "reference.safetensors"), metadata=metadata)
        meta = {name: (t.to("meta") if i % 2 else t) for i, (name, t) in enumerate(tensors.items())}
        write_safetensors(meta, tmp_path / "streamed.safetensors", metadata, lambda name: tensors[name])
        assert (tmp_path / "streamed.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()


# ---------------------------------------------------------------------------- chunked perplexity


def full_logits_perplexity(model, windows) -> float:
    with torch.no_grad():
        logprobs = model(windows).logits.double().log_softmax(-1)
    return math.exp(-logprobs[:, :-1].gather(-1, windows[:, 1:, None]).mean().item())


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_chunked_perplexity_equals_the_full_logits_value(family, tiny_model, monkeypatch):
    model = tiny_model(family, vocab_size=1000, **({"final_logit_softcapping": 5.0} if family == "gemma3" else {}))
    windows = torch.randint(0, 1000, (3, 24), generator=torch.Generator().manual_seed(1))
    expected = full_logits_perplexity(model, windows)
    monkeypatch.setattr(perplexity_module, "LOGIT_BYTES", 4 * 1000 * 5)  # 5 positions at a time
    assert perplexity(model, windows, batch_size=2, progress=False) == pytest.approx(expected, rel=1e-6)


def textbook_upper(gram: torch.Tensor, jitter: float = 1e-6, tries: int = 6) -> torch.Tensor:
    """cholesky_upper as first written (before its memory savings): symmetrise, factor,
    else a growing ridge times an identity matrix."""
    g = gram.double()
    g = 0.5 * (g + g.T)
    factor, info = torch.linalg.cholesky_ex(g)
    if int(info) == 0:
        return factor.T.contiguous()
    shift, eps, eye = max(0.0, -float(torch.linalg.eigvalsh(g)[0])), jitter, torch.eye(g.shape[0], dtype=g.dtype)
    for _ in range(tries):
        factor, info = torch.linalg.cholesky_ex(g + (shift + eps * float(torch.diagonal(g).mean())) * eye)
        if int(info) == 0:
            return factor.T.contiguous()
        eps *= 10.0
    raise AssertionError("singular")


@pytest.mark.parametrize("tokens, skew", [(300, 0.0), (60, 0.0), (60, 1e-9)])  # regular; singular; not symmetric
def test_in_place_whitening_keeps_the_bits(tokens, skew):
    """The factor made in place, and svd_llm dropping and refactoring it, give the bits of
    the textbook code: a regular Gram, a singular one (the ridge path), and one that is not
    bit-symmetric (float32 and float64)."""
    from cospadi.budget import LowRankBudget
    from cospadi.solvers import cholesky_upper, svd_llm

    torch.manual_seed(0)
    x = torch.randn(tokens, 96)
    x[:, 5] = 0.0  # a dead input: exact zeros in the Gram
    gram = (x.T @ x).double() + skew * torch.randn(96, 96, dtype=torch.float64)
    weight = torch.randn(96, 40)
    for g in (gram, gram.float()):
        upper = textbook_upper(g)
        assert torch.equal(cholesky_upper(g), upper) and torch.equal(cholesky_upper(g).signbit(), upper.signbit())
        u, sigma, vh = torch.linalg.svd(upper @ weight.double(), full_matrices=False)
        root = sigma[:12].sqrt()
        factors = svd_llm(weight, g, LowRankBudget(96, 40, 12))
        assert torch.equal(factors.left, torch.linalg.solve_triangular(upper, u[:, :12] * root, upper=True))
        assert torch.equal(factors.right, root[:, None] * vh[:12])


def test_grams_widen_in_place_with_the_bits_of_a_float64_sum():
    from cospadi.pipeline.calibrate import add_widened

    torch.manual_seed(0)
    gram, product = torch.randn(300, 300, dtype=torch.float64), torch.randn(300, 300)
    product[0, 0] = -0.0
    expected, got = gram + product.double(), gram.clone()
    add_widened(got, product, rows=64)
    assert torch.equal(got, expected) and torch.equal(got.signbit(), expected.signbit())


def test_each_solved_job_frees_its_gram_and_dense_weights(tiny_llama, tiny_ids, monkeypatch):
    """One worker solves the smallest jobs first, swaps each job's modules into its block
    at once, and drops its Grams and dense weights (the caller's dict no longer holds
    them): after the solve nothing keeps them alive."""
    import weakref

    from cospadi.adapters import adapter_for, decoder_layers
    from cospadi.methods import get_method
    from cospadi.pipeline import solve
    from cospadi.pipeline.calibrate import accumulate_grams
    from cospadi.pipeline.capture import capture_block_inputs

    model = tiny_llama(1)
    layers, adapter = decoder_layers(model), adapter_for(model)
    states, kwargs = capture_block_inputs(model, layers, tiny_ids, 3)
    grams = {0: accumulate_grams(layers[0], adapter, states, kwargs[0])}
    jobs = solve.plan_jobs(layers, [0], adapter, grams, {(0, name): 0.3 for name in adapter.targets})
    assert grams == {0: {}}
    held = [weakref.ref(t) for job in jobs for t in job.grams + [linear.weight for linear in job.linears]]
    sizes, real = [], solve.solve_job
    monkeypatch.setattr(solve, "solve_job", lambda job, *args: sizes.append(job.size) or real(job, *args))
    solved = solve.solve_jobs(jobs, get_method("svd-llm"), SolverOptions(), 1, lambda n: None)
    assert all(ref() is None for ref in held)
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    for job in jobs:
        module = solved[id(job)][0][0]
        assert layers[0].get_submodule(job.members[0][1]) is module and job.grams == [] and job.linears == []
